"""2-D convolution as an implicit GEMM with a fused epilogue.

GEMM view: M = B*H'*W' output pixels, N = C_out, K = C_in*KH*KW. A program owns a [BLOCK_M, BLOCK_N] output
tile; it loops over the KH*KW taps (unrolled) and, per tap, over C_in in BLOCK_K chunks, gathering the input
pixels the tap reads ([BLOCK_M, BLOCK_K], zero outside the image: that is the padding) and the tap's weights
([BLOCK_K, BLOCK_N]). With ``circular`` (AUTOMATIC1111's "tiling": ``padding_mode="circular"`` on every conv)
the rows and columns outside the image wrap around instead (row -1 is row H-1), as ``F.pad(..., mode="circular")``
then an unpadded convolution. No im2col buffer. Input, weight, residual and output are all read through their strides,
so NCHW and channels_last work alike; channels_last activations are the fast path (the K loads are then
contiguous). The weights are read in the "kernel layout": logical shape [C_out, C_in, KH, KW], memory order
[KH, KW, C_in, C_out] (C_out contiguous, so the [BLOCK_K, BLOCK_N] weight tiles load coalesced). The model holds
its convolution weights that way from load on (``model/layers.py`` ``Conv2d``), so the kernel reads the
parameter's own storage: what a LoRA switch writes into it (``copy_``) is what the next launch, or a captured
CUDA graph's replay, reads. A weight in any other layout is repacked for that one call (nothing is kept: a
kept copy would go stale when the weight changes in place). Accumulation is float32
(full IEEE float32 products for float32 inputs). The epilogue adds bias, the per-(batch, channel) ``emb`` and
the ``residual``, multiplies by ``scale``, and stores once. ``UPSAMPLE`` 2 convolves the nearest-upsampled input
without storing it: the taps address the upsampled image and read pixel (h // 2, w // 2) of x.

The prologue (``norm_in``, issue 22 item 2): the GroupNorm (+ SiLU) that precedes most of the UNet's convolutions
is applied to each input tile as it is loaded, from per-(batch, channel) mean and scale that two small launches
compute first (``group_norm.group_norm_affine``): the normalised activations are never stored, and the
GroupNorm's apply pass (a read and a write of the activations) is gone. Zero padding stays zero (the padded
convolution of the normalised input, as the unfused model).

The statistics epilogue (``stats_for``, issue 22 item 6): when the output is what a GroupNorm reads next, the
kernel also computes that norm's per-(batch, channel) (mean, rstd * gamma) from its tiles as stored (partials per
(image, group), merged by the launch's last program: ``group_norm.tile_group_partials`` /
``finish_group_stats``), so the consumer's prologue finds them ready (``GroupNormIn.stats``) and the two
statistics launches before it are gone.

Filling the GPU (issue 22, "under-filled grids"): where the autotuned tiles fill less than two waves of the GPU's
SMs (SD 1.5's 32x32, 16x16 and 8x8 levels), the launch takes a small grid-filling tile, and where even that falls
short (the 8x8 level), each tile's C_in loop is split over SPLIT programs (:func:`split_k_for`); each stores its
float32 partial tile to a workspace [SPLIT, M, N], and the last of a tile's programs to finish (a per-tile arrival
count) sums them in split order and runs the epilogue once (``_split_k_sum``), the statistics epilogue included:
deterministic, no float atomics. SPLIT 1 is the kernel as it was: no workspace, no count.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels._triton import (FLOAT_DTYPES, KernelArgumentError, check_device, configs, dot_dtype,
                                     dot_precision, is_recording, launch, round_bf16_by_bits, rounds_bf16_by_bits,
                                     sm_count)
from tritonsd.kernels.group_norm import (GroupStats, StatsBuffers, finish_group_stats, group_norm_affine,
                                         group_norm_reference, stats_buffers, tile_group_partials)
from tritonsd.kernels.conv_layout import has_kernel_layout, kernel_layout_strides, to_kernel_layout  # noqa: F401

# at most 3 per key (each key is timed once per GPU; see compile/tuning.py); all use wgmma on sm_90 in fp16/bf16
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)]
]
INTERPRETED_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
GROUP_M = 8  # output-tile rows swept together, so neighbouring programs share weight tiles in L2
MIN_TRITON_C_IN = 16  # dispatch sends fewer input channels (the first convolutions, 3 or 4 wide) to the reference:
# their masked 4-wide channel tiles spill registers on sm_90 in every config (check-compile)


# With the GroupNorm prologue (NORM_IN), (128, 64, 32, 4 warps, 4 stages) spills 144 bytes (triton 3.9) / 136 bytes
# (3.6) on sm_90 at SD 1.5's 3x3 convolutions (check-compile, benchmarks/results/check-compile-sm_90-conv-groupnorm-*):
# those launches go to an autotuner without it.
CONFIGS_NORM_IN = [c for c in CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) != (128, 64, 4)]
# With the prologue and the GroupNorm statistics epilogue (NORM_IN + STATS_OUT), CONFIGS_NORM_IN's configs spill on
# sm_90 at SD 1.5's 3x3 convolutions (check-compile: (64, 128, 4 warps) 12 bytes in bf16 under triton 3.9;
# (128, 128, 8 warps, 3 or 4 stages) 8-24 bytes under 3.6): that variant has 8-warp tiles of 8192 outputs instead,
# which compile without a spill under both.
CONFIGS_NORM_STATS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
]
# Filling the GPU (issue 22, "under-filled grids"): where the autotuned tiles (CONFIGS*, at least 8192 outputs each)
# fill less than SPLIT_K_WAVES waves of the GPU's SMs (SD 1.5 512x512 on an H100: the 32x32, 16x16 and 8x8 levels),
# the launch takes the grid-filling tile instead (SPLIT_K_CONFIGS, 64x32), and where even those tiles fall short
# (the 8x8 level), every tile's C_in loop is split over SPLIT programs (see split_k_for), which sum their float32
# partials through a workspace (_split_k_sum). At SD 1.5 512x512 (UNet batch 2, 132 SMs): the 32x32 level (M =
# 2048, C_out 640) has 640 tiles, the 16x16 level (M = 512, C_out 1280) 320, unsplit; the 8x8 level (M = 128)
# 80 tiles, SPLIT 4. The workspace traffic is about SPLIT_K_WAVES x SMs float32 tiles written and read per split
# launch, so the split tile is small: 64x32 halves what a 64x64 tile writes (2.2 MB a launch on 132 SMs), and is
# the smallest tile sm_90's wgmma takes whole (BLOCK_M 64 per warp group).
SPLIT_K_WAVES = 2  # the waves of programs a launch fills, at least
MIN_K_CHUNKS_PER_SPLIT = 4  # every split sums at least this many BLOCK_K chunks (taps x its channel chunks)
# The split's reduction is unrolled (one load per split): check-compile at SD 1.5's launches (sm_90, triton 3.9 and
# 3.6) found spills with 64x64 tiles of 4 warps in every 3x3 variant at SPLIT 7 or more and with the GroupNorm
# prologue from SPLIT 2, and with 8 warps at SPLIT 14 (batch 1's 8x8 level) with the prologue; with 64x32 tiles of
# 4 warps, every 3x3 variant with the prologue at SPLIT 4 or 7 (124-248 bytes, 255 registers, both tritons), while
# 8 warps compile all 112 grid-filling launches without a spill (benchmarks/results/check-compile-sm_90-conv-grid-*).
MAX_SPLIT_K = 7
# one tile size for all grid-filling configs, so that the launcher knows the grid (and SPLIT) before the tuner picks
SPLIT_K_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bk, w, s in [(64, 8, 3)]
]
# M = batch x output pixels; stride_xc is 1 for channels_last input (the layout changes the best tile)
KEY = ["M", "C_IN", "C_OUT", "H", "W", "KH", "KW", "STRIDE", "PAD", "HAS_RES", "stride_xc", "NORM_IN", "STATS_OUT"]


@triton.jit
def _split_k_sum(acc, Ws, Counters, split, tile, offs_m, offs_n, m_ok, n_ok, N, MN, SPLIT_K: tl.constexpr):
    """Split-K's reduction: store this program's float32 partial ``acc`` [BLOCK_M, BLOCK_N] as split ``split`` of
    the workspace Ws [SPLIT_K, M, N], count its arrival at ``tile``; the last of the tile's SPLIT_K programs gets
    the sum of all partials in split order 0..SPLIT_K-1, ``m_ok`` and True (the others: ``m_ok`` all False, so
    the epilogue that follows loads and stores nothing, and False) and resets the count to 0 (a captured CUDA graph
    replays it).

    Why the last program sees every partial on a GPU: each program's threads store their part of the partial,
    meet at a barrier (all of the program's stores done), then one atomic add with release semantics at GPU
    scope publishes them with the count. The atomic adds on one counter form a single chain, each acquiring the
    previous releases, so the program that reads SPLIT_K - 1 has acquired every other program's stores; its
    loads come after that (a second barrier) and read through L2 (``.cg``: no stale L1 line). Deterministic: the
    sum runs in split order whichever program arrives last, with the partials rounded to float32 alike (its own
    taken from registers, the others from the workspace), so every run gives the same bits; no float atomics.
    """
    tile_ok = m_ok[:, None] & n_ok[None, :]
    ws_tile = Ws + offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] pointers into split 0 (int32: see
    tl.store(ws_tile + split * MN, acc, mask=tile_ok)      # the launcher's SPLIT_K * M * N < 2**31)
    tl.debug_barrier()
    arrived = tl.atomic_add(Counters + tile, 1, sem="acq_rel")
    tl.debug_barrier()
    last = arrived == SPLIT_K - 1
    # scalar conditions enter the masks through tl.where: triton 3.9's interpreter makes ``block & scalar`` int32
    total = tl.zeros_like(acc)
    for s in tl.static_range(SPLIT_K):
        part = tl.load(ws_tile + s * MN, mask=tl.where(last & (split != s), tile_ok, False), other=0.0,
                       cache_modifier=".cg")
        total += tl.where(split == s, acc, part)
    tl.store(Counters + tile, 0, mask=last)
    return total, tl.where(last, m_ok, False), last


@triton.jit
def _conv2d_kernel(
    X, Wt, Bias, Emb, Res, Y, NMean, NScale, NBias, SGamma, SMean, SScale, SPart, SCount,
    M, C_IN, H, W, C_OUT, H_OUT, W_OUT,
    stride_xb, stride_xc, stride_xh, stride_xw,
    X2, C1, stride_x2b, stride_x2c, stride_x2h, stride_x2w,  # TWO_INPUTS: channels [C1, C_IN) come from X2
    stride_wn, stride_wc, stride_wh, stride_ww,
    stride_eb, stride_en,
    stride_rb, stride_rc, stride_rh, stride_rw,
    stride_yb, stride_yc, stride_yh, stride_yw,
    scale, S_GROUPS, s_eps,
    Ws, Counters,  # split-K (SPLIT_K > 1): float32 partial tiles [SPLIT_K, M, C_OUT], an arrival count per tile
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, CIRCULAR: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_EMB: tl.constexpr, HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr,
    NORM_IN: tl.constexpr, SILU_IN: tl.constexpr, ROUND_BF16_BY_BITS: tl.constexpr, UPSAMPLE: tl.constexpr,
    TWO_INPUTS: tl.constexpr,
    STATS_OUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1,
):
    # grouped tile order (as the Triton matmul tutorial)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    c_lo = 0  # the input channels this program sums over, at every tap
    c_hi = C_IN
    if SPLIT_K > 1:  # programs [s * tiles, (s + 1) * tiles) take split s of every tile: C_in chunks [s * per, ...)
        split = pid // (num_m * num_n)
        pid = pid % (num_m * num_n)
        per = tl.cdiv(tl.cdiv(C_IN, BLOCK_K), SPLIT_K) * BLOCK_K
        c_lo = split * per
        c_hi = tl.minimum(c_lo + per, C_IN)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_OUT
    hw_out = H_OUT * W_OUT
    bidx = offs_m // hw_out  # [BLOCK_M] batch, output row, output column
    ho = (offs_m % hw_out) // W_OUT
    wo = offs_m % W_OUT
    x_batch = X + bidx.to(tl.int64) * stride_xb
    b64 = bidx.to(tl.int64)
    offs_k0 = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kh in tl.static_range(KH):
        hi = ho * STRIDE - PAD + kh
        if CIRCULAR:  # wrap around once (the launcher guarantees PAD <= H, W): every tap reads a real pixel
            hi = tl.where(hi < 0, hi + H, tl.where(hi >= H, hi - H, hi))
            h_ok = m_ok
        else:
            h_ok = m_ok & (hi >= 0) & (hi < H)
        for kw in tl.static_range(KW):
            wi = wo * STRIDE - PAD + kw
            if CIRCULAR:
                wi = tl.where(wi < 0, wi + W, tl.where(wi >= W, wi - W, wi))
                pix_ok = h_ok
            else:
                pix_ok = h_ok & (wi >= 0) & (wi < W)
            # [BLOCK_M] pointers to channel 0; H, W are the (nearest-)upsampled input's, x holds 1/UPSAMPLE of each
            x_pix = x_batch + (hi // UPSAMPLE) * stride_xh + (wi // UPSAMPLE) * stride_xw
            w_tap = Wt + kh * stride_wh + kw * stride_ww
            for c0 in range(c_lo, c_hi, BLOCK_K):
                offs_k = c0 + offs_k0
                k_ok = offs_k < c_hi
                a_ok = pix_ok[:, None] & k_ok[None, :]
                if TWO_INPUTS:  # the whole chunk comes from one input (the launcher checks C1 % BLOCK_K == 0);
                    # its base and strides are picked as scalars, so no second row of pointers stays live (a
                    # [BLOCK_M] select spilled 12-36 bytes in bf16 at SD 1.5's 8x8 split launches, triton 3.9);
                    # UPSAMPLE is 1 (the launcher)
                    from_x2 = c0 >= C1
                    a_pix = (tl.where(from_x2, X2, X) + b64 * tl.where(from_x2, stride_x2b, stride_xb)
                             + hi * tl.where(from_x2, stride_x2h, stride_xh)
                             + wi * tl.where(from_x2, stride_x2w, stride_xw))  # [BLOCK_M]
                    a_k = (offs_k - tl.where(from_x2, C1, 0)) * tl.where(from_x2, stride_x2c, stride_xc)
                else:
                    a_pix = x_pix
                    a_k = offs_k * stride_xc
                a = tl.load(a_pix[:, None] + a_k[None, :], mask=a_ok, other=0.0)  # [BLOCK_M, BLOCK_K]
                if NORM_IN:  # GroupNorm (+ SiLU) of the input as it is loaded; the padding stays zero
                    nk = bidx[:, None].to(tl.int64) * C_IN + offs_k[None, :]  # [BLOCK_M, BLOCK_K] into [B, C_in]
                    mean = tl.load(NMean + nk, mask=a_ok, other=0.0)
                    scl = tl.load(NScale + nk, mask=a_ok, other=0.0)
                    shift = tl.load(NBias + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                    a_norm = (a.to(tl.float32) - mean) * scl + shift[None, :]
                    if SILU_IN:
                        a_norm = a_norm / (1.0 + tl.exp(-a_norm))
                    a_norm = tl.where(a_ok, a_norm, 0.0)
                    if ROUND_BF16_BY_BITS:  # what the unfused GroupNorm stores, also under the interpreter
                        a = round_bf16_by_bits(a_norm)
                    else:
                        a = a_norm.to(X.dtype.element_ty)
                a = a.to(DOT_DTYPE)
                b = tl.load(w_tap + offs_k[:, None] * stride_wc + offs_n[None, :] * stride_wn,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_K, BLOCK_N]
                acc += tl.dot(a, b, input_precision=PRECISION)

    tile_done = True  # this program holds the tile's final values
    if SPLIT_K > 1:  # the tile's last program to finish goes on alone, with the sum of every split's partial
        acc, m_ok, tile_done = _split_k_sum(acc, Ws, Counters, split, pid, offs_m, offs_n, m_ok, n_ok, C_OUT, M * C_OUT, SPLIT_K)
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_EMB:
        acc += tl.load(Emb + bidx[:, None].to(tl.int64) * stride_eb + offs_n[None, :] * stride_en, mask=tile_ok,
                       other=0.0).to(tl.float32)
    if HAS_RES:
        r_ptr = (Res + bidx[:, None].to(tl.int64) * stride_rb + offs_n[None, :] * stride_rc
                 + (ho * stride_rh + wo * stride_rw)[:, None])
        acc += tl.load(r_ptr, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        acc = acc * scale
    y_ptr = (Y + bidx[:, None].to(tl.int64) * stride_yb + offs_n[None, :] * stride_yc
             + (ho * stride_yh + wo * stride_yw)[:, None])
    y = acc.to(Y.dtype.element_ty)
    tl.store(y_ptr, y, mask=tile_ok)
    if STATS_OUT:  # the next GroupNorm's statistics, of the values as stored (group_norm.py, issue 22 item 6)
        cg = C_OUT // S_GROUPS
        if tile_done:  # split-K: the tile's partial from its finishing program; every program is counted below
            tile_group_partials(y.to(tl.float32), offs_m, offs_n, m_ok, n_ok, pid_m, pid_n, M, hw_out, C_OUT, cg,
                                S_GROUPS, SPart, BLOCK_M, BLOCK_N)
        finish_group_stats(SPart, SCount, SGamma, SMean, SScale, M, hw_out, C_OUT, cg, S_GROUPS, s_eps,
                           BLOCK_M, BLOCK_N)


_CONV2D_JIT = _conv2d_kernel
_conv2d_kernel = triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=KEY)(_CONV2D_JIT)
_conv2d_norm_kernel = triton.autotune(configs=configs(CONFIGS_NORM_IN, INTERPRETED_CONFIG), key=KEY)(_CONV2D_JIT)
# with the GroupNorm statistics epilogue (STATS_OUT), without and with the prologue
_conv2d_stats_kernel = triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=KEY)(_CONV2D_JIT)
_conv2d_norm_stats_kernel = triton.autotune(configs=configs(CONFIGS_NORM_STATS, INTERPRETED_CONFIG),
                                            key=KEY)(_CONV2D_JIT)
_VARIANTS = {(False, False): _conv2d_kernel, (True, False): _conv2d_norm_kernel,
             (False, True): _conv2d_stats_kernel, (True, True): _conv2d_norm_stats_kernel}  # (norm_in, stats_out)
# SPLIT_K > 1 launches, with or without the GroupNorm prologue (SPLIT follows from the key's shape)
_conv2d_split_kernel = triton.autotune(configs=configs(SPLIT_K_CONFIGS, INTERPRETED_CONFIG), key=KEY)(_CONV2D_JIT)


def split_k_for(m: int, n: int, c_in_chunks: int, taps: int, block_m: int, block_n: int, sms: int | None) -> int:
    """SPLIT for an [m, n] output of ``block_m x block_n`` tiles whose K loop is ``taps`` x ``c_in_chunks`` chunks,
    on ``sms`` SMs (None: no GPU to fill, 1): 1 when the tiles alone fill SPLIT_K_WAVES waves; else the smallest
    SPLIT whose tiles x SPLIT do, at most one channel chunk per split and MIN_K_CHUNKS_PER_SPLIT chunks in all,
    and at most MAX_SPLIT_K."""
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if not sms or tiles >= SPLIT_K_WAVES * sms:
        return 1
    want = triton.cdiv(SPLIT_K_WAVES * sms, tiles)
    most = min(c_in_chunks, c_in_chunks * taps // MIN_K_CHUNKS_PER_SPLIT, MAX_SPLIT_K)
    return max(1, min(want, most))


def split_tile() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of every split-K config (one tile size: see SPLIT_K_CONFIGS)."""
    c = _conv2d_split_kernel.configs[0].kwargs
    return c["BLOCK_M"], c["BLOCK_N"]


def _fills_gpu(m: int, n: int, block_m: int, block_n: int, sms: int | None) -> bool:
    """Whether ``block_m x block_n`` tiles of an [m, n] output fill SPLIT_K_WAVES waves of ``sms`` SMs (None:
    no GPU to fill: they do)."""
    return not sms or triton.cdiv(m, block_m) * triton.cdiv(n, block_n) >= SPLIT_K_WAVES * sms


def _split_for_launch(split_k: int | None, m: int, c_out: int, c_in: int, taps: int, device: torch.device,
                      tuned: list[triton.Config]) -> int | None:
    """None: the autotuned tiles ``tuned`` (their smallest fills the GPU, or ``split_k`` is 1); else the
    grid-filling tile's SPLIT (1 or more): ``split_k`` when given, else :func:`split_k_for` on this device (1 when
    the workspace would outgrow the kernel's int32 offsets)."""
    if split_k == 1:
        return None
    if split_k is None:
        sms = sm_count(device)
        smallest = min(tuned, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]).kwargs
        if _fills_gpu(m, c_out, smallest["BLOCK_M"], smallest["BLOCK_N"], sms):
            return None
        block_k = max(c.kwargs["BLOCK_K"] for c in _conv2d_split_kernel.configs)  # the fewest chunks any config has
        split_k = split_k_for(m, c_out, triton.cdiv(c_in, block_k), taps, *split_tile(), sms)
        return split_k if split_k * m * c_out < 2**31 else 1
    if split_k * m * c_out >= 2**31:
        raise KernelArgumentError(f"split_k={split_k}: the workspace of {split_k} x {m} x {c_out} float32 partials "
                                  "is too large (2**31 elements at most)")
    return split_k


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}  # per device: int32 arrival counts, every one left at 0


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros the split-K launches share on ``device`` (each launch resets those it counted on). A
    larger buffer is added when needed, never swapped for: a captured CUDA graph keeps its buffer's address.
    (Split launches on concurrent streams would share counts: the runtime issues its kernels on one stream.)"""
    if is_recording():
        return torch.empty(n, device=device, dtype=torch.int32)  # meta: nothing runs
    kept = _COUNTERS.setdefault(device, [])
    if not kept or kept[-1].numel() < n:
        kept.append(torch.zeros(max(n, 4096), device=device, dtype=torch.int32))
    return kept[-1][:n]


def _as_int(v) -> int | None:
    """An int stride/padding, or a pair of equal ints; None for anything else (the reference handles it)."""
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1] and isinstance(v[0], int):
        return v[0]
    return None


def _output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding,
                  upsample: int = 1, x2_channels: int = 0) -> tuple[int, int, int, int] | None:
    """[B, C_out, H', W'] for the convolutions the kernel covers (of x upsampled ``upsample`` times, with
    ``x2_channels`` more input channels from a second input), None for the others."""
    st, pad = _as_int(stride), _as_int(padding)
    if (x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1] + x2_channels or st is None
            or pad is None or st < 1):
        return None
    h_out = (x.shape[2] * upsample + 2 * pad - weight.shape[2]) // st + 1
    w_out = (x.shape[3] * upsample + 2 * pad - weight.shape[3]) // st + 1
    if h_out <= 0 or w_out <= 0:
        return None  # the reference raises its own error
    return x.shape[0], weight.shape[0], h_out, w_out


class GroupNormIn(NamedTuple):
    """A GroupNorm (optionally followed by SiLU) applied to the convolution's input as it is loaded:
    ``silu(F.group_norm(x, groups, weight, bias, eps))`` in float32, rounded to x's dtype (the unfused op's)."""

    weight: torch.Tensor
    bias: torch.Tensor
    groups: int = 32
    eps: float = 1e-5
    silu: bool = False
    stats: GroupStats | None = None  # x's (mean, scale) made by the kernel that wrote x (its stats epilogue)


def _stats_fit(norm: GroupNormIn | None, x: torch.Tensor) -> bool:
    """Whether ``norm.stats`` are x's [B, C] float32 (mean, scale) on x's device."""
    st = norm.stats if norm is not None else None
    return st is not None and all(t.shape == x.shape[:2] and t.dtype == torch.float32 and t.device == x.device
                                  for t in st)


def _stats_fit_cat(norm: GroupNormIn | None, x: torch.Tensor, x2: torch.Tensor) -> bool:
    """:func:`_stats_fit` for the concatenation of x and x2 along the channels: [B, C1 + C2] float32."""
    st = norm.stats if norm is not None else None
    shape = (x.shape[0], x.shape[1] + x2.shape[1])
    return st is not None and all(tuple(t.shape) == shape and t.dtype == torch.float32 and t.device == x.device
                                  for t in st)


def two_input_alignment() -> int:
    """The channel multiple C1 must be for the two-input kernel: every config's BLOCK_K of every variant (each K
    chunk then lies within one input)."""
    kernels = (*_VARIANTS.values(), _conv2d_split_kernel)
    return math.lcm(*(c.kwargs["BLOCK_K"] for k in kernels for c in k.configs))


def _two_inputs_fit(x: torch.Tensor, x2: torch.Tensor, norm_in: GroupNormIn | None, upsample: int) -> bool:
    """Whether the kernel reads ``cat([x, x2], 1)`` from x and x2 themselves: 4-D inputs of one float dtype,
    batch and size; C1 a multiple of :func:`two_input_alignment`; no upsampling; a GroupNorm prologue's
    statistics given (made by ``concat.concat_stats``: the launcher's own two launches read one tensor)."""
    return (x.dim() == 4 and x2.dim() == 4 and x.shape[0] == x2.shape[0] and x.shape[2:] == x2.shape[2:]
            and x.dtype == x2.dtype and x.dtype in FLOAT_DTYPES and x.device == x2.device and upsample == 1
            and x.shape[1] > 0 and x.shape[1] % two_input_alignment() == 0
            and (norm_in is None or _stats_fit_cat(norm_in, x, x2)))


def _stats_possible(norm: GroupNormIn | None, c_out: int) -> bool:
    return norm is not None and norm.weight is not None and norm.groups > 0 and c_out % norm.groups == 0


def conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                  padding: int = 0, emb: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                  scale: float | None = None, out: torch.Tensor | None = None,
                  circular: bool = False, norm_in: GroupNormIn | None = None, upsample: int = 1,
                  stats_for: GroupNormIn | None = None, split_k: int | None = None,
                  x2: torch.Tensor | None = None):
    """Same contract as :func:`conv2d_reference`; ``out`` (optional, [B, C_out, H', W']) receives the result.

    Falls back to the reference (which also raises the errors for bad shapes) for grouped convolutions,
    unequal or string stride/padding, dtypes other than float16/bfloat16/float32, x and weight of different
    dtypes, emb/residual shapes that only broadcast, or circular padding wider than the image (torch refuses
    it; the kernel wraps once), or a ``norm_in`` whose groups do not divide C_in or that lacks weight or bias.
    Its output is channels-last. ``circular`` is not part of the autotune key: the wrap-around changes only the
    load addresses, so both modes share the tuned tile. ``norm_in``: its statistics are ``norm_in.stats`` when
    given (made by the kernel that wrote x), else two small launches (``group_norm.group_norm_affine``); the
    kernel normalises each input tile as it loads it. ``upsample``
    2: the convolution of x nearest-upsampled 2x (the UNet's and VAE's ``Upsample``), reading each of x's pixels
    where the upsampled one would be (the 4x larger tensor is never stored); not in the autotune key (only the
    load addresses change: the upsampled shape's tuned tile serves). Other factors run the reference.

    ``stats_for``: the GroupNorm that reads the output next (its weight, groups, eps; bias and silu unused). The
    result is then ``(y, GroupStats | None)``: y's per-(batch, channel) (mean, rstd * weight), computed in this
    launch's epilogue from the values as stored (None where the reference ran, or the groups do not divide C_out).
    ``split_k``: None picks the tile and SPLIT for this device (the autotuned tiles where they fill two waves of
    its SMs, else the grid-filling 64x32 tile, split where :func:`split_k_for` says); 1 is the autotuned tiles
    unsplit; more is the grid-filling tile split that many ways.

    ``x2``: a second input [B, C2, H, W]; the convolution is then that of ``torch.cat([x, x2], 1)`` (the weight has
    C1 + C2 input channels; ``norm_in`` indexes the concatenated channels), read from x and x2 themselves (the
    decoder's skip connections: the concatenation is never stored). Where :func:`_two_inputs_fit` does not hold
    (C1 not a multiple of every config's BLOCK_K, ``upsample`` 2, no statistics for ``norm_in``, mismatched
    inputs), x and x2 are concatenated first (torch's cat, which raises for mismatched sizes) and the one-input
    path runs.
    """
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise KernelArgumentError(f"split_k must be a positive integer or None, got {split_k!r}")
    if x2 is not None and not _two_inputs_fit(x, x2, norm_in, upsample):
        x, x2 = torch.cat([x, x2], 1), None
    y, stats = _conv2d(x, weight, bias, stride, padding, emb, residual, scale, out, circular, norm_in, upsample,
                       stats_for, split_k, x2)
    return y if stats_for is None else (y, stats)


