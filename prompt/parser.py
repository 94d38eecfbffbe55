"""AUTOMATIC1111 (v1.10.1) prompt syntax: emphasis weights and prompt-editing schedules.

* ``parse_prompt_attention``: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``, escapes ``\\( \\) \\[ \\] \\\\``, unbalanced
  brackets running to the end, ``BREAK`` separators; the same regex scanner as A1111's.
* ``prompt_schedules``: ``[from:to:when]``, ``[to:when]``, ``[from::when]``, ``[a|b]`` with the results of
  A1111's ``get_learned_conditioning_prompt_schedules``. A1111 parses with a lark Earley grammar; this is a small
  recursive-descent parser of the same grammar::

      start:     (prompt | one of "[]():")*
      prompt:    (emphasized | scheduled | alternate | plain)*
      emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
      scheduled: "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
      alternate: "[" prompt ("|" [prompt])+ "]"
      plain:     ([^\\[]():|] | \\ any-but-newline)+

  A text the grammar does not accept (a ``|`` outside an alternation, a trailing ``\\``) is used literally at
  every step, as in A1111. Where the grammar is ambiguous (a bracket that can be either literal text or part of
  a construct), lark's choice varies with Python's hash seed; we always take the construct.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tritonsd.escape import quote


class PromptSyntaxError(ValueError):
    """A prompt A1111 itself would fail on (e.g. an emphasis weight that is not a number: ``(x:1.2.3)``), or one
    past this runtime's bounds (brackets nested deeper than MAX_NESTING, a weight past MAX_EMPHASIS)."""


MAX_NESTING = 256  # brackets open at once: the editing parser recurses twice per level (3,000 overflowed the stack)
MAX_EMPHASIS = 1000.0  # |weight| of any text after nesting: 1.1 ** 72; larger ones overflow half precision


def check_nesting(text: str) -> None:
    """PromptSyntaxError when more than MAX_NESTING brackets are open at once (escaped ones are text)."""
    depth = deepest = 0
    escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]" and depth:
            depth -= 1
    if deepest > MAX_NESTING:
        raise PromptSyntaxError(f"brackets nested {deepest} deep; the limit is {MAX_NESTING}")


# --------------------------------------------------------------------------------------------------------------
# Emphasis

_RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ("BREAK", -1)  # a parse entry with this text and weight closes the current chunk


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PromptSyntaxError(f"emphasis weight {text!r} is not a number") from None
    if not abs(value) <= MAX_EMPHASIS:
        raise PromptSyntaxError(f"emphasis weight {quote(text, 40)} is outside -{MAX_EMPHASIS:g}..{MAX_EMPHASIS:g}")
    return value


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` with runs of equal weight merged, exactly as A1111.

    ``BREAK`` in unweighted text gives ``["BREAK", -1]``; inside brackets that marker's -1 gets multiplied, so it
    ends up as the literal word with a negative weight (A1111's quirk, kept). An empty prompt is ``[["", 1.0]]``.
    """
    check_nesting(text)
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, piece in enumerate(_RE_BREAK.split(part)):
                if i > 0:
                    res.append(list(BREAK_MARKER))
                res.append([piece, 1.0])

    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    for piece, weight in res:
        if not abs(weight) <= MAX_EMPHASIS:
            raise PromptSyntaxError(f"the emphasis of {quote(piece, 20)} multiplies to {weight:.4g}, outside "
                                    f"-{MAX_EMPHASIS:g}..{MAX_EMPHASIS:g}")

    i = 0  # merge runs of identical weights
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def is_break(text: str, weight: float) -> bool:
    return text == BREAK_MARKER[0] and weight == BREAK_MARKER[1]


# --------------------------------------------------------------------------------------------------------------
# Prompt-editing grammar

_RE_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_RE_WS = re.compile(r"\s+")
# lark's common.SIGNED_NUMBER: [+-] (INT exp | DECIMAL exp? | INT); the longest form wins
_RE_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)")


@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list  # list of node lists (None for an empty option)


class _Parser:
    def __init__(self, text: str):
        self.text = text

    def prompt(self, i: int) -> tuple[list, int]:
        """The longest run of prompt elements from i (never fails; may be empty)."""
        nodes: list = []
        while i < len(self.text):
            c = self.text[i]
            if c == "(":
                got = self.emphasized_round(i)
            elif c == "[":
                got = self.square(i)
            else:
                m = _RE_PLAIN.match(self.text, i)
                got = (m.group(0), m.end()) if m else None
            if got is None:
                break
            node, i = got
            nodes.append(node)
        return nodes, i

    def _char(self, i: int, c: str) -> bool:
        return i < len(self.text) and self.text[i] == c

    def emphasized_round(self, i: int):
        inner, j = self.prompt(i + 1)
        if self._char(j, ")"):
            return ["(", inner, ")"], j + 1
        if self._char(j, ":"):
            inner2, k = self.prompt(j + 1)
            if self._char(k, ")"):
                return ["(", inner, ":", inner2, ")"], k + 1
        return None

    def _when(self, i: int):
        """``[ws] NUMBER [ws] "]"`` from i -> (number text, index after "]") or None."""
        m = _RE_WS.match(self.text, i)
        i = m.end() if m else i
        n = _RE_NUMBER.match(self.text, i)
        if not n:
            return None
        j = n.end()
        m = _RE_WS.match(self.text, j)
        j = m.end() if m else j
        return (n.group(0), j + 1) if self._char(j, "]") else None

    def square(self, i: int):
        first, j = self.prompt(i + 1)
        if self._char(j, "]"):
            return ["[", first, "]"], j + 1
        if self._char(j, "|"):
            options = [first]
            while self._char(j, "|"):
                option, j = self.prompt(j + 1)
                options.append(option or None)
            return (_Alternate(options), j + 1) if self._char(j, "]") else None
        if self._char(j, ":"):
            when = self._when(j + 1)
            if when is not None:  # [to:when]
                return _Scheduled(None, first, when[0]), when[1]
            second, k = self.prompt(j + 1)
            if self._char(k, ":"):
                when = self._when(k + 1)
                if when is not None:  # [from:to:when]
                    return _Scheduled(first, second, when[0]), when[1]
        return None

    def start(self) -> list | None:
        """The whole text as nodes, or None where the grammar does not accept it."""
        nodes: list = []
        i = 0
        while i < len(self.text):
            prompt, i = self.prompt(i)
            nodes.extend(prompt)
            if i < len(self.text):
                if self.text[i] not in "[]():":
                    return None  # "|" outside an alternation, or a lone "\"
                nodes.append(self.text[i])
                i += 1
        return nodes


def _walk(nodes):
    """Every _Scheduled / _Alternate in the tree, in any branch."""
    for node in nodes:
        if isinstance(node, list):
            yield from _walk(node)
        elif isinstance(node, _Scheduled):
            yield node
            if node.before:
                yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                if option:
                    yield from _walk(option)


def _text_at(nodes, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            out.append(_text_at(node, step))
        elif isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= node.when else node.after
            out.append(_text_at(chosen, step))
        else:
            option = node.options[(step - 1) % len(node.options)]
            out.append(_text_at(option or [], step))
    return "".join(out)


def _end_step(number: str, steps: int, int_offset: int, flt_offset: float, old: bool) -> int:
    v = float(number)
    if old:
        v = v * steps if v < 1 else v
    elif "." in number:
        v = (v - flt_offset) * steps
    else:
        v = v - int_offset
    if math.isinf(v):  # A1111 raises OverflowError here; clamp instead
        return steps if v > 0 else -(2 ** 63)
    return min(steps, int(v))


def prompt_schedule(prompt: str, base_steps: int, hires_steps: int | None = None,
                    use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]`` for one prompt: ``text`` is used for the steps up to and including end_step.

    With ``hires_steps`` (A1111's hires pass), integers count from ``base_steps`` and fractions from 1.0.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps
    check_nesting(prompt)
    tree = _Parser(prompt).start()
    if tree is None:
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            node.when = _end_step(node.number, steps, int_offset, flt_offset, use_old_scheduling)
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))
    return [(t, _text_at(tree, t)) for t in sorted(ends)]


def prompt_schedules(prompts: list[str], steps: int, hires_steps: int | None = None,
                     use_old_scheduling: bool = False) -> list[list[tuple[int, str]]]:
    """``get_learned_conditioning_prompt_schedules``: one schedule per prompt."""
    cache: dict[str, list[tuple[int, str]]] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = prompt_schedule(p, steps, hires_steps, use_old_scheduling)
    return [list(cache[p]) for p in prompts]


def schedule_index(schedule: list[tuple[int, str]], step: int) -> int:
    """Index of the schedule entry the sampler uses at ``step``, A1111's ``reconstruct_cond_batch``: ``step`` is
    the 0-based count of denoiser calls so far (A1111's ``CFGDenoiser.step``); the first entry whose end_step >=
    step, else the first. (So ``[a:b:5]`` of 10 steps uses ``a`` for steps 0..5 and ``b`` for 6..9.)"""
    for index, (end, _) in enumerate(schedule):
        if step <= end:
            return index
    return 0


__all__ = ["MAX_EMPHASIS", "MAX_NESTING", "PromptSyntaxError", "check_nesting", "is_break", "parse_prompt_attention",
           "prompt_schedule", "prompt_schedules", "schedule_index"]
