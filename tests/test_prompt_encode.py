"""Batched prompt conditioning against AUTOMATIC1111's own outputs on the tiny checkpoints (float32, relative
error within FP32_BOUND), and properties of the original's algorithm checked on prompts the fixtures lack."""

from __future__ import annotations

import pytest
import torch

from _prompt_models import tiny_model
from conftest import FP32_BOUND
from tritonsd.prompt.chunks import PromptTooLongError
from tritonsd.prompt.encode import PromptEncodeError, encode_prompts, encode_schedule
from tritonsd.prompt.tokenizer import BOS_ID, EOS_ID
from tritonsd.testing.reference import relative_error


def _prompts(case):
    return [p["prompt"] if isinstance(p, dict) else p for p in case["prompts"]]


@pytest.mark.parametrize("model_name, ref_name, count", [("sd1-tiny", "prompts-sd1-tiny", 16),
                                                         ("sd2v-tiny", "prompts-sd2v-tiny", 14)])
def test_sd12_conditionings_match_a1111(fixtures, reference, model_name, ref_name, count):
    tensors, meta = reference(ref_name)
    model = tiny_model(fixtures, model_name)
    assert len(meta["cases"]) == count
    for case in meta["cases"]:
        out = encode_prompts(model, _prompts(case), clip_skip=case.get("clip_skip", 1))
        ref = tensors[case["tensor"]]
        assert out.context.shape == ref.shape, case["name"]
        err = relative_error(out.context, ref)
        assert err < FP32_BOUND, f"{case['name']}: {err}"
        assert out.vector is None


def test_sdxl_conditionings_match_a1111(fixtures, reference):
    tensors, meta = reference("prompts-sdxl-tiny")
    model = tiny_model(fixtures, "sdxl-tiny")
    assert len(meta["cases"]) == 8
    for case in meta["cases"]:
        out = encode_prompts(model, _prompts(case), width=case["width"], height=case["height"],
                             is_negative=case["is_negative_prompt"])
        for key, got in (("crossattn", out.context), ("vector", out.vector)):
            ref = tensors[f"{case['name']}.{key}"]
            assert got.shape == ref.shape, (case["name"], key)
            if ref.abs().max() == 0:
                assert got.abs().max() == 0, (case["name"], key)
            else:
                err = relative_error(got, ref)
                assert err < FP32_BOUND, f"{case['name']}.{key}: {err}"


def test_clip_skip_is_ignored_for_open_clip(fixtures):
    model = tiny_model(fixtures, "sd2v-tiny")
    a = encode_prompts(model, ["a red ball"], clip_skip=1).context
    b = encode_prompts(model, ["a red ball"], clip_skip=2).context
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_name", ["sd1-tiny", "sd2v-tiny"])
def test_unweighted_short_prompt_equals_the_plain_encoder(fixtures, model_name):
    """With all weights 1 the rescale is exactly 1-ish: one chunk equals the model's own (independently tested)
    77-token encoder output on an unseen prompt."""
    model = tiny_model(fixtures, model_name)
    prompt = "an old lighthouse on a cliff at dusk, oil painting"
    ours = encode_prompts(model, [prompt]).context
    plain = model.get_learned_conditioning([prompt])
    assert relative_error(ours, plain) < FP32_BOUND


def test_long_prompt_chunks_are_encoded_independently(fixtures):
    model = tiny_model(fixtures, "sd1-tiny")
    embedder = model.cond_stage_model
    cat = embedder.tokenizer.encode("cat")[0]
    out = encode_prompts(model, ["cat " * 80]).context
    assert out.shape[1] == 154
    first = embedder.encode_tokens(torch.tensor([[BOS_ID] + [cat] * 75 + [EOS_ID]]))
    second = embedder.encode_tokens(torch.tensor([[BOS_ID] + [cat] * 5 + [EOS_ID] * 71]))
    assert relative_error(out[:, :77], first) < FP32_BOUND
    assert relative_error(out[:, 77:], second) < FP32_BOUND


