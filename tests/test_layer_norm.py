"""LayerNorm kernel against the torch reference (under the interpreter when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import layer_norm as layer_norm_mod
from tritonsd.kernels._triton import KernelArgumentError
from tritonsd.kernels.layer_norm import layer_norm_reference, layer_norm_triton

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, layer_norm_mod, "layer_norm_reference")


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0 + 1.5
    w = torch.randn(shape[-1], generator=g)
    b = torch.randn(shape[-1], generator=g)
    return (t.to(DEVICE, dtype) for t in (x, w, b))


def check(x, w, b, dtype):
    ref = layer_norm_reference(x.double(), None if w is None else w.double(), None if b is None else b.double())
    out = torch.full(x.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = layer_norm_triton(x, w, b, 1e-5, out=out)
    assert got is out and got.dtype == dtype
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [
    pytest.param((2, 64, 320), id="sd1-320"),
    pytest.param((1, 16, 1280), id="sd-1280"),
    pytest.param((2, 77, 768), id="clip-768"),
    pytest.param((3, 77, 32), id="fixture-32"),
    pytest.param((5, 100), id="odd-100"),
])
def test_matches_reference(no_fallback, shape, dtype):
    x, w, b = inputs(shape, dtype, seed=shape[-1])
    check(x, w, b, dtype)


def test_strided_rows_and_no_affine(no_fallback):
    x, _, _ = inputs((2, 10, 2 * 96), torch.float32, seed=9)
    check(x[..., :96], None, None, torch.float32)  # rows of a wider tensor, read through their stride


def test_weight_shape_is_checked():
    x, w, b = inputs((2, 8), torch.float32, seed=1)
    with pytest.raises(KernelArgumentError, match="weight"):
        layer_norm_triton(x, w[:4], b)
