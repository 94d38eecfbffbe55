"""SDXL txt2img through the pipeline's own functions against sgm's ``do_sample`` runs in the fixtures:
conditioning (with the zeroed unconditional text), LegacyDDPM sigmas and the quantised timesteps, Euler (CFG 7.5
and 5.0) and DPM++ 2M (CFG 7.5) latents, per-step denoised and decoded images, from the stored ``sample.x_T``."""

from __future__ import annotations

import pytest
import torch

from tritonsd.model.sd import load_model
from tritonsd.sampler import pipeline as P
from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND

RUNS = {"euler_cfg7p5": ("euler", 7.5), "euler_cfg5p0": ("euler", 5.0), "dpmpp2m_cfg7p5": ("dpmpp_2m", 7.5)}


def check(actual, ref, what):
    err = relative_error(actual, ref)
    assert err <= FP32_BOUND, f"{what}: relative error {err:.3g} > {FP32_BOUND}"


@pytest.fixture(scope="module")
def sdxl(fixtures, reference):
    model = load_model(fixtures / "sdxl-tiny.safetensors", fixtures / "sdxl-tiny.yaml", text_heads=2)
    ref, meta = reference("sdxl-tiny")
    h, w = meta["sample_target_size"]
    assert meta["sample_original_size"] == [h, w] and meta["sample_crop_coords_top_left"] == [0, 0]
    cond, uncond = P.encode_prompts(model, meta["sample_prompt"], meta["sample_negative_prompt"],
                                    ref["sample.x_T"].shape[0], 7.5, h, w)
    return model, ref, cond, uncond


def test_conditioning(sdxl):
    _, ref, cond, uncond = sdxl
    check(cond["context"], ref["sample.crossattn"], "sample.crossattn")
    check(cond["y"], ref["sample.vector"], "sample.vector")
    assert torch.equal(uncond["context"], ref["sample.uc_crossattn"])  # zeros: the negative prompt is ignored
    check(uncond["y"], ref["sample.uc_vector"], "sample.uc_vector")


def test_real_negative_prompt_is_encoded(sdxl):
    model, ref, cond, _ = sdxl
    _, uncond = P.encode_prompts(model, "a red circle", "blurry", 1, 7.5, 128, 128)
    crossattn, vector = model.get_learned_conditioning(["blurry"], original_size=(128, 128),
                                                       crop_coords_top_left=(0, 0), target_size=(128, 128))
    assert torch.equal(uncond["context"], crossattn) and torch.equal(uncond["y"], vector)
    assert uncond["context"].abs().max() > 0


def test_sigmas_and_timesteps_exact(sdxl):
    model, ref, _, _ = sdxl
    for sampler in ("euler", "dpmpp_2m"):
        sigmas = P.make_schedule(model, sampler, 10, karras=False)
        assert torch.equal(sigmas, ref["sample.sigmas"])
        assert torch.equal(P.sigma_denoiser(model).sigma_to_idx(sigmas[:-1]), ref["sample.timesteps"])


@pytest.mark.parametrize("run", list(RUNS))
def test_sampling(sdxl, run):
    model, ref, cond, uncond = sdxl
    sampler, scale = RUNS[run]
    sigmas = P.make_schedule(model, sampler, 10, karras=False)
    x = P.txt2img_start(model, sigmas, ref["sample.x_T"])
    check(x, ref["sample.x_T"] * (1 + ref["sample.sigmas"][0].double() ** 2).sqrt().float(), "start latent")
    denoised = []
    latents = P.sample_latents(model, sampler, sigmas, x, scale, cond, uncond,
                               callback=lambda d: denoised.append(d["denoised"]))
    check(latents, ref[f"{run}.latents"], f"{run}.latents")
    check(torch.stack(denoised), ref[f"{run}.denoised"], f"{run}.denoised")
    check(P.decode_latents(model, latents), ref[f"{run}.image"], f"{run}.image")


def test_sizes(sdxl):
    """Latent sides must be multiples of 4 (two UNet downsamplings) -> image sides multiples of 32."""
    model = sdxl[0]
    assert P.size_multiple(model) == 32
    s = P.resolve_settings(model, P.GenerationSettings())
    assert (s.width, s.height) == (1024, 1024)
    assert P.resolve_settings(model, P.GenerationSettings(width=96, height=160)).width == 96
    with pytest.raises(P.PipelineError, match="multiple of 32"):
        P.resolve_settings(model, P.GenerationSettings(width=80, height=64))


@pytest.mark.parametrize("sampler, extra", [("dpmpp_2m", {"karras": True, "negative_prompt": "blurry"}),
                                            ("ddim", {}),
                                            ("euler_a", {"init_image": torch.zeros(1, 3, 64, 64), "strength": 0.5})])
def test_generate_smoke(sdxl, sampler, extra):
    """generate() end to end on SDXL at 64x64 (latent 8x8): finite, deterministic."""
    model = sdxl[0]
    settings = P.GenerationSettings(prompt="a red circle", sampler=sampler, steps=2, width=64, height=64, seed=1,
                                    **extra)
    out = P.generate(model, settings)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert torch.equal(P.generate(model, settings), out)