def test_emphasis_original_by_hand(fixtures):
    """A1111's EmphasisOriginal on an unseen weighted prompt: z * m, rescaled to the unweighted mean."""
    model = tiny_model(fixtures, "sd1-tiny")
    embedder = model.cond_stage_model
    ids = embedder.tokenizer.encode("a blue house")
    z = embedder.encode_tokens(torch.tensor([[BOS_ID] + ids + [EOS_ID] * (76 - len(ids))])).double()
    m = torch.ones(1, 77, dtype=torch.float64)
    m[0, 2] = 1.5  # "blue"
    expected = z * m[..., None]
    expected = expected * (z.mean() / expected.mean())
    got = encode_prompts(model, ["a (blue:1.5) house"]).context
    assert relative_error(got, expected) < FP32_BOUND


def test_prompts_in_one_batch_share_the_rescale(fixtures):
    model = tiny_model(fixtures, "sd1-tiny")
    alone = encode_prompts(model, ["a (red:1.4) ball"]).context
    together = encode_prompts(model, ["a (red:1.4) ball", "a green cube"]).context
    assert together.shape[0] == 2
    assert not torch.allclose(alone[0], together[0], rtol=0, atol=1e-6)


def test_sdxl_empty_negative_is_zero_text(fixtures):
    model = tiny_model(fixtures, "sdxl-tiny")
    pos = encode_prompts(model, [""], width=768, height=512)
    neg = encode_prompts(model, [""], width=768, height=512, is_negative=True)
    assert neg.context.abs().max() == 0
    pooled = model.conditioner.embedders[1].pooled_dim
    assert neg.vector[:, :pooled].abs().max() == 0
    assert torch.equal(neg.vector[:, pooled:], pos.vector[:, pooled:])
    nonempty = encode_prompts(model, ["a dog"], width=768, height=512, is_negative=True)
    assert torch.equal(nonempty.context, encode_prompts(model, ["a dog"], width=768, height=512).context)


def test_bad_requests_are_one_line(fixtures):
    model = tiny_model(fixtures, "sd1-tiny")
    for kwargs in ({"clip_skip": 0}, {"clip_skip": 99}):
        with pytest.raises(PromptEncodeError) as e:
            encode_prompts(model, ["a"], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(PromptEncodeError):
        encode_prompts(model, [])
    with pytest.raises(PromptTooLongError) as e:
        encode_prompts(model, ["cat " * 1001])
    assert "1001" in str(e.value) and "\n" not in str(e.value)
    out = encode_prompts(model, ["🐱 (((unbalanced", "BREAK", "[a:b:0.5]"])
    assert out.context.shape == (3, 77, 32) and torch.isfinite(out.context).all()


def test_prompt_editing_steps_use_the_fixture_schedules(fixtures, reference):
    """Records which conditioning each sampler step gets and checks it against A1111's schedules (steps=10):
    step s (0-based, as A1111's denoiser counter) uses the first entry with s <= end_step."""
    _, meta = reference("prompts-sd1-tiny")
    model = tiny_model(fixtures, "sd1-tiny")
    for s in meta["prompt_schedules"]:
        sched = encode_schedule(model, s["prompt"], s["steps"])
        expected_texts = [text for _, text in s["schedule"]]
        assert sched.texts == expected_texts and sched.end_steps == [e for e, _ in s["schedule"]]
        together = encode_prompts(model, expected_texts).context  # one batch, as A1111
        used = []
        table, _ = sched.table(s["steps"])
        for step in range(s["steps"]):
            context, _ = sched.at(step)
            j = next(i for i, (end, _) in enumerate(s["schedule"]) if step <= end)
            assert torch.equal(context[0], together[j]) and torch.equal(table[step], together[j])
            used.append(sched.texts[sched.index_at(step)])
        assert len(used) == s["steps"]
    editing = encode_schedule(model, "a [cat:dog:0.5] on a mat", 10)
    assert [editing.texts[editing.index_at(k)] for k in range(10)] == ["a cat on a mat"] * 6 + ["a dog on a mat"] * 4
