"""Prompt editing through the Pipeline: each sampler step's UNet call gets the conditioning of the schedule entry
AUTOMATIC1111 would use at that step (the fixtures' ``prompt_schedules``, made by A1111's own parser); the
graph runner's loop (its eager path on the CPU) reads the same per-step rows; and whole generations at sizes
that are multiples of 8 but not of 64 run for SD1, SD2 and SDXL."""

from __future__ import annotations

import pytest
import torch

from tritonsd.sampler.graph import GraphRunner, tables_on_device
from tritonsd.sampler.wiring import sigma_denoiser


def a1111_entry(schedule: list, step: int) -> int:
    """``prompt_parser.reconstruct_cond_batch``: the first entry whose end step is >= the denoiser's step."""
    for index, (end_at, _text) in enumerate(schedule):
        if step <= end_at:
            return index
    return 0


def recorded_contexts(pipe, monkeypatch, settings, runner: list | None = None) -> tuple[list, torch.Tensor]:
    """The context of every UNet call of one run (cond rows only: CFG 1), and the latents; with ``runner`` (a
    list) the loop runs through a CPU GraphRunner, appended to it."""
    seen = []
    unet = pipe.unet

    def spy(x, t, context, y=None):
        seen.append(context[0].clone())
        return unet(x, t, context, y)

    monkeypatch.setattr(pipe, "unet", spy)
    if runner is not None:
        runner.append(GraphRunner(tables_on_device(sigma_denoiser(spy, pipe.config), "cpu"), "cpu"))
        monkeypatch.setattr(pipe, "_graph_runner", lambda spec, s: runner[0])
    cond = pipe.encode(settings)
    x = pipe.denoise(pipe.prepare_latents(settings), cond, settings)
    monkeypatch.undo()
    return seen, x


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2v-tiny"])
def test_each_step_uses_the_scheduled_conditioning(pipes, reference, monkeypatch, name):
    pipe = pipes(name)
    _, meta = reference(f"prompts-{name}")
    for case in meta["prompt_schedules"]:
        schedule = case["schedule"]
        settings = pipe.settings(prompt=case["prompt"], steps=case["steps"], sampler="euler", cfg_scale=1.0,
                                 width=64, height=64, seed=1)
        entries = pipe._encode_side(case["prompt"], settings, is_negative=False)
        assert entries.texts == [text for _, text in schedule], case["prompt"]
        seen, _ = recorded_contexts(pipe, monkeypatch, settings)
        assert len(seen) == case["steps"]
        for step, context in enumerate(seen):
            want = a1111_entry(schedule, step)
            assert torch.equal(context, entries.cond.context[want].float()), f"{case['prompt']!r} step {step}"
        first_use = {}
        for step in range(case["steps"]):
            first_use.setdefault(schedule[a1111_entry(schedule, step)][1], seen[step])
        contexts = list(first_use.values())  # the texts really differ in what the UNet sees
        assert all(not torch.equal(a, b) for i, a in enumerate(contexts) for b in contexts[i + 1:])


def test_graph_runner_reads_the_per_step_rows(pipes, monkeypatch):
    """The runner's loop (eager on the CPU, the body a CUDA graph captures) gives the eager pipeline's per-step
    conditioning and latents, bit for bit."""
    pipe = pipes("sd1-tiny")
    settings = pipe.settings(prompt="a [cat:dog:0.5] on a mat", negative_prompt="[blurry|sharp]", steps=4,
                             sampler="euler_a", cfg_scale=1.0, width=64, height=64, seed=3)
    eager_seen, eager = recorded_contexts(pipe, monkeypatch, settings)
    made = []
    seen, through = recorded_contexts(pipe, monkeypatch, settings, made)
    assert made[0].captures == 1 and next(iter(made[0].entries)).per_step
    assert torch.equal(through, eager)
    assert all(torch.equal(a, b) for a, b in zip(seen, eager_seen)) and len(seen) == len(eager_seen) == 4


def test_cond_and_uncond_of_different_lengths(pipes, monkeypatch):
    """A prompt of two chunks against an empty negative prompt: two UNet calls per step (A1111's default), or
    one batched call with the negative padded by empty chunks (pad_cond_uncond), which changes the image."""
    pipe = pipes("sd1-tiny")
    long_prompt = " ".join(["cat"] * 80)
    calls = []
    unet = pipe.unet
    monkeypatch.setattr(pipe, "unet", lambda x, t, context, y=None: (calls.append(tuple(context.shape)),
                                                                       unet(x, t, context, y))[1])
    common = dict(prompt=long_prompt, steps=2, sampler="euler", width=64, height=64, seed=4)
    apart = pipe.generate(pipe.settings(**common))
    assert calls == [(1, 154, 32), (1, 77, 32)] * 2
    calls.clear()
    padded = pipe.generate(pipe.settings(**common, pad_cond_uncond=True))
    assert calls == [(2, 154, 32)] * 2
    assert not torch.equal(apart, padded)


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("width, height", [(128, 96), (680, 384)])  # 1360x768 at half scale: latent 85x48
def test_sizes_that_are_multiples_of_8(pipes, name, width, height):
    pipe = pipes(name)
    images = pipe.generate(pipe.settings(prompt="a red circle", steps=1, sampler="euler", width=width,
                                         height=height, seed=0))
    assert images.shape == (1, 3, height, width) and torch.isfinite(images).all()
