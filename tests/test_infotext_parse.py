"""Reading A1111 ``parameters`` infotexts back (A1111 v1.10.1 parse_generation_parameters rules), including the
writer's own output (tools/png.py) and malformed or unknown fields."""

from __future__ import annotations

import pytest

from tritonsd.sampler.infotext_parse import InfotextError, generation_settings, parse_infotext
from tritonsd.sampler.infotext import Infotext

A1111_TEXT = """masterpiece, (a cat:1.2) on a [red:blue:0.5] mat
second prompt line
Negative prompt: blurry, lowres
watermark
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 832x1216, \
Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Clip skip: 2, RNG: CPU, Variation seed: 77, \
Variation seed strength: 0.25, TI hashes: "easyneg: 6f6d3a9e1b2c, style: aa11bb22cc33", Lora hashes: "x: 1", \
Version: v1.10.1"""


def test_a1111_text_raw_fields():
    raw = parse_infotext(A1111_TEXT)
    assert raw["Prompt"] == "masterpiece, (a cat:1.2) on a [red:blue:0.5] mat\nsecond prompt line"
    assert raw["Negative prompt"] == "blurry, lowres\nwatermark"
    assert raw["Size-1"] == "832" and raw["Size-2"] == "1216"
    assert raw["TI hashes"] == "easyneg: 6f6d3a9e1b2c, style: aa11bb22cc33"  # JSON-quoted value unquoted
    assert raw["Version"] == "v1.10.1" and raw["Lora hashes"] == "x: 1"


def test_a1111_text_typed_settings():
    s = generation_settings(A1111_TEXT)
    assert (s["steps"], s["sampler"], s["schedule_type"], s["cfg_scale"]) == (28, "DPM++ 2M", "Karras", 6.5)
    assert (s["seed"], s["width"], s["height"], s["clip_skip"]) == (3141592653, 832, 1216, 2)
    assert (s["rng"], s["subseed"], s["subseed_strength"]) == ("cpu", 77, 0.25)
    assert s["extra"]["Model hash"] == "31e35c80fc" and "Version" in s["extra"]
    assert s["notes"] == []


def test_defaults_for_missing_fields():
    s = generation_settings("a cat\nSteps: 20, Seed: 1, Size: 512x512")
    assert s["clip_skip"] == 1 and s["rng"] == "nv" and s["schedule_type"] == "Automatic"
    assert generation_settings("a cat\nRNG: GPU, Steps: 4, Seed: 2")["rng"] == "nv"  # GPU noise == nv


def test_a_last_line_with_fewer_than_three_pairs_is_prompt():
    raw = parse_infotext("a photo\nlighting: soft, mood: calm")
    assert raw["Prompt"] == "a photo\nlighting: soft, mood: calm"
    assert "lighting" not in raw


def test_round_trip_of_our_writer():
    text = Infotext(prompt="a (red:1.3) fox", negative_prompt="blur", steps=12, sampler="Euler a",
                    cfg_scale=7.5, seed=99, width=640, height=384, model_hash="abcdef0123", model="tiny",
                    extra={"Clip skip": 2, "RNG": "CPU", "Variation seed": 5,
                           "Variation seed strength": 0.4}).render()
    s = generation_settings(text)
    assert (s["prompt"], s["negative_prompt"], s["steps"], s["sampler"], s["cfg_scale"], s["seed"]) == \
        ("a (red:1.3) fox", "blur", 12, "Euler a", 7.5, 99)
    assert (s["width"], s["height"], s["clip_skip"], s["rng"], s["subseed"], s["subseed_strength"]) == \
        (640, 384, 2, "cpu", 5, 0.4)


def test_malformed_fields_are_noted_not_fatal():
    s = generation_settings("p\nSteps: many, Seed: -3, CFG scale: inf, Size: 0x64, RNG: TPU, Clip skip: 1.5, "
                            "Variation seed strength: 2, Sampler: Euler")
    assert s["sampler"] == "Euler" and s["height"] == 64
    for key in ("steps", "seed", "cfg_scale", "width", "rng", "clip_skip", "subseed_strength"):
        assert key not in s
    assert len(s["notes"]) == 7 and all("\n" not in n for n in s["notes"])


