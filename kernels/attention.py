"""Flash attention forward: online softmax over key blocks, float32 scores and accumulators.

q, k and v are read in place through their strides ([B, N, H*D] views such as the chunks of a fused qkv
projection); no transposed or contiguous copies are made.

Head dims that are not a power of two (40, 80, 160 in SD) are split into two power-of-two slabs,
``D = D0 + D1``: D0 the largest power of two <= D and D1 the tail rounded up to a power of two (at least 16,
tl.dot's minimum), masked beyond D. 80 = 64 + 16 and 160 = 128 + 32 waste nothing; 40 = 32 + 16 computes 48
columns (instead of 64 for a blind pad). Both slabs are loaded once per block, q.k^T is the sum of two dots and
the output keeps two accumulators, so the tensor cores see only power-of-two tiles.

Cross-attention with its query projection (issue 22; :func:`cross_q_attention_triton`): the transformer block's
attn2 computes ``q = LayerNorm(x) @ Wq^T`` and attends over the text's keys. Its kernel makes each program's q tile
itself (BLOCK_M rows of one image, one head's D columns of Wq): the rows' LayerNorm statistics over all C channels
and the normalised x tiles as kernels/linear.py's prologue does them (its jitted helpers), the product accumulated
in float32 and rounded to x's dtype as the unfused GEMM stores q, then the same flash loop (:func:`_attend`). q is
never written to memory (B*N*H*D elements written and read back per block, one launch fewer); each program re-reads
its x rows (from L2: the heads of one row block read the same rows) and its head's D x C slab of Wq.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels._triton import (FLOAT_DTYPES, KernelArgumentError, check_device, configs, dot_dtype,
    dot_precision, launch, next_power_of_2, round_bf16_by_bits, rounds_bf16_by_bits, shipped)
from tritonsd.kernels.linear import Norm, _layer_norm_tile, _row_stats

MAX_HEAD_DIM = 512  # larger head dims fall back to the reference (the accumulators would not fit in registers)
LOG2E = 1.4426950408889634

# Autotune candidates per class of padded head dim (the accumulators' register footprint grows with D), at most
# 3 per key, pruned with ``tritonsd check-compile --arch sm_90`` (benchmarks/results/check-compile-sm_90*.json):
# every fp16/bf16 config uses wgmma and spills nothing. BLOCK_M=32 fell back to mma.sync; at D=512, (64, 16, 4 warps,
# 2) spilled 4.6 KB and (64, 32, 8 warps, 2) 40 bytes.
CONFIGS_SMALL_D = [  # D0 + D1 <= 64
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]
]
CONFIGS_MEDIUM_D = [  # D0 + D1 <= 160
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)]  # (128, 32, 4 warps, 3): 16 B spill
]
LARGE_D = [(64, 32, 8, 1), (64, 16, 8, 2), (64, 16, 8, 1)]  # (BLOCK_M, BLOCK_N, warps, stages)
# Register allocation differs between Triton releases: a row listed here is shipped only from the Triton version
# where check-compile found it spill-free. (64, 32, 8 warps, 1 stage) at D=512 spills 880 bytes on sm_90 under
# triton 3.6 (the GPU image's; 255 registers) and nothing under 3.9 (benchmarks/results/check-compile-sm_90*.json;
# 3.7 and 3.8 not checked, so not shipped there).
LARGE_D_SINCE_TRITON = {(64, 32, 8, 1): (3, 9)}
CONFIGS_LARGE_D = [  # up to 512 (VAE mid-block, one head), half precision
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in shipped(LARGE_D, LARGE_D_SINCE_TRITON)
]
CONFIGS_LARGE_D_FP32 = [  # float32 tiles of D up to 512 fit shared memory only in small blocks (no wgmma in fp32)
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 32, 4, 2), (32, 16, 4, 1)]
]
INTERPRETED_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)
# Cross-attention with its query projection (:func:`cross_q_attention_triton`): the attention's tiles plus BLOCK_K,
# the projection's step over the query's channels; head dims up to 160 (D0 + D1), SD's cross-attention. Checked
# with ``tritonsd check-compile --arch sm_90 --kernels attention`` at SD 1.5's, SD 2.1's and SDXL's shapes under
# triton 3.9 and 3.6 (benchmarks/results/check-compile-sm_90-attention-crossq*-triton3.*.json): wgmma, no spill;
# the fullest are (128, 64, 64, 4 warps) at D=40 and D=64 (254-255 registers) and (64, 64, 64, 4 warps) at D=160
# (250-254).
CROSS_Q_SMALL_D = [(128, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3)]  # D0 + D1 <= 64
CROSS_Q_MEDIUM_D = [(128, 64, 64, 8, 3), (128, 32, 64, 8, 3), (64, 64, 64, 4, 3)]  # D0 + D1 <= 160
CROSS_Q_MAX_SLABS = 160
INTERPRETED_CROSS_Q_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4,
                                          num_stages=1)


def _cross_q_configs(rows: list[tuple]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in rows]


@triton.jit
def _attend(
    q0, q1, k_base, v_base, o_base, offs_m, row_ok, pid_m, M, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    """The flash loop of one program: its query rows' slabs q0 [BLOCK_M, D0] and q1 [BLOCK_M, D1] (unused when
    D1 == 0) against every key block of one head, the result stored to o_base's rows ``offs_m``."""
    offs_d0 = tl.arange(0, D0)
    d0_ok = offs_d0 < HEAD_D  # all-true unless HEAD_D < 16
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_ok = offs_d1 < HEAD_D
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    hi = M
    if CAUSAL:
        hi = tl.minimum(M, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        # k^T slabs: [D, BLOCK_N]
        k0 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d0[:, None] * stride_kd,
                     mask=col_ok[None, :] & d0_ok[:, None], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q0, k0, input_precision=PRECISION)
        if D1 > 0:
            k1 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d1[:, None] * stride_kd,
                         mask=col_ok[None, :] & d1_ok[:, None], other=0.0).to(DOT_DTYPE)
            s += tl.dot(q1, k1, input_precision=PRECISION)
        s = s * qk_scale  # log2 units: softmax via exp2
        if CAUSAL:
            s = tl.where(col_ok[None, :] & (offs_n[None, :] <= offs_m[:, None]), s, float("-inf"))
        elif not EVEN_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds a valid key for every row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p = p.to(v_base.dtype.element_ty).to(DOT_DTYPE)  # P in v's dtype, as flash attention does
        v0 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd,
                     mask=col_ok[:, None] & d0_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd,
                         mask=col_ok[:, None] & d1_ok[None, :], other=0.0).to(DOT_DTYPE)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)

    inv_l = 1.0 / l_i
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d0[None, :] * stride_od,
             (acc0 * inv_l[:, None]).to(o_base.dtype.element_ty), mask=row_ok[:, None] & d0_ok[None, :])
    if D1 > 0:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d1[None, :] * stride_od,
                 (acc1 * inv_l[:, None]).to(o_base.dtype.element_ty), mask=row_ok[:, None] & d1_ok[None, :])


