"""Noise schedules of the original Stable Diffusion code, reproduced to the bit.

Three families of the same 1000-step DDPM schedule, each as its original computes it (dtype and rounding
order matter at the 1e-7 level, and the DDIM / sgm step selections differ in which timesteps they pick):

* DDPM: linear betas and ``alphas_cumprod`` (CompVis ``make_beta_schedule`` / ``register_schedule``).
* DDIM / PLMS: the "uniform" timestep subset and its alphas (``make_ddim_timesteps``,
  ``make_ddim_sampling_parameters``), over the model's float32 ``alphas_cumprod`` buffer.
* k-diffusion 0.1.1 (``DiscreteSchedule``, quantize=False): the 1000 training sigmas, log-linear
  interpolation between them (fractional timesteps) and the Karras schedule.
* sgm (SDXL): ``LegacyDDPMDiscretization`` sigmas from the float64 schedule and the nearest-sigma
  quantisation of ``DiscreteDenoiser``.

All sigma tensors are 1-D; sampling sigmas are descending and end with 0, training sigmas ascending.

Same schedule on every machine: the originals' float32 ``sqrt`` / ``log`` / ``exp`` differ in the last bit
between MKL's code paths for different processors, and ``torch.linspace`` between torch's vectorized and scalar
CPU kernels. So the training sigmas and their logs of the released models' linear schedule are read from
``pinned.py`` (the values the parity fixtures were made with), ``exp`` in ``t_to_sigma`` is taken in float64 and
rounded (correctly rounded whatever the machine's float64 ``exp``, except in cases rarer than 1 in 10^8), and
k-diffusion's timesteps and the Karras ramp come from ``linspace32`` (the vectorized kernel's arithmetic). The
Karras schedule's ``** rho`` is still torch's (vectorized SLEEF ``pow`` on AVX2 / AVX-512, as the fixtures; the
scalar ``pow`` of CPUs without AVX2 may differ in the last bit).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from tritonsd.sampler import pinned

NUM_TRAIN_TIMESTEPS = 1000


class ScheduleError(ValueError):
    """A schedule was asked for with arguments the original cannot serve."""


# ---------------------------------------------------------------- DDPM


def linear_betas(linear_start: float = 0.00085, linear_end: float = 0.012,
                 num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """float64 ``linspace(sqrt(start), sqrt(end), n) ** 2`` (torch's linspace, as the original)."""
    if num_timesteps < 2:
        raise ScheduleError(f"a linear beta schedule needs at least 2 timesteps, got {num_timesteps}")
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """float64 ``cumprod(1 - betas)``, a sequential product as numpy's."""
    betas64 = betas.detach().to("cpu", torch.float64).numpy()
    return torch.from_numpy(np.cumprod(1.0 - betas64, axis=0))


def linear_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012,
                          num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """float64 ``alphas_cumprod`` of the linear schedule; ``.float()`` gives the checkpoints' buffer."""
    return alphas_cumprod_from_betas(linear_betas(linear_start, linear_end, num_timesteps))


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


# ---------------------------------------------------------------- DDIM / PLMS


class DDIMSchedule(NamedTuple):
    """Everything DDIM and PLMS need besides the model, indexed by step in ascending timestep order.

    ``timesteps`` int64, ``alphas`` float32 (``alphas_cumprod[timesteps]``), ``alphas_prev`` and ``sigmas``
    float64 (the original holds them in float64 arrays; samplers cast them to the latent dtype).
    Sampling runs from the last entry to the first.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``make_ddim_timesteps('uniform')``: ``range(0, T, T // steps) + 1``, ascending int64.

    When ``steps`` does not divide T this gives MORE than ``steps`` timesteps (12 -> 13: 1, 84, ..., 997),
    as the original does.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ScheduleError(f"DDIM steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ScheduleError(f"DDIM steps must be between 1 and {num_train_timesteps}, got {steps}")
    c = num_train_timesteps // int(steps)
    return torch.from_numpy(np.asarray(list(range(0, num_train_timesteps, c)), dtype=np.int64) + 1)


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int, eta: float = 0.0) -> DDIMSchedule:
    """``make_ddim_sampling_parameters`` over the model's float32 ``alphas_cumprod`` buffer.

    ``alphas_prev`` of the first timestep is ``alphas_cumprod[0]`` (not 1); ``sigmas`` =
    ``eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))`` in float64 from the float32 values.
    """
    acp = alphas_cumprod.detach().to("cpu", torch.float32)
    timesteps = ddim_timesteps(steps, acp.shape[0])
    if int(timesteps[-1]) >= acp.shape[0]:
        raise ScheduleError(
            f"DDIM with {steps} steps selects timestep {int(timesteps[-1])}, beyond the {acp.shape[0]}-step "
            f"schedule (the original fails the same way); use at most {acp.shape[0] // 2} steps")
    if eta < 0:
        raise ScheduleError(f"DDIM eta must be >= 0, got {eta}")
    alphas = acp[timesteps]
    alphas_prev = torch.cat([acp[:1], acp[timesteps[:-1]]]).to(torch.float64)
    a = alphas.to(torch.float64)
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - a) * (1 - a / alphas_prev))
    return DDIMSchedule(timesteps, alphas, alphas_prev, sigmas)


# ---------------------------------------------------------------- k-diffusion (CompVisDenoiser)


def discrete_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The 1000 training sigmas ``((1 - ac) / ac) ** 0.5``, ascending, from the float32 buffer (pinned for
    the linear schedule)."""
    acp = alphas_cumprod.to(torch.float32)
    table = pinned.kdiff_sigmas(acp)
    return table.to(acp.device) if table is not None else ((1 - acp) / acp) ** 0.5


