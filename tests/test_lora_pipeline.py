"""LoRA in generation: applying a LoRA in place gives the latents of the ``tritonsd merge`` output, and switching
LoRAs in place (two LoRAs and none) gives what a fresh model with that LoRA gives; on CUDA the same through the
graph runner, captured once. Through the Pipeline: ``set_loras`` and the stages, stopping at the latents."""

from __future__ import annotations

import pytest
import torch

from tritonsd.lora.apply import LoraSpec, LoraState
from tritonsd.model.load import load_model
from tritonsd import pipeline as P
from tritonsd.tools.merge import merge_checkpoint
from tritonsd.testing.reference import relative_error

from test_lora import synthetic_modules, write_lora

SETTINGS = dict(prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, sampler="euler_a",
                seed=7)


def latents_of(pipe, **kw) -> torch.Tensor:
    """The sampler's final latents of one run: the Pipeline's stages up to ``denoise``."""
    settings = pipe.settings(**{**SETTINGS, **kw})
    latents = pipe.denoise(pipe.prepare_latents(settings), pipe.encode(settings), settings)
    return latents.detach().cpu().clone()


def load(fixtures, path=None, device="cpu", dtype=torch.float32):
    return P.Pipeline(load_model(path or fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml",
                                 text_heads=2, device=device, dtype=dtype))


@pytest.fixture(scope="module")
def second_lora(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "second.safetensors"
    return write_lora(path, {name: parts for name, _, parts, _, _ in synthetic_modules()})


def test_applying_equals_merging(fixtures, tmp_path):
    lora = fixtures / "lora-sd1-tiny.safetensors"
    merged_path = tmp_path / "merged.safetensors"
    merge_checkpoint(fixtures / "sd1-tiny.safetensors", [LoraSpec(lora, 0.7)], merged_path)
    pipe = load(fixtures)
    plain = latents_of(pipe)
    report = pipe.set_loras([(lora, 0.7)])
    assert report.weights_changed == 61 and report.pristine_bytes > 0
    applied = latents_of(pipe)
    merged = latents_of(load(fixtures, merged_path))
    assert relative_error(applied, merged) <= 1e-5
    assert relative_error(applied, plain) > 1e-3, "the LoRA changes the result"


def test_switching_equals_fresh_runs(fixtures, second_lora):
    first = fixtures / "lora-sd1-tiny.safetensors"
    choices = {"first": [LoraSpec(first, 0.7)], "second": [LoraSpec(second_lora, 0.8, 0.5)], "none": []}
    fresh = {}
    for name, specs in choices.items():
        pipe = load(fixtures)
        LoraState(pipe.model).apply(specs)
        fresh[name] = latents_of(pipe)
    pipe = load(fixtures)
    for name in ["first", "second", "none", "first", "none"]:
        pipe.set_loras(choices[name])
        assert torch.equal(latents_of(pipe), fresh[name]), f"after switching to {name}"
    assert not torch.equal(fresh["first"], fresh["second"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_switching_under_cuda_graphs_captures_once(fixtures, second_lora):
    first = fixtures / "lora-sd1-tiny.safetensors"
    choices = {"first": [LoraSpec(first, 0.7)], "second": [LoraSpec(second_lora, 0.8, 0.5)], "none": []}
    pipe = load(fixtures, device="cuda", dtype=torch.float16)  # half precision: no fp32 compile storm
    runner = None
    for name in ["first", "second", "none", "first"]:
        pipe.set_loras(choices[name])
        graphed = latents_of(pipe)
        eager = latents_of(pipe, use_graphs=False)
        fresh = load(fixtures, device="cuda", dtype=torch.float16)
        LoraState(fresh.model).apply(choices[name])
        runner = runner or pipe._runner
        assert pipe._runner is runner and runner.captures == 1, "one capture serves every switch"
        assert relative_error(graphed, eager) <= 1e-2, f"graph replay after switching to {name}"
        assert relative_error(graphed, latents_of(fresh, use_graphs=False)) <= 1e-2, f"{name}: a fresh eager run"
    pipe.set_loras([])