@triton.jit
def _attention_kernel(
    Q, K, V, O,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_ob, stride_on, stride_od,
    H, N, M, qk_scale,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * HEAD_D * stride_qd
    k_base = K + b * stride_kb + h * HEAD_D * stride_kd
    v_base = V + b * stride_vb + h * HEAD_D * stride_vd
    o_base = O + b * stride_ob + h * HEAD_D * stride_od

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d0 = tl.arange(0, D0)
    q0 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d0[None, :] * stride_qd,
                 mask=row_ok[:, None] & (offs_d0 < HEAD_D)[None, :], other=0.0).to(DOT_DTYPE)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d1[None, :] * stride_qd,
                     mask=row_ok[:, None] & (offs_d1 < HEAD_D)[None, :], other=0.0).to(DOT_DTYPE)
    else:
        q1 = q0  # unused
    _attend(q0, q1, k_base, v_base, o_base, offs_m, row_ok, pid_m, M, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
            HEAD_D, D0, D1, CAUSAL, PRECISION, DOT_DTYPE, BLOCK_M, BLOCK_N, EVEN_N)


@triton.jit
def _stored(x, Like, ROUND_BF16_BY_BITS: tl.constexpr):
    """float32 ``x`` rounded to Like's element type as a GPU store rounds it (to nearest even; under the interpreter
    bfloat16 goes through ``round_bf16_by_bits``, its cast truncates)."""
    if ROUND_BF16_BY_BITS:
        x = round_bf16_by_bits(x)
    else:
        x = x.to(Like.dtype.element_ty)
    return x


