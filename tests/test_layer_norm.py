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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_transformer_view_of_nchw_is_read_in_place(no_fallback, dtype):
    """SD 1.5's norm1 input: the [B, H*W, C] view of an NCHW tensor (columns H*W apart), read without a copy."""
    g = torch.Generator().manual_seed(3)
    nchw = (torch.randn(2, 40, 4, 6, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    x = nchw.permute(0, 2, 3, 1).reshape(2, 24, 40)  # [B, C, H, W] -> [B, H*W, C], a view
    assert x.data_ptr() == nchw.data_ptr() and x.stride(-1) == 24
    assert layer_norm_mod.rows_view(x).data_ptr() == nchw.data_ptr()
    _, w, b = inputs((40,), dtype, seed=4)
    check(x, w, b, dtype)


def test_leading_dims_that_do_not_merge(no_fallback):
    """[A, B, N, D] whose A and B cannot merge: read as [A*B, N, D] when possible, else through a copy."""
    x, w, b = inputs((3, 4, 5, 48), torch.float32, seed=5)
    rows = x[:, :, :3]  # [3, 4, 3, 48]: rows 240 apart within a block of 3, so only [12, 3, 48] is a view
    assert layer_norm_mod.rows_view(rows).shape == (12, 3, 48)
    assert layer_norm_mod.rows_view(rows).data_ptr() == rows.data_ptr()
    check(rows, w, b, torch.float32)
    check(x.transpose(1, 2)[:, :, :3], w, b, torch.float32)  # [3, 5, 3, 48]: needs a copy
