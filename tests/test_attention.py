"""Flash attention kernel against the torch reference (under the Triton interpreter when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import attention as attention_mod
from tritonsd.kernels._triton import KernelArgumentError
from tritonsd.kernels.attention import attention_reference, attention_triton, split_head_dim
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, attention_mod, "attention_reference")


def qkv(b, n, m, width, dtype, seed, fused=True):
    """q [B, N, W] and k, v [B, M, W] as non-contiguous chunks of fused projections (as the model passes)."""
    g = torch.Generator().manual_seed(seed)
    if fused and n == m:
        q, k, v = torch.randn(b, n, 3 * width, generator=g).to(DEVICE, dtype).chunk(3, dim=-1)
    else:
        q = torch.randn(b, n, 2 * width, generator=g).to(DEVICE, dtype)[..., :width]  # a view of a wider tensor
        k, v = torch.randn(b, m, 2 * width, generator=g).to(DEVICE, dtype).chunk(2, dim=-1)
    return q, k, v


def check(b, n, m, heads, d, dtype, causal, seed, no_fallback_ok=True):
    q, k, v = qkv(b, n, m, heads * d, dtype, seed)
    assert not q.is_contiguous() and not k.is_contiguous()
    ref = attention_reference(q.double(), k.double(), v.double(), heads, causal=causal)
    out = torch.full((b, n, heads * d), float("nan"), device=DEVICE, dtype=dtype)
    got = attention_triton(q, k, v, heads, causal=causal, out=out)
    assert got is out and got.dtype == dtype
    return assert_matches(got, ref, dtype)


# (B, N, M, heads, head dim, causal): SD shapes at modest N, N never a multiple of the block
SD_SHAPES = [
    pytest.param(1, 100, 77, 2, 40, False, id="sd1-cross-d40"),
    pytest.param(1, 130, 130, 2, 40, False, id="sd1-self-d40"),
    pytest.param(1, 90, 77, 2, 80, False, id="sd1-cross-d80"),
    pytest.param(1, 70, 77, 1, 160, False, id="sd1-cross-d160"),
    pytest.param(2, 200, 200, 1, 64, False, id="sd2-self-d64"),
    pytest.param(1, 70, 77, 10, 64, False, id="sdxl-cross-10h-d64"),
    pytest.param(1, 65, 65, 20, 64, False, id="sdxl-self-20h-d64"),
    pytest.param(1, 70, 70, 1, 512, False, id="vae-mid-d512"),
    pytest.param(2, 77, 77, 2, 16, True, id="text-tiny-causal-d16"),
    pytest.param(1, 77, 77, 2, 64, True, id="text-causal-d64"),
    pytest.param(1, 64, 64, 2, 32, False, id="tiny-d32"),
    pytest.param(1, 33, 5, 3, 24, False, id="odd-d24"),
    pytest.param(1, 20, 9, 1, 8, True, id="odd-d8-causal"),
]


@pytest.mark.parametrize("b,n,m,heads,d,causal", SD_SHAPES)
def test_float32_matches_reference(no_fallback, b, n, m, heads, d, causal):
    check(b, n, m, heads, d, torch.float32, causal, seed=n * 131 + d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,n,m,heads,d,causal", [
    pytest.param(1, 100, 77, 2, 40, False, id="cross-d40"),
    pytest.param(1, 96, 96, 1, 160, False, id="self-d160"),
    pytest.param(1, 77, 77, 2, 64, True, id="causal-d64"),
])
def test_half_precision_matches_reference(no_fallback, dtype, b, n, m, heads, d, causal):
    check(b, n, m, heads, d, dtype, causal, seed=7 + d)


def test_contiguous_inputs_and_fresh_output(no_fallback):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 50, 2 * 40, generator=g).to(DEVICE) for _ in range(3))
    got = attention_triton(q, k, v, 2)
    assert relative_error(got, attention_reference(q, k, v, 2)) <= 1e-5


def test_head_dim_split():
    assert split_head_dim(40) == (32, 16)
    assert split_head_dim(80) == (64, 16)
    assert split_head_dim(160) == (128, 32)
    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(512) == (512, 0)
    assert split_head_dim(8) == (16, 0)
    for d in range(1, 513):
        d0, d1 = split_head_dim(d)
        assert d0 + d1 >= d and d0 >= 16 and (d1 == 0 or d1 >= 16)


def test_unsupported_head_dim_falls_back_to_reference():
    q, k, v = qkv(1, 4, 4, 1024, torch.float32, seed=1)
    got = attention_triton(q, k, v, 1)
    assert torch.equal(got, attention_reference(q, k, v, 1))


def test_bad_shapes_raise():
    q, k, v = qkv(1, 4, 6, 64, torch.float32, seed=2)
    with pytest.raises(KernelArgumentError, match="heads"):
        attention_triton(q, k, v, 3)
    with pytest.raises(KernelArgumentError, match="do not match"):
        attention_triton(q, k[:, :, :32], v, 2)