@triton.jit
def _cross_q_attention_kernel(
    X, Wq, Bq, LnW, LnB, K, V, O,
    stride_xb, stride_xn, stride_xc,
    stride_wn, stride_wc,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_ob, stride_on, stride_od,
    H, N, M, C, eps, qk_scale,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROUND_BF16_BY_BITS: tl.constexpr,
    HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """:func:`_attention_kernel` whose q tile is made here: ``LayerNorm(x rows) @ Wq[h*D:(h+1)*D]^T + bq``,
    accumulated in float32 over x's C channels, then rounded to x's dtype as the unfused GEMM stores q."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    x_base = X + b * stride_xb
    w_base = Wq + (h * HEAD_D).to(tl.int64) * stride_wn  # this head's D rows of Wq [H*D, C]
    k_base = K + b * stride_kb + h * HEAD_D * stride_kd
    v_base = V + b * stride_vb + h * HEAD_D * stride_vd
    o_base = O + b * stride_ob + h * HEAD_D * stride_od

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_d0 = tl.arange(0, D0)
    d0_ok = offs_d0 < HEAD_D
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_ok = offs_d1 < HEAD_D
    if NORM:
        mean, rstd = _row_stats(x_base, offs_m, row_ok, C, eps, stride_xn, stride_xc, BLOCK_M, BLOCK_K)
    q0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        q1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    x_ptr = x_base + offs_m[:, None].to(tl.int64) * stride_xn + offs_k[None, :] * stride_xc  # [BLOCK_M, BLOCK_K]
    for k0 in range(0, C, BLOCK_K):
        k_ok = (k0 + offs_k) < C
        a = tl.load(x_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            a = _layer_norm_tile(a, mean, rstd, LnW, LnB, k0 + offs_k, k_ok, ROUND_BF16_BY_BITS)
        a = a.to(DOT_DTYPE)
        # Wq^T slabs: [BLOCK_K, D]
        w0 = tl.load(w_base + offs_d0[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wc,
                     mask=k_ok[:, None] & d0_ok[None, :], other=0.0).to(DOT_DTYPE)
        q0 += tl.dot(a, w0, input_precision=PRECISION)
        if D1 > 0:
            w1 = tl.load(w_base + offs_d1[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wc,
                         mask=k_ok[:, None] & d1_ok[None, :], other=0.0).to(DOT_DTYPE)
            q1 += tl.dot(a, w1, input_precision=PRECISION)
        x_ptr += BLOCK_K * stride_xc
    if HAS_BIAS:
        q0 += tl.load(Bq + h * HEAD_D + offs_d0, mask=d0_ok, other=0.0).to(tl.float32)[None, :]
    # q as the unfused GEMM stores it (x's dtype, to nearest even), then the dot operand
    q0 = _stored(q0, X, ROUND_BF16_BY_BITS).to(DOT_DTYPE)
    if D1 > 0:
        if HAS_BIAS:
            q1 += tl.load(Bq + h * HEAD_D + offs_d1, mask=d1_ok, other=0.0).to(tl.float32)[None, :]
        q1 = _stored(q1, X, ROUND_BF16_BY_BITS).to(DOT_DTYPE)
    else:
        q1 = q0  # unused
    _attend(q0, q1, k_base, v_base, o_base, offs_m, row_ok, pid_m, M, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
            HEAD_D, D0, D1, False, PRECISION, DOT_DTYPE, BLOCK_M, BLOCK_N, EVEN_N)


def _tuned(configs_list: list[triton.Config]):
    return triton.autotune(configs=configs(configs_list, INTERPRETED_CONFIG),
                           key=["HEAD_D", "CAUSAL", "N", "M"])(
        triton.heuristics({"EVEN_N": lambda a: a["M"] % a["BLOCK_N"] == 0})(_attention_kernel))


# One autotuner per head-dim class, so each class only tries configs whose tiles fit.
_KERNEL_SMALL_D = _tuned(CONFIGS_SMALL_D)
_KERNEL_MEDIUM_D = _tuned(CONFIGS_MEDIUM_D)
_KERNEL_LARGE_D = _tuned(CONFIGS_LARGE_D)
_KERNEL_LARGE_D_FP32 = _tuned(CONFIGS_LARGE_D_FP32)


def _tuned_cross_q(rows: list[tuple]):
    return triton.autotune(configs=configs(_cross_q_configs(rows), INTERPRETED_CROSS_Q_CONFIG),
                           key=["HEAD_D", "N", "M", "C", "HAS_BIAS", "NORM"])(
        triton.heuristics({"EVEN_N": lambda a: a["M"] % a["BLOCK_N"] == 0})(_cross_q_attention_kernel))


_CROSS_Q_SMALL_D = _tuned_cross_q(CROSS_Q_SMALL_D)
_CROSS_Q_MEDIUM_D = _tuned_cross_q(CROSS_Q_MEDIUM_D)


def split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): power-of-two slabs covering d with D1 = 0 when d is a power of two (see the module docstring)."""
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return (d0, 0) if rest == 0 else (d0, max(16, next_power_of_2(rest)))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise KernelArgumentError(f"attention takes q [B, N, H*D], k and v [B, M, H*D]; got ranks "
                                  f"{q.dim()}, {k.dim()}, {v.dim()}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise KernelArgumentError(f"attention shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                  f"v {tuple(v.shape)}")
    if heads <= 0 or q.shape[2] % heads:
        raise KernelArgumentError(f"width {q.shape[2]} is not divisible into {heads} heads")


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`attention_reference`; ``out`` (optional, [B, N, H*D]) receives the result.

    Falls back to the reference for what the kernel does not cover: head dims above 512, dtypes other than
    float16/bfloat16/float32, q, k, v of different dtypes, or no keys at all.
    """
    _check(q, k, v, heads)
    b, n, hd = q.shape
    m = k.shape[1]
    d = hd // heads
    if d > MAX_HEAD_DIM or m == 0 or q.dtype not in FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        result = attention_reference(q, k, v, heads, causal=causal)
        return result if out is None else out.copy_(result)
    check_device(q, k, v, out)
    if out is None:
        out = torch.empty((b, n, hd), device=q.device, dtype=q.dtype)
    if b == 0 or n == 0:
        return out
    d0, d1 = split_head_dim(d)
    if d0 + d1 <= 64:
        kernel = _KERNEL_SMALL_D
    elif d0 + d1 <= 160:
        kernel = _KERNEL_MEDIUM_D
    else:
        kernel = _KERNEL_LARGE_D_FP32 if q.dtype == torch.float32 else _KERNEL_LARGE_D
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * heads)  # noqa: E731
    launch(
        kernel, grid, q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, n, m, LOG2E / math.sqrt(d),
        HEAD_D=d, D0=d0, D1=d1, CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype),
        DOT_DTYPE=dot_dtype(q.dtype),
    )
    return out


def covers_cross_q(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: torch.Tensor,
                   v: torch.Tensor, heads: int, norm: Norm | None = None) -> bool:
    """Whether :func:`cross_q_attention_triton` runs its kernel for these arguments (else its reference): x
    [B, N, C], weight [H*D, C], k and v [B, M, H*D] with M > 0, head dims up to 160 (two slabs of at most 160),
    one float dtype for every tensor, norm and bias of the right shapes."""
    if x.dim() != 3 or weight.dim() != 2 or k.dim() != 3 or v.dim() != 3 or heads <= 0:
        return False
    b, _, c = x.shape
    hd = weight.shape[0]
    if weight.shape[1] != c or hd % heads or k.shape != v.shape or k.shape[0] != b or k.shape[2] != hd:
        return False
    d0, d1 = split_head_dim(hd // heads)
    tensors = [x, weight, k, v] + ([bias] if bias is not None else [])
    if norm is not None:
        if norm.weight is None or norm.bias is None:
            return False
        tensors += [norm.weight, norm.bias]
        if any(tuple(p.shape) != (c,) for p in (norm.weight, norm.bias)):
            return False
    if bias is not None and tuple(bias.shape) != (hd,):
        return False
    return (d0 + d1 <= CROSS_Q_MAX_SLABS and k.shape[1] > 0 and c > 0 and x.dtype in FLOAT_DTYPES
            and all(t.dtype == x.dtype for t in tensors))


def cross_q_attention_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: torch.Tensor,
                             v: torch.Tensor, heads: int, norm: Norm | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`cross_q_attention_reference`, in one launch: each program projects its own query
    tile (``q`` is never written to memory) and runs the flash loop over k and v; ``out`` (optional,
    [B, N, H*D]) receives the result. Falls back to the reference for what :func:`covers_cross_q` rejects."""
    if not covers_cross_q(x, weight, bias, k, v, heads, norm):
        result = cross_q_attention_reference(x, weight, bias, k, v, heads, norm)
        return result if out is None else out.copy_(result)
    check_device(x, weight, bias, k, v, out, *(norm[:2] if norm is not None else ()))
    b, n, c = x.shape
    hd, m = weight.shape[0], k.shape[1]
    d = hd // heads
    if out is None:
        out = torch.empty((b, n, hd), device=x.device, dtype=x.dtype)
    if b == 0 or n == 0:
        return out
    d0, d1 = split_head_dim(d)
    kernel = _CROSS_Q_SMALL_D if d0 + d1 <= 64 else _CROSS_Q_MEDIUM_D
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * heads)  # noqa: E731
    bq = bias.contiguous() if bias is not None else weight  # a dummy when HAS_BIAS is off (never read)
    ln_w, ln_b = (norm.weight.contiguous(), norm.bias.contiguous()) if norm is not None else (weight, weight)
    launch(
        kernel, grid, x, weight, bq, ln_w, ln_b, k, v, out,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, n, m, c, float(norm.eps) if norm is not None else 0.0, LOG2E / math.sqrt(d),
        HAS_BIAS=bias is not None, NORM=norm is not None,
        # the normalised activations and q round as the GPU rounds them, also under the interpreter
        ROUND_BF16_BY_BITS=rounds_bf16_by_bits(x.dtype),
        HEAD_D=d, D0=d0, D1=d1, PRECISION=dot_precision(x.dtype), DOT_DTYPE=dot_dtype(x.dtype),
    )
    return out


def cross_q_attention_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: torch.Tensor,
                                v: torch.Tensor, heads: int, norm: Norm | None = None) -> torch.Tensor:
    """``attention(F.linear(F.layer_norm(x), weight, bias), k, v)``: the unfused model's ops. x: [B, N, C], weight:
    [H*D, C], k and v: [B, M, H*D] -> [B, N, H*D]."""
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    return attention_reference(F.linear(x, weight, bias), k, v, heads)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head. q: [B, N, H*D], k, v: [B, M, H*D] -> [B, N, H*D]."""
    b, n, hd = q.shape
    m = k.shape[1]
    d = hd // heads
    # [B, N, H*D] -> [B, H, N, D]
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, m, heads, d).transpose(1, 2)
    vh = v.reshape(b, m, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    # [B, H, N, D] -> [B, N, H*D]
    return out.transpose(1, 2).reshape(b, n, hd)
