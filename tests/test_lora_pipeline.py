"""LoRA in generation: applying a LoRA in place gives the latents of the ``tritonsd merge`` output, and switching
LoRAs in place (two LoRAs and none) gives what a fresh model with that LoRA gives; on CUDA the same through the
graph runner, captured once. Written against ``sampler.pipeline.generate``; the Pipeline will take these over."""

from __future__ import annotations

import pytest
import torch

from tritonsd.model.lora import LoraSpec, LoraState
from tritonsd.model.sd import load_model
from tritonsd.sampler import pipeline as P
from tritonsd.tools.merge import merge_checkpoint
from tritonsd.tools.reference import relative_error

from test_lora import synthetic_modules, write_lora

SETTINGS = dict(prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, sampler="euler_a",
                seed=7)


def latents_of(model, monkeypatch, **kw) -> torch.Tensor:
    """The sampler's final latents of one ``generate`` run (captured on their way to the VAE)."""
    seen = []
    decode = P.decode_latents

    def spy(m, latents):
        seen.append(latents.detach().cpu().clone())
        return decode(m, latents)

    monkeypatch.setattr(P, "decode_latents", spy)
    P.generate(model, P.GenerationSettings(**{**SETTINGS, **kw}))
    monkeypatch.setattr(P, "decode_latents", decode)
    return seen[-1]


def load(fixtures, path=None, device="cpu"):
    return load_model(path or fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", text_heads=2,
                      device=device)


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "second.safetensors"
    return write_lora(path, {name: parts for name, _, parts, _, _ in synthetic_modules()})


def test_applying_equals_merging(fixtures, tmp_path, monkeypatch):
    lora = fixtures / "lora-sd1-tiny.safetensors"
    merged_path = tmp_path / "merged.safetensors"
    merge_checkpoint(fixtures / "sd1-tiny.safetensors", [LoraSpec(lora, 0.7)], merged_path)
    model = load(fixtures)
    plain = latents_of(model, monkeypatch)
    LoraState(model).apply([LoraSpec(lora, 0.7)])
    applied = latents_of(model, monkeypatch)
    merged = latents_of(load(fixtures, merged_path), monkeypatch)
    assert relative_error(applied, merged) <= 1e-5
    assert relative_error(applied, plain) > 1e-3, "the LoRA changes the result"


def test_switching_equals_fresh_runs(fixtures, second_lora, monkeypatch):
    first = fixtures / "lora-sd1-tiny.safetensors"
    choices = {"first": [LoraSpec(first, 0.7)], "second": [LoraSpec(second_lora, 0.8, 0.5)], "none": []}
    fresh = {}
    for name, specs in choices.items():
        model = load(fixtures)
        LoraState(model).apply(specs)
        fresh[name] = latents_of(model, monkeypatch)
    model = load(fixtures)
    state = LoraState(model)
    for name in ["first", "second", "none", "first", "none"]:
        state.apply(choices[name])
        assert torch.equal(latents_of(model, monkeypatch), fresh[name]), f"after switching to {name}"
    assert not torch.equal(fresh["first"], fresh["second"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_switching_under_cuda_graphs_captures_once(fixtures, second_lora, monkeypatch):
    first = fixtures / "lora-sd1-tiny.safetensors"
    choices = {"first": [LoraSpec(first, 0.7)], "second": [LoraSpec(second_lora, 0.8, 0.5)], "none": []}
    model = load(fixtures, device="cuda")
    state = LoraState(model)
    runner = None
    for name in ["first", "second", "none", "first"]:
        state.apply(choices[name])
        graphed = latents_of(model, monkeypatch)
        eager = latents_of(model, monkeypatch, use_graphs=False)
        runner = runner or model.graph_runner.runner
        assert model.graph_runner.runner is runner and runner.captures == 1, "one capture serves every switch"
        assert relative_error(graphed, eager) <= 1e-3, f"graph replay after switching to {name}"
    state.clear()
