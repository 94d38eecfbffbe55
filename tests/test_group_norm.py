"""GroupNorm (+ fused SiLU) kernel against the torch reference (under the interpreter when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import group_norm as group_norm_mod
from tritonsd.kernels._triton import KernelArgumentError
from tritonsd.kernels.group_norm import group_norm_reference, group_norm_triton

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, group_norm_mod, "group_norm_reference")


def inputs(shape, dtype, seed, channels_last=False):
    """x with a large mean (stresses the variance computation), weight and bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 3.0
    w = torch.randn(shape[1], generator=g)
    b = torch.randn(shape[1], generator=g)
    x, w, b = (t.to(DEVICE, dtype) for t in (x, w, b))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, w, b


def check(shape, dtype, silu, channels_last, seed, groups=32):
    x, w, b = inputs(shape, dtype, seed, channels_last)
    ref = group_norm_reference(x.double(), w.double(), b.double(), groups, 1e-5, silu=silu)
    out = torch.full_like(x, float("nan"))
    got = group_norm_triton(x, w, b, groups, 1e-5, silu=silu, out=out)
    assert got is out and got.dtype == dtype and got.stride() == x.stride()
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape,silu", [
    pytest.param((2, 320, 8, 8), True, id="unet-320-silu"),
    pytest.param((1, 640, 4, 4), False, id="unet-640"),
    pytest.param((2, 32, 16, 16), True, id="fixture-32ch-1-per-group"),
    pytest.param((1, 64, 5, 7), False, id="odd-hw"),
])
def test_float32_matches_reference(no_fallback, shape, silu, channels_last):
    check(shape, torch.float32, silu, channels_last, seed=sum(shape))


def test_float32_large_group_is_chunked(no_fallback):
    """VAE-like: a few channels per group over a large image, several slices per group merged."""
    check((1, 32, 64, 64), torch.float32, True, False, seed=11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_precision_matches_reference(no_fallback, dtype, channels_last):
    check((2, 128, 8, 8), dtype, True, channels_last, seed=5)


def test_three_dim_input(no_fallback):
    check((2, 64, 40), torch.float32, False, False, seed=4)


def test_groups_must_divide_channels():
    x, w, b = inputs((1, 30, 4, 4), torch.float32, seed=0)
    with pytest.raises(KernelArgumentError, match="groups"):
        group_norm_triton(x, w, b, 32)
