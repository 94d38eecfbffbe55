"""GroupNorm (+ SiLU) applied in the convolution's input load (issue 22, item 2) against float64 arithmetic written
out here (under the interpreter when there is no GPU): the statistics' launcher, the fused convolution at odd sizes,
both layouts, zero and circular padding, batch 1 and 2, and a ResBlock through the Triton kernels vs the torch ops."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import conv as conv_mod
from tritonsd.kernels import dispatch
from tritonsd.kernels.conv import GroupNormIn, conv2d_triton
from tritonsd.kernels.group_norm import group_norm_affine
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE, assert_matches, forbid_fallback


@pytest.fixture
def no_fallback(monkeypatch):
    forbid_fallback(monkeypatch, conv_mod, "conv2d_reference")


def group_norm64(x, weight, bias, groups, eps, silu):
    """(x - mean_g) / sqrt(var_g + eps) * w + b per (batch, group), then x * sigmoid(x), in float64."""
    b, c = x.shape[:2]
    xg = x.double().reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    y = y * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]
    return y * torch.sigmoid(y) if silu else y


def make(b, c_in, c_out, hw, k, dtype, seed, groups=4, silu=True, channels_last=True, emb=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, *hw, generator=g) * 3.0 + 1.5  # off-centre groups: the mean matters
    t = {"x": x, "weight": torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5,
         "bias": torch.randn(c_out, generator=g), "emb": torch.randn(b, c_out, generator=g) if emb else None}
    t = {n: None if v is None else v.to(DEVICE, dtype) for n, v in t.items()}
    if channels_last:
        t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    norm = GroupNormIn(torch.randn(c_in, generator=g).to(DEVICE, dtype) * 0.5 + 1.0,
                       torch.randn(c_in, generator=g).to(DEVICE, dtype) * 0.5, groups, 1e-5, silu)
    return t, norm


def check(t, norm, dtype, stride=1, padding=1, circular=False):
    h = group_norm64(t["x"], norm.weight, norm.bias, norm.groups, norm.eps, norm.silu)
    if circular:
        h = torch.nn.functional.pad(h, (padding,) * 4, mode="circular")
    ref = torch.nn.functional.conv2d(h, t["weight"].double(), t["bias"].double(), stride, 0 if circular else padding)
    if t["emb"] is not None:
        ref = ref + t["emb"].double()[:, :, None, None]
    out = torch.full(ref.shape, float("nan"), device=DEVICE, dtype=dtype)
    got = conv2d_triton(**t, stride=stride, padding=padding, circular=circular, norm_in=norm, out=out)
    assert got is out
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("b,c_in,c_out,hw,k,groups,silu,channels_last", [
    pytest.param(2, 32, 24, (7, 9), 3, 4, True, True, id="b2-3x3-silu-cl-odd"),
    pytest.param(1, 24, 16, (5, 6), 3, 8, True, False, id="b1-3x3-silu-nchw"),
    pytest.param(2, 48, 40, (4, 3), 1, 16, False, True, id="b2-1x1-proj_in-no-silu"),
])
def test_fused_groupnorm_conv_matches_arithmetic(no_fallback, b, c_in, c_out, hw, k, groups, silu, channels_last,
                                                 dtype):
    t, norm = make(b, c_in, c_out, hw, k, dtype, seed=c_in + k, groups=groups, silu=silu, channels_last=channels_last)
    check(t, norm, dtype, padding=k // 2)


def test_stride_and_circular_padding(no_fallback):
    t, norm = make(2, 16, 16, (9, 7), 3, torch.float32, seed=3, emb=False)
    check(t, norm, torch.float32, stride=2, padding=1)
    check(t, norm, torch.float32, padding=1, circular=True)


def test_affine_matches_the_formula():
    t, norm = make(2, 32, 8, (6, 5), 3, torch.float32, seed=5, groups=8)
    mean, scale = group_norm_affine(t["x"], norm.weight, norm.groups, norm.eps)
    xg = t["x"].double().reshape(2, 8, -1)
    mean64 = xg.mean(-1).repeat_interleave(4, dim=1)  # [B, G] -> [B, C]
    rstd64 = 1.0 / torch.sqrt(xg.var(-1, unbiased=False) + norm.eps).repeat_interleave(4, dim=1)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale.double(), rstd64 * norm.weight.double(), rtol=1e-5, atol=1e-5)


def test_norm_in_changes_the_result():
    """The prologue is not a no-op (the checks above would also hold for a reference that ignored it)."""
    t, norm = make(1, 16, 8, (5, 5), 3, torch.float32, seed=6)
    assert relative_error(conv2d_triton(**t, padding=1), conv2d_triton(**t, padding=1, norm_in=norm)) > 0.1


@pytest.mark.parametrize("batch", [1, 2])
def test_resblock_through_triton_matches_torch(batch):
    from tritonsd.model.unet import ResBlock

    block = ResBlock(32, 64, 48)
    g = torch.Generator().manual_seed(batch)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    block = block.to(DEVICE).eval()
    x = (torch.randn(batch, 32, 5, 7, generator=g) + 0.5).to(DEVICE)
    emb = torch.randn(batch, 48, generator=g).to(DEVICE)
    with torch.no_grad():
        with dispatch.force("torch"):
            ref = block(x, emb)
        with dispatch.force("triton"):
            got = block(x, emb)
            with dispatch.unfused("group_norm"):
                apart = block(x, emb)
    assert relative_error(got, ref) <= 1e-5 and relative_error(apart, ref) <= 1e-5
