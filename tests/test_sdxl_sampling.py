"""SDXL txt2img through the pipeline's own functions against sgm's ``do_sample`` runs in the fixtures:
conditioning (with the zeroed unconditional text), LegacyDDPM sigmas and the quantised timesteps, Euler (CFG 7.5
and 5.0) and DPM++ 2M (CFG 7.5) latents, per-step denoised and decoded images, from the stored ``sample.x_T``."""

from __future__ import annotations

import pytest
import torch

from tritonsd.model.load import load_model
from tritonsd import pipeline as P
from tritonsd.sampler import registry
from tritonsd.sampler import wiring as W
from tritonsd.sampler.settings import GenerationSettings, SettingsError, side_multiple
from tritonsd.testing.groups import StoredNoise
from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND

RUNS = {"euler_cfg7p5": ("euler", 7.5), "euler_cfg5p0": ("euler", 5.0), "dpmpp2m_cfg7p5": ("dpmpp_2m", 7.5)}


def check(actual, ref, what):
    err = relative_error(actual, ref)
    assert err <= FP32_BOUND, f"{what}: relative error {err:.3g} > {FP32_BOUND}"


@pytest.fixture(scope="module")
def sdxl(fixtures, reference):
    pipe = P.Pipeline(load_model(fixtures / "sdxl-tiny.safetensors", fixtures / "sdxl-tiny.yaml", text_heads=2))
    ref, meta = reference("sdxl-tiny")
    h, w = meta["sample_target_size"]
    assert meta["sample_original_size"] == [h, w] and meta["sample_crop_coords_top_left"] == [0, 0]
    c = pipe.encode(pipe.settings(prompt=meta["sample_prompt"], negative_prompt=meta["sample_negative_prompt"],
                                  batch_size=ref["sample.x_T"].shape[0], width=w, height=h))
    return pipe, ref, c.cond, c.uncond


def test_conditioning(sdxl):
    _, ref, cond, uncond = sdxl
    check(cond["context"], ref["sample.crossattn"], "sample.crossattn")
    check(cond["y"], ref["sample.vector"], "sample.vector")
    assert torch.equal(uncond["context"], ref["sample.uc_crossattn"])  # zeros: the negative prompt is ignored
    check(uncond["y"], ref["sample.uc_vector"], "sample.uc_vector")


def test_real_negative_prompt_is_encoded(sdxl):
    pipe, ref, cond, _ = sdxl
    model = pipe.model
    uncond = pipe.encode(pipe.settings(prompt="a red circle", negative_prompt="blurry", width=128, height=128)).uncond
    crossattn, vector = model.get_learned_conditioning(["blurry"], original_size=(128, 128),
                                                       crop_coords_top_left=(0, 0), target_size=(128, 128))
    assert torch.equal(uncond["context"], crossattn) and torch.equal(uncond["y"], vector)
    assert uncond["context"].abs().max() > 0


def test_sigmas_and_timesteps_exact(sdxl):
    pipe, ref, _, _ = sdxl
    for sampler in ("euler", "dpmpp_2m"):
        sigmas = W.make_schedule(pipe.config, registry.get(sampler), 10, karras=False)
        assert torch.equal(sigmas, ref["sample.sigmas"])
        assert torch.equal(W.sigma_denoiser(None, pipe.config).sigma_to_idx(sigmas[:-1]), ref["sample.timesteps"])


@pytest.mark.parametrize("run", list(RUNS))
def test_sampling(sdxl, run):
    pipe, ref, cond, uncond = sdxl
    sampler, scale = RUNS[run]
    settings = pipe.settings(sampler=sampler, karras=False, steps=10, cfg_scale=scale, batch_size=2, width=128,
                             height=128, seed=0)
    latents = pipe.prepare_latents(settings, StoredNoise(ref["sample.x_T"]))
    assert torch.equal(latents.schedule, ref["sample.sigmas"])
    check(latents.x, ref["sample.x_T"] * (1 + ref["sample.sigmas"][0].double() ** 2).sqrt().float(), "start latent")
    denoised = []
    x = pipe.denoise(latents, P.Conditioning(cond, uncond), settings, callback=lambda d: denoised.append(d["denoised"]))
    check(x, ref[f"{run}.latents"], f"{run}.latents")
    check(torch.stack(denoised), ref[f"{run}.denoised"], f"{run}.denoised")
    check(pipe.decode(x), ref[f"{run}.image"], f"{run}.image")


def test_sizes(sdxl):
    """Any multiple of 8 (the UNet resizes where an upsampled tensor and its skip differ, as A1111)."""
    pipe = sdxl[0]
    assert side_multiple(pipe.config) == 8
    s = pipe.settings()
    assert (s.width, s.height) == (1024, 1024)
    assert pipe.settings(width=80, height=64).width == 80
    with pytest.raises(SettingsError, match="multiple of 8"):
        pipe.settings(GenerationSettings(width=84, height=64))


@pytest.mark.parametrize("sampler, extra", [("dpmpp_2m", {"karras": True, "negative_prompt": "blurry"}),
                                            ("ddim", {}),
                                            ("euler_a", {"init_image": torch.zeros(1, 3, 64, 64), "strength": 0.5})])
def test_generate_smoke(sdxl, sampler, extra):
    """generate() end to end on SDXL at 64x64 (latent 8x8): finite, deterministic."""
    pipe = sdxl[0]
    settings = pipe.settings(prompt="a red circle", sampler=sampler, steps=2, width=64, height=64, seed=1, **extra)
    out = pipe.generate(settings)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert torch.equal(pipe.generate(settings), out)
