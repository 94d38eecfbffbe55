"""The convolution of two inputs read as one (issue 22 item 7, kernels/conv.py ``x2=``): ``conv(cat([x, x2], 1))``
without the concatenation stored, against the float64 reference on ``torch.cat``; the K chunks of x then x2 (C1 a
multiple of the interpreter's BLOCK_K, 32), with the GroupNorm prologue (statistics of the concatenation from
``concat.concat_stats``), split-K forced, circular padding, the statistics epilogue; the fallbacks to the
concatenation; the dispatch switch; the tiny UNet reading its skips apart."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels import concat as concat_mod
from tritonsd.kernels import conv as conv_mod
from tritonsd.kernels.concat import concat_stats
from tritonsd.kernels.conv import GroupNormIn, conv2d_reference, conv2d_triton

from kernel_checks import DEVICE, assert_matches, forbid_fallback, poison_allocations


@pytest.fixture
def poisoned(monkeypatch):
    """The kernel itself runs (no reference), every float tensor the launchers allocate starts as NaN."""
    forbid_fallback(monkeypatch, conv_mod, "conv2d_reference")
    poison_allocations(monkeypatch)


def make(b, c1, c2, c_out, hw, k, dtype, seed, bias=True, emb=True, residual=True, x2_last=True):
    """x [B, C1, H, W] (channels-last), x2 [B, C2, H, W] (channels-last or NCHW), the weight for C1 + C2 inputs
    (the model's kernel layout) and the epilogue's terms; random values of two different scales."""
    g = torch.Generator().manual_seed(seed)
    pad = k // 2
    t = {"x": torch.randn(b, c1, *hw, generator=g) * 2.0 + 0.5,
         "x2": torch.randn(b, c2, *hw, generator=g) * 0.7 - 0.3,
         "weight": torch.randn(c_out, c1 + c2, k, k, generator=g) / ((c1 + c2) * k * k) ** 0.5,
         "bias": torch.randn(c_out, generator=g) if bias else None,
         "emb": torch.randn(b, c_out, generator=g) if emb else None,
         "residual": torch.randn(b, c_out, *hw, generator=g) if residual else None}
    t = {n: None if v is None else v.to(DEVICE, dtype) for n, v in t.items()}
    t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    if x2_last:
        t["x2"] = t["x2"].contiguous(memory_format=torch.channels_last)
    t["weight"] = conv_mod.to_kernel_layout(t["weight"])
    return t, {"stride": 1, "padding": pad}


def norm_for(t, groups, with_stats=True, silu=True) -> GroupNormIn:
    """A GroupNorm (+ SiLU) over the C1 + C2 channels, with the concatenation's statistics from the concat's
    launch without its store (what the UNet hands the conv), or none."""
    x, x2 = t["x"], t["x2"]
    c, dtype = x.shape[1] + x2.shape[1], x.dtype
    g = torch.Generator().manual_seed(c + groups)
    norm = GroupNormIn(torch.randn(c, generator=g).to(DEVICE, dtype) * 0.5 + 1.0,
                       torch.randn(c, generator=g).to(DEVICE, dtype) * 0.5, groups, 1e-5, silu)
    return norm._replace(stats=concat_stats(x, x2, norm)) if with_stats else norm


def reference64(t, params, norm_in=None, **kw):
    """The float64 reference of the convolution of ``torch.cat([x, x2], 1)``."""
    as64 = {n: None if v is None else v.double() for n, v in t.items() if n != "x2"}
    as64["x"] = torch.cat([t["x"].double(), t["x2"].double()], 1)
    norm64 = None if norm_in is None else norm_in._replace(weight=norm_in.weight.double(),
                                                           bias=norm_in.bias.double(), stats=None)
    return conv2d_reference(**as64, **params, norm_in=norm64, **kw)


def launched(t, params, **kw):
    """The conv launch ``conv2d_triton`` makes (the last one recorded) and its named arguments."""
    with _triton.recording() as launches:
        conv2d_triton(**t, **params, **kw)
    kernel, args, kwargs = launches[-1]
    return kernel, {**dict(zip(conv_mod._CONV2D_JIT.arg_names, args)), **kwargs}


def run_two(t, params, dtype, **kw):
    """The poisoned output of the two-input kernel (checked to be the one launched, reading x and x2)."""
    _, named = launched(t, params, **kw)
    assert named["TWO_INPUTS"] and named["C1"] == t["x"].shape[1]
    assert torch.equal(named["X"], t["x"]) and torch.equal(named["X2"], t["x2"])  # x2 made channels-last if not
    ref = reference64(t, params, **{n: v for n, v in kw.items() if n != "split_k"})
    out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = conv2d_triton(**t, **params, out=out, **kw)
    assert got is out
    return got, ref


# (B, C1, C2, C_out, (H, W), kernel): C1 a multiple of 32 (the interpreter's BLOCK_K), C1 != C2, C2 not one
CASES = [
    pytest.param(2, 32, 24, 40, (5, 7), 3, id="b2-32+24-3x3"),
    pytest.param(1, 64, 40, 24, (6, 5), 3, id="b1-64+40-3x3"),
    pytest.param(2, 32, 72, 33, (4, 6), 1, id="b2-32+72-1x1"),  # the ResBlock's shortcut
    pytest.param(1, 96, 17, 16, (3, 9), 1, id="b1-96+17-1x1"),
]


@pytest.mark.parametrize("b,c1,c2,c_out,hw,k", CASES)
def test_float32_matches_the_reference_of_the_concatenation(poisoned, b, c1, c2, c_out, hw, k):
    t, params = make(b, c1, c2, c_out, hw, k, torch.float32, seed=c1 + c2 + b)
    got, ref = run_two(t, params, torch.float32, scale=0.7)
    assert_matches(got, ref, torch.float32)


@pytest.mark.parametrize("b", [1, 2])
def test_float32_with_the_groupnorm_prologue(poisoned, b):
    """The norm indexes the concatenated channels: 7 groups of 8 (x holds the first 4), then 4 groups of 14, one
    of them spanning x's last channels and x2's first."""
    for c2, groups in ((24, 7), (24, 4)):
        t, params = make(b, 32, c2, 40, (5, 6), 3, torch.float32, seed=5 + b + groups, residual=False)
        norm = norm_for(t, groups)
        assert norm.stats is not None
        got, ref = run_two(t, params, torch.float32, norm_in=norm)
        assert_matches(got, ref, torch.float32)


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("with_norm", [False, True], ids=["plain", "norm_in"])
@pytest.mark.parametrize("b", [1, 2])
def test_float32_split_k(poisoned, split, with_norm, b):
    """SPLIT forced: C1 32 + C2 40 in chunks of 32 -> [0, 32) from x, [32, 64) and [64, 72) from x2 (split 3:
    one chunk each; split 2: x's chunk and x2's first in one split)."""
    t, params = make(b, 32, 40, 24, (5, 7), 3, torch.float32, seed=split + 10 * b)
    norm = norm_for(t, 8) if with_norm else None
    kernel, named = launched(t, params, split_k=split, norm_in=norm)
    assert kernel is conv_mod._conv2d_split_kernel and named["SPLIT_K"] == split
    got, ref = run_two(t, params, torch.float32, split_k=split, norm_in=norm)
    assert_matches(got, ref, torch.float32)


def test_float32_circular_and_an_nchw_second_input(poisoned):
    t, params = make(2, 32, 24, 16, (4, 5), 3, torch.float32, seed=21, x2_last=False)
    got, ref = run_two(t, params, torch.float32, circular=True, norm_in=norm_for(t, 4))
    assert_matches(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_norm", [False, True], ids=["plain", "norm_in"])
def test_half_precision(poisoned, dtype, with_norm):
    t, params = make(2, 32, 24, 40, (5, 7), 3, dtype, seed=11)
    norm = norm_for(t, 4) if with_norm else None
    got, ref = run_two(t, params, dtype, norm_in=norm, scale=0.5)
    assert_matches(got, ref, dtype)


def test_the_same_bits_as_the_one_input_kernel_on_the_concatenation(poisoned):
    """The two inputs change only where each chunk is loaded from: the output and the statistics epilogue's
    (mean, scale) are those of the one-input kernel reading the stored concatenation, bit for bit."""
    t, params = make(2, 32, 24, 40, (5, 7), 3, torch.float32, seed=13)
    g = torch.Generator().manual_seed(14)
    gamma = (torch.rand(40, generator=g) + 0.5).to(DEVICE)
    norm, out_norm = norm_for(t, 4), GroupNormIn(gamma, torch.zeros(40, device=DEVICE), 8)
    y, st = conv2d_triton(**t, **params, norm_in=norm, stats_for=out_norm)
    one = {**{n: v for n, v in t.items() if n != "x2"}, "x": torch.cat([t["x"], t["x2"]], 1)}
    y1, st1 = conv2d_triton(**one, **params, norm_in=norm, stats_for=out_norm)
    assert torch.equal(y, y1) and torch.equal(st.mean, st1.mean) and torch.equal(st.scale, st1.scale)


# ---- where the two inputs cannot be read apart: the concatenation first, then the one-input kernel


@pytest.mark.parametrize("case", ["c1-not-a-chunk-multiple", "upsample", "norm-without-stats"])
def test_fallbacks_concatenate_first_and_stay_right(poisoned, case):
    c1 = 24 if case == "c1-not-a-chunk-multiple" else 32
    t, params = make(1, c1, 24, 16, (4, 5), 3, torch.float32, seed=3, residual=case != "upsample")
    kw = {"upsample": 2} if case == "upsample" else {}
    if case == "norm-without-stats":
        kw["norm_in"] = norm_for(t, 4, with_stats=False)
    kernel, named = launched(t, params, **kw)
    assert not named["TWO_INPUTS"] and named["X"].shape[1] == c1 + 24
    ref = reference64(t, params, **kw)
    assert_matches(conv2d_triton(**t, **params, **kw), ref, torch.float32)


def test_inputs_that_do_not_concatenate_are_torchs_error():
    t, params = make(1, 32, 8, 8, (4, 5), 3, torch.float32, seed=4, residual=False)
    t["x2"] = t["x2"][:, :, :3]
    with pytest.raises(RuntimeError):
        conv2d_triton(**t, **params)


def test_dispatch_reads_apart_on_triton_and_concatenates_elsewhere(monkeypatch):
    t, params = make(2, 32, 24, 16, (4, 5), 3, torch.float32, seed=8)
    norm = norm_for(t, 4)
    x, x2 = t.pop("x"), t.pop("x2")
    seen = []
    kernel = conv_mod.conv2d_triton
    monkeypatch.setattr(conv_mod, "conv2d_triton", lambda *a, **k: seen.append("x2" in k) or kernel(*a, **k))
    with dispatch.force("triton"):
        apart = dispatch.conv2d(x, **t, **params, norm_in=norm, x2=x2)
        with dispatch.unfused("skip_concat"):
            together = dispatch.conv2d(x, **t, **params, norm_in=norm, x2=x2)
    with dispatch.force("torch"):
        ref = dispatch.conv2d(x, **t, **params, norm_in=norm, x2=x2)
    assert seen == [True, False]
    assert torch.equal(apart, together)
    assert_matches(apart, ref, torch.float32)


# ---- the UNet: the decoder's ResBlocks read h and the skip apart


@pytest.mark.slow  # two UNet passes under the interpreter: 157 s on 2 shared CPU cores
def test_unet_reads_the_skips_apart_with_the_same_bits(models, monkeypatch):
    """sd1-tiny's twelve output blocks all start with a ResBlock with a conv shortcut (C1 64 or 32): none of them
    stores the concatenation, and the result is the materialised path's, bit for bit (the statistics and each
    conv's arithmetic are the same); batch 2, an odd latent."""
    unet = models("sd1-tiny").model.diffusion_model.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 10, generator=g).to(DEVICE)
    context = torch.randn(2, 77, unet.cfg.context_dim, generator=g).to(DEVICE)
    t = torch.tensor([500.0, 500.0], device=DEVICE)
    stored = []
    cat = concat_mod.concat_channels_triton
    monkeypatch.setattr(concat_mod, "concat_channels_triton", lambda *a, **k: stored.append(1) or cat(*a, **k))
    with torch.no_grad(), dispatch.force("triton"):
        apart = unet(x, t, context)
        apart_stores, stored[:] = len(stored), []
        with dispatch.unfused("skip_concat"):
            together = unet(x, t, context)
    assert apart_stores == 0 and len(stored) == len(unet.output_blocks) == 12
    assert torch.equal(apart, together)
