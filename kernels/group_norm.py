"""GroupNorm with optional fused SiLU, statistics in float32.

Two kernels over x viewed as [B, C, S] (S = H*W, NCHW or channels_last strides alike):

1. ``_group_stats_kernel``, grid (B*G, SPLIT): each program walks one slice of its group's C/G*S elements in
   tiles, takes each tile's exact mean and centred sum of squares, and merges them (Chan's parallel update),
   writing (count, mean, M2) for its slice. Splitting a group across programs keeps the GPU busy when B*G is
   only 64 while the groups are large (VAE: 4 channels x 128*128 positions).
2. ``_group_norm_apply_kernel``, same grid: merges its group's SPLIT partials the same way (exact, stable),
   then normalises its slice, applies the per-channel affine and SiLU, and stores in x's dtype.

x is read twice, y written once. A group's elements are walked in memory order: channel-major for NCHW,
position-major for channels_last (``CHANNELS_INNER``), so loads stay contiguous in both layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels._triton import (FLOAT_DTYPES, INTERPRET, KernelArgumentError, check_device, configs, launch,
    next_power_of_2)

CONFIGS = [triton.Config({"BLOCK": bl}, num_warps=w) for bl, w in [(1024, 4), (2048, 8), (4096, 8)]]  # <= 3 per key
INTERPRETED_CONFIG = triton.Config({"BLOCK": 1024}, num_warps=4)
TARGET_PROGRAMS = 8 * 132  # enough slices to fill an H100 several times over
MIN_SLICE = 4096  # elements per program at least (smaller slices only add merge work)


@triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=["S", "Cg", "SLICE", "CHANNELS_INNER"])
@triton.jit
def _group_stats_kernel(X, STATS, S, Cg, G, stride_xb, stride_xc, stride_xs, SLICE, SPLIT,
                        CHANNELS_INNER: tl.constexpr, BLOCK: tl.constexpr):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    base = X + b * stride_xb + (g * Cg).to(tl.int64) * stride_xc
    total = Cg * S
    start = pid_s * SLICE
    end = tl.minimum(start + SLICE, total)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(start, end, BLOCK):
        e = t + tl.arange(0, BLOCK)
        ok = e < end
        if CHANNELS_INNER:  # group-local element index -> (channel, position), in memory order
            c = e % Cg
            s = e // Cg
        else:
            c = e // S
            s = e % S
        x = tl.load(base + c * stride_xc + s * stride_xs, mask=ok, other=0.0).to(tl.float32)
        n_t = tl.minimum(end - t, BLOCK).to(tl.float32)
        mean_t = tl.sum(x, 0) / n_t
        xc = tl.where(ok, x - mean_t, 0.0)
        m2_t = tl.sum(xc * xc, 0)
        # Chan et al.: merge (count, mean, m2) with the tile's
        n_new = count + n_t
        delta = mean_t - mean
        mean = mean + delta * (n_t / n_new)
        m2 = m2 + m2_t + delta * delta * (count * n_t / n_new)
        count = n_new
    out = STATS + (pid_bg * SPLIT + pid_s) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _merged_stats(STATS, pid_bg, SPLIT, eps, SPLIT_P2: tl.constexpr):
    """(mean, rstd) of group ``pid_bg`` from its SPLIT partial (count, mean, M2) rows: a vectorised Chan update
    (empty slices have count 0)."""
    parts = tl.arange(0, SPLIT_P2)
    p_ok = parts < SPLIT
    p_base = STATS + (pid_bg * SPLIT + parts) * 3
    n_p = tl.load(p_base, mask=p_ok, other=0.0)
    mean_p = tl.load(p_base + 1, mask=p_ok, other=0.0)
    m2_p = tl.load(p_base + 2, mask=p_ok, other=0.0)
    n = tl.sum(n_p, 0)
    mean = tl.sum(n_p * mean_p, 0) / n
    d = mean_p - mean
    var = (tl.sum(m2_p, 0) + tl.sum(n_p * d * d, 0)) / n
    return mean, 1.0 / tl.sqrt_rn(var + eps)


@triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=["S", "Cg", "SLICE", "CHANNELS_INNER", "SILU"])
@triton.jit
def _group_norm_apply_kernel(X, Y, W, B, STATS, S, Cg, G, stride_xb, stride_xc, stride_xs,
                             stride_yb, stride_yc, stride_ys, SLICE, SPLIT, eps,
                             CHANNELS_INNER: tl.constexpr, SILU: tl.constexpr, SPLIT_P2: tl.constexpr,
                             BLOCK: tl.constexpr):
    pid_bg = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    mean, rstd = _merged_stats(STATS, pid_bg, SPLIT, eps, SPLIT_P2)

    x_base = X + b * stride_xb + (g * Cg).to(tl.int64) * stride_xc
    y_base = Y + b * stride_yb + (g * Cg).to(tl.int64) * stride_yc
    total = Cg * S
    start = pid_s * SLICE
    end = tl.minimum(start + SLICE, total)
    for t in range(start, end, BLOCK):
        e = t + tl.arange(0, BLOCK)
        ok = e < end
        if CHANNELS_INNER:
            c = e % Cg
            s = e // Cg
        else:
            c = e // S
            s = e % S
        x = tl.load(x_base + c * stride_xc + s * stride_xs, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + g * Cg + c, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(B + g * Cg + c, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + bias
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_base + c * stride_yc + s * stride_ys, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _group_affine_kernel(W, STATS, MEAN, SCALE, C, Cg, G, SPLIT, eps, SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (batch, group): merge the partial statistics (as the apply kernel does) and write, for each of the
    group's channels, ``mean`` and ``rstd * weight`` [B, C] (float32): what a consumer needs to apply the norm
    while it loads x (kernels/conv.py's GroupNorm prologue). W first: the variant's dtype is its first tensor's."""
    pid_bg = tl.program_id(0)
    b = (pid_bg // G).to(tl.int64)
    g = pid_bg % G
    mean, rstd = _merged_stats(STATS, pid_bg, SPLIT, eps, SPLIT_P2)
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < Cg
        ch = g * Cg + c
        w = tl.load(W + ch, mask=ok, other=0.0).to(tl.float32)
        tl.store(MEAN + b * C + ch, tl.zeros([BLOCK_C], dtype=tl.float32) + mean, mask=ok)
        tl.store(SCALE + b * C + ch, rstd * w, mask=ok)


def _slices(groups_total: int, group_size: int) -> tuple[int, int]:
    """(elements per program, programs per group) for B*G groups of ``group_size`` elements."""
    if INTERPRET:  # few programs (the interpreter's cost is per program), but still several slices to merge
        split = max(1, min(4, triton.cdiv(group_size, 1024)))
        slice_size = triton.cdiv(group_size, split)
        return slice_size, triton.cdiv(group_size, slice_size)
    split = max(1, min(triton.cdiv(TARGET_PROGRAMS, groups_total), triton.cdiv(group_size, MIN_SLICE), 64))
    # slices are multiples of the largest tile so that only the group's last tile is partial
    slice_size = triton.cdiv(triton.cdiv(group_size, split), 4096) * 4096
    return slice_size, triton.cdiv(group_size, slice_size)


def group_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int = 32,
                      eps: float = 1e-5, silu: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`group_norm_reference`; ``out`` (optional, x's shape) receives the result.

    Falls back to the reference for unsupported dtypes, inputs of rank < 3, or missing weight/bias.
    """
    if x.dim() < 2 or num_groups <= 0 or x.shape[1] % num_groups:
        raise KernelArgumentError(f"group_norm: {num_groups} groups do not divide the channels of a "
                                  f"{tuple(x.shape)} input")
    if x.dim() < 3 or weight is None or bias is None or x.dtype not in FLOAT_DTYPES:
        result = group_norm_reference(x, weight, bias, num_groups, eps, silu=silu)
        return result if out is None else out.copy_(result)
    check_device(x, weight, bias, out)
    bsz, c = x.shape[:2]
    s = x[0, 0].numel()
    xs = x.reshape(bsz, c, s)  # [B, C, H, W] -> [B, C, S]: a view for NCHW and channels_last alike
    if out is None:
        out = torch.empty_like(x)  # keeps x's memory format
    if xs.numel() == 0:
        return out
    ys = out.view(bsz, c, s)
    cg = c // num_groups
    slice_size, split = _slices(bsz * num_groups, cg * s)
    channels_inner = s > 1 and xs.stride(1) < xs.stride(2)
    stats = torch.empty((bsz * num_groups, split, 3), device=x.device, dtype=torch.float32)
    grid = (bsz * num_groups, split)
    launch(_group_stats_kernel, grid, xs, stats, s, cg, num_groups, xs.stride(0), xs.stride(1), xs.stride(2),
           slice_size, split, CHANNELS_INNER=channels_inner)
    launch(_group_norm_apply_kernel, grid, xs, ys, weight.contiguous(), bias.contiguous(), stats, s, cg, num_groups,
           xs.stride(0), xs.stride(1), xs.stride(2), ys.stride(0), ys.stride(1), ys.stride(2), slice_size, split,
           eps, CHANNELS_INNER=channels_inner, SILU=bool(silu), SPLIT_P2=next_power_of_2(split))
    return out


def group_norm_affine(x: torch.Tensor, weight: torch.Tensor, num_groups: int = 32,
                      eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale), each [B, C] float32: GroupNorm(x) = (x - mean) * scale + bias per (batch, channel), with
    scale = weight / sqrt(var + eps). Two launches (the partial statistics, then their merge), for a consumer
    that applies the norm while it loads x (kernels/conv.py), so the normalised tensor is never stored.
    x [B, C, ...] with C divisible by ``num_groups``, any strides; float16/bfloat16/float32."""
    check_device(x, weight)
    bsz, c = x.shape[:2]
    s = x[0, 0].numel()
    xs = x.reshape(bsz, c, s)  # [B, C, H, W] -> [B, C, S]: a view for NCHW and channels_last alike
    cg = c // num_groups
    slice_size, split = _slices(bsz * num_groups, cg * s)
    channels_inner = s > 1 and xs.stride(1) < xs.stride(2)
    stats = torch.empty((bsz * num_groups, split, 3), device=x.device, dtype=torch.float32)
    mean = torch.empty((bsz, c), device=x.device, dtype=torch.float32)
    scale = torch.empty((bsz, c), device=x.device, dtype=torch.float32)
    launch(_group_stats_kernel, (bsz * num_groups, split), xs, stats, s, cg, num_groups, xs.stride(0),
           xs.stride(1), xs.stride(2), slice_size, split, CHANNELS_INNER=channels_inner)
    launch(_group_affine_kernel, (bsz * num_groups,), weight.contiguous(), stats, mean, scale, c, cg, num_groups,
           split, eps, SPLIT_P2=next_power_of_2(split), BLOCK_C=min(next_power_of_2(cg), 128))
    return mean, scale


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int = 32,
                         eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """As the original GroupNorm32: statistics in float32, result cast back to x's dtype."""
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
