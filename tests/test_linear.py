"""The Linear GEMM with fused epilogues (bias, GEGLU gate, residual) against float64 arithmetic written out here
(under the interpreter when there is no GPU). Shapes are small and odd: the interpreter runs every program."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tritonsd.kernels import dispatch
from tritonsd.kernels import linear as linear_mod
from tritonsd.kernels.linear import linear_reference, linear_triton
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE, assert_matches, forbid_fallback

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, linear_mod, "linear_reference")


def expected(x, weight, bias, residual, geglu, norm=None):
    """The unfused layers in float64, from their formulas: (x - mean) / sqrt(var + eps) * w + b over the last dim;
    x W^T + b; a * 0.5 g (1 + erf(g / sqrt 2)); + r."""
    x = x.double()
    if norm is not None:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
    y = x @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    if geglu:
        f = y.shape[-1] // 2
        a, g = y[..., :f], y[..., f:]
        y = a * 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
    if residual is not None:
        y = y + residual.double()
    return y


def make(lead, k, n_w, dtype, seed, bias=True, residual=False, geglu=False, norm=False):
    g = torch.Generator().manual_seed(seed)
    n = n_w // 2 if geglu else n_w
    t = {
        "x": torch.randn(*lead, k, generator=g) * 2.0 + 0.5,  # off-centre rows: the norm's mean matters
        "weight": torch.randn(n_w, k, generator=g) / k ** 0.5,
        "bias": torch.randn(n_w, generator=g) if bias else None,
        "residual": torch.randn(*lead, n, generator=g) if residual else None,
    }
    t = {name: None if v is None else v.to(DEVICE, dtype) for name, v in t.items()}
    t["norm"] = None
    if norm:
        w, b = (torch.randn(k, generator=g).to(DEVICE, dtype) for _ in range(2))
        t["norm"] = linear_mod.Norm(w, b, 1e-5)
    return t


def check(t, geglu, dtype):
    ref = expected(t["x"], t["weight"], t["bias"], t["residual"], geglu, t["norm"])
    out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = linear_triton(**t, geglu=geglu, out=out)
    assert got is out and got.dtype == dtype
    assert_matches(got, ref, dtype)


# (leading dims, K, weight rows): batch 1 and 2, sizes that fill no tile evenly, one K below BLOCK_K
SHAPES = [
    pytest.param((2, 37), 40, 72, id="b2-N37-K40-N72"),
    pytest.param((1, 50), 96, 64, id="b1-N50-K96-N64"),
    pytest.param((1, 3), 24, 18, id="b1-N3-K24-N18"),
    pytest.param((66,), 72, 40, id="2d-M66"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead,k,n_w", SHAPES)
@pytest.mark.parametrize("epilogue", ["plain", "bias", "bias-residual", "geglu", "geglu-residual", "norm",
                                      "norm-bias-residual", "norm-geglu"])
def test_matches_unfused_arithmetic(no_fallback, lead, k, n_w, dtype, epilogue):
    geglu = "geglu" in epilogue
    t = make(lead, k, n_w, dtype, seed=k * n_w, bias=epilogue not in ("plain", "norm"),
             residual=epilogue.endswith("residual"), geglu=geglu, norm=epilogue.startswith("norm"))
    check(t, geglu, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_input_and_residual(no_fallback, dtype):
    """x a column slice (row stride != K), the residual a permuted NCHW view: both read through their strides."""
    t = make((2, 20), 48, 32, dtype, seed=7, residual=True)
    wide = torch.randn(2, 20, 80, device=DEVICE).to(dtype)
    wide[..., 16:64] = t["x"]
    t["x"] = wide[..., 16:64]
    nchw = t["residual"].permute(0, 2, 1).contiguous()  # [2, 32, 20]
    t["residual"] = nchw.permute(0, 2, 1)  # [2, 20, 32], column stride 20
    check(t, False, dtype)


def test_norm_reads_strided_rows(no_fallback):
    """The LayerNorm prologue over a column slice of a wider tensor, with K above BLOCK_K (several passes)."""
    t = make((2, 13), 72, 48, torch.float32, seed=8, norm=True, residual=True)
    wide = torch.randn(2, 13, 100, device=DEVICE)
    wide[..., 20:92] = t["x"]
    t["x"] = wide[..., 20:92]
    check(t, False, torch.float32)


def test_norm_without_affine_falls_back():
    t = make((2, 3), 16, 8, torch.float32, seed=9)
    t["norm"] = linear_mod.Norm(None, None, 1e-5)
    got = linear_triton(**t)
    ref = torch.nn.functional.linear(torch.nn.functional.layer_norm(t["x"], (16,), eps=1e-5), t["weight"], t["bias"])
    torch.testing.assert_close(got, ref)


def test_weight_view_of_a_fused_buffer(no_fallback):
    """A weight that is rows of a larger buffer (the fused q/k/v storage) is read in place."""
    t = make((2, 9), 32, 96, torch.float32, seed=3, bias=False)
    t["weight"] = t["weight"][32:64]
    check(t, False, torch.float32)


def test_reference_is_the_unfused_model():
    t = make((2, 5), 16, 24, torch.float64, seed=1, residual=True, geglu=True, norm=True)
    got = linear_reference(**t, geglu=True)
    torch.testing.assert_close(got, expected(**t, geglu=True), rtol=1e-12, atol=1e-12)


def test_unsupported_calls_fall_back():
    """Mixed dtypes go to the reference (which raises what torch raises); a broadcast residual is computed there."""
    t = make((2, 4), 8, 6, torch.float32, seed=2)
    del t["norm"]
    r = torch.randn(6, device=DEVICE)  # broadcasts over rows: not the kernel's contract
    got = linear_triton(t["x"], t["weight"], t["bias"], residual=r)
    torch.testing.assert_close(got, expected(t["x"], t["weight"], t["bias"], r, False).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        linear_triton(t["x"], t["weight"].half())
    with pytest.raises(RuntimeError):
        linear_triton(t["x"], t["weight"][:5], geglu=True)  # odd width: the reference's chunk cannot split it


def test_dispatch_torch_is_the_reference():
    t = make((1, 7), 16, 32, torch.float32, seed=4, residual=True, geglu=True, norm=True)
    with dispatch.force("torch"):
        got = dispatch.linear(**t, geglu=True)
    assert torch.equal(got, linear_reference(**t, geglu=True))


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.to(DEVICE).eval()


@pytest.mark.parametrize("linear_proj", [False, True], ids=["proj-conv1x1-sd1", "proj-linear-sd2"])
@pytest.mark.parametrize("batch", [1, 2])
def test_spatial_transformer_fused_matches_torch(linear_proj, batch):
    """A SpatialTransformer (GEGLU in the FF projection's epilogue, every residual add in a GEMM epilogue, proj_out
    reading the channels-last view) through the Triton kernels equals the same module on the torch ops."""
    from tritonsd.model.unet import SpatialTransformer

    st = _random_(SpatialTransformer(64, heads=2, depth=1, context_dim=24, linear=linear_proj), seed=batch)
    g = torch.Generator().manual_seed(10 + batch)
    x = torch.randn(batch, 64, 5, 3, generator=g).to(DEVICE)
    context = torch.randn(batch, 7, 24, generator=g).to(DEVICE)
    with torch.no_grad():
        with dispatch.force("torch"):
            ref = st(x, context)
        with dispatch.force("triton"):
            got = st(x, context)
    assert got.shape == ref.shape == x.shape
    assert relative_error(got, ref) <= 1e-5


@pytest.mark.parametrize("off", [("norm",), ("geglu",), ("residual",), ("qkv",), ("norm", "geglu", "residual", "qkv")])
def test_unfused_switches_give_the_same_block(off):
    """``dispatch.unfused`` (the GPU script's fused-vs-unfused timing) runs the separate launches, with the same
    result, and records them: the LayerNorm / GEGLU kernels come back, and F.linear for what is left unfused."""
    from tritonsd.kernels import _triton, geglu, layer_norm
    from tritonsd.model.unet import BasicTransformerBlock

    block = _random_(BasicTransformerBlock(32, heads=2, dim_head=16, context_dim=24), seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 32, generator=g).to(DEVICE)
    context = torch.randn(2, 5, 24, generator=g).to(DEVICE)
    with torch.no_grad(), dispatch.force("triton"):
        fused = block(x, context)
        with dispatch.unfused(*off):
            apart = block(x, context)
        on_meta = copy.deepcopy(block).to("meta")
        with _triton.recording() as launches, dispatch.unfused(*off):
            on_meta(x.to("meta"), context.to("meta"))
    assert relative_error(apart, fused) <= 1e-5
    names = [k for k, _, _ in launches]
    # q, k, v apart read norm1's output: that LayerNorm runs apart too
    assert (layer_norm._layer_norm_kernel in names) == ("norm" in off or "qkv" in off)
    assert (geglu._geglu_kernel in names) == ("geglu" in off)
    with pytest.raises(ValueError, match="unknown fusion"):
        with dispatch.unfused("nope"):
            pass
