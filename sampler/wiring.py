"""How a model meets a sampler: its schedule, its denoiser (eps / v / sgm, plus CFG) and the first latent.

One function each, so the Pipeline, the parity checks and the benchmarks build the same thing:

* ``alphas_cumprod64(config)``: the float64 schedule the original code holds besides its float32 buffer (sgm
  rebuilds it from the config; Stability's DDIM converts v with it). The checkpoint's own buffer when that
  differs from the config's linear schedule.
* ``make_schedule``: a ``DDIMSchedule`` (DDIM, PLMS) or descending sigmas ending in 0: k-diffusion's
  ``get_sigmas`` / Karras for SD1/2, sgm's ``LegacyDDPMDiscretization`` / Karras (between the training sigma
  extremes) for SDXL.
* ``build_denoiser(unet, config, spec, cfg_scale, schedule, device)``: ``CFGDenoiser`` around the sigma-space
  wrapper (k-diffusion combines denoised x0), prepared with the schedule's per-step tables, or ``EpsFromV`` /
  ``EpsPrediction`` around ``CFGDenoiser(UNetOutput)`` for DDIM / PLMS (the original combines the raw output).
  PLMS on v models converts v too: the original PLMSSampler would misread v as eps.
* ``txt2img_start`` / ``img2img_start``: the first latent from unit noise (and the init latent).

img2img (``strength`` s, n steps):
* DDIM / PLMS as the original scripts (``t_enc = int(s * n)``): ``x = sqrt(a[t_enc]) x0 + sqrt(1 - a[t_enc]) x_T``,
  then the steps of indices ``t_enc - 1 .. 0``; ``a[n]`` (which the original lacks: it fails at strength 1) is 0,
  so strength 1 is pure noise, exactly txt2img; strength 0 runs no step and returns the init latent itself.
* the sigma samplers as AUTOMATIC1111 v1.10 (``sd_samplers_kdiffusion.sample_img2img``): ``t_enc =
  int(min(s, 0.999) * n)``, then ``t_enc + 1`` steps from ``sigmas[n - t_enc - 1]``, ``x = x0 + x_T * sigmas[n -
  t_enc - 1]`` (``rule="webui"``). The original scripts' ``t_enc = int(s * n)`` steps from ``sigmas[n - t_enc]``
  stay available as ``rule="original"``.
* hires fix's second pass (``start_at``): webui's fixed-steps ``t_enc`` on a longer schedule
  (``sampler/upscale.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

from tritonsd.sampler import denoise as D
from tritonsd.sampler import schedule as S
from tritonsd.sampler import upscale as U
from tritonsd.sampler.registry import SamplerSpec


class WiringError(ValueError):
    """A model / sampler combination this runtime does not support."""


def alphas_cumprod64(config) -> torch.Tensor:
    """The float64 schedule: the config's linear one, or the file's buffer when that differs from it."""
    acp64 = S.linear_alphas_cumprod(config.linear_start, config.linear_end, config.timesteps)
    if config.alphas_cumprod_source == "file" and not torch.equal(acp64.float(), config.alphas_cumprod.float()):
        return config.alphas_cumprod.double()
    return acp64


def sigma_denoiser(unet: Callable, config, step_embedder=None):
    """The sigma-space wrapper: sgm's quantising eps denoiser (SDXL) or k-diffusion's CompVis(V)Denoiser; it
    knows the UNet's embedding width, so that ``prepare`` tabulates the timestep sinusoid (for a UNet callable
    that takes ``t_emb``) and, given the model's ``step_embedder()``, its time MLP and projections (for one that
    takes ``step_emb``)."""
    dim = config.unet.model_channels
    if config.family == "sdxl":
        if config.parameterization != "eps":
            raise WiringError("SDXL v-prediction models are not supported")
        return D.SGMEpsDenoiser(unet, alphas_cumprod64(config), embedding_dim=dim, step_embedder=step_embedder)
    wrapper = D.VDenoiser if config.parameterization == "v" else D.EpsDenoiser
    return wrapper(unet, config.alphas_cumprod, embedding_dim=dim, step_embedder=step_embedder)


def timestep_model(unet: Callable, config, cfg_scale: float):
    """DDIM / PLMS's ``model(x, t, **cond) -> (eps, pred_x0 or None)`` with CFG on the raw output."""
    raw = D.CFGDenoiser(D.UNetOutput(unet), cfg_scale)
    if config.parameterization == "v":
        return D.EpsFromV(raw, alphas_cumprod64(config))
    return D.EpsPrediction(raw)


