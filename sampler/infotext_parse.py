"""Reading AUTOMATIC1111's ``parameters`` infotext back (v1.10.1 ``infotext_utils.parse_generation_parameters``).

The text is the prompt (possibly several lines), optionally ``Negative prompt: ...`` lines, and a last line of
``Key: value`` pairs (values may be JSON-quoted). As A1111: the last line counts as parameters only when it holds
at least 3 pairs (else it is part of the prompt); ``WxH`` values split into ``Key-1`` / ``Key-2``; missing
``Clip skip`` means 1, missing ``RNG`` means GPU, missing ``Schedule type`` means Automatic; unknown keys are kept.

``parse_infotext`` gives that raw ``{key: str}`` dict; ``generation_settings`` turns it into typed settings for the
pipeline, ignoring (with one note each) values that do not parse, as A1111's paste does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tritonsd.sampler.rng import RNGError, source_from_infotext
from tritonsd.sampler.seeds import SEED_RANGE

# A1111's pattern for the pairs of the last line. ``re`` runs it in quadratic time on a long line that holds no
# pair (every start position rescans the run after it, holding the GIL): ``param_pairs`` gives its findall()
# result in one pass; this stays as the definition it is tested against.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
MAX_INFOTEXT_CHARS = 64 * 1024  # A1111 writes a few KiB; the project's prompts are at most 10,000 characters
_KEY_CHARS = re.compile(r"[\w \-/]+")  # the key's character class (\w, space, '-', '/')
_WORD = re.compile(r"\w")


class InfotextError(ValueError):
    """Text that cannot be read as an infotext at all (one line)."""


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def param_pairs(line: str) -> list[tuple[str, str]]:
    """``RE_PARAM.findall(line)`` in linear time: the same (key, raw value) pairs.

    A match at position p: optional whitespace, a key (a word character, then at least one of ``[\\w -/]``) that
    runs to the end of its run of key characters, which must be followed by ':' (a shorter key would be followed by
    a key character, never ':'), optional whitespace, then a JSON-like quoted value (at least one character or
    escape pair, closed by '"' and followed by ',' or the end) or else everything up to the next ','. Where no
    match starts, findall tries the next position; the tables below answer each try in constant time.
    """
    n = len(line)
    if n == 0:
        return []
    key_end = [0] * (n + 1)  # key_end[i]: the end of the run of key characters starting at i (i when none)
    for m in _KEY_CHARS.finditer(line):
        for i in range(m.start(), m.end()):
            key_end[i] = m.end()
    for i in range(n + 1):
        key_end[i] = max(key_end[i], i)
    space_end = list(range(n + 1))  # space_end[i]: the first non-whitespace index from i
    for i in range(n - 1, -1, -1):
        if line[i].isspace():
            space_end[i] = space_end[i + 1]
    close = [-1] * (n + 2)  # close[i]: the closing '"' a quoted value's characters starting at i reach, or -1
    for i in range(n - 1, -1, -1):
        c = line[i]
        if c == '"':
            close[i] = i
        elif c == "\\":
            close[i] = close[i + 2] if i + 1 < n and line[i + 1] != "\n" else -1
        else:
            close[i] = close[i + 1]
    next_comma = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        next_comma[i] = i if line[i] == "," else next_comma[i + 1]

    def at_end(i: int) -> bool:  # the pattern's '$'
        return i == n or (i == n - 1 and line[i] == "\n")

    out, p = [], 0
    while p < n:
        q = space_end[p]
        r = key_end[q + 1] if q + 1 <= n else q + 1
        if q >= n or not _WORD.match(line, q) or r < q + 2 or r >= n or line[r] != ":":
            p += 1
            continue
        v = space_end[r + 1]
        end = None
        if v + 1 < n and line[v] == '"' and line[v + 1] != '"' and close[v + 1] != -1:
            c = close[v + 1]
            if c + 1 < n and line[c + 1] == ",":
                value, end = line[v:c + 1], c + 2
            elif at_end(c + 1):
                value, end = line[v:c + 1], c + 1
        if end is None:
            comma = next_comma[v]
            value, end = line[v:comma], min(comma + 1, n)
        out.append((line[q:r], value))
        p = end
    return out


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters`` (without styles / hypernetwork / hires back-compat)."""
    if not isinstance(text, str):
        raise InfotextError(f"an infotext must be text, got {type(text).__name__}")
    if len(text) > MAX_INFOTEXT_CHARS:
        raise InfotextError(f"the infotext is {len(text)} characters long; the limit is {MAX_INFOTEXT_CHARS}")
    *lines, last = text.strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    res: dict[str, str] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        value = _unquote(value)
        m = RE_IMAGESIZE.match(value)
        if m is not None:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value
    res.setdefault("Clip skip", "1")
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    res.setdefault("Emphasis", "Original")
    return res


