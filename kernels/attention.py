"""Flash attention forward: online softmax over key blocks, float32 scores and accumulators.

q, k and v are read in place through their strides ([B, N, H*D] views such as the chunks of a fused qkv
projection); no transposed or contiguous copies are made.

Head dims that are not a power of two (40, 80, 160 in SD) are split into two power-of-two slabs,
``D = D0 + D1``: D0 the largest power of two <= D and D1 the tail rounded up to a power of two (at least 16,
tl.dot's minimum), masked beyond D. 80 = 64 + 16 and 160 = 128 + 32 waste nothing; 40 = 32 + 16 computes 48
columns (instead of 64 for a blind pad). Both slabs are loaded once per block, q.k^T is the sum of two dots and
the output keeps two accumulators, so the tensor cores see only power-of-two tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels._triton import (FLOAT_DTYPES, KernelArgumentError, check_device, configs, dot_dtype,
    dot_precision, launch, next_power_of_2, shipped)

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
    d0_ok = offs_d0 < HEAD_D  # all-true unless HEAD_D < 16
    q0 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d0[None, :] * stride_qd,
                 mask=row_ok[:, None] & d0_ok[None, :], other=0.0).to(DOT_DTYPE)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_ok = offs_d1 < HEAD_D
        q1 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d1[None, :] * stride_qd,
                     mask=row_ok[:, None] & d1_ok[None, :], other=0.0).to(DOT_DTYPE)
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
        p = p.to(V.dtype.element_ty).to(DOT_DTYPE)  # P in v's dtype, as flash attention does
        v0 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd,
                     mask=col_ok[:, None] & d0_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd,
                         mask=col_ok[:, None] & d1_ok[None, :], other=0.0).to(DOT_DTYPE)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)

    inv_l = 1.0 / l_i
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d0[None, :] * stride_od,
             (acc0 * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d0_ok[None, :])
    if D1 > 0:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d1[None, :] * stride_od,
                 (acc1 * inv_l[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d1_ok[None, :])


def _tuned(configs_list: list[triton.Config]):
    return triton.autotune(configs=configs(configs_list, INTERPRETED_CONFIG),
                           key=["HEAD_D", "CAUSAL", "N", "M"])(
        triton.heuristics({"EVEN_N": lambda a: a["M"] % a["BLOCK_N"] == 0})(_attention_kernel))


# One autotuner per head-dim class, so each class only tries configs whose tiles fit.
_KERNEL_SMALL_D = _tuned(CONFIGS_SMALL_D)
_KERNEL_MEDIUM_D = _tuned(CONFIGS_MEDIUM_D)
_KERNEL_LARGE_D = _tuned(CONFIGS_LARGE_D)
_KERNEL_LARGE_D_FP32 = _tuned(CONFIGS_LARGE_D_FP32)


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
