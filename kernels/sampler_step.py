"""The sampler loop's elementwise arithmetic around the UNet, one launch each instead of two to seven torch ops:

* ``denoiser_output``: the sigma-space denoisers' ``x + raw * c_out`` (eps) or ``raw * c_out + x * c_skip`` (v);
* ``cfg_combine``: classifier-free guidance, ``uncond + (cond - uncond) * scale``;
* ``euler_step``: ``x + ((x - denoised) / sigma) * dt``, then ``+ noise * noise_scale * noise_sigma`` (ancestral);
* ``dpmpp_2m_step``: ``ratio * x - decay * denoised``, with ``denoised = w * denoised - w_old * old`` first
  (the second-order DPM-Solver++(2M) step).

Exact to the reference: each kernel does the reference's float32 operations in the reference's order, each
rounded on its own (``enable_fp_fusion=False``: no multiply-add contraction; ``div_rn``: correctly rounded
division), so it equals the torch reference on the CPU bit for bit. (torch on CUDA divides by a host scalar
through its reciprocal; the kernel divides, as torch does on the CPU.)

Scalars are host numbers (Python floats or CPU 0-d tensors: the per-step tables, or values the sampler computed
from CPU sigmas) and become float32 kernel arguments, which a CUDA graph bakes into each captured step. Tensors:
float32, one shape (no broadcasting), at most 4-D, any strides (the UNet's output is channels_last on CUDA);
the result is contiguous. Anything else runs the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonsd.kernels._triton import check_device, launch

BLOCK = 1024  # elements per program; an elementwise pass over a latent needs no tuning
_OPTIONS = {"BLOCK": BLOCK, "enable_fp_fusion": False}


@triton.jit
def _offsets(i, S1, S2, S3, st0, st1, st2, st3):
    """Memory offset of element ``i`` (row-major over [S0, S1, S2, S3]) of a tensor with strides ``st*``."""
    i3 = i % S3
    rest = i // S3
    i2 = rest % S2
    rest = rest // S2
    return (rest // S1) * st0 + (rest % S1) * st1 + i2 * st2 + i3 * st3


@triton.jit
def _denoiser_output_kernel(X, R, OUT, c_out, c_skip, N, S1, S2, S3, sx0, sx1, sx2, sx3, sr0, sr1, sr2, sr3,
                            HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(X + _offsets(i, S1, S2, S3, sx0, sx1, sx2, sx3), mask=ok)
    raw = tl.load(R + _offsets(i, S1, S2, S3, sr0, sr1, sr2, sr3), mask=ok)
    if HAS_SKIP:
        out = raw * c_out + x * c_skip
    else:
        out = raw * c_out + x  # == x + raw * c_out: one rounded add either way
    tl.store(OUT + i, out, mask=ok)


@triton.jit
def _cfg_combine_kernel(U, C, OUT, scale, N, S1, S2, S3, su0, su1, su2, su3, sc0, sc1, sc2, sc3,
                        BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    u = tl.load(U + _offsets(i, S1, S2, S3, su0, su1, su2, su3), mask=ok)
    c = tl.load(C + _offsets(i, S1, S2, S3, sc0, sc1, sc2, sc3), mask=ok)
    tl.store(OUT + i, u + (c - u) * scale, mask=ok)


@triton.jit
def _euler_step_kernel(X, D, NOISE, OUT, sigma, dt, noise_scale, noise_sigma, N, S1, S2, S3,
                       sx0, sx1, sx2, sx3, sd0, sd1, sd2, sd3, sn0, sn1, sn2, sn3,
                       HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(X + _offsets(i, S1, S2, S3, sx0, sx1, sx2, sx3), mask=ok)
    d = tl.load(D + _offsets(i, S1, S2, S3, sd0, sd1, sd2, sd3), mask=ok)
    out = x + tl.math.div_rn(x - d, sigma) * dt
    if HAS_NOISE:
        noise = tl.load(NOISE + _offsets(i, S1, S2, S3, sn0, sn1, sn2, sn3), mask=ok)
        out = out + noise * noise_scale * noise_sigma
    tl.store(OUT + i, out, mask=ok)


@triton.jit
def _dpmpp_2m_step_kernel(X, D, OLD, OUT, ratio, decay, w, w_old, N, S1, S2, S3,
                          sx0, sx1, sx2, sx3, sd0, sd1, sd2, sd3, so0, so1, so2, so3,
                          SECOND_ORDER: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(X + _offsets(i, S1, S2, S3, sx0, sx1, sx2, sx3), mask=ok)
    d = tl.load(D + _offsets(i, S1, S2, S3, sd0, sd1, sd2, sd3), mask=ok)
    if SECOND_ORDER:
        old = tl.load(OLD + _offsets(i, S1, S2, S3, so0, so1, so2, so3), mask=ok)
        d = w * d - w_old * old
    tl.store(OUT + i, ratio * x - decay * d, mask=ok)


# ---------------------------------------------------------------- launchers


def _fits(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the kernels take these tensors: float32, x's shape, at most 4-D, something to do."""
    tensors = [x, *(t for t in others if t is not None)]
    return (x.dim() <= 4 and x.numel() > 0 and all(t.dtype == torch.float32 for t in tensors)
            and all(t.shape == x.shape for t in tensors))


