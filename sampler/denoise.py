"""Model wrappers between the UNet and the samplers; they know nothing about samplers.

The UNet is a callable ``unet(x, t, context, y=None)`` (``StableDiffusion.apply_model``); conditioning
travels as keywords ``context``, ``y`` (SDXL's vector) and ``c_concat`` (inpainting: concatenated to the
latent on channels, unscaled, after the input scaling).

Sigma space (k-diffusion style, ``denoiser(x, sigma, **cond) -> denoised x0``):
* ``EpsDenoiser`` / ``VDenoiser``: k-diffusion 0.1.1 ``CompVisDenoiser`` / ``CompVisVDenoiser``
  (quantize=False: the UNet gets the FRACTIONAL timestep ``sigma_to_t(sigma)``).
* ``SGMEpsDenoiser``: sgm ``DiscreteDenoiser`` + ``EpsScaling`` (SDXL): sigma snapped to the nearest training
  sigma, whose integer index is the timestep.

Timestep space (DDIM / PLMS, ``model(x, t, **cond) -> (eps, pred_x0 or None)``):
* ``UNetOutput``: the raw UNet output (eps or v); ``EpsPrediction`` / ``EpsFromV`` turn it into eps (and x0
  for v, with the DDPM buffers, as the Stability ``DDIMSampler`` does).

Guidance: ``CFGDenoiser(inner, cond_scale)`` wraps either kind (cond and uncond of different token lengths run
as two calls, as AUTOMATIC1111 does; ``PerCallConditioning`` selects per-step rows for prompt editing); it goes INSIDE the eps/v conversion for
DDIM (``EpsFromV(CFGDenoiser(UNetOutput(unet), s), acp)``: the original combines raw v) and OUTSIDE the
sigma-space wrappers (``CFGDenoiser(VDenoiser(unet, acp), s)``: k-diffusion combines denoised x0).
"""

from __future__ import annotations

import torch

from tritonsd.sampler import schedule


class CFGError(ValueError):
    """Conditional and unconditional inputs do not pair up."""


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def call_unet(unet, x, t, context=None, y=None, c_concat=None):
    """The one place that assembles the UNet input: ``cat([x, c_concat], 1)`` when inpainting."""
    if c_concat is not None:
        if isinstance(c_concat, (list, tuple)):
            c_concat = torch.cat(list(c_concat), dim=1)
        x = torch.cat([x, c_concat], dim=1)
    return unet(x, t, context, y=y)


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class EpsDenoiser:
    """eps-prediction UNet as a denoiser: ``x + eps(x * c_in, t(sigma)) * c_out`` with c_out = -sigma."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        self.unet = unet
        self.sigmas = schedule.discrete_sigmas(alphas_cumprod)  # ascending, float32
        self.log_sigmas = schedule.discrete_log_sigmas(self.sigmas)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int) -> torch.Tensor:
        return schedule.get_sigmas(self.sigmas, n, self.log_sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedule.sigma_to_t(sigma, self.sigmas.to(sigma.device), self.log_sigmas.to(sigma.device))

    def __call__(self, x, sigma, **cond):
        sigma = _batch_sigma(sigma, x)
        s = _append_dims(sigma, x.ndim)
        c_out = -s
        c_in = 1 / (s ** 2 + 1.0) ** 0.5
        eps = call_unet(self.unet, x * c_in, self.sigma_to_t(sigma), **cond)
        return x + eps * c_out


class VDenoiser(EpsDenoiser):
    """v-prediction UNet as a denoiser: ``v(x * c_in, t(sigma)) * c_out + x * c_skip`` (sigma_data 1)."""

    def __call__(self, x, sigma, **cond):
        sigma = _batch_sigma(sigma, x)
        s = _append_dims(sigma, x.ndim)
        c_skip = 1.0 / (s ** 2 + 1.0)
        c_out = -s / (s ** 2 + 1.0) ** 0.5
        c_in = 1 / (s ** 2 + 1.0) ** 0.5
        v = call_unet(self.unet, x * c_in, self.sigma_to_t(sigma), **cond)
        return v * c_out + x * c_skip


class SGMEpsDenoiser:
    """sgm ``DiscreteDenoiser`` with ``EpsScaling`` (SDXL): quantised sigma, integer timestep.

    ``alphas_cumprod`` should be the float64 schedule (``schedule.linear_alphas_cumprod``), as sgm rebuilds it;
    sampling sigmas come from ``schedule.sgm_sigmas``.
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        self.unet = unet
        self.sigmas = schedule.sgm_training_sigmas(alphas_cumprod)  # ascending, float32

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedule.sigma_to_idx(sigma, self.sigmas.to(sigma.device))

    def __call__(self, x, sigma, **cond):
        sigma = _batch_sigma(sigma, x)
        idx = self.sigma_to_idx(sigma)
        s = _append_dims(self.sigmas.to(x.device)[idx], x.ndim)
        c_out = -s
        c_in = 1 / (s ** 2 + 1.0) ** 0.5
        eps = call_unet(self.unet, x * c_in, idx, **cond)
        return eps * c_out + x


