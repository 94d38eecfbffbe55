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

from typing import NamedTuple

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
    return GroupStats(mean, scale)


def group_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int = 32,
                         eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """As the original GroupNorm32: statistics in float32, result cast back to x's dtype."""
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


# ---- GroupNorm statistics in the producing kernel's epilogue (issue 22, item 6) -------------------------------------
#
# A kernel that writes a tensor some GroupNorm reads next (kernels/conv.py's convolution, kernels/concat.py) can
# hand that norm its per-(batch, channel) (mean, scale) itself, so the consumer launches nothing before it:
#
# 1. every program reduces its output tile, as stored, to partial (mean, M2) per (image, group) the tile touches
#    (:func:`tile_group_partials`) and writes them to a float32 workspace [B, G, NT_M * NT_N, 2]: slot
#    (i_m, i_n) of (image b, group g) is the i_m-th row tile of image b's rows and the i_n-th column tile of group
#    g's columns. A slot's count is known from the indices alone (:func:`_slot_counts`), so slots no tile touches
#    are never written nor read (count 0): the workspace needs no initialisation.
# 2. the last program to finish (a global int32 counter) merges every (image, group)'s partials with Chan's
#    formula in a fixed order (deterministic: no float atomics) and writes mean and scale = rstd * gamma [B, C]
#    exactly as ``_group_affine_kernel`` does, then puts the counter back to 0 (so a captured CUDA graph can
#    replay the launch) (:func:`finish_group_stats`).

class GroupStats(NamedTuple):
    """A GroupNorm's statistics as its consumer applies them: ``(x - mean) * scale + bias`` per (batch, channel),
    mean and scale = rstd * weight each [B, C] float32 (what :func:`group_norm_affine` returns)."""

    mean: torch.Tensor
    scale: torch.Tensor


MERGE_BG = tl.constexpr(32)  # (image, group) pairs merged side by side by the last program
MERGE_T = tl.constexpr(32)  # slots per pair loaded at once
MERGE_C = tl.constexpr(16)  # channels per pair written at once


