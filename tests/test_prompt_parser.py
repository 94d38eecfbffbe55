"""Prompt syntax against AUTOMATIC1111 v1.10.1: every parse and schedule of the fixtures exact, A1111's own
doctest examples, and further schedules produced by A1111's lark grammar (run separately with lark 1.1.2; the same
under several Python hash seeds) that the fixtures lack."""

from __future__ import annotations

import json

import pytest

from tritonsd.prompt.parser import PromptSyntaxError, parse_prompt_attention, prompt_schedules, schedule_index

PROMPT_REFERENCES = ("prompts-sd1-tiny", "prompts-sd2v-tiny", "prompts-sdxl-tiny", "ti-sd1-tiny", "ti-sdxl-tiny")


def _fixture_parses(fixtures):
    """(prompt, parse) of every prompt in the prompt / TI references (every tower's record)."""
    out = []
    for name in PROMPT_REFERENCES:
        meta = json.loads((fixtures / f"{name}.reference.json").read_text())
        for case in meta["cases"]:
            for key in ("prompts", "chunks", "clip_l", "open_clip_g"):
                for p in case.get(key, []):
                    if isinstance(p, dict) and "parse_prompt_attention" in p:
                        out.append((p["prompt"], p["parse_prompt_attention"]))
    return out


def test_every_fixture_parse_is_exact(fixtures):
    parses = _fixture_parses(fixtures)
    assert len(parses) >= 40
    for prompt, expected in parses:
        assert parse_prompt_attention(prompt) == expected, prompt


def test_every_fixture_schedule_is_exact(fixtures):
    count = 0
    for name in ("prompts-sd1-tiny", "prompts-sd2v-tiny"):
        meta = json.loads((fixtures / f"{name}.reference.json").read_text())
        for s in meta["prompt_schedules"]:
            got = prompt_schedules([s["prompt"]], s["steps"])[0]
            assert [list(x) for x in got] == s["schedule"], s["prompt"]
            count += 1
    assert count == 8


