"""Split-K convolution (issue 22, "under-filled grids"): the choice of SPLIT, and the split kernel against the float64
torch reference under the interpreter (programs run one after another there, through the same code: every split
stores its partial, the last sums them), forced with ``split_k=`` on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels import conv as conv_mod
from tritonsd.kernels.conv import GroupNormIn, conv2d_reference, conv2d_triton, split_k_for

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, conv_mod, "conv2d_reference")


# ---- the choice (a pure function): SD 1.5 at 512x512 is UNet batch 2 (CFG), latent 64x64; an H100 has 132 SMs


@pytest.mark.parametrize("m,n,c_in,taps,expect", [
    (2 * 8 * 8, 1280, 1280, 9, 7),  # 8x8 level: 2 x 20 tiles of 64x64; 264 / 40 -> 7 (6.6 rounded up)
    (2 * 16 * 16, 1280, 1280, 9, 2),  # 16x16 level: 8 x 20 = 160 tiles (1.2 waves) -> 2
    (2 * 16 * 16, 1280, 640, 1, 2),  # its 1x1 skip conv: 10 chunks of 64, 1 tap: at most 10 // 4 = 2 splits
    (2 * 32 * 32, 640, 640, 9, 1),  # 32x32 level: 32 x 10 = 320 tiles, two waves already
    (2 * 64 * 64, 320, 320, 9, 1),  # 64x64 level: 640 tiles
    (2 * 8 * 8, 1280, 2560, 1, 7),  # 8x8 1x1 skip conv of the up blocks: 40 chunks, at most 10 splits
    (1 * 8 * 8, 1280, 1280, 9, 7),  # batch 1 (no CFG): 20 tiles want 14, capped at 7
    (2 * 8 * 8, 1280, 128, 9, 2),  # only 2 channel chunks: at most 2 splits (no empty split)
    (2 * 8 * 8, 1280, 192, 1, 1),  # 3 chunks, 1 tap: 3 // 4 = 0 splits of 4 chunks -> unsplit
    (2 * 8 * 8, 1280, 256, 1, 1),  # 4 chunks, 1 tap: one split of 4 chunks -> unsplit
    (2 * 8 * 8, 1280, 512, 1, 2),  # 8 chunks, 1 tap: 2 splits of 4
])
def test_split_k_for_sd15_levels_on_an_h100(m, n, c_in, taps, expect):
    chunks = -(-c_in // 64)
    assert split_k_for(m, n, chunks, taps, 64, 64, 132) == expect


def test_split_k_for_without_a_gpu_or_on_a_full_grid():
    assert split_k_for(128, 1280, 40, 9, 64, 64, None) == 1  # the CPU: nothing to fill
    assert split_k_for(64 * 264, 64, 40, 9, 64, 64, 132) == 1  # 264 tiles: exactly two waves
    assert split_k_for(64 * 263, 64, 40, 9, 64, 64, 132) == 2  # one tile short of them
    assert split_k_for(64, 64, 40, 9, 64, 64, 132) == 7  # one tile: capped at MAX_SPLIT_K (spills beyond)
    assert split_k_for(64, 64, 5, 9, 64, 64, 132) == 5  # ... and by its 5 channel chunks
    assert split_k_for(2 * 8 * 8, 1280, 20, 9, 64, 64, 108) == 6  # an A100: 216 / 40 -> 6 (5.4 rounded up)


@pytest.mark.parametrize("m,n,c_in,taps,tuned,expect", [
    (2 * 64 * 64, 320, 320, 9, "CONFIGS", None),  # 64x64 level: 64x128 tiles make 384 (two waves): autotuned
    (2 * 32 * 32, 640, 640, 9, "CONFIGS", 1),  # 32x32: 160 of the smallest autotuned tile; 640 of 64x32: unsplit
    (2 * 16 * 16, 1280, 1280, 9, "CONFIGS_NORM_STATS", 1),  # 16x16: 80 -> 320 tiles of 64x32: unsplit
    (2 * 16 * 16, 1280, 640, 1, "CONFIGS", 1),  # its 1x1 skip conv, alike
    (2 * 8 * 8, 1280, 1280, 9, "CONFIGS_NORM_STATS", 4),  # 8x8: 80 tiles of 64x32 -> SPLIT 4 (264 / 80 = 3.3)
    (2 * 8 * 8, 1280, 2560, 1, "CONFIGS", 4),  # 8x8's 1x1 skip conv of the up blocks
    (2 * 64 * 64, 4, 320, 9, "CONFIGS", 3),  # conv_out: 4 channels, 128 tiles of 64x32 -> 3
])
def test_the_launch_takes_the_grid_filling_tile_where_the_autotuned_ones_fall_short(m, n, c_in, taps, tuned,
                                                                                     expect):
    """SD 1.5 512x512 (UNet batch 2) on an H100 (132 SMs): None is the autotuned tiles; a number is the 64x32
    grid-filling tile with that SPLIT (``split_k=1`` asks for the autotuned tiles, more for that split)."""
    assert conv_mod.split_tile() in ((64, 32),) and conv_mod.INTERPRETED_CONFIG.kwargs["BLOCK_N"] == 32
    meta = torch.device("meta")
    with _triton.recording():
        assert conv_mod._split_for_launch(None, m, n, c_in, taps, meta, getattr(conv_mod, tuned)) == expect
        assert conv_mod._split_for_launch(1, m, n, c_in, taps, meta, getattr(conv_mod, tuned)) is None
        assert conv_mod._split_for_launch(3, m, n, c_in, taps, meta, getattr(conv_mod, tuned)) == 3
    assert conv_mod._split_for_launch(None, m, n, c_in, taps, torch.device("cpu"), conv_mod.CONFIGS) is None


def test_sm_count_follows_the_device():
    assert _triton.sm_count(torch.device("cpu")) is None
    assert _triton.sm_count(torch.device("meta")) is None  # a meta tensor outside a recording runs nothing
    with _triton.recording():
        assert _triton.sm_count(torch.device("meta")) == 132  # an H100, unless told otherwise
        with _triton.assume_gpu(108):
            assert _triton.sm_count(torch.device("meta")) == 108
        assert _triton.sm_count(torch.device("meta")) == 132


# ---- the kernel, SPLIT forced


def make(b, c_in, c_out, hw, k, dtype, seed, bias=True, emb=True, residual=True, stride=1, pad=None):
    g = torch.Generator().manual_seed(seed)
    pad = k // 2 if pad is None else pad
    h_out, w_out = (hw[0] + 2 * pad - k) // stride + 1, (hw[1] + 2 * pad - k) // stride + 1
    t = {"x": torch.randn(b, c_in, *hw, generator=g) * 2.0 + 0.5,
         "weight": torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5,
         "bias": torch.randn(c_out, generator=g) if bias else None,
         "emb": torch.randn(b, c_out, generator=g) if emb else None,
         "residual": torch.randn(b, c_out, h_out, w_out, generator=g) if residual else None}
    t = {n: None if v is None else v.to(DEVICE, dtype) for n, v in t.items()}
    t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    return t, {"stride": stride, "padding": pad}


def norm_for(c_in, dtype, seed, groups, silu=True) -> GroupNormIn:
    g = torch.Generator().manual_seed(seed + 1000)
    return GroupNormIn(torch.randn(c_in, generator=g).to(DEVICE, dtype) * 0.5 + 1.0,
                       torch.randn(c_in, generator=g).to(DEVICE, dtype) * 0.5, groups, 1e-5, silu)


def reference64(t, params, norm_in=None, **kw):
    as64 = {n: None if v is None else v.double() for n, v in t.items()}
    norm64 = None if norm_in is None else norm_in._replace(weight=norm_in.weight.double(), bias=norm_in.bias.double())
    return conv2d_reference(**as64, **params, norm_in=norm64, **kw)


def run_split(t, params, dtype, split, **kw):
    """The poisoned output through the split kernel (checked to be the one launched, with this SPLIT)."""
    with _triton.recording() as launches:
        conv2d_triton(**t, **params, split_k=split, **kw)
    kernel, args, kwargs = launches[-1]  # after the GroupNorm statistics' launches, with norm_in
    assert kernel is conv_mod._conv2d_split_kernel and kwargs["SPLIT_K"] == split
    ref = reference64(t, params, **kw)
    out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = conv2d_triton(**t, **params, split_k=split, out=out, **kw)
    assert got is out
    return got, ref


# (B, C_in, C_out, (H, W), kernel, stride, SPLIT, epilogue terms): C_in split in chunks of BLOCK_K (32 under the
# interpreter): 72 -> [0, 32) [32, 64) [64, 72) at SPLIT 3; 80 -> [0, 64) [64, 80) at SPLIT 2; 40 at SPLIT 4 -> two
# empty splits (their partials are zeros). M = 2 x 5 x 7 = 70 and C_out 40: 2 x 2 tiles, each counted apart.
CASES = [
    pytest.param(2, 72, 40, (5, 7), 3, 1, 3, dict(bias=True, emb=True, residual=True), 0.5, id="b2-72to40-3x3-all"),
    pytest.param(1, 80, 24, (6, 6), 3, 1, 2, dict(bias=False, emb=False, residual=False), None, id="b1-80to24-bare"),
    pytest.param(1, 40, 33, (4, 5), 3, 1, 4, dict(bias=True, emb=False, residual=True), None, id="empty-splits"),
    pytest.param(2, 96, 40, (5, 7), 1, 1, 3, dict(bias=True, emb=True, residual=False), 0.7, id="1x1-b2"),
    pytest.param(1, 72, 16, (9, 7), 3, 2, 2, dict(bias=True, emb=True, residual=False), None, id="stride2"),
]


@pytest.mark.parametrize("b,c_in,c_out,hw,k,stride,split,terms,scale", CASES)
def test_float32_split_matches_reference(no_fallback, b, c_in, c_out, hw, k, stride, split, terms, scale):
    t, params = make(b, c_in, c_out, hw, k, torch.float32, seed=c_in + split, stride=stride, **terms)
    got, ref = run_split(t, params, torch.float32, split, scale=scale)
    assert_matches(got, ref, torch.float32)


@pytest.mark.parametrize("circular", [False, True], ids=["zeros", "circular"])
@pytest.mark.parametrize("b", [1, 2])
def test_float32_split_with_the_groupnorm_prologue(no_fallback, b, circular):
    t, params = make(b, 72, 40, (5, 6), 3, torch.float32, seed=7 + b, residual=not circular)
    got, ref = run_split(t, params, torch.float32, 3, norm_in=norm_for(72, torch.float32, b, groups=8),
                         circular=circular, scale=0.8)
    assert_matches(got, ref, torch.float32)


def test_float32_split_circular(no_fallback):
    t, params = make(2, 48, 24, (4, 6), 3, torch.float32, seed=31)
    got, ref = run_split(t, params, torch.float32, 2, circular=True)
    assert_matches(got, ref, torch.float32)


def test_float32_split_of_an_upsampling_conv(no_fallback):
    """The nearest 2x upsample in the input load (the UNet's Upsample) with split K: x [1, 48, 3, 4] read as 6 x 8."""
    t, params = make(1, 48, 24, (3, 4), 3, torch.float32, seed=17, residual=False)
    got, ref = run_split(t, params, torch.float32, 2, upsample=2)
    assert got.shape == (1, 24, 6, 8)
    assert_matches(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_norm", [False, True], ids=["plain", "norm_in"])
def test_half_precision_split(no_fallback, dtype, with_norm):
    t, params = make(2, 72, 40, (5, 7), 3, dtype, seed=11)
    norm = norm_for(72, dtype, 11, groups=4) if with_norm else None
    got, ref = run_split(t, params, dtype, 3, norm_in=norm, scale=0.5)
    assert_matches(got, ref, dtype)


def test_a_second_call_gives_the_same_bits_and_the_counts_are_reset(no_fallback):
    t, params = make(2, 72, 40, (5, 7), 3, torch.float32, seed=3)
    first, _ = run_split(t, params, torch.float32, 3)
    second = conv2d_triton(**t, **params, split_k=3)
    assert torch.equal(first, second)
    for kept in conv_mod._COUNTERS[first.device]:
        assert not kept.any()  # every tile's count back at 0 (a CUDA graph's replay starts from there)


# ---- SPLIT 1 is today's path; the choice while recording; the dispatch switch


def test_split_1_launches_the_unsplit_kernel_without_workspace(no_fallback):
    t, params = make(1, 72, 40, (5, 7), 3, torch.float32, seed=2)
    for split in (None, 1):  # None: no GPU to fill on the CPU -> 1
        with _triton.recording() as launches:
            out = conv2d_triton(**t, **params, split_k=split)
        (kernel, args, kwargs), = launches
        assert kernel is conv_mod._conv2d_kernel and "SPLIT_K" not in kwargs
        named = dict(zip(conv_mod._CONV2D_JIT.arg_names, args))
        assert named["Ws"] is out and named["Counters"] is out  # the launcher's dummies: nothing allocated


def _recorded_sd_conv(c_in, side, **kw):
    x = torch.empty(2, c_in, side, side, device="meta", dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    w = torch.empty(1280, c_in, 3, 3, device="meta", dtype=torch.float16)
    with _triton.recording() as launches, dispatch.force("auto"):
        dispatch.conv2d(x, w, None, 1, 1, **kw)
    (kernel, args, kwargs), = launches
    return kernel, dict(zip(conv_mod._CONV2D_JIT.arg_names, args)), kwargs


def test_recorded_sd15_8x8_conv_splits_for_two_waves_of_an_h100():
    kernel, named, kwargs = _recorded_sd_conv(1280, 8)
    tile = conv_mod.split_tile()
    # 2 x 8 x 8 = 128 pixels x 1280 channels: 40 tiles of 64x64 (the GPU's split tile) -> 7; 80 of 64x32 (the
    # interpreter's) -> 4 (3.3 rounded up)
    expect = {(64, 64): 7, (64, 32): 4}[tile]
    assert kernel is conv_mod._conv2d_split_kernel and kwargs["SPLIT_K"] == expect
    assert named["Ws"].shape == (expect, 128, 1280) and named["Ws"].dtype == torch.float32
    assert named["Counters"].shape == (128 // tile[0] * 1280 // tile[1],) and named["Counters"].dtype == torch.int32
    with _triton.assume_gpu(10):  # a small GPU: 40 tiles fill 2 waves of 10 SMs
        assert _recorded_sd_conv(1280, 8)[0] is conv_mod._conv2d_kernel


def test_unfused_split_k_runs_one_program_per_tile():
    with dispatch.unfused("split_k"):
        kernel, named, kwargs = _recorded_sd_conv(1280, 8)
    assert kernel is conv_mod._conv2d_kernel and "SPLIT_K" not in kwargs


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_bad_split_k_is_a_clear_error(bad):
    t, params = make(1, 16, 8, (4, 4), 3, torch.float32, seed=1)
    with pytest.raises(_triton.KernelArgumentError, match="split_k"):
        conv2d_triton(**t, **params, split_k=bad)