def _conv2d(x, weight, bias, stride, padding, emb, residual, scale, out, circular, norm_in, upsample, stats_for,
            split_k, x2=None):
    c2 = x2.shape[1] if x2 is not None else 0
    out_shape = _output_shape(x, weight, stride, padding, upsample, c2) if upsample in (1, 2) else None
    if (out_shape is None or x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype
            or (emb is not None and tuple(emb.shape) != out_shape[:2])
            or (residual is not None and tuple(residual.shape) != out_shape)
            or (circular and _as_int(padding) > upsample * min(x.shape[2], x.shape[3]))
            or (norm_in is not None and (norm_in.weight is None or norm_in.bias is None or norm_in.groups <= 0
                                         or (x.shape[1] + c2) % norm_in.groups))):
        if x2 is not None:
            x = torch.cat([x, x2], 1)
        result = conv2d_reference(x, weight, bias, stride, padding, emb=emb, residual=residual, scale=scale,
                                  circular=circular, norm_in=norm_in, upsample=upsample)
        return (result if out is None else out.copy_(result)), None
    check_device(x, x2, weight, bias, emb, residual, out, *(norm_in[:2] if norm_in is not None else ()),
                 *(stats_for[:1] if stats_for is not None else ()))
    bsz, c1, h, w = x.shape
    c_in = c1 + c2  # the convolution's input channels: x's, then x2's
    c_out, _, kh, kw = weight.shape
    st, pad = _as_int(stride), _as_int(padding)
    h_out, w_out = out_shape[2:]
    if out is None:
        out_dtype = x.dtype  # as the reference's type promotion
        for t in (emb, residual):
            if t is not None:
                out_dtype = torch.promote_types(out_dtype, t.dtype)
        out = torch.empty(out_shape, device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    m = bsz * h_out * w_out
    if m == 0 or c_out == 0:
        return out, None
    if not x.is_contiguous(memory_format=torch.channels_last):
        # Channels-last in and out: gathering channels H*W apart (NCHW), or storing and reading the residual
        # with the pixel index split into NCHW strides, spills registers on sm_90 (check-compile: up to 5.9 KB
        # per thread in every config); the first convolution copies its input once, the rest chain channels-last.
        x = x.contiguous(memory_format=torch.channels_last)
    if x2 is not None and not x2.is_contiguous(memory_format=torch.channels_last):
        x2 = x2.contiguous(memory_format=torch.channels_last)
    if residual is not None and not residual.is_contiguous(memory_format=torch.channels_last):
        residual = residual.contiguous(memory_format=torch.channels_last)
    weight = to_kernel_layout(weight)  # the model's own weights already are: no copy (see the module docstring)
    e = emb if emb is not None else out
    r = residual if residual is not None else out
    if norm_in is not None:
        # made by the kernel that wrote x (with x2: always, _two_inputs_fit): nothing to launch
        if x2 is not None or _stats_fit(norm_in, x):
            n_mean, n_scale = norm_in.stats
        else:
            n_mean, n_scale = group_norm_affine(x, norm_in.weight, norm_in.groups, norm_in.eps)  # [B, C_in] fp32
        n_bias = norm_in.bias.contiguous()
    else:
        n_mean = n_scale = n_bias = out
    stats_out = _stats_possible(stats_for, c_out)
    kernel = _VARIANTS[(norm_in is not None, stats_out)]
    split = _split_for_launch(split_k, m, c_out, c_in, kh * kw, x.device, kernel.configs)
    if split is not None:  # the grid-filling tile (see SPLIT_K_CONFIGS), its C_in loop split SPLIT ways
        kernel = _conv2d_split_kernel
    else:
        split = 1
    if stats_out:
        s_groups, s_eps = stats_for.groups, float(stats_for.eps)
        blocks = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kernel.configs]
        sb = stats_buffers(stats_for.weight, s_groups, bsz, h_out * w_out, c_out, x.device, blocks)
    else:
        s_groups, s_eps = 1, 0.0
        sb = StatsBuffers(out, out, out, out, out)  # unused
    ws = counters = out  # unused unless split
    if split > 1:
        ws = torch.empty((split, m, c_out), device=x.device, dtype=torch.float32)  # every element written first
        counters = _counters(x.device, triton.cdiv(m, split_tile()[0]) * triton.cdiv(c_out, split_tile()[1]))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]) * split,)  # noqa: E731
    launch(
        kernel, grid, x, weight, bias if bias is not None else weight, e, r, out, n_mean, n_scale, n_bias,
        *sb,
        m, c_in, h * upsample, w * upsample, c_out, h_out, w_out,
        *x.stride(),
        x2 if x2 is not None else x, c1, *(x2 if x2 is not None else x).stride(),
        *weight.stride(),
        e.stride(0), e.stride(1),
        *r.stride(), *out.stride(),
        1.0 if scale is None else float(scale), s_groups, s_eps,
        ws, counters,
        KH=kh, KW=kw, STRIDE=st, PAD=pad, CIRCULAR=bool(circular) and pad > 0,
        HAS_BIAS=bias is not None, HAS_EMB=emb is not None, HAS_RES=residual is not None,
        HAS_SCALE=scale is not None, NORM_IN=norm_in is not None, SILU_IN=norm_in is not None and bool(norm_in.silu),
        ROUND_BF16_BY_BITS=norm_in is not None and rounds_bf16_by_bits(x.dtype), UPSAMPLE=upsample,
        TWO_INPUTS=x2 is not None,
        STATS_OUT=stats_out,
        PRECISION=dot_precision(x.dtype), DOT_DTYPE=dot_dtype(x.dtype), GROUP=GROUP_M,
        **({"SPLIT_K": split} if split > 1 else {}),
    )
    return out, (sb.stats if stats_out else None)


def conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                     padding: int = 0, emb: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                     scale: float | None = None, circular: bool = False,
                     norm_in: GroupNormIn | None = None, upsample: int = 1) -> torch.Tensor:
    """``(conv2d(x) + bias + emb[:, :, None, None] + residual) * scale``, each term optional. ``circular``:
    the padding wraps around (``nn.Conv2d``'s ``padding_mode="circular"``: ``F.pad`` circular, then no padding).
    ``norm_in``: x is first ``group_norm_reference(x, ...)`` (the unfused GroupNorm, SiLU included); then
    ``upsample`` > 1: ``F.interpolate(x, scale_factor=upsample, mode="nearest")`` (the UNet's and VAE's Upsample)."""
    if norm_in is not None:
        x = group_norm_reference(x, norm_in.weight, norm_in.bias, norm_in.groups, norm_in.eps, silu=norm_in.silu)
    if upsample != 1:
        x = F.interpolate(x, scale_factor=float(upsample), mode="nearest")  # [B, C, H*up, W*up]
    if circular:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        x = F.pad(x, (pw, pw, ph, ph), mode="circular")  # [B, C, H + 2ph, W + 2pw]
        padding = 0
    y = F.conv2d(x, weight, bias, stride, padding)
    if emb is not None:
        y = y + emb[:, :, None, None]
    if residual is not None:
        y = y + residual
    if scale is not None:
        y = y * scale
    return y