def build_denoiser(unet: Callable, config, spec: SamplerSpec, cfg_scale: float, schedule=None,
                   device: str | torch.device | None = None, step_embedder=None):
    """What ``spec.fn`` calls: the guided denoiser of its space; given the sigma ``schedule`` the loop will run
    (and the latents' ``device``), prepared with its per-step tables (``denoise.prepare``)."""
    if spec.space == "timesteps":  # SDXL too (as AUTOMATIC1111 offers it; sgm itself has no DDIM)
        return timestep_model(unet, config, cfg_scale)
    den = D.CFGDenoiser(sigma_denoiser(unet, config, step_embedder), cfg_scale)
    return den if schedule is None else D.prepare(den, schedule, device)


def make_schedule(config, spec: SamplerSpec, steps: int, karras: bool = False, eta: float = 0.0):
    """A ``DDIMSchedule`` (timestep samplers) or descending float32 sigmas ending in 0 (sigma samplers)."""
    if spec.space == "timesteps":
        return S.ddim_schedule(config.alphas_cumprod, steps, eta)
    if config.family == "sdxl":
        acp = alphas_cumprod64(config)
        if karras:
            training = S.sgm_training_sigmas(acp)
            return S.get_sigmas_karras(steps, training[0].item(), training[-1].item())
        return S.sgm_sigmas(acp, steps)
    den = sigma_denoiser(None, config)
    if karras:
        return S.get_sigmas_karras(steps, den.sigma_min.item(), den.sigma_max.item())
    return den.get_sigmas(steps)


def num_steps(schedule) -> int:
    """Sampler steps a schedule runs."""
    if isinstance(schedule, S.DDIMSchedule):
        return len(schedule.timesteps)
    return len(schedule) - 1


def txt2img_start(config, schedule, x_T: torch.Tensor) -> torch.Tensor:
    """The first latent from unit noise: x_T (DDIM / PLMS), ``x_T * sigmas[0]`` (k-diffusion),
    ``x_T * sqrt(1 + sigmas[0]**2)`` (sgm, SDXL)."""
    if isinstance(schedule, S.DDIMSchedule):
        return x_T
    if config.family == "sdxl":
        return x_T * S.sgm_start_scale(schedule)
    return x_T * schedule[0]


IMG2IMG_RULES = ("webui", "original")


def img2img_start(schedule, init_latent: torch.Tensor, noise: torch.Tensor, strength: float, rule: str = "webui"):
    """(first latent, remaining schedule or None) for img2img; see the module docstring."""
    if rule not in IMG2IMG_RULES:
        raise WiringError(f"unknown img2img rule {rule!r}; expected one of {', '.join(IMG2IMG_RULES)}")
    n = num_steps(schedule)
    if isinstance(schedule, S.DDIMSchedule) or rule == "original":
        t_enc = int(strength * n)
        if not isinstance(schedule, S.DDIMSchedule):
            if t_enc == 0:
                return init_latent, None
            t_enc -= 1  # the original scripts run t_enc steps from sigmas[n - t_enc]
        return start_at(schedule, init_latent, noise, t_enc)
    return start_at(schedule, init_latent, noise, U.img2img_t_enc(n, strength))


def start_at(schedule, init_latent: torch.Tensor, noise: torch.Tensor, t_enc: int):
    """(first latent, remaining schedule or None) noising ``init_latent`` to step ``t_enc`` of ``schedule``:
    sigma samplers run ``t_enc + 1`` steps from ``sigmas[n - t_enc - 1]`` (webui's ``sample_img2img``); DDIM /
    PLMS run ``t_enc`` steps from ``stochastic_encode`` at ``t_enc`` (none at 0; pure noise at ``n``)."""
    n = num_steps(schedule)
    if isinstance(schedule, S.DDIMSchedule):
        if t_enc == 0:
            return init_latent, None
        if t_enc == n:  # a[n] = 0: pure noise
            return noise, schedule
        a = schedule.alphas[t_enc].to(torch.float32)
        x = a.sqrt() * init_latent + (1.0 - a).sqrt() * noise  # stochastic_encode
        return x, S.DDIMSchedule(*(field[:t_enc] for field in schedule))
    sigmas = schedule[n - t_enc - 1:]
    return init_latent + noise * sigmas[0], sigmas
