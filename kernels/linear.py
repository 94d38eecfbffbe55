"""The transformer's Linear layers as one Triton GEMM with a fused epilogue: ``y = x @ W^T + bias``, then
optionally the GEGLU gate, then optionally a residual add, stored once.

GEMM view: x [M, K] (the [..., K] rows), W [N_w, K] as ``nn.Linear`` holds it (read through its strides, never
transposed or copied), y [M, N]. A program owns a [BLOCK_M, BLOCK_N] output tile and loops over K in BLOCK_K
chunks; accumulation is float32 (full IEEE float32 products for float32 inputs); on sm_90 the fp16/bf16 dots are
``wgmma`` (``tritonsd check-compile``).

Epilogues (issue 22):

* ``geglu``: the feed-forward's projection ``proj`` [2F, K] followed by ``a * gelu(gate)`` with ``(a, gate) =
  y.chunk(2, -1)``. The program keeps two accumulators, one over the rows ``n`` of W (``a``) and one over the rows
  ``F + n`` (``gate``), sharing each x tile, and writes only the [M, F] product: the 2F-wide intermediate is never
  written to memory, and the separate GEGLU launch disappears (exact erf GELU in float32, as kernels/geglu.py).
* ``residual``: ``+ residual`` [M, N] (the transformer block's skip connections: attention out-projections, the
  feed-forward's second Linear, SD2/SDXL's ``proj_out``), read through its strides.

Prologue (issue 22, item 4):

* ``norm``: ``LayerNorm(x)`` over K computed while the x tiles are loaded, so the normalised activations are never
  written. Each program first takes its rows' statistics in two passes over K (mean, then the variance of the
  centred rows: no cancellation, as kernels/layer_norm.py), in float32; each x tile is then normalised, scaled,
  shifted and rounded to x's dtype (what the unfused LayerNorm stores) before the dot. The passes re-read x (from
  L2: the programs of one row block read the same rows); the LayerNorm launch and its output's write and read
  are saved.

``geglu(LayerNorm(x) @ W^T + b) + residual``: the order of the unfused model.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonsd.kernels import _triton
from tritonsd.kernels._triton import (FLOAT_DTYPES, check_device, configs, dot_dtype, dot_precision, launch,
                                     round_bf16_by_bits, rounds_bf16_by_bits)
from tritonsd.kernels.geglu import geglu_reference

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), at most 3 per key; checked with ``tritonsd check-compile --arch sm_90
# --kernels linear`` (benchmarks/results/check-compile-sm_90-linear-triton*.json): wgmma, no spill.
PLAIN = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
# GEGLU holds two accumulators per tile (a and gate): the tiles are half as wide for the same registers.
GATED = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (128, 32, 64, 4, 4)]


def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in rows]


CONFIGS, CONFIGS_GEGLU = _configs(PLAIN), _configs(GATED)
INTERPRETED_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
GROUP_M = 8  # output-tile rows swept together, so neighbouring programs share weight tiles in L2
SQRT1_2 = tl.constexpr(0.7071067811865476)
KEY = ["M", "N", "K", "HAS_BIAS", "HAS_RES", "NORM"]


@triton.jit
def _row_stats(X, offs_m, m_ok, K, eps, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, 1 / sqrt(var + eps)) [BLOCK_M] of the rows of X [M, K], in float32, two passes over K."""
    offs_k = tl.arange(0, BLOCK_K)
    rows = X + offs_m[:, None].to(tl.int64) * stride_xm
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = m_ok[:, None] & ((k0 + offs_k) < K)[None, :]
        total += tl.sum(tl.load(rows + (k0 + offs_k)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32), 1)
    mean = total / K
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok = m_ok[:, None] & ((k0 + offs_k) < K)[None, :]
        xk = tl.load(rows + (k0 + offs_k)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
        xc = tl.where(ok, xk - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, 1)
    return mean, 1.0 / tl.sqrt_rn(sq / K + eps)


@triton.jit
def _layer_norm_tile(a, mean, rstd, LnW, LnB, cols, col_ok, ROUND_BF16_BY_BITS: tl.constexpr):
    """The x tile ``a`` [BLOCK_M, BLOCK_K] (its columns ``cols``) after the LayerNorm of its rows' statistics
    (:func:`_row_stats`), as the unfused op stores it: float32 arithmetic, rounded to a's dtype (to nearest even,
    as the GPU's cvt.rn does, also under the interpreter: ``ROUND_BF16_BY_BITS``); 0 beyond the row's end."""
    gamma = tl.load(LnW + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(LnB + cols, mask=col_ok, other=0.0).to(tl.float32)
    a_norm = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
    a_norm = tl.where(col_ok[None, :], a_norm, 0.0)
    if ROUND_BF16_BY_BITS:
        a_norm = round_bf16_by_bits(a_norm)
    else:
        a_norm = a_norm.to(a.dtype)
    return a_norm


@triton.jit
def _linear_tile(
    X, Wt, Bias, Res, Y, LnW, LnB, M, N, K, eps,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GEGLU: tl.constexpr, NORM: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grouped tile order (as the Triton matmul tutorial)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptr = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptr = Wt + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn  # [BLOCK_K, BLOCK_N] of W^T
    gate_ptr = w_ptr + N * stride_wn  # GEGLU: the gate's rows of W, F = N rows further

    if NORM:
        mean, rstd = _row_stats(X, offs_m, m_ok, K, eps, stride_xm, stride_xk, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            a = _layer_norm_tile(a, mean, rstd, LnW, LnB, k0 + offs_k, k_ok, ROUND_BF16_BY_BITS)
        a = a.to(DOT_DTYPE)
        w_ok = k_ok[:, None] & n_ok[None, :]
        b = tl.load(w_ptr, mask=w_ok, other=0.0).to(DOT_DTYPE)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if GEGLU:
            g = tl.load(gate_ptr, mask=w_ok, other=0.0).to(DOT_DTYPE)
            acc_gate += tl.dot(a, g, input_precision=PRECISION)
            gate_ptr += BLOCK_K * stride_wk
        x_ptr += BLOCK_K * stride_xk
        w_ptr += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GEGLU:
            acc_gate += tl.load(Bias + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GEGLU:
        acc = acc * (0.5 * acc_gate * (1.0 + tl.math.erf(acc_gate * SQRT1_2)))
    tile_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        r_ptr = Res + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptr, mask=tile_ok, other=0.0).to(tl.float32)
    y_ptr = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=tile_ok)


@triton.autotune(configs=configs(CONFIGS, INTERPRETED_CONFIG), key=KEY)
@triton.jit
def _linear_kernel(
    X, Wt, Bias, Res, Y, LnW, LnB, M, N, K, eps,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, ROUND_BF16_BY_BITS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _linear_tile(X, Wt, Bias, Res, Y, LnW, LnB, M, N, K, eps, stride_xm, stride_xk, stride_wn, stride_wk,
                 stride_rm, stride_rn, stride_ym, stride_yn, HAS_BIAS, HAS_RES, False, NORM, ROUND_BF16_BY_BITS,
                 PRECISION, DOT_DTYPE,
                 GROUP, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.autotune(configs=configs(CONFIGS_GEGLU, INTERPRETED_CONFIG), key=KEY)
@triton.jit
def _linear_geglu_kernel(
    X, Wt, Bias, Res, Y, LnW, LnB, M, N, K, eps,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, ROUND_BF16_BY_BITS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    _linear_tile(X, Wt, Bias, Res, Y, LnW, LnB, M, N, K, eps, stride_xm, stride_xk, stride_wn, stride_wk,
                 stride_rm, stride_rn, stride_ym, stride_yn, HAS_BIAS, HAS_RES, True, NORM, ROUND_BF16_BY_BITS,
                 PRECISION, DOT_DTYPE,
                 GROUP, BLOCK_M, BLOCK_N, BLOCK_K)


class Norm(NamedTuple):
    """A LayerNorm over the GEMM's K, applied to x first: ``F.layer_norm(x, (K,), weight, bias, eps)``."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float = 1e-5


def _out_features(x: torch.Tensor, weight: torch.Tensor, bias, residual, geglu: bool, norm) -> int | None:
    """N of the result for the calls the kernel covers; None for the others (the reference handles them)."""
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (geglu and weight.shape[0] % 2):
        return None
    if norm is not None and (norm.weight is None or norm.bias is None
                             or any(tuple(p.shape) != (x.shape[-1],) or p.dtype != x.dtype
                                    for p in (norm.weight, norm.bias))):
        return None
    n = weight.shape[0] // 2 if geglu else weight.shape[0]
    if x.dtype not in FLOAT_DTYPES or weight.dtype != x.dtype:
        return None
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        return None
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        return None  # shapes that only broadcast
    return n


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [R, C]: a view when the leading dims merge (Linear inputs and outputs), else a copy."""
    return t.reshape(-1, t.shape[-1])


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, geglu: bool = False, norm: Norm | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`linear_reference`; ``out`` (optional, contiguous [..., N]) receives the result.

    Falls back to the reference (which also raises the errors for bad shapes) for dtypes other than
    float16/bfloat16/float32, x, weight, bias and norm parameters of different dtypes, a norm without weight or
    bias, and residual shapes that only broadcast.
    """
    n = _out_features(x, weight, bias, residual, geglu, norm)
    if n is None:
        result = linear_reference(x, weight, bias, residual, geglu, norm)
        return result if out is None else out.copy_(result)
    check_device(x, weight, bias, residual, out, *(norm[:2] if norm is not None else ()))
    k = x.shape[-1]
    if out is None:
        out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        out = torch.empty((*x.shape[:-1], n), device=x.device, dtype=out_dtype)
    rows = _rows(x)  # [M, K]
    m = rows.shape[0]
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(linear_reference(x, weight, bias, residual, geglu, norm))  # nothing to multiply
    y = out.view(-1, n)
    res = _rows(residual) if residual is not None else y
    kernel = _linear_geglu_kernel if geglu else _linear_kernel
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    b = bias.contiguous() if bias is not None else weight
    ln_w, ln_b = (norm.weight.contiguous(), norm.bias.contiguous()) if norm is not None else (weight, weight)
    launch(kernel, grid, rows, weight, b, res, y, ln_w, ln_b, m, n, k, float(norm.eps) if norm is not None else 0.0,
           *rows.stride(), *weight.stride(), *res.stride(), *y.stride(),
           HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm is not None,
           # the normalised activations round as the unfused LayerNorm's output, also under the interpreter
           ROUND_BF16_BY_BITS=norm is not None and rounds_bf16_by_bits(x.dtype),
           PRECISION=dot_precision(x.dtype), DOT_DTYPE=dot_dtype(x.dtype), GROUP=GROUP_M)
    return out


def runs_apart(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               geglu: bool, norm: Norm | None, apart: Callable[[], torch.Tensor]) -> bool:
    """Whether this GPU's tuning tables say the call runs faster unfused (``apart``: cuBLAS's GEMM with the
    LayerNorm, GEGLU and add as their own launches) than as :func:`linear_triton`'s one fused GEMM; the tuner of
    ``_triton.tuning`` times both once per key (compile/tuning.py). False for calls the kernel does not cover."""
    n = _out_features(x, weight, bias, residual, geglu, norm)
    if n is None:
        return False
    k = x.shape[-1]
    key = (x.numel() // k if k else 0, n, k, bias is not None, residual is not None, norm is not None, str(x.dtype))
    return _triton.runs_apart(_linear_geglu_kernel if geglu else _linear_kernel, key, x.device,
                              {_triton.FUSED: lambda: linear_triton(x, weight, bias, residual, geglu, norm),
                               _triton.APART: apart})


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, geglu: bool = False,
                     norm: Norm | None = None) -> torch.Tensor:
    """``F.layer_norm`` over the last dim (``norm``), ``F.linear(x, weight, bias)``, then ``a * gelu(gate)`` of its
    halves (``geglu``), then ``+ residual``: the unfused model's ops, one after the other."""
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)
    y = F.linear(x, weight, bias)
    if geglu:
        y = geglu_reference(y)
    if residual is not None:
        y = y + residual
    return y
