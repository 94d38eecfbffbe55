"""Implicit-GEMM conv2d with fused epilogue against the torch reference (interpreter when there is no GPU).

Shapes are small: the interpreter runs every program in Python."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import _triton
from tritonsd.kernels import conv as conv_mod
from tritonsd.kernels.conv import conv2d_reference, conv2d_triton

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, conv_mod, "conv2d_reference")


def case(b, c_in, c_out, hw, k, stride, pad, dtype, seed, epilogue=True, channels_last=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    h_out, w_out = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    t = {
        "x": torch.randn(b, c_in, h, w, generator=g),
        "weight": torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5,
        "bias": torch.randn(c_out, generator=g) if bias else None,
        "emb": torch.randn(b, c_out, generator=g) if epilogue else None,
        "residual": torch.randn(b, c_out, h_out, w_out, generator=g) if epilogue else None,
    }
    t = {name: None if v is None else v.to(DEVICE, dtype) for name, v in t.items()}
    if channels_last:
        t["x"] = t["x"].to(memory_format=torch.channels_last)
    return t, dict(stride=stride, padding=pad, scale=0.70710678 if epilogue else None)


def check(tensors, params, dtype):
    as64 = {name: None if v is None else v.double() for name, v in tensors.items()}
    ref = conv2d_reference(**as64, **params)
    out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = conv2d_triton(**tensors, **params, out=out)
    assert got is out
    assert_matches(got, ref, dtype)


# (B, C_in, C_out, (H, W), kernel, stride, padding, fused epilogue)
SHAPES = [
    pytest.param(2, 32, 64, (16, 16), 3, 1, 1, True, id="resblock-3x3-32to64-emb-res-scale"),
    pytest.param(1, 64, 64, (8, 8), 3, 1, 1, False, id="3x3-64"),
    pytest.param(2, 64, 32, (8, 8), 1, 1, 0, True, id="skip-1x1-64to32"),
    pytest.param(1, 32, 32, (16, 16), 3, 2, 1, False, id="unet-downsample-s2-p1"),
    pytest.param(1, 32, 32, (17, 17), 3, 2, 0, False, id="vae-downsample-prepadded-s2-p0"),
    pytest.param(1, 4, 32, (16, 16), 3, 1, 1, False, id="conv-in-4ch"),
    pytest.param(1, 9, 24, (11, 13), 3, 1, 1, True, id="odd-inpaint-9ch"),
]


@pytest.mark.parametrize("b,c_in,c_out,hw,k,stride,pad,epilogue", SHAPES)
def test_float32_matches_reference(no_fallback, b, c_in, c_out, hw, k, stride, pad, epilogue):
    tensors, params = case(b, c_in, c_out, hw, k, stride, pad, torch.float32, seed=c_in * 7 + k, epilogue=epilogue)
    check(tensors, params, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_reference(no_fallback, dtype):
    tensors, params = case(2, 32, 48, (8, 8), 3, 1, 1, dtype, seed=3)
    check(tensors, params, dtype)


def test_channels_last_input_without_bias(no_fallback):
    tensors, params = case(1, 24, 40, (9, 9), 3, 1, 1, torch.float32, seed=5, channels_last=True, bias=False)
    check(tensors, params, torch.float32)


def test_grouped_convolution_falls_back_to_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 5, 5, generator=g).to(DEVICE)
    w = torch.randn(8, 4, 3, 3, generator=g).to(DEVICE)  # groups=2: not covered by the kernel
    with pytest.raises(RuntimeError):  # the reference's own error: conv2d_reference takes no groups
        conv2d_triton(x, w, None, 1, 1)


def _launched_weight(tensors, params):
    """The weight tensor the launcher hands to the kernel (recorded, not run)."""
    with _triton.recording() as launches:
        conv2d_triton(**tensors, **params)
    (kernel, args, _), = launches
    assert kernel is conv_mod._conv2d_kernel
    return args[1]


def test_kernel_layout_weights_are_read_in_place(no_fallback):
    """A weight in the kernel layout ([KH, KW, C_in, C_out] memory order) is launched as it is, its own storage:
    what copy_() writes into it is what the next launch reads. Nothing is cached between calls."""
    tensors, params = case(1, 8, 16, (6, 6), 3, 1, 1, torch.float32, seed=8, epilogue=False)
    w = conv_mod.to_kernel_layout(tensors["weight"])
    assert w.stride() == (1, 16, 3 * 8 * 16, 8 * 16) and conv_mod.has_kernel_layout(w)
    assert torch.equal(w, tensors["weight"]) and conv_mod.to_kernel_layout(w) is w
    tensors["weight"] = w
    assert _launched_weight(tensors, params) is w
    check(tensors, params, torch.float32)
    w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(9)).to(w))  # as a LoRA switch does
    assert w.stride() == (1, 16, 3 * 8 * 16, 8 * 16) and _launched_weight(tensors, params) is w
    check(tensors, params, torch.float32)
    assert not hasattr(conv_mod, "_PACKED")


@pytest.mark.parametrize("k", [1, 3])
def test_other_weight_layouts_are_repacked_per_call(no_fallback, k):
    """A contiguous (or any other) weight gives the same results through a one-off repacked copy, made anew at
    every call: an in-place change is seen at once."""
    tensors, params = case(1, 16, 24, (7, 7), k, 1, k // 2, torch.float32, seed=10 + k, epilogue=False)
    w = tensors["weight"]
    assert w.is_contiguous() and not conv_mod.has_kernel_layout(w)
    first = _launched_weight(tensors, params)
    assert conv_mod.has_kernel_layout(first) and torch.equal(first, w)
    assert first.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    check(tensors, params, torch.float32)
    w.mul_(-0.5)
    assert torch.equal(_launched_weight(tensors, params), w)
    check(tensors, params, torch.float32)


# ---- circular padding (AUTOMATIC1111's "tiling"): the rows and columns outside the image wrap around

CIRCULAR_SHAPES = [
    pytest.param(2, 32, 48, (11, 13), 3, 1, 1, True, id="odd-3x3-emb-res-scale"),
    pytest.param(1, 16, 24, (7, 9), 3, 2, 1, False, id="odd-downsample-s2-p1"),
    pytest.param(1, 24, 16, (5, 6), 5, 1, 2, False, id="5x5-p2"),
    pytest.param(1, 16, 16, (3, 4), 3, 1, 3, False, id="pad-as-wide-as-the-image"),
    pytest.param(1, 16, 8, (6, 5), 1, 1, 0, True, id="1x1-no-padding"),
]


@pytest.mark.parametrize("b,c_in,c_out,hw,k,stride,pad,epilogue", CIRCULAR_SHAPES)
def test_circular_float32_matches_reference(no_fallback, b, c_in, c_out, hw, k, stride, pad, epilogue):
    tensors, params = case(b, c_in, c_out, hw, k, stride, pad, torch.float32, seed=c_in + hw[0], epilogue=epilogue)
    check(tensors, {**params, "circular": True}, torch.float32)


def test_circular_half_precision_channels_last_matches_reference(no_fallback):
    tensors, params = case(2, 32, 40, (9, 7), 3, 1, 1, torch.float16, seed=21, channels_last=True)
    check(tensors, {**params, "circular": True}, torch.float16)


def test_circular_differs_from_zero_padding_only_at_the_border(no_fallback):
    """The check above could pass with the wrap-around ignored if the reference ignored it too: the two modes
    must differ, and only in the outermost output rows and columns."""
    tensors, params = case(1, 16, 16, (8, 10), 3, 1, 1, torch.float32, seed=4, epilogue=False)
    zeros = conv2d_triton(**tensors, **params)
    wrapped = conv2d_triton(**tensors, **params, circular=True)
    assert torch.equal(zeros[..., 1:-1, 1:-1], wrapped[..., 1:-1, 1:-1])
    for border in (zeros[..., 0, :] - wrapped[..., 0, :], zeros[..., :, -1] - wrapped[..., :, -1]):
        assert border.abs().min() > 0  # every border pixel read at least one wrapped-around tap


def _circular_by_indexing(x, weight, bias, pad, stride):
    """Circular padding written out independently: padded row i is image row (i - pad) mod H."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h + 2 * pad) - pad) % h
    cols = (torch.arange(w + 2 * pad) - pad) % w
    return torch.nn.functional.conv2d(x[..., rows, :][..., cols], weight, bias, stride)


