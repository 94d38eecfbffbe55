"""End-to-end sampling parity: our samplers + denoisers around the loaded tiny models against the original
CompVis / Stability DDIM and PLMS, k-diffusion 0.1.1 and sgm (SDXL) runs stored in the fixtures.

Each model is loaded once per module and each sampler run computed once (cached), then compared tensor by
tensor. Conditioning is the stored ``sample.cond`` / ``sample.uncond`` (SDXL: ``sample.crossattn`` / ``vector``
and the ``uc_`` pair); one run per model starts from the prompts instead (text encoders -> sampler -> VAE),
so the whole chain is covered too.
"""

from __future__ import annotations

import pytest
import torch

from tritonsd.model.load import load_model
from tritonsd.sampler import denoise as D
from tritonsd.sampler import samplers as K
from tritonsd.sampler import schedule as S
from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND

SD_MODELS = ["sd1-tiny", "sd2v-tiny"]


class Bench:
    """One loaded model, its reference tensors and a cache of sampler runs."""

    def __init__(self, fixtures, reference, name):
        self.name = name
        self.model = load_model(fixtures / f"{name}.safetensors", fixtures / f"{name}.yaml", text_heads=2)
        self.ref, self.meta = reference(name)
        self.runs: dict[str, dict] = {}

    @property
    def config(self):
        return self.model.config

    def image(self, latents):
        return torch.clamp((self.model.decode_first_stage(latents) + 1) / 2, 0, 1)

    def run(self, key, fn):
        if key not in self.runs:
            with torch.no_grad():
                self.runs[key] = fn()
        return self.runs[key]


@pytest.fixture(scope="module")
def benches(fixtures, reference):
    cache: dict[str, Bench] = {}

    def get(name):
        if name not in cache:
            cache[name] = Bench(fixtures, reference, name)
        return cache[name]

    return get


def check(actual, ref, what):
    err = relative_error(actual, ref)
    assert err <= FP32_BOUND, f"{what}: relative error {err:.3g} > {FP32_BOUND}"


# ---------------------------------------------------------------- SD1 / SD2: CompVis / Stability samplers


def ddim_model(b: Bench, scale):
    """CFG on the raw UNet output, then eps (and x0 for v) as the original DDIMSampler does."""
    raw = D.CFGDenoiser(D.UNetOutput(b.model.apply_model), scale)
    if b.config.parameterization == "v":
        return D.EpsFromV(raw, b.config.alphas_cumprod)
    return D.EpsPrediction(raw)


def ddim_run(b: Bench, scale, cond, uncond):
    sched = S.ddim_schedule(b.config.alphas_cumprod, 10)
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}}
    latents, inter = K.sample_ddim(ddim_model(b, scale), b.ref["sample.x_T"], sched, extra_args=extra)
    return {"latents": latents, "x_inter": torch.stack(inter["x_inter"]),
            "pred_x0": torch.stack(inter["pred_x0"]), "image": b.image(latents), "timesteps": sched.timesteps}


@pytest.mark.parametrize("name", SD_MODELS)
@pytest.mark.parametrize("run", ["ddim_cfg7p5", "ddim_cfg1p0"])
def test_ddim(benches, name, run):
    b = benches(name)
    scale = {"ddim_cfg7p5": 7.5, "ddim_cfg1p0": 1.0}[run]
    out = b.run(run, lambda: ddim_run(b, scale, b.ref["sample.cond"], b.ref["sample.uncond"]))
    assert torch.equal(out["timesteps"], b.ref["ddim.timesteps"])
    for key in ("latents", "x_inter", "pred_x0", "image"):
        check(out[key], b.ref[f"{run}.{key}"], f"{name} {run}.{key}")


@pytest.mark.parametrize("name", SD_MODELS)
def test_ddim_from_prompts(benches, name):
    """Conditioning recomputed with get_learned_conditioning, then DDIM CFG 7.5 and the VAE."""
    b = benches(name)
    prompt = b.meta["sample_prompt"]

    def chain():
        cond = b.model.get_learned_conditioning(2 * [prompt])
        uncond = b.model.get_learned_conditioning(2 * [""])
        return {"cond": cond, "uncond": uncond, **ddim_run(b, 7.5, cond, uncond)}

    out = b.run("ddim_from_prompts", chain)
    check(out["cond"], b.ref["sample.cond"], f"{name} sample.cond")
    check(out["uncond"], b.ref["sample.uncond"], f"{name} sample.uncond")
    for key in ("latents", "x_inter", "image"):
        check(out[key], b.ref[f"ddim_cfg7p5.{key}"], f"{name} ddim_cfg7p5.{key} from prompts")


