"""Samplers as pure functions: no model, schedule or guidance knowledge, no hidden RNG.

Sigma-space samplers (k-diffusion 0.1.1's, same signature and arithmetic):
    ``sample_*(model, x, sigmas, extra_args=None, callback=None, ...) -> x``
    ``model(x, sigma, **extra_args)`` returns the denoised x0; ``sigma`` is a [B] tensor on the device of
    ``sigmas`` (not of ``x``: with CPU sigmas, as the pipeline and the CUDA-graph runner keep them, the
    denoiser reads host values and looks its per-step tables up by them, see ``denoise``); ``sigmas`` descend
    to 0; ``x`` starts as unit noise times the start scale (``sigmas[0]`` for k-diffusion,
    ``schedule.sgm_start_scale`` for sgm). The callback gets ``{x, i, sigma, sigma_hat, denoised}``.
    sgm's ``EulerEDMSampler`` (s_churn 0) and ``DPMPP2MSampler`` are ``sample_euler`` and ``sample_dpmpp_2m``
    over the sgm sigmas with a quantising denoiser: their update formulas are the same operations.
    Each update is one fused launch on CUDA (``dispatch.euler_step`` / ``dpmpp_2m_step``: k-diffusion's
    operations in its order, exact to the torch reference that runs elsewhere).

Timestep-space samplers (CompVis ``DDIMSampler.ddim_sampling`` / ``PLMSSampler.plms_sampling``):
    ``sample_ddim(model, x, schedule, ...) -> (x, {"x_inter": [...], "pred_x0": [...]})``
    ``model(x, t, **extra_args)`` returns ``(eps, pred_x0)`` for integer timesteps ``t`` [B]; ``pred_x0`` is
    None when it should be derived from eps with the DDIM alphas (eps models), or the model's own x0 (v models,
    as the Stability DDIMSampler does). Both lists start with x_T. The callback gets ``{x, i, t, denoised}``.

Noise: every stochastic sampler takes ``noise_sampler(a, b) -> Tensor`` (k-diffusion's protocol; a, b are the
current and next sigma, or timestep for DDIM); the default draws from a CPU ``torch.Generator`` seeded
with ``seed``, so results are reproducible and independent of the global RNG and of the device.
"""

from __future__ import annotations

from typing import Callable

import torch

from tritonsd.kernels import dispatch
from tritonsd.sampler.schedule import DDIMSchedule

NoiseSampler = Callable[[object, object], torch.Tensor]


class SamplerError(ValueError):
    """A sampler was called with arguments it cannot honour."""