# parse_prompt_attention's docstring in A1111 (exact float values included)
@pytest.mark.parametrize("text, expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
])
def test_a1111_docstring_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    # hand-derived: nesting multiplies; spaces around the weight are allowed (v1.10.1's regex)
    ("((a:1.5) b)", [["a", 1.5 * 1.1], [" b", 1.1]]),
    ("[[x]]", [["x", (1 / 1.1) * (1 / 1.1)]]),
    ("(x : 0.5 )", [["x ", 0.5]]),
    ("a BREAK b BREAK c", [["a", 1.0], ["BREAK", -1], ["b", 1.0], ["BREAK", -1], ["c", 1.0]]),
    ("BREAK", [["", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),  # the quirk: a weighted literal BREAK
    ("aBREAKb", [["aBREAKb", 1.0]]),
    ("", [["", 1.0]]),
    ("a) b] c", [["a) b] c", 1.0]]),  # closing brackets without an opener are text
    ("(a:2", [["a:2", 1.1]]),  # unbalanced: runs to the end with 1.1
    ("\\\\", [["\\", 1.0]]),
    ("🐱 (猫:1.2) café", [["🐱 ", 1.0], ["猫", 1.2], [" café", 1.0]]),
])
def test_constructed_parses(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_malformed_weight_is_one_line_error():
    # A1111 raises float("1.2.3") ValueError with a traceback; we give one line
    with pytest.raises(PromptSyntaxError) as e:
        parse_prompt_attention("(a:1.2.3)")
    assert "\n" not in str(e.value) and "1.2.3" in str(e.value)


# Produced by A1111 v1.10.1's get_learned_conditioning_prompt_schedules (its lark grammar, lark 1.1.2), steps=10
A1111_SCHEDULES = [
    ('a [b:3]', [[3, 'a '], [10, 'a b']]),
    ('a [b: 3]', [[3, 'a '], [10, 'a b']]),
    ('a [[[b]]:2]', [[2, 'a '], [10, 'a [[b]]']]),
    ('[(a:2):3]', [[3, ''], [10, '(a:2)']]),
    ('a [b : c : 1] d', [[1, 'a b  d'], [10, 'a  c  d']]),
    ('a[b:[c:d:2]:1]e', [[1, 'abe'], [2, 'ace'], [10, 'ade']]),
    ('a [unbalanced', [[10, 'a [unbalanced']]),
    ('a [b:.5] c', [[5, 'a  c'], [10, 'a b c']]),
    ('((a][:b:c [d:3]', [[3, '((a][:b:c '], [10, '((a][:b:c d']]),
    ('[a|(b:1.1)]', [[1, 'a'], [2, '(b:1.1)'], [3, 'a'], [4, '(b:1.1)'], [5, 'a'], [6, '(b:1.1)'], [7, 'a'], [8, '(b:1.1)'], [9, 'a'], [10, '(b:1.1)']]),
    ('[fe|]male', [[1, 'female'], [2, 'male'], [3, 'female'], [4, 'male'], [5, 'female'], [6, 'male'], [7, 'female'], [8, 'male'], [9, 'female'], [10, 'male']]),
    ('[fe|||]male', [[1, 'female'], [2, 'male'], [3, 'male'], [4, 'male'], [5, 'female'], [6, 'male'], [7, 'male'], [8, 'male'], [9, 'female'], [10, 'male']]),
    ('a [b:1.5] c', [[10, 'a  c']]),
    ('[cat|dog|bird] on a [red:blue:0.3] mat', [[1, 'cat on a red mat'], [2, 'dog on a red mat'], [3, 'bird on a red mat'], [4, 'cat on a blue mat'], [5, 'dog on a blue mat'], [6, 'bird on a blue mat'], [7, 'cat on a blue mat'], [8, 'dog on a blue mat'], [9, 'bird on a blue mat'], [10, 'cat on a blue mat']]),
    ('a [b::4] c', [[4, 'a b c'], [10, 'a  c']]),
    ('[x:-1] y', [[10, 'x y']]),
    ('a | b', [[10, 'a | b']]),
    ('(a|b)', [[10, '(a|b)']]),
    ('a [b:3e0] c', [[3, 'a  c'], [10, 'a b c']]),
    ('a [b:1.] c', [[10, 'a  c']]),
    ('back\\slash [x:2]', [[2, 'back\\slash '], [10, 'back\\slash x']]),
    ('x [(a:1.2) b:c:0.6] y', [[6, 'x (a:1.2) b y'], [10, 'x c y']]),
    ('[[a|b]:[c|d]:5]', [[1, 'a'], [2, 'b'], [3, 'a'], [4, 'b'], [5, 'a'], [6, 'd'], [7, 'c'], [8, 'd'], [9, 'c'], [10, 'd']]),
    ('trail \\', [[10, 'trail \\']]),
    ('a\\[b:3]', [[10, 'a\\[b:3]']]),
    ('(a:[b:c:2])', [[2, '(a:b)'], [10, '(a:c)']]),
    ('[a:b:0]', [[10, 'b']]),
    ('[a:b:999]', [[10, 'a']]),
    ('a [b:c:  4  ] d', [[4, 'a b d'], [10, 'a c d']]),
    ('[:x:2]', [[2, ''], [10, 'x']]),
]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULES)
def test_schedules_match_a1111_grammar(prompt, expected):
    assert [list(x) for x in prompt_schedules([prompt], 10)[0]] == expected


def test_hires_schedules():
    # A1111 docstring: with hires_steps, fractions count from 1.0 and integers from the base steps
    got = prompt_schedules(["a [b:.5] c", "a [b:1.5] c", "a [b:12] c"], 10, 10)
    assert [[list(x) for x in s] for s in got] == [[[10, "a b c"]], [[5, "a  c"], [10, "a b c"]],
                                                     [[2, "a  c"], [10, "a b c"]]]


def test_schedule_index_follows_reconstruct_cond_batch():
    # A1111's denoiser step counter starts at 0 and takes the first entry with step <= end_at_step
    schedule = prompt_schedules(["a [cat:dog:0.5] on a mat"], 10)[0]
    assert [schedule_index(schedule, s) for s in range(10)] == [0] * 6 + [1] * 4
    alternating = prompt_schedules(["[a|b] portrait"], 10)[0]
    assert [alternating[schedule_index(alternating, s)][1] for s in range(4)] == \
        ["a portrait", "a portrait", "b portrait", "a portrait"]


def test_bad_input_never_crashes():
    for text in ["[", "]", "(((", "[a:b:c:d]", "[a|b", "|", "\\", "[a:1e999]", "[a:b:-1e999]", "🐱" * 50,
                 "[" * 200 + "a" + "]" * 200, "(a:" * 50]:
        schedule = prompt_schedules([text], 20)[0]
        assert schedule and schedule[-1][0] == 20
        parse_prompt_attention(text)