def test_plms_sd1(benches):
    b = benches("sd1-tiny")
    sched = S.ddim_schedule(b.config.alphas_cumprod, 10)
    extra = {"cond": {"context": b.ref["sample.cond"]}, "uncond": {"context": b.ref["sample.uncond"]}}
    latents, _ = b.run("plms", lambda: K.sample_plms(ddim_model(b, 7.5), b.ref["sample.x_T"], sched, extra_args=extra))
    check(latents, b.ref["plms_cfg7p5.latents"], "sd1-tiny plms_cfg7p5.latents")


# ---------------------------------------------------------------- SD1 / SD2: k-diffusion samplers


def kdiff_denoiser(b: Bench):
    wrapper = D.VDenoiser if b.config.parameterization == "v" else D.EpsDenoiser
    return wrapper(b.model.apply_model, b.config.alphas_cumprod)


def kdiff_run(b: Bench, sampler, sigmas, **kwargs):
    cfg = D.CFGDenoiser(kdiff_denoiser(b), 7.5)
    extra = {"cond": {"context": b.ref["sample.cond"]}, "uncond": {"context": b.ref["sample.uncond"]}}
    denoised = []
    latents = sampler(cfg, b.ref["sample.x_T"] * sigmas[0], sigmas, extra_args=extra,
                      callback=lambda d: denoised.append(d["denoised"]), **kwargs)
    return {"latents": latents, "denoised": torch.stack(denoised), "sigmas": sigmas}


@pytest.mark.parametrize("name", SD_MODELS)
def test_euler(benches, name):
    b = benches(name)
    out = b.run("euler", lambda: kdiff_run(b, K.sample_euler, kdiff_denoiser(b).get_sigmas(10)))
    check(out["sigmas"], b.ref["kdiff.sigmas"], f"{name} kdiff.sigmas")
    check(out["latents"], b.ref["euler_cfg7p5.latents"], f"{name} euler_cfg7p5.latents")
    check(out["denoised"], b.ref["euler_cfg7p5.denoised"], f"{name} euler_cfg7p5.denoised")


@pytest.mark.parametrize("name", SD_MODELS)
def test_euler_ancestral_stored_noise(benches, name):
    b = benches(name)

    def run():
        noises = list(b.ref["euler_a_cfg7p5.noise"])
        out = kdiff_run(b, K.sample_euler_ancestral, kdiff_denoiser(b).get_sigmas(10), eta=1.0, s_noise=1.0,
                        noise_sampler=lambda sigma, sigma_next: noises.pop(0))
        return {**out, "unused_noises": len(noises)}

    out = b.run("euler_a", run)
    assert out["unused_noises"] == 0, "one stored noise per step with a next sigma > 0"
    check(out["latents"], b.ref["euler_a_cfg7p5.latents"], f"{name} euler_a_cfg7p5.latents")


@pytest.mark.parametrize("name", SD_MODELS)
def test_dpmpp_2m_karras(benches, name):
    b = benches(name)
    den = kdiff_denoiser(b)
    sigmas = S.get_sigmas_karras(10, den.sigma_min.item(), den.sigma_max.item(), rho=7.0)
    out = b.run("dpmpp", lambda: kdiff_run(b, K.sample_dpmpp_2m, sigmas))
    check(out["sigmas"], b.ref["kdiff.sigmas_karras"], f"{name} kdiff.sigmas_karras")
    check(out["latents"], b.ref["dpmpp_2m_karras_cfg7p5.latents"], f"{name} dpmpp_2m_karras_cfg7p5.latents")
    check(out["denoised"], b.ref["dpmpp_2m_karras_cfg7p5.denoised"], f"{name} dpmpp_2m_karras_cfg7p5.denoised")


# ---------------------------------------------------------------- SDXL: sgm EulerEDMSampler / DPMPP2MSampler