@pytest.mark.parametrize("hw,k,stride,pad", [((7, 9), 3, 1, 1), ((6, 5), 3, 2, 1), ((5, 7), 5, 1, 2), ((3, 3), 3, 1, 3)])
def test_circular_reference_matches_torch(hw, k, stride, pad):
    """The reference against torch's own circular mode (``nn.Conv2d(padding_mode="circular")``, i.e.
    ``F.pad(..., mode="circular")`` then no padding, which A1111 switches on) and against explicit modulo indexing."""
    tensors, _ = case(2, 6, 5, hw, k, stride, pad, torch.float64, seed=k + pad, epilogue=False)
    x, weight, bias = tensors["x"], tensors["weight"], tensors["bias"]
    got = conv2d_reference(x, weight, bias, stride, pad, circular=True)
    layer = torch.nn.Conv2d(6, 5, k, stride, pad, padding_mode="circular").to(x)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        torch.testing.assert_close(got, layer(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, _circular_by_indexing(x, weight, bias, pad, stride), rtol=1e-12, atol=1e-12)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="circular")
    torch.testing.assert_close(got, torch.nn.functional.conv2d(padded, weight, bias, stride), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- the nearest 2x upsample in the load


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c,hw,channels_last,circular", [
    pytest.param(2, 32, (5, 7), True, False, id="odd-b2-channels-last"),
    pytest.param(1, 24, (4, 4), False, False, id="b1-nchw"),
    pytest.param(1, 16, (3, 5), True, True, id="circular"),
])
def test_upsample_in_the_load_is_interpolate_then_conv(no_fallback, dtype, b, c, hw, channels_last, circular):
    """``upsample=2``: what the UNet's and VAE's Upsample computed in two ops (nearest 2x, then a padded 3x3 conv
    with bias and a residual), on fresh random data into a poisoned output."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(11 + b + c)
    x = torch.randn(b, c, *hw, generator=g)
    weight = torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5
    bias = torch.randn(c, generator=g)
    residual = torch.randn(b, c, 2 * hw[0], 2 * hw[1], generator=g)
    up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    if circular:
        up = F.pad(up, (1, 1, 1, 1), mode="circular")
    want = F.conv2d(up, weight.double(), bias.double(), 1, 0 if circular else 1) + residual.double()
    x, weight, bias, residual = (t.to(DEVICE, dtype) for t in (x, weight, bias, residual))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = torch.full(want.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = conv2d_triton(x, weight, bias, 1, 1, residual=residual, out=out, circular=circular, upsample=2)
    assert got is out
    assert_matches(got, want, dtype)


def test_other_upsample_factors_run_the_reference(monkeypatch):
    calls = []
    real = conv_mod.conv2d_reference
    monkeypatch.setattr(conv_mod, "conv2d_reference", lambda *a, **k: calls.append(k["upsample"]) or real(*a, **k))
    x = torch.randn(1, 16, 3, 3, device=DEVICE)
    w = torch.randn(16, 16, 3, 3, device=DEVICE)
    got = conv2d_triton(x, w, None, 1, 1, upsample=3)
    assert calls == [3] and got.shape == (1, 16, 9, 9)
