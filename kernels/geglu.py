"""GEGLU gate of the transformer feed-forward: x [..., 2F] -> a * gelu(gate), (a, gate) = x.chunk(2, -1).

Both halves are read straight from x (no chunk copies); the exact erf GELU is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels._triton import FLOAT_DTYPES, check_device, configs, launch

CONFIGS = [
    triton.Config({"BLOCK_F": bf}, num_warps=w)
    for bf, w in [(1024, 4), (2048, 8), (4096, 8)]  # <= 3 per key
]
INTERPRETED_CONFIG = triton.Config({"BLOCK_F": 512}, num_warps=4)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2), a constexpr so the kernel can read it


@triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=["F"])
@triton.jit
def _geglu_kernel(X, Y, stride_x, stride_y, F, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = cols < F
    a = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(X + row * stride_x + F + cols, mask=ok, other=0.0).to(tl.float32)
    y = a * (0.5 * gate * (1.0 + tl.math.erf(gate * SQRT1_2)))
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def geglu_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`geglu_reference`; ``out`` (optional, contiguous [..., F]) receives the result.

    Falls back to the reference for unsupported dtypes or a last dim with stride != 1.
    """
    if x.dim() == 0 or x.shape[-1] % 2 or x.dtype not in FLOAT_DTYPES or (x.shape[-1] > 1 and x.stride(-1) != 1):
        result = geglu_reference(x)  # the reference raises its own error for an odd last dim
        return result if out is None else out.copy_(result)
    check_device(x, out)
    f = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * f)  # [..., 2F] -> [R, 2F], a view for Linear outputs
    if out is None:
        out = torch.empty((*x.shape[:-1], f), device=x.device, dtype=x.dtype)
    if rows.shape[0] == 0 or f == 0:
        return out
    y = out.view(-1, f)
    grid = lambda meta: (rows.shape[0], triton.cdiv(f, meta["BLOCK_F"]))  # noqa: E731
    launch(_geglu_kernel, grid, rows, y, rows.stride(0), y.stride(0), f)
    return out


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] -> a * gelu(gate) [..., F] (exact erf GELU), (a, gate) = x.chunk(2, -1) as the original."""
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)