@triton.jit
def _slot_geometry(HW, Cg, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(NT_M, NT_N): at most how many BLOCK_M row tiles one image's HW rows touch, and BLOCK_N column tiles one
    group's Cg columns touch (an interval of n indices meets at most (n - 1) // BLOCK + 2 tiles)."""
    return (HW - 1) // BLOCK_M + 2, (Cg - 1) // BLOCK_N + 2


@triton.jit
def tile_group_partials(v, offs_m, offs_n, m_ok, n_ok, pid_m, pid_n, M, HW, C, Cg, G, PART,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the tile's partial (mean, M2) per (image, group) it touches. ``v`` [BLOCK_M, BLOCK_N] float32: the
    values as stored (rows m = image * HW + pixel, columns = channels); a tile may straddle images (HW not a
    multiple of BLOCK_M, or smaller than it) and groups (Cg not a power of 2). Per image, each column's
    (mean, M2) over the image's rows first, then those merged per group (Chan): a few [BLOCK_N] reductions per
    group instead of whole-tile ones."""
    nt_m, nt_n = _slot_geometry(HW, Cg, BLOCK_M, BLOCK_N)
    img = offs_m // HW  # [BLOCK_M]
    grp = offs_n // Cg  # [BLOCK_N]
    b_lo = (pid_m * BLOCK_M) // HW
    b_hi = (tl.minimum((pid_m + 1) * BLOCK_M, M) - 1) // HW
    g_lo = (pid_n * BLOCK_N) // Cg
    g_hi = (tl.minimum((pid_n + 1) * BLOCK_N, C) - 1) // Cg
    for b in range(b_lo, b_hi + 1):
        rows = m_ok & (img == b)
        n_rows = tl.sum(rows.to(tl.float32), 0)
        sel = rows[:, None] & n_ok[None, :]
        col_mean = tl.sum(tl.where(sel, v, 0.0), 0) / n_rows  # [BLOCK_N]
        d = tl.where(sel, v - col_mean[None, :], 0.0)
        col_m2 = tl.sum(d * d, 0)  # [BLOCK_N]
        i_m = pid_m - (b * HW) // BLOCK_M
        for g in range(g_lo, g_hi + 1):
            cols = n_ok & (grp == g)
            n_cols = tl.sum(cols.to(tl.float32), 0)
            g_mean = tl.sum(tl.where(cols, col_mean, 0.0), 0) / n_cols
            dm = tl.where(cols, col_mean - g_mean, 0.0)
            g_m2 = tl.sum(tl.where(cols, col_m2, 0.0), 0) + n_rows * tl.sum(dm * dm, 0)
            i_n = pid_n - (g * Cg) // BLOCK_N
            slot = PART + (((b * G + g) * nt_m + i_m) * nt_n + i_n).to(tl.int64) * 2
            tl.store(slot, g_mean)
            tl.store(slot + 1, g_m2)


@triton.jit
def _slot_counts(b, g, t, HW, Cg, nt_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Elements of (image b, group g) in slot t ([MERGE_BG, 1] and [1, MERGE_T] broadcast): what
    :func:`tile_group_partials` reduced there; 0 for slots no tile touches."""
    pm = (b * HW) // BLOCK_M + t // nt_n  # the slot's row tile
    pn = (g * Cg) // BLOCK_N + t % nt_n  # its column tile
    rows = tl.minimum((pm + 1) * BLOCK_M, (b + 1) * HW) - tl.maximum(pm * BLOCK_M, b * HW)
    cols = tl.minimum((pn + 1) * BLOCK_N, (g + 1) * Cg) - tl.maximum(pn * BLOCK_N, g * Cg)
    return (tl.maximum(rows, 0) * tl.maximum(cols, 0)).to(tl.float32)


@triton.jit
def _merge_group_partials(PART, GAMMA, MEAN, SCALE, B, HW, C, Cg, G, eps,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Every (image, group)'s partials merged (Chan, slots in order), then mean and rstd * gamma per channel."""
    nt_m, nt_n = _slot_geometry(HW, Cg, BLOCK_M, BLOCK_N)
    slots = nt_m * nt_n
    for bg0 in range(0, B * G, MERGE_BG):
        bg = bg0 + tl.arange(0, MERGE_BG)
        bg_ok = bg < B * G
        b = bg // G
        g = bg % G
        count = tl.zeros([MERGE_BG], dtype=tl.float32)
        mean = tl.zeros([MERGE_BG], dtype=tl.float32)
        m2 = tl.zeros([MERGE_BG], dtype=tl.float32)
        for t0 in range(0, slots, MERGE_T):
            t = t0 + tl.arange(0, MERGE_T)
            n = _slot_counts(b[:, None], g[:, None], t[None, :], HW, Cg, nt_n, BLOCK_M, BLOCK_N)
            ok = bg_ok[:, None] & (t < slots)[None, :] & (n > 0.0)  # [MERGE_BG, MERGE_T]
            n = tl.where(ok, n, 0.0)
            p = PART + ((bg[:, None] * slots + t[None, :]).to(tl.int64) * 2)
            # .cg: read from L2, where the other programs' stores are (not a stale L1 line)
            mean_p = tl.load(p, mask=ok, other=0.0, cache_modifier=".cg")
            m2_p = tl.load(p + 1, mask=ok, other=0.0, cache_modifier=".cg")
            n_c = tl.sum(n, 1)
            mean_c = tl.sum(n * mean_p, 1) / tl.maximum(n_c, 1.0)
            d = tl.where(ok, mean_p - mean_c[:, None], 0.0)
            m2_c = tl.sum(m2_p, 1) + tl.sum(n * d * d, 1)
            # Chan et al.: the running (count, mean, M2) merged with the chunk's
            n_new = count + n_c
            delta = mean_c - mean
            frac = n_c / tl.maximum(n_new, 1.0)
            mean = mean + delta * frac
            m2 = m2 + m2_c + delta * delta * count * frac
            count = n_new
        rstd = 1.0 / tl.sqrt_rn(m2 / tl.maximum(count, 1.0) + eps)
        for c0 in range(0, Cg, MERGE_C):
            c = c0 + tl.arange(0, MERGE_C)
            ok = bg_ok[:, None] & (c < Cg)[None, :]
            ch = g[:, None] * Cg + c[None, :]  # [MERGE_BG, MERGE_C] channels
            w = tl.load(GAMMA + ch, mask=ok, other=0.0).to(tl.float32)
            out = b[:, None].to(tl.int64) * C + ch
            tl.store(MEAN + out, tl.zeros([MERGE_BG, MERGE_C], dtype=tl.float32) + mean[:, None], mask=ok)
            tl.store(SCALE + out, rstd[:, None] * w, mask=ok)


@triton.jit
def finish_group_stats(PART, COUNTER, GAMMA, MEAN, SCALE, M, HW, C, Cg, G, eps,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """After :func:`tile_group_partials`: the last program of the launch merges everything and resets COUNTER.

    Memory ordering on a GPU (the lock pattern of Triton's layer-norm backward tutorial): ``debug_barrier``
    makes every thread of this program finish its partial stores before one thread does the atomic; the atomic's
    acq_rel semantics (gpu scope) release those stores with it, and the last program's increment acquires every
    earlier program's release (they all precede it in the counter's modification order), so its loads (through
    L2, ``.cg``) see every partial. Under the interpreter programs run one after the other: the same code holds.
    """
    tl.debug_barrier()
    old = tl.atomic_add(COUNTER, 1, sem="acq_rel")
    if old == tl.num_programs(0) - 1:
        _merge_group_partials(PART, GAMMA, MEAN, SCALE, M // HW, HW, C, Cg, G, eps, BLOCK_M, BLOCK_N)
        tl.atomic_xchg(COUNTER, 0)  # ready for the next launch (and a captured graph's replay)


def stats_workspace_size(batch: int, hw: int, channels: int, groups: int,
                         blocks: list[tuple[int, int]]) -> int:
    """float32 elements of the partials' workspace: enough for every (BLOCK_M, BLOCK_N) in ``blocks`` (the
    autotuner picks one after the launcher allocated it)."""
    cg = channels // groups
    return max(batch * groups * ((hw - 1) // bm + 2) * ((cg - 1) // bn + 2) * 2 for bm, bn in blocks)


class StatsBuffers(NamedTuple):
    """What a launch with the statistics epilogue takes: the consumer norm's gamma [C], the results mean and
    scale [B, C] float32, the partials' workspace and the program counter."""

    gamma: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    part: torch.Tensor
    counter: torch.Tensor

    @property
    def stats(self) -> GroupStats:
        return GroupStats(self.mean, self.scale)


def stats_buffers(weight: torch.Tensor, groups: int, batch: int, hw: int, channels: int, device: torch.device,
                  blocks: list[tuple[int, int]]) -> StatsBuffers:
    """The buffers for a launch over ``batch`` images of ``hw`` pixels x ``channels`` whose GroupNorm has
    ``groups`` groups and ``weight``; ``blocks``: the (BLOCK_M, BLOCK_N) tiles the launch may run with. Nothing
    is initialised (no launch): see :func:`tile_group_partials`."""
    def empty(*shape):
        return torch.empty(shape, device=device, dtype=torch.float32)
    return StatsBuffers(weight.contiguous(), empty(batch, channels), empty(batch, channels),
                        empty(stats_workspace_size(batch, hw, channels, groups, blocks)), stats_counter(device))


_counters: dict[torch.device, torch.Tensor] = {}


def stats_counter(device: torch.device) -> torch.Tensor:
    """The device's int32 program counter for :func:`finish_group_stats` (0 between launches: each launch's last
    program resets it). One per device: the launches that use it run in one stream, one after the other."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _counters:
        _counters[device] = torch.zeros(1, device=device, dtype=torch.int32)
    return _counters[device]