# key -> (setting name, converter)
def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _seed(v: str) -> int:
    n = int(v)
    if n < 0 or n >= SEED_RANGE:
        raise ValueError("outside 0..2**64-1")
    return n


def _strength(v: str) -> float:
    x = float(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError("outside 0..1")
    return x


def _count(v: str) -> int:
    n = int(v)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def _positive_real(v: str) -> float:
    x = _finite(v)
    if x <= 0:
        raise ValueError("must be above 0")
    return x


def _choice(*labels: str, flag: bool = False):
    """A converter of one of webui's radio labels to its index (``type="index"`` radios); ``flag``: of two labels,
    as False / True (the settings' fields that are flags)."""
    def convert(v: str) -> int | bool:
        if v not in labels:
            raise ValueError(f"not one of {', '.join(labels)}")
        return bool(labels.index(v)) if flag else labels.index(v)
    return convert


def _bool(v: str) -> bool:
    """A1111's checkbox values: "True" / "False"."""
    if v not in ("True", "False"):
        raise ValueError("not True or False")
    return v == "True"


def _finite(v: str) -> float:
    x = float(v)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError("not finite")
    return x


_TYPED = {
    "Steps": ("steps", _positive_int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule_type", str),
    "CFG scale": ("cfg_scale", _finite),
    "Seed": ("seed", _seed),
    "Size-1": ("width", _positive_int),
    "Size-2": ("height", _positive_int),
    "Clip skip": ("clip_skip", _positive_int),
    "RNG": ("rng", source_from_infotext),
    "Variation seed": ("subseed", _seed),
    "Variation seed strength": ("subseed_strength", _strength),
    "Emphasis": ("emphasis", str),
    "Denoising strength": ("strength", _strength),
    "Hires upscale": ("hr_scale", _positive_real),
    "Hires resize-1": ("hr_resize_x", _count),
    "Hires resize-2": ("hr_resize_y", _count),
    "Hires steps": ("hr_second_pass_steps", _count),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler", str),
    "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
    "Hires checkpoint": ("hr_checkpoint_name", str),  # "name [hash]"; webui's absent key: "Use same checkpoint"
    "Tiling": ("tiling", _bool),
    # img2img's inpainting (webui's ``StableDiffusionProcessingImg2Img.init`` writes them; its UI's radios read
    # them back by label, ``type="index"``)
    "Conditional mask weight": ("inpainting_mask_weight", _strength),  # 9-channel models, any mode
    "Mask blur": ("mask_blur", _count),
    "Mask mode": ("inpainting_mask_invert", _choice("Inpaint masked", "Inpaint not masked", flag=True)),
    "Inpaint area": ("inpaint_full_res", _choice("Whole picture", "Only masked", flag=True)),
    "Masked area padding": ("inpaint_full_res_padding", _count),
    "Masked content": ("inpainting_fill", _choice("fill", "original", "latent noise", "latent nothing")),
}
HIRES_KEYS = ("Hires upscale", "Hires upscaler", "Hires resize-1")  # with "Denoising strength": hires fix was on


def _printable(text: str, limit: int = 60) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def generation_settings(infotext: str | dict[str, str]) -> dict[str, Any]:
    """Typed settings: prompt, negative_prompt, steps, sampler, schedule_type, cfg_scale, seed, width, height,
    clip_skip, rng ("nv" / "cpu"), subseed, subseed_strength, emphasis, tiling, strength (``Denoising strength``) and the
    hires fields (hr_scale, hr_resize_x / _y, hr_second_pass_steps, hr_upscaler, hr_sampler, hr_scheduler,
    hr_prompt, hr_negative_prompt, hr_checkpoint_name), the inpainting's (mask_blur, inpainting_mask_invert,
    inpaint_full_res, inpaint_full_res_padding, inpainting_fill), where present; ``enable_hr``: whether the text says hires fix was on (webui's
    rule: a denoising strength and a hires size or upscaler); ``extra``: every other key (raw strings); ``notes``:
    one line per value that did not parse (that field is left out)."""
    raw = parse_infotext(infotext) if isinstance(infotext, str) else dict(infotext)
    out: dict[str, Any] = {"prompt": raw.get("Prompt", ""), "negative_prompt": raw.get("Negative prompt", ""),
                           "extra": {}, "notes": []}
    for key, value in raw.items():
        if key in ("Prompt", "Negative prompt"):
            continue
        if key not in _TYPED:
            out["extra"][key] = value
            continue
        name, convert = _TYPED[key]
        try:
            out[name] = convert(value.strip())
        except (ValueError, RNGError) as e:
            reason = str(e).splitlines()[0] if str(e) else "malformed"
            out["notes"].append(f"infotext field {_printable(key)!s}: {_printable(value)!r} ignored ({reason})")
    out["enable_hr"] = "Denoising strength" in raw and any(k in raw for k in HIRES_KEYS)
    units = control_units(out["extra"], out["notes"])
    if units:
        out["controlnet"] = units
    return out


RE_CONTROL_KEY = re.compile(r"^ControlNet (\d+)$")
CONTROL_LABELS = {"Module": "module", "Model": "model", "Weight": "weight", "Resize Mode": "resize_mode",
                  "Processor Res": "processor_res", "Threshold A": "threshold_a", "Threshold B": "threshold_b",
                  "Guidance Start": "guidance_start", "Guidance End": "guidance_end", "Pixel Perfect": "pixel_perfect",
                  "Control Mode": "control_mode"}


def control_units(extra: dict, notes: list[str]) -> list[dict]:
    """The ``ControlNet N`` keys (taken out of ``extra``) as ControlUnit fields, in N's order, read as the
    extension's ``ControlNetUnit.parse``: ``Key: value`` items split at ',' and ': ', values "True" / "False",
    ints, floats, else text; unknown keys ignored. A unit that does not parse is left out, with a note."""
    units = []
    for key in [k for k in extra if RE_CONTROL_KEY.match(k)]:
        text = extra.pop(key)
        try:
            fields = {}
            for item in text.split(","):
                label, value = item.strip().split(": ")
                if label in CONTROL_LABELS:
                    fields[CONTROL_LABELS[label]] = _unit_value(value)
            if "model" not in fields:
                raise ValueError("no Model")
        except ValueError as e:
            notes.append(f"infotext field {_printable(key)}: {_printable(text)!r} ignored ({e})")
            continue
        units.append((int(RE_CONTROL_KEY.match(key).group(1)), fields))
    return [fields for _, fields in sorted(units, key=lambda u: u[0])]


def _unit_value(value: str):
    """The extension's ``parse_value``."""
    if value in ("True", "False"):
        return value == "True"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


# Infotext keys whose presence asks A1111 for something tritonsd does not implement (the image would differ);
# ``--infotext`` / ``--from-png`` / the server's ``infotext`` refuse them unless told to ignore them
UNSUPPORTED_KEYS = ("Face restoration", "Seed resize from", "Refiner", "Refiner switch at", "Script",
                    "ADetailer model")


def unsupported_keys(parsed: dict) -> list[str]:
    """The ``UNSUPPORTED_KEYS`` a ``generation_settings`` result holds among its ``extra`` keys."""
    return [k for k in UNSUPPORTED_KEYS if k in parsed.get("extra", {})]


__all__ = ["InfotextError", "UNSUPPORTED_KEYS", "generation_settings", "param_pairs", "parse_infotext",
           "unsupported_keys"]