class UNetOutput:
    """The UNet's raw output (eps or v) at integer timesteps, conditioning as keywords."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x, t, **cond):
        return call_unet(self.unet, x, t, **cond)


class EpsPrediction:
    """An eps model for DDIM / PLMS: ``(eps, None)``; the sampler derives x0 with its own alphas."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, t, **cond):
        return self.inner(x, t, **cond), None


class EpsFromV:
    """A v model for DDIM: ``predict_eps_from_z_and_v`` and ``predict_start_from_z_and_v`` of the original.

    ``sqrt(alphas_cumprod)`` and ``sqrt(1 - alphas_cumprod)`` are taken in float64 then held in float32, as
    ``register_schedule`` does; pass the float64 schedule to match its buffers to the bit.
    """

    def __init__(self, inner, alphas_cumprod: torch.Tensor):
        self.inner = inner
        acp = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sqrt_alphas_cumprod = acp.sqrt().to(torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt().to(torch.float32)

    def __call__(self, x, t, **cond):
        v = self.inner(x, t, **cond)
        a = _append_dims(self.sqrt_alphas_cumprod.to(x.device)[t], x.ndim).to(x.dtype)
        b = _append_dims(self.sqrt_one_minus_alphas_cumprod.to(x.device)[t], x.ndim).to(x.dtype)
        eps = a * v + b * x
        pred_x0 = a * x - b * v
        return eps, pred_x0


class CFGDenoiser:
    """Classifier-free guidance: ``uncond + (cond - uncond) * scale`` from ONE batched call ``[uncond, cond]``.

    Called as ``cfg(x, s, cond, uncond=None, **shared)``: ``cond`` / ``uncond`` are dicts of per-sample
    conditioning (``context``, ``y``, ...) with the same keys, concatenated uncond first; ``shared`` tensors
    (e.g. inpainting's ``c_concat``) serve both halves. With scale 1.0 or no ``uncond`` only the conditional
    batch is evaluated, as the original DDIM does.
    """

    def __init__(self, inner, cond_scale: float):
        self.inner = inner
        self.cond_scale = float(cond_scale)

    def __call__(self, x, s, cond: dict, uncond: dict | None = None, **shared):
        if uncond is None or self.cond_scale == 1.0:
            return self.inner(x, s, **cond, **shared)
        if set(cond) != set(uncond):
            raise CFGError(f"cond has keys {sorted(cond)} but uncond has {sorted(uncond)}")
        if any(_rows_shape(cond[k]) != _rows_shape(uncond[k]) for k in cond):
            # prompts of different lengths (77 * k tokens): two UNet calls, as AUTOMATIC1111 does by default
            out_cond = self.inner(x, s, **cond, **shared)
            out_uncond = self.inner(x, s, **uncond, **shared)
            return out_uncond + (out_cond - out_uncond) * self.cond_scale
        inputs = {k: _cat_pair(uncond[k], cond[k]) for k in cond}
        inputs.update({k: _cat_pair(v, v) for k, v in shared.items()})
        s = _batch_sigma(s, x)
        out_uncond, out_cond = self.inner(torch.cat([x, x]), torch.cat([s, s]), **inputs).chunk(2)
        return out_uncond + (out_cond - out_uncond) * self.cond_scale


class PerCallConditioning:
    """Prompt editing: the conditioning tensors are tables [calls, B, ...] and call k of the model gets row
    ``min(k, calls - 1)`` (AUTOMATIC1111's ``CFGDenoiser.step`` count). Wraps the outermost model (a CFG
    denoiser, or DDIM's eps wrapper around one); make one per sampler run. Under a CUDA graph the row choice
    happens at capture: each captured step reads its own row of the static tables."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, x, s, cond: dict, uncond: dict | None = None, **shared):
        k = self.calls
        self.calls += 1

        def row(side):
            return None if side is None else {n: t[min(k, t.shape[0] - 1)] for n, t in side.items()}

        return self.inner(x, s, cond=row(cond), uncond=row(uncond), **shared)


def _rows_shape(t) -> tuple:
    return tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else ()


def _cat_pair(a, b):
    if a is None or b is None:
        if a is None and b is None:
            return None
        raise CFGError("a conditioning entry is None on one side of the guidance pair only")
    if isinstance(a, (list, tuple)):
        return [torch.cat([u, c]) for u, c in zip(a, b)]
    return torch.cat([a, b])
