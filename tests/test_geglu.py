"""GEGLU kernel against the torch reference (under the interpreter when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import geglu as geglu_mod
from tritonsd.kernels.geglu import geglu_reference, geglu_triton

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, geglu_mod, "geglu_reference")


def check(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0).to(DEVICE, dtype)
    ref = geglu_reference(x.double())
    out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = geglu_triton(x, out=out)
    assert got is out and got.dtype == dtype
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [
    pytest.param((2, 9, 2 * 1280), id="F1280"),
    pytest.param((1, 4, 2 * 2560), id="F2560"),
    pytest.param((1, 2, 2 * 5120), id="F5120"),
    pytest.param((2, 77, 2 * 128), id="fixture-F128"),
    pytest.param((3, 2 * 100), id="odd-F100"),
])
def test_matches_reference(no_fallback, shape, dtype):
    check(shape, dtype, seed=shape[-1])


def test_odd_width_is_an_error():
    with pytest.raises(RuntimeError):
        geglu_triton(torch.randn(2, 7, device=DEVICE))