SDXL_RUNS = {"euler_cfg7p5": (K.sample_euler, 7.5), "euler_cfg5p0": (K.sample_euler, 5.0),
             "dpmpp2m_cfg7p5": (K.sample_dpmpp_2m, 7.5)}


def sdxl_run(b: Bench, run, cond, uncond):
    """do_sample: start at x_T * sqrt(1 + sigma_max^2), quantising eps denoiser, CFG over one [uc, c] batch."""
    sampler, scale = SDXL_RUNS[run]
    acp = S.linear_alphas_cumprod(b.config.linear_start, b.config.linear_end, len(b.config.alphas_cumprod))
    sigmas = S.sgm_sigmas(acp, 10)
    cfg = D.CFGDenoiser(D.SGMEpsDenoiser(b.model.apply_model, acp), scale)
    extra = {"cond": dict(zip(("context", "y"), cond)), "uncond": dict(zip(("context", "y"), uncond))}
    denoised = []
    latents = sampler(cfg, b.ref["sample.x_T"] * S.sgm_start_scale(sigmas), sigmas, extra_args=extra,
                      callback=lambda d: denoised.append(d["denoised"]))
    return {"latents": latents, "denoised": torch.stack(denoised), "image": b.image(latents), "sigmas": sigmas}


@pytest.mark.parametrize("run", list(SDXL_RUNS))
def test_sdxl(benches, run):
    b = benches("sdxl-tiny")
    cond = (b.ref["sample.crossattn"], b.ref["sample.vector"])
    uncond = (b.ref["sample.uc_crossattn"], b.ref["sample.uc_vector"])
    out = b.run(run, lambda: sdxl_run(b, run, cond, uncond))
    check(out["sigmas"], b.ref["sample.sigmas"], "sdxl sample.sigmas")
    for key in ("latents", "denoised", "image"):
        check(out[key], b.ref[f"{run}.{key}"], f"sdxl {run}.{key}")


def test_sdxl_from_prompts(benches):
    """SDXL-base txt2img conditioning (zeroed text for uc, size features kept), then Euler CFG 7.5."""
    b = benches("sdxl-tiny")
    m = b.meta
    sizes = {"original_size": tuple(m["sample_original_size"]),
             "crop_coords_top_left": tuple(m["sample_crop_coords_top_left"]),
             "target_size": tuple(m["sample_target_size"])}

    def chain():
        cond = b.model.get_learned_conditioning(2 * [m["sample_prompt"]], **sizes)
        uncond = b.model.get_learned_conditioning(2 * [m["sample_negative_prompt"]], zero_text=True, **sizes)
        return {"cond": cond, "uncond": uncond, **sdxl_run(b, "euler_cfg7p5", cond, uncond)}

    out = b.run("sdxl_from_prompts", chain)
    for got, key in zip(out["cond"] + out["uncond"],
                        ("sample.crossattn", "sample.vector", "sample.uc_crossattn", "sample.uc_vector")):
        check(got, b.ref[key], f"sdxl {key} from prompts")
    for key in ("latents", "image"):
        check(out[key], b.ref[f"euler_cfg7p5.{key}"], f"sdxl euler_cfg7p5.{key} from prompts")


# ---------------------------------------------------------------- SD1 inpainting: c_concat shared by both halves


def test_inpaint_ddim(benches):
    """runwayml's inpaint_st.py DDIM: UNet input cat([x, mask, masked-image latents]), CFG 7.5."""
    b = benches("sd1-inpaint-tiny")
    ref = b.ref

    def run():
        sched = S.ddim_schedule(b.config.alphas_cumprod, 10)
        extra = {"cond": {"context": ref["inpaint.cond"]}, "uncond": {"context": ref["inpaint.uncond"]},
                 "c_concat": ref["inpaint.c_concat"]}
        latents, inter = K.sample_ddim(ddim_model(b, 7.5), ref["inpaint.x_T"], sched, extra_args=extra)
        return {"latents": latents, "x_inter": torch.stack(inter["x_inter"]), "result": b.image(latents),
                "timesteps": sched.timesteps}

    out = b.run("inpaint", run)
    assert torch.equal(out["timesteps"], ref["ddim.timesteps"])
    for key in ("latents", "x_inter", "result"):
        check(out[key], ref[f"inpaint.{key}"], f"sd1-inpaint-tiny inpaint.{key}")