def _layout(x: torch.Tensor) -> tuple[int, int, int]:
    """[S1, S2, S3] of x viewed as 4-D (leading dims of 1 added)."""
    shape = (1,) * (4 - x.dim()) + tuple(x.shape)
    return shape[1], shape[2], shape[3]


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """t's strides viewed as 4-D (0 for the added dims); zeros for an absent operand."""
    if t is None:
        return (0, 0, 0, 0)
    return (0,) * (4 - t.dim()) + tuple(t.stride())


def _output(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {list(x.shape)}")
    return out


def _grid(x: torch.Tensor) -> tuple[int]:
    return (triton.cdiv(x.numel(), BLOCK),)


def denoiser_output_triton(x, raw, c_out, c_skip=None, out=None) -> torch.Tensor:
    """Same contract as :func:`denoiser_output_reference`; ``out`` (optional, contiguous) receives the result."""
    if not _fits(x, raw):
        return _into(out, denoiser_output_reference(x, raw, c_out, c_skip))
    check_device(x, raw, out)
    out = _output(x, out)
    launch(_denoiser_output_kernel, _grid(x), x, raw, out, float(c_out), 1.0 if c_skip is None else float(c_skip),
           x.numel(), *_layout(x), *_strides(x), *_strides(raw), HAS_SKIP=c_skip is not None, **_OPTIONS)
    return out


def denoiser_output_reference(x, raw, c_out, c_skip=None) -> torch.Tensor:
    """``x + raw * c_out`` (eps; sgm's ``raw * c_out + x`` is the same sum) or ``raw * c_out + x * c_skip`` (v)."""
    if c_skip is None:
        return x + raw * c_out
    return raw * c_out + x * c_skip


def cfg_combine_triton(uncond, cond, scale, out=None) -> torch.Tensor:
    """Same contract as :func:`cfg_combine_reference`; ``out`` (optional, contiguous) receives the result."""
    if not _fits(uncond, cond):
        return _into(out, cfg_combine_reference(uncond, cond, scale))
    check_device(uncond, cond, out)
    out = _output(uncond, out)
    launch(_cfg_combine_kernel, _grid(uncond), uncond, cond, out, float(scale), uncond.numel(), *_layout(uncond),
           *_strides(uncond), *_strides(cond), **_OPTIONS)
    return out


def cfg_combine_reference(uncond, cond, scale) -> torch.Tensor:
    """k-diffusion's guidance: ``uncond + (cond - uncond) * scale``."""
    return uncond + (cond - uncond) * scale


def euler_step_triton(x, denoised, sigma, dt, noise=None, noise_scale=1.0, noise_sigma=0.0,
                      out=None) -> torch.Tensor:
    """Same contract as :func:`euler_step_reference`; ``out`` (optional, contiguous) receives the result."""
    if not _fits(x, denoised, noise):
        return _into(out, euler_step_reference(x, denoised, sigma, dt, noise, noise_scale, noise_sigma))
    check_device(x, denoised, noise, out)
    out = _output(x, out)
    launch(_euler_step_kernel, _grid(x), x, denoised, x if noise is None else noise, out, float(sigma), float(dt),
           float(noise_scale), float(noise_sigma), x.numel(), *_layout(x), *_strides(x), *_strides(denoised),
           *_strides(noise), HAS_NOISE=noise is not None, **_OPTIONS)
    return out


def euler_step_reference(x, denoised, sigma, dt, noise=None, noise_scale=1.0, noise_sigma=0.0) -> torch.Tensor:
    """An Euler step along ``d = (x - denoised) / sigma`` (scalar sigma): ``x + d * dt``; with ``noise`` (the
    ancestral step) then ``+ noise * noise_scale * noise_sigma``."""
    x = x + (x - denoised) / sigma * dt
    if noise is not None:
        x = x + noise * noise_scale * noise_sigma
    return x


def dpmpp_2m_step_triton(x, ratio, decay, denoised, old=None, w=None, w_old=None, out=None) -> torch.Tensor:
    """Same contract as :func:`dpmpp_2m_step_reference`; ``out`` (optional, contiguous) receives the result."""
    if not _fits(x, denoised, old):
        return _into(out, dpmpp_2m_step_reference(x, ratio, decay, denoised, old, w, w_old))
    check_device(x, denoised, old, out)
    out = _output(x, out)
    second = old is not None
    launch(_dpmpp_2m_step_kernel, _grid(x), x, denoised, old if second else x, out, float(ratio), float(decay),
           float(w) if second else 0.0, float(w_old) if second else 0.0, x.numel(), *_layout(x), *_strides(x),
           *_strides(denoised), *_strides(old), SECOND_ORDER=second, **_OPTIONS)
    return out


def dpmpp_2m_step_reference(x, ratio, decay, denoised, old=None, w=None, w_old=None) -> torch.Tensor:
    """``ratio * x - decay * denoised`` (k-diffusion's ``sigma_fn(t_next) / sigma_fn(t)`` and ``(-h).expm1()``);
    with ``old`` (the previous denoised) the second-order ``denoised = w * denoised - w_old * old`` first."""
    if old is not None:
        denoised = w * denoised - w_old * old
    return ratio * x - decay * denoised


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    return result if out is None else out.copy_(result)