def seeded_noise_sampler(x: torch.Tensor, seed: int) -> NoiseSampler:
    """Noise like ``x`` from a CPU generator seeded once; successive calls continue its stream."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def sample(_a, _b) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    return sample


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma from a denoiser output.

    A 0-d ``sigma`` stays 0-d, so it may live on the CPU while ``x`` is on the GPU (a CPU scalar then): the
    CUDA-graph runner keeps ``sigmas`` on the CPU so that the samplers' control flow never syncs the device.
    """
    return (x - denoised) / (sigma if sigma.ndim == 0 else _append_dims(sigma, x.ndim))


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """(sigma_down, sigma_up): the deterministic step target and the noise to add after it."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _check_sigmas(x: torch.Tensor, sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise SamplerError(f"sigmas must be a 1-D tensor of at least 2 values, got shape {tuple(sigmas.shape)}")


def _sigma_ones(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """[B] ones that turn ``sigmas[i]`` into the model's sigma batch: x's dtype (as k-diffusion's
    ``x.new_ones``), the device of ``sigmas``, so that CPU sigmas give a host batch the denoiser can read."""
    return torch.ones(x.shape[0], dtype=x.dtype, device=sigmas.device)


# ---------------------------------------------------------------- sigma space (k-diffusion)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, noise_sampler: NoiseSampler | None = None, seed: int = 0):
    """Euler steps (Karras et al. 2022, Algorithm 2); deterministic unless ``s_churn`` > 0."""
    _check_sigmas(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    s_in = _sigma_ones(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            if noise_sampler is None:
                noise_sampler = seeded_noise_sampler(x, seed)
            eps = noise_sampler(sigmas[i], sigma_hat) * s_noise
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = dispatch.euler_step(x, denoised, sigma_hat, sigmas[i + 1] - sigma_hat)  # x + to_d(...) * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, eta=1.0, s_noise=1.0,
                           noise_sampler: NoiseSampler | None = None, seed: int = 0):
    """Euler ancestral: an Euler step down to ``sigma_down``, then fresh noise of ``sigma_up``.

    The noise sampler is called once per step whose next sigma is > 0, in step order.
    """
    _check_sigmas(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = seeded_noise_sampler(x, seed) if noise_sampler is None else noise_sampler
    s_in = _sigma_ones(x, sigmas)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        dt = sigma_down - sigmas[i]
        if sigmas[i + 1] > 0:  # x + to_d(...) * dt + noise * s_noise * sigma_up
            x = dispatch.euler_step(x, denoised, sigmas[i], dt, noise_sampler(sigmas[i], sigmas[i + 1]), s_noise,
                                    sigma_up)
        else:
            x = dispatch.euler_step(x, denoised, sigmas[i], dt)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None):
    """DPM-Solver++(2M): first step and the step to sigma 0 are first order (the last returns denoised)."""
    _check_sigmas(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    s_in = _sigma_ones(x, sigmas)

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        ratio, decay = sigma_fn(t_next) / sigma_fn(t), (-h).expm1()
        if old_denoised is None or sigmas[i + 1] == 0:
            x = dispatch.dpmpp_2m_step(x, ratio, decay, denoised)  # ratio * x - decay * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            # ratio * x - decay * denoised_d, denoised_d = (1 + 1 / (2 r)) * denoised - (1 / (2 r)) * old_denoised
            x = dispatch.dpmpp_2m_step(x, ratio, decay, denoised, old_denoised, 1 + 1 / (2 * r), 1 / (2 * r))
        old_denoised = denoised
    return x


# ---------------------------------------------------------------- timestep space (CompVis DDIM / PLMS)


class _DDIMCoefficients:
    """The schedule's per-step scalars in the latent dtype, as the original's ``torch.full`` buffers hold them,
    and everything ``step`` derives from them, computed for all steps before the loop (square roots, squares and
    differences are correctly rounded, so each entry is bit for bit the value an in-loop 0-d computation gives);
    ``batch_t[index]`` is the [B] int64 timestep batch of step ``index``."""

    def __init__(self, schedule: DDIMSchedule, x: torch.Tensor):
        if schedule.timesteps.ndim != 1 or len(schedule.timesteps) < 1:
            raise SamplerError("the DDIM schedule has no timesteps")
        self.timesteps = [int(t) for t in schedule.timesteps]
        self.alphas = schedule.alphas.to(x.device, x.dtype)
        self.alphas_prev = schedule.alphas_prev.to(x.device, x.dtype)
        self.sigmas = schedule.sigmas.to(x.device, x.dtype)
        self.sqrt_one_minus_alphas = (1.0 - schedule.alphas.to(torch.float32)).sqrt().to(x.device, x.dtype)
        self.stochastic = bool((schedule.sigmas != 0).any())
        self.sqrt_alphas = self.alphas.sqrt()
        self.sqrt_alphas_prev = self.alphas_prev.sqrt()
        self.dir_coef = (1.0 - self.alphas_prev - self.sigmas ** 2).sqrt()
        steps = torch.tensor(self.timesteps, dtype=torch.long, device=x.device)
        self.batch_t = steps[:, None].expand(len(self.timesteps), x.shape[0]).contiguous()  # [n] -> [n, B]

    def step(self, x, e_t, pred_x0, index, noise=None):
        """One DDIM update from x at step ``index``; ``pred_x0`` None derives it from ``e_t``."""
        if pred_x0 is None:
            pred_x0 = (x - self.sqrt_one_minus_alphas[index] * e_t) / self.sqrt_alphas[index]
        dir_xt = self.dir_coef[index] * e_t  # (1 - a_prev - sigma_t ** 2).sqrt() * e_t
        x_prev = self.sqrt_alphas_prev[index] * pred_x0 + dir_xt
        if noise is not None:
            x_prev = x_prev + self.sigmas[index] * noise
        return x_prev, pred_x0


@torch.no_grad()
def sample_ddim(model, x, schedule: DDIMSchedule, extra_args=None, callback=None,
                noise_sampler: NoiseSampler | None = None, seed: int = 0):
    """DDIM from x_T over ``schedule`` (from ``schedule.ddim_schedule``); eta > 0 draws noise every step."""
    extra_args = {} if extra_args is None else extra_args
    coef = _DDIMCoefficients(schedule, x)
    if coef.stochastic and noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, seed)
    intermediates = {"x_inter": [x], "pred_x0": [x]}
    n = len(coef.timesteps)
    for i in range(n):
        index = n - i - 1
        t = coef.timesteps[index]
        e_t, pred_x0 = model(x, coef.batch_t[index], **extra_args)
        noise = None
        if coef.stochastic:
            noise = noise_sampler(t, coef.timesteps[index - 1] if index > 0 else 0)
        x_prev, pred_x0 = coef.step(x, e_t, pred_x0, index, noise)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": pred_x0})
        x = x_prev
        intermediates["x_inter"].append(x)
        intermediates["pred_x0"].append(pred_x0)
    return x, intermediates


@torch.no_grad()
def sample_plms(model, x, schedule: DDIMSchedule, extra_args=None, callback=None):
    """PLMS (pseudo linear multistep) over DDIM timesteps; eta must be 0.

    The first step is a pseudo improved Euler step (two model calls), later ones Adams-Bashforth of order
    2-4 on eps. pred_x0 always comes from the combined eps (the original handles eps models only).
    """
    extra_args = {} if extra_args is None else extra_args
    coef = _DDIMCoefficients(schedule, x)
    if coef.stochastic:
        raise SamplerError("PLMS needs eta = 0 (a DDIM schedule without noise)")
    intermediates = {"x_inter": [x], "pred_x0": [x]}
    n = len(coef.timesteps)
    old_eps: list[torch.Tensor] = []
    for i in range(n):
        index = n - i - 1
        t = coef.timesteps[index]
        e_t, _ = model(x, coef.batch_t[index], **extra_args)
        if len(old_eps) == 0:
            x_prev, _ = coef.step(x, e_t, None, index)
            e_t_next, _ = model(x_prev, coef.batch_t[max(index - 1, 0)], **extra_args)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = coef.step(x, e_t_prime, None, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "denoised": pred_x0})
        x = x_prev
        intermediates["x_inter"].append(x)
        intermediates["pred_x0"].append(pred_x0)
    return x, intermediates