def discrete_log_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``log_sigmas`` buffer: ``sigmas.log()`` (pinned for the linear schedule's sigmas)."""
    table = pinned.kdiff_log_sigmas(sigmas)
    return table.to(sigmas.device) if table is not None else sigmas.log()


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor, log_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Fractional timestep -> sigma, linear in log-sigma between the neighbouring training sigmas.

    The float32 interpolation is k-diffusion's; its ``exp`` is taken in float64 and rounded to float32, the same
    on every machine (float32 ``exp`` differs in the last bit between MKL's code paths).
    """
    if log_sigmas is None:
        log_sigmas = discrete_log_sigmas(sigmas)
    t = t.float()
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
    return log_sigma.double().exp().float()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, log_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Sigma -> fractional timestep, inverting ``t_to_sigma`` (k-diffusion's quantize=False path).

    Below the smallest training sigma t is 0, above the largest t is 999 (the weight is clamped). Pass
    ``log_sigmas`` (``discrete_log_sigmas``) on the device when calling per step.
    """
    if log_sigmas is None:
        log_sigmas = discrete_log_sigmas(sigmas)
    log_sigma = sigma.log()
    # index of the last training sigma <= sigma (sigmas ascend), kept inside [0, n - 2]
    count_le = (log_sigma - log_sigmas[:, None]).ge(0).sum(dim=0)
    low_idx = (count_le - 1).clamp(min=0, max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.view(sigma.shape)


def get_sigmas(sigmas: torch.Tensor, n: int, log_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """``DiscreteSchedule.get_sigmas(n)``: n sigmas at t = linspace(999, 0, n), then 0."""
    if n < 1:
        raise ScheduleError(f"the number of sampling steps must be at least 1, got {n}")
    t = linspace32(sigmas.shape[0] - 1, 0, n).to(sigmas.device)
    return append_zero(t_to_sigma(t, sigmas, log_sigmas))


def linspace32(start: float, end: float, n: int) -> torch.Tensor:
    """float32 ``torch.linspace(start, end, n)`` as torch's vectorized CPU kernel (AVX2 / AVX-512) gives it, on
    any machine: step = (end - start) / (n - 1) in float32, then ``start + step * i`` for the first n // 2 values
    and ``end - step * (n - 1 - i)`` for the rest, each one fused multiply-add (exact in float64, rounded once).
    torch's scalar kernel (CPUs without AVX2) rounds twice and differs in the last bit for many n (12, 16, ...).
    """
    if n == 1:
        return torch.tensor([start], dtype=torch.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    t = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return torch.from_numpy(t.astype(np.float32))


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Karras et al. (2022) schedule: n sigmas from sigma_max to sigma_min, then 0 (k-diffusion's)."""
    if n < 1:
        raise ScheduleError(f"the number of sampling steps must be at least 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ScheduleError(f"Karras sigmas need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = linspace32(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


# ---------------------------------------------------------------- sgm (SDXL)


def _sgm_sigmas_at(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``to_torch((1 - ac) / ac) ** 0.5``: the ratio in the schedule's own (float64) dtype, sqrt in float32."""
    acp = alphas_cumprod.detach().cpu()
    return ((1 - acp) / acp).to(torch.float32) ** 0.5


def _sgm_training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """All 1000 sgm sigmas, ascending: pinned for the linear schedule, else computed."""
    table = pinned.sgm_sigmas(alphas_cumprod)
    return table if table is not None else _sgm_sigmas_at(alphas_cumprod)


def sgm_timesteps(n: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Timesteps ``LegacyDDPMDiscretization`` picks for n steps, descending int64 (10 -> 999, 899, ..., 99)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_train_timesteps:
        raise ScheduleError(f"sgm sampling steps must be an integer between 1 and {num_train_timesteps}, got {n!r}")
    if n == num_train_timesteps:
        return torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
    t = np.linspace(num_train_timesteps - 1, 0, int(n), endpoint=False).astype(int)
    return torch.from_numpy(t.astype(np.int64))


def sgm_sigmas(alphas_cumprod: torch.Tensor, n: int) -> torch.Tensor:
    """``LegacyDDPMDiscretization()(n)``: sigmas at ``sgm_timesteps(n)``, descending, then 0.

    Pass the float64 ``alphas_cumprod`` (``linear_alphas_cumprod``) to match sgm to the bit; sgm never sees
    the float32 buffer.
    """
    t = sgm_timesteps(n, alphas_cumprod.shape[0])
    return append_zero(_sgm_training_sigmas(alphas_cumprod)[t])  # element-wise: the same as sgm's subset


def sgm_training_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``DiscreteDenoiser.sigmas``: the 1000 training sigmas, ascending, float32."""
    return _sgm_training_sigmas(alphas_cumprod)


def sigma_to_idx(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sgm's quantisation: index of the nearest training sigma (linear distance, first on ties)."""
    dists = sigma - sigmas[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape)


def sgm_start_scale(sigmas: torch.Tensor) -> torch.Tensor:
    """sgm scales unit noise by ``sqrt(1 + sigma_max ** 2)`` to start (k-diffusion uses ``sigma_max``)."""
    return torch.sqrt(1.0 + sigmas[0] ** 2.0)
