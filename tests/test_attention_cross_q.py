"""Cross-attention with its query projection in the kernel (``cross_q_attention_triton``: LayerNorm, q = x Wq^T,
flash attention over k, v in one launch) against float64 arithmetic written out here, and the UNet's cross-
attention through it (under the Triton interpreter when there is no GPU). Shapes are small and odd."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels import attention as attention_mod
from tritonsd.kernels.attention import (Norm, attention_triton, covers_cross_q, cross_q_attention_reference,
                                        cross_q_attention_triton)
from tritonsd.kernels.linear import linear_triton
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE, assert_matches, forbid_fallback, poison_allocations


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, attention_mod, "cross_q_attention_reference")
    forbid_fallback(monkeypatch, attention_mod, "attention_reference")


def expected(x, weight, bias, k, v, heads, norm, dtype):
    """The unfused ops in float64 from their formulas, with what the unfused model stores between them rounded to
    ``dtype`` (the normalised x, then q): (x - mean) / sqrt(var + eps) * w + b over C; q = x Wq^T + bq; per head
    softmax(q k^T / sqrt(D)) v."""
    x = x.double()
    if norm is not None:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
        x = x.to(dtype).double()
    q = x @ weight.double().T
    if bias is not None:
        q = q + bias.double()
    q = q.to(dtype).double()
    b, n, hd = q.shape
    m, d = k.shape[1], hd // heads
    # [B, N, H*D] -> [B, H, N, D]
    qh, kh, vh = (t.double().reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, N, M]
    # [B, H, N, D] -> [B, N, H*D]
    return (p @ vh).transpose(1, 2).reshape(b, n, hd)


def make(b, n, m, c, heads, d, dtype, seed, bias=False, norm=True):
    """x [B, N, C] as a strided view (a slice of wider rows), Wq [H*D, C], k and v [B, M, H*D] as the two halves
    of one [B, M, 2*H*D] projection (as model/hoist.py's k, v are not), random off-centre rows."""
    g = torch.Generator().manual_seed(seed)
    hd = heads * d
    x = (torch.randn(b, n, c + 5, generator=g) * 2.0 + 0.5).to(DEVICE, dtype)[..., 3:3 + c]
    k, v = torch.randn(b, m, 2 * hd, generator=g).to(DEVICE, dtype).chunk(2, dim=-1)
    t = {"x": x, "weight": (torch.randn(hd, c, generator=g) / c ** 0.5).to(DEVICE, dtype),
         "bias": torch.randn(hd, generator=g).to(DEVICE, dtype) if bias else None, "k": k, "v": v, "heads": heads,
         "norm": None}
    if norm:
        w, nb = ((1.0 + 0.3 * torch.randn(c, generator=g)).to(DEVICE, dtype),
                 (0.3 * torch.randn(c, generator=g)).to(DEVICE, dtype))
        t["norm"] = Norm(w, nb, 1e-5)
    return t


def check(t, dtype, monkeypatch):
    ref = expected(**t, dtype=dtype)
    poison_allocations(monkeypatch)
    got = cross_q_attention_triton(**t)
    assert got.dtype == dtype and got.shape == ref.shape
    return assert_matches(got, ref, dtype)


# (B, N, M, C, heads, head dim): SD 1.5's head dims 40, 80 (and 160), a power of two; N never a multiple of the
# interpreted BLOCK_M (64); C not a multiple of its BLOCK_K (32) in most; 77 keys (a text encoder's tokens)
SHAPES = [
    pytest.param(1, 70, 77, 40, 2, 40, id="b1-d40-C40"),
    pytest.param(2, 37, 77, 80, 1, 80, id="b2-d80-C80"),
    pytest.param(2, 65, 77, 48, 3, 32, id="b2-d32-C48"),
    pytest.param(1, 20, 77, 72, 1, 160, id="b1-d160-C72"),
    pytest.param(1, 9, 5, 24, 2, 64, id="b1-d64-M5-C24"),
]


@pytest.mark.parametrize("b,n,m,c,heads,d", SHAPES)
def test_float32_matches_unfused_ops(no_fallback, monkeypatch, b, n, m, c, heads, d):
    check(make(b, n, m, c, heads, d, torch.float32, seed=n * 7 + d), torch.float32, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,n,m,c,heads,d", [SHAPES[0], SHAPES[1], SHAPES[2]])
def test_half_precision_matches_unfused_ops(no_fallback, monkeypatch, dtype, b, n, m, c, heads, d):
    check(make(b, n, m, c, heads, d, dtype, seed=n + d), dtype, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,n,m,c,heads,d", [SHAPES[0], SHAPES[1]])
def test_same_as_the_q_gemm_then_attention(dtype, b, n, m, c, heads, d):
    """The fused launch gives what the launches it replaces give (the q GEMM with the LayerNorm in its prologue,
    storing q in x's dtype, then the attention kernel): under the interpreter the same float32 operations, so
    the same bits; on a GPU the q products may sum in another order (a last-bit difference in q)."""
    t = make(b, n, m, c, heads, d, dtype, seed=b + n + d, bias=True)
    fused = cross_q_attention_triton(**t)
    apart = attention_triton(linear_triton(t["x"], t["weight"], t["bias"], norm=t["norm"]), t["k"], t["v"], heads)
    if DEVICE == "cpu":
        assert torch.equal(fused, apart)
    else:
        assert relative_error(fused, apart) <= 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bias_and_no_norm(no_fallback, monkeypatch, dtype):
    check(make(2, 30, 77, 40, 2, 40, dtype, seed=5, bias=True, norm=False), dtype, monkeypatch)
    check(make(1, 30, 77, 40, 2, 40, dtype, seed=6, bias=True, norm=True), dtype, monkeypatch)


def test_reference_is_the_unfused_ops():
    t = make(2, 11, 7, 16, 2, 8, torch.float64, seed=9, bias=True)
    assert relative_error(cross_q_attention_reference(**t), expected(**t, dtype=torch.float64)) <= 1e-12


def test_what_the_kernel_does_not_cover_falls_back_to_the_reference():
    t = make(1, 6, 5, 16, 1, 256, torch.float32, seed=2)  # head dim 256: beyond the fused kernel's 160
    assert not covers_cross_q(**t)
    assert torch.equal(cross_q_attention_triton(**t), cross_q_attention_reference(**t))
    t = make(1, 6, 5, 16, 2, 8, torch.float32, seed=3)
    assert covers_cross_q(**t)
    t["norm"] = Norm(None, None, 1e-5)
    assert not covers_cross_q(**t)
    t = make(1, 6, 5, 16, 2, 8, torch.float32, seed=4)
    t["weight"] = t["weight"].half()
    assert not covers_cross_q(**t)


def _random_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.to(DEVICE).eval()


@pytest.mark.parametrize("batch", [1, 2])
def test_transformer_block_cross_attention_in_one_launch(batch):
    """A BasicTransformerBlock through the Triton kernels: attn2 is one fused launch (no q GEMM), with the result
    of ``unfused("cross_q")`` (the q GEMM, then the attention kernel) and of the torch ops."""
    from tritonsd.model.unet import BasicTransformerBlock

    block = _random_(BasicTransformerBlock(80, heads=2, dim_head=40, context_dim=24), seed=batch)
    g = torch.Generator().manual_seed(20 + batch)
    x = torch.randn(batch, 13, 80, generator=g).to(DEVICE)
    context = torch.randn(batch, 77, 24, generator=g).to(DEVICE)
    with torch.no_grad():
        with dispatch.force("torch"):
            ref = block(x, context)
        with dispatch.force("triton"):
            fused = block(x, context)
            with dispatch.unfused("cross_q"):
                apart = block(x, context)
            on_meta = copy.deepcopy(block).to("meta")
            recorded = {}
            for off in ((), ("cross_q",)):
                with _triton.recording() as launches, dispatch.unfused(*off):
                    on_meta(x.to("meta"), context.to("meta"))
                recorded[off] = [k for k, _, _ in launches]
    assert relative_error(fused, ref) <= 1e-5
    assert relative_error(fused, apart) <= 1e-5
    fused_names, apart_names = recorded[()], recorded[("cross_q",)]
    assert attention_mod._CROSS_Q_SMALL_D in fused_names and attention_mod._CROSS_Q_SMALL_D not in apart_names
    assert len(fused_names) == len(apart_names) - 1  # the q GEMM's launch is gone


def test_lora_on_to_q_is_read_at_each_call():
    """A change to to_q's weight in place (a LoRA applied or removed) shows in the next call: nothing is kept."""
    from tritonsd.model.unet import CrossAttention

    attn = _random_(CrossAttention(32, 24, heads=2, dim_head=16), seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 9, 32, generator=g).to(DEVICE)
    context = torch.randn(1, 77, 24, generator=g).to(DEVICE)
    delta = (torch.randn(attn.to_q.weight.shape, generator=g) * 0.2).to(DEVICE)
    with torch.no_grad(), dispatch.force("triton"):
        before = attn(x, context)
        attn.to_q.weight.add_(delta)
        after = attn(x, context)
        with dispatch.force("torch"):
            ref = attn(x, context)
        attn.to_q.weight.sub_(delta)
        again = attn(x, context)
    assert relative_error(after, ref) <= 1e-5
    assert relative_error(after, before) > 1e-3
    assert relative_error(again, before) <= 1e-6