def test_unknown_and_odd_text_never_crashes():
    for text in ["", "\n\n", "Steps: 5", ": : :", "a\nB: 1, C: \"unterminated, D: 3", "\x00\x1b[31m",
                 "🐱\nSteps: 🐱, Seed: 🐱, Size: 🐱x🐱", "a\n" + "K: v, " * 500]:
        s = generation_settings(text)
        assert isinstance(s["prompt"], str)
        for note in s["notes"]:
            assert "\n" not in note and "\x1b" not in note
    with pytest.raises(InfotextError):
        parse_infotext(b"bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- issue 26: linear time, A1111's results


def test_param_pairs_is_a1111s_findall():
    """``param_pairs`` against A1111's own regex (RE_PARAM, kept as the definition) on generated lines built from
    the characters that matter to it: key characters, whitespace, ':', ',', quotes, escapes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tritonsd.sampler.infotext_parse import RE_PARAM, param_pairs

    chars = st.sampled_from(list("ab_Z9 \t-/:,\"\\\n\u00a0é.x"))

    @settings(max_examples=3000, deadline=None, derandomize=True, database=None)
    @given(st.lists(chars, max_size=40).map("".join))
    def same(line):
        assert param_pairs(line) == RE_PARAM.findall(line)

    same()
    for line in ['Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512',
                 'A: "x, y", B: "q\\"r", C: "unterminated, D: 4', 'ab:"x' * 50, '  key - a/b :  v ,k2:"",k3:1']:
        assert param_pairs(line) == RE_PARAM.findall(line)


def test_a_long_line_without_pairs_is_one_pass():
    """32,000 key characters froze the server for 8 s under A1111's regex (quadratic: every start position
    rescans the run). Counted, not timed: the scanner visits each start position once."""
    from tritonsd.sampler import infotext_parse

    calls = []
    real = infotext_parse._WORD.match

    class Counting:
        def match(self, text, pos):
            calls.append(pos)
            return real(text, pos)

    line = "a" * 32_000
    old, infotext_parse._WORD = infotext_parse._WORD, Counting()
    try:
        assert infotext_parse.param_pairs(line) == []
    finally:
        infotext_parse._WORD = old
    assert len(calls) <= len(line)


def test_infotext_over_the_cap_is_one_line():
    from tritonsd.sampler.infotext_parse import MAX_INFOTEXT_CHARS

    with pytest.raises(InfotextError, match="limit") as e:
        parse_infotext("a" * (MAX_INFOTEXT_CHARS + 1))
    assert "\n" not in str(e.value)


def test_rng_field_is_written_as_webui_writes_randn_source():
    """webui v1.10.1's ``create_infotext``: ``"RNG": opts.randn_source if opts.randn_source != "GPU" else None``;
    our sources by webui's names (nv is its "NV", cpu its "CPU", gpu its "GPU"), read back by them."""
    from tritonsd.sampler.rng import RNGError, infotext_rng, source_from_infotext

    assert [infotext_rng(s) for s in ("nv", "cpu", "gpu", "NV")] == ["NV", "CPU", None, "NV"]  # gpu: no device needed
    with pytest.raises(RNGError):
        infotext_rng("mps")
    assert [source_from_infotext(v) for v in ("NV", "CPU", "GPU", None)] == ["nv", "cpu", "nv", "nv"]
    assert generation_settings("a\nSteps: 4, Seed: 2, RNG: NV")["rng"] == "nv"


def test_inpainting_keys_read_back_as_webuis_radios():
    """img2img's inpainting keys (``StableDiffusionProcessingImg2Img.init``) by the labels of webui's radios
    (``type="index"``): Mask mode, Inpaint area, Masked content; Mask blur and padding as numbers."""
    from tritonsd.sampler.settings import fields_from_infotext

    text = ("a\nSteps: 4, Sampler: Euler, Seed: 2, Size: 64x64, Denoising strength: 0.45, Mask mode: Inpaint not "
            "masked, Mask blur: 6, Inpaint area: Only masked, Masked area padding: 12, Masked content: latent noise")
    fields, notes = fields_from_infotext(text)
    assert not notes
    assert {k: fields[k] for k in ("strength", "mask_blur", "inpainting_mask_invert", "inpaint_full_res",
                                   "inpaint_full_res_padding", "inpainting_fill")} == \
        {"strength": 0.45, "mask_blur": 6, "inpainting_mask_invert": True, "inpaint_full_res": True,
         "inpaint_full_res_padding": 12, "inpainting_fill": 2}
    fill = {label: fields_from_infotext(f"a\nSteps: 4, Seed: 2, Masked content: {label}")[0]["inpainting_fill"]
            for label in ("fill", "original", "latent noise", "latent nothing")}
    assert fill == {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}
    whole = fields_from_infotext("a\nSteps: 4, Seed: 2, Inpaint area: Whole picture, Mask mode: Inpaint masked")[0]
    assert (whole["inpaint_full_res"], whole["inpainting_mask_invert"]) == (False, False)
    bad, notes = fields_from_infotext("a\nSteps: 4, Seed: 2, Masked content: lava")
    assert "inpainting_fill" not in bad and len(notes) == 1
    hires = fields_from_infotext("a\nSteps: 4, Seed: 2, Denoising strength: 0.5, Hires upscale: 2, Mask blur: 3")[0]
    assert "mask_blur" not in hires  # a hires run's strength is the second pass's; no mask there
