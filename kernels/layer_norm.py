"""LayerNorm over the last dimension: one program per row, the row held in registers, statistics in float32
(mean first, then the variance of the centred row: no cancellation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton import FLOAT_DTYPES, KernelArgumentError, check_device, configs, next_power_of_2

MAX_WIDTH = 16384  # wider rows fall back to the reference (one row must fit in registers)

# Only the warps per row are tuned: the block is the whole (padded) row.
CONFIGS = [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]
INTERPRETED_CONFIG = triton.Config({}, num_warps=4)


@triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=["BLOCK_D", "HAS_WEIGHT", "HAS_BIAS"])
@triton.jit
def _layer_norm_kernel(X, W, B, Y, stride_x, stride_y, D, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    xc = tl.where(ok, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / D
    y = xc * (1.0 / tl.sqrt_rn(var + eps))
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`layer_norm_reference`; ``out`` (optional, contiguous, x's shape) gets the result.

    Falls back to the reference for rows wider than 16384, unsupported dtypes, or a last dim with stride != 1.
    """
    d = x.shape[-1] if x.dim() else 0
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            raise KernelArgumentError(f"layer_norm {name} has shape {tuple(p.shape)}, expected ({d},)")
    if x.dim() == 0 or d > MAX_WIDTH or x.dtype not in FLOAT_DTYPES or (d > 1 and x.stride(-1) != 1):
        result = layer_norm_reference(x, weight, bias, eps)
        return result if out is None else out.copy_(result)
    check_device(x, weight, bias, out)
    rows = x.reshape(-1, d)  # a view for the usual [B, N, C] activations; a copy only for odd strides
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if rows.shape[0] == 0 or d == 0:
        return out
    y = out.view(-1, d)
    block = next_power_of_2(d)
    w = weight.contiguous() if weight is not None else rows
    b = bias.contiguous() if bias is not None else rows
    _layer_norm_kernel[(rows.shape[0],)](
        rows, w, b, y, rows.stride(0), y.stride(0), d, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_D=block,
    )
    return out


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
