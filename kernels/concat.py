"""Channel concatenation ``torch.cat([a, b], 1)`` with the next GroupNorm's statistics in the epilogue.

SD's decoder feeds ``cat([h, skip], 1)`` to a ResBlock whose first conv applies a GroupNorm (+ SiLU) as it
loads its input (kernels/conv.py's prologue). This kernel writes the concatenation (one launch, as torch's cat)
and, with ``stats_for``, also that norm's per-(batch, channel) (mean, rstd * gamma) from the values as stored
(``group_norm.tile_group_partials`` / ``finish_group_stats``, as the convolution's epilogue), so the two
statistics launches before the conv are gone (issue 22, item 6).

GEMM-like view: M = B*H*W pixels, N = C1 + C2 channels. A program owns a [BLOCK_M, BLOCK_N] tile of the
channels-last output [B, C1+C2, H, W]; columns below C1 come from ``a``, the others from ``b``, both read
through their own strides (NCHW or channels-last alike).

:func:`concat_stats` is the same launch without the store (``STORE`` off): the statistics alone, for a consumer
that reads the two inputs itself (``conv.conv2d_triton(..., x2=...)``: the ResBlock's in_layers conv and its 1x1
skip_connection), so the concatenation is never written (issue 22 item 7).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonsd.kernels._triton import FLOAT_DTYPES, check_device, configs, launch
from tritonsd.kernels.group_norm import GroupStats, StatsBuffers, finish_group_stats, stats_buffers, tile_group_partials

CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w) for bm, bn, w in [(64, 64, 4), (128, 64, 8)]]
INTERPRETED_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4)


@triton.jit
def _concat_kernel(A, B, Y, SGamma, SMean, SScale, SPart, SCount,
                   M, HW, W, C1, C2,
                   stride_ab, stride_ac, stride_ah, stride_aw,
                   stride_bb, stride_bc, stride_bh, stride_bw,
                   stride_yb, stride_yc, stride_yh, stride_yw,
                   S_GROUPS, s_eps,
                   STATS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   STORE: tl.constexpr = True):
    pid = tl.program_id(0)
    c = C1 + C2
    num_n = tl.cdiv(c, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < c
    bidx = (offs_m // HW).to(tl.int64)  # [BLOCK_M] image, row, column
    hh = (offs_m % HW) // W
    ww = offs_m % W
    from_a = offs_n < C1
    tile_ok = m_ok[:, None] & n_ok[None, :]
    a_ptr = A + (bidx * stride_ab + hh * stride_ah + ww * stride_aw)[:, None] + offs_n[None, :] * stride_ac
    b_ptr = B + (bidx * stride_bb + hh * stride_bh + ww * stride_bw)[:, None] + (offs_n - C1)[None, :] * stride_bc
    v = tl.load(a_ptr, mask=tile_ok & from_a[None, :], other=0.0)
    v = tl.where(from_a[None, :], v, tl.load(b_ptr, mask=tile_ok & ~from_a[None, :], other=0.0))
    if STORE:
        y_ptr = Y + (bidx * stride_yb + hh * stride_yh + ww * stride_yw)[:, None] + offs_n[None, :] * stride_yc
        tl.store(y_ptr, v, mask=tile_ok)
    if STATS_OUT:  # the ResBlock's first GroupNorm's statistics (group_norm.py)
        cg = c // S_GROUPS
        tile_group_partials(v.to(tl.float32), offs_m, offs_n, m_ok, n_ok, pid_m, pid_n, M, HW, c, cg, S_GROUPS,
                            SPart, BLOCK_M, BLOCK_N)
        finish_group_stats(SPart, SCount, SGamma, SMean, SScale, M, HW, c, cg, S_GROUPS, s_eps, BLOCK_M, BLOCK_N)


_CONCAT_JIT = _concat_kernel
KEY = ["M", "C1", "C2", "STATS_OUT", "STORE"]  # STORE: the two autotuners share the JIT's name in the tuning tables
_concat_kernel = triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=KEY)(_CONCAT_JIT)
# STORE off: the statistics alone (concat_stats)
_concat_stats_kernel = triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=KEY)(_CONCAT_JIT)


def _stats_possible(stats_for, channels: int) -> bool:
    return (stats_for is not None and stats_for.weight is not None and stats_for.groups > 0
            and channels % stats_for.groups == 0)


def concat_channels_triton(a: torch.Tensor, b: torch.Tensor, stats_for=None):
    """``torch.cat([a, b], 1)`` for a [B, C1, H, W] and b [B, C2, H, W] of one float dtype, any strides; the
    result is channels-last. ``stats_for``: the GroupNorm that reads the result next (a ``conv.GroupNormIn``:
    weight, groups, eps); the result is then ``(y, GroupStats | None)``, as ``conv.conv2d_triton``'s. Falls back
    to the reference for other ranks, shapes that differ outside dim 1, or dtypes (stats None)."""
    if not _inputs_fit(a, b):
        y = concat_channels_reference(a, b)
        return y if stats_for is None else (y, None)
    check_device(a, b, *(stats_for[:1] if stats_for is not None else ()))
    bsz, c1, h, w = a.shape
    c = c1 + b.shape[1]
    out = torch.empty((bsz, c, h, w), device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    m = bsz * h * w
    stats_out = _stats_possible(stats_for, c) and m > 0
    if m == 0 or c == 0:
        return out if stats_for is None else (out, None)
    if stats_out:
        blocks = [(cf.kwargs["BLOCK_M"], cf.kwargs["BLOCK_N"]) for cf in _concat_kernel.configs]
        sb = stats_buffers(stats_for.weight, stats_for.groups, bsz, h * w, c, a.device, blocks)
        s_groups, s_eps = stats_for.groups, float(stats_for.eps)
    else:
        sb = StatsBuffers(out, out, out, out, out)  # unused
        s_groups, s_eps = 1, 0.0
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]),)  # noqa: E731
    launch(_concat_kernel, grid, a, b, out, *sb, m, h * w, w, c1, b.shape[1], *a.stride(), *b.stride(),
           *out.stride(), s_groups, s_eps, STATS_OUT=stats_out, STORE=True)
    if stats_for is None:
        return out
    return out, (sb.stats if stats_out else None)


def _inputs_fit(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dim() == 4 and b.dim() == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
            and a.dtype == b.dtype and a.dtype in FLOAT_DTYPES)


def concat_stats(a: torch.Tensor, b: torch.Tensor, stats_for) -> GroupStats | None:
    """``stats_for``'s (mean, rstd * gamma) of ``torch.cat([a, b], 1)`` (a ``conv.GroupNormIn``: weight, groups,
    eps), computed by the concat's launch from a and b without storing the concatenation: the same launch, tiles
    and arithmetic as :func:`concat_channels_triton`'s statistics, so the same bits. None where that function
    makes none (inputs it does not take, groups that do not divide C1 + C2, no pixels)."""
    if stats_for is None or not _inputs_fit(a, b):
        return None
    check_device(a, b, stats_for.weight)
    bsz, c1, h, w = a.shape
    c = c1 + b.shape[1]
    m = bsz * h * w
    if m == 0 or not _stats_possible(stats_for, c):
        return None
    blocks = [(cf.kwargs["BLOCK_M"], cf.kwargs["BLOCK_N"]) for cf in _concat_stats_kernel.configs]
    sb = stats_buffers(stats_for.weight, stats_for.groups, bsz, h * w, c, a.device, blocks)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]),)  # noqa: E731
    # Y is a's own storage, never written (STORE off): a dummy, as the conv launcher's unused arguments
    launch(_concat_stats_kernel, grid, a, b, a, *sb, m, h * w, w, c1, b.shape[1], *a.stride(), *b.stride(),
           *a.stride(), stats_for.groups, float(stats_for.eps), STATS_OUT=True, STORE=False)
    return sb.stats


def concat_channels_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], 1)``."""
    return torch.cat([a, b], dim=1)
