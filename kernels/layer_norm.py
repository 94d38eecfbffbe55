"""LayerNorm over the last dimension: one program per row, the row held in registers, statistics in float32
(mean first, then the variance of the centred row: no cancellation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels._triton import FLOAT_DTYPES, KernelArgumentError, check_device, configs, launch, next_power_of_2

MAX_WIDTH = 16384  # wider rows fall back to the reference (one row must fit in registers)

# Only the warps per row are tuned: the block is the whole (padded) row.
CONFIGS = [triton.Config({}, num_warps=w) for w in (2, 4, 8)]  # <= 3 per key (rows are at most 2048 wide in SD)
INTERPRETED_CONFIG = triton.Config({}, num_warps=4)


@triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG),
                 key=["BLOCK_D", "HAS_WEIGHT", "HAS_BIAS", "COLS_CONTIGUOUS"])
@triton.jit
def _layer_norm_kernel(X, W, B, Y, N, stride_xb, stride_xn, stride_xd, stride_y, D, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COLS_CONTIGUOUS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row = b * N + n of the [B, N, D] view
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x_row = X + (row // N) * stride_xb + (row % N) * stride_xn
    if COLS_CONTIGUOUS:
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_row + cols * stride_xd, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / D
    xc = tl.where(ok, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / D
    y = xc * (1.0 / tl.sqrt_rn(var + eps))
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a [B, N, D] view without copying when its leading dims allow it (any strides, e.g. the
    [B, H*W, C] view of an NCHW tensor, whose columns are H*W apart); a contiguous copy only otherwise."""
    d = x.shape[-1]
    if x.dim() == 1:
        return x.view(1, 1, d)
    try:
        return x.view(1, -1, d)  # [..., D] -> [1, R, D]: leading dims merge
    except RuntimeError:
        pass
    if x.dim() >= 3:
        try:
            return x.view(-1, x.shape[-2], d)  # [..., N, D] -> [B, N, D]
        except RuntimeError:
            pass
    return x.reshape(1, -1, d)  # a copy


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`layer_norm_reference`; ``out`` (optional, contiguous, x's shape) gets the result.

    x is read through its strides (rows need not be contiguous; the output is). Falls back to the reference for
    rows wider than 16384 or unsupported dtypes.
    """
    d = x.shape[-1] if x.dim() else 0
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (d,):
            raise KernelArgumentError(f"layer_norm {name} has shape {tuple(p.shape)}, expected ({d},)")
    if x.dim() == 0 or d > MAX_WIDTH or x.dtype not in FLOAT_DTYPES:
        result = layer_norm_reference(x, weight, bias, eps)
        return result if out is None else out.copy_(result)
    check_device(x, weight, bias, out)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return out
    x3 = rows_view(x)  # [B, N, D]
    y = out.view(-1, d)
    block = next_power_of_2(d)
    w = weight.contiguous() if weight is not None else y
    b = bias.contiguous() if bias is not None else y
    launch(_layer_norm_kernel, (y.shape[0],), x3, w, b, y, x3.shape[1], *x3.stride(), y.stride(0), d, eps,
           HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, COLS_CONTIGUOUS=d == 1 or x3.stride(2) == 1,
           BLOCK_D=block)
    return out


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
