"""The channel concat with the next GroupNorm's statistics (kernels/concat.py, issue 22 item 6): the copy exact,
the (mean, rstd * gamma) against float64 arithmetic written out here, NCHW and channels-last inputs, sizes where
tiles straddle images, groups and the two inputs' boundary (the interpreter's tile is 64 x 32), batch 1 and 2; the
same statistics without the concatenation stored (``concat_stats``)."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import concat as concat_mod
from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels.concat import concat_channels_triton, concat_stats
from tritonsd.kernels.conv import GroupNormIn
from tritonsd.kernels.group_norm import stats_counter
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE, forbid_fallback, poison_allocations


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor the launcher allocates starts as NaN (the output, the statistics, the workspace)."""
    forbid_fallback(monkeypatch, concat_mod, "concat_channels_reference")
    poison_allocations(monkeypatch)


def stats64(y, gamma, groups, eps):
    b, c = y.shape[:2]
    yg = y.double().reshape(b, groups, -1)
    mean = yg.mean(-1)
    rstd = 1.0 / torch.sqrt(((yg - mean[..., None]) ** 2).mean(-1) + eps)
    return mean.repeat_interleave(c // groups, 1), rstd.repeat_interleave(c // groups, 1) * gamma.double()[None]


def make(b, c1, c2, hw, dtype, groups, seed, a_last=True, b_last=True):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(b, c1, *hw, generator=g) * 2.0 + 1.0).to(DEVICE, dtype)
    s = (torch.randn(b, c2, *hw, generator=g) * 0.5 - 0.3).to(DEVICE, dtype)
    if a_last:
        a = a.contiguous(memory_format=torch.channels_last)
    if b_last:
        s = s.contiguous(memory_format=torch.channels_last)
    norm = GroupNormIn((torch.randn(c1 + c2, generator=g) * 0.5 + 1.0).to(DEVICE, dtype),
                       torch.zeros(c1 + c2, device=DEVICE, dtype=dtype), groups, 1e-5, True)
    return a, s, norm


CASES = [  # b, c1, c2, (h, w), groups, a channels-last, b channels-last
    pytest.param(2, 24, 16, (5, 7), 4, True, True, id="b2-Cg10-cl"),
    pytest.param(1, 40, 20, (9, 9), 3, False, True, id="b1-Cg20-nchw-and-cl"),
    pytest.param(2, 30, 30, (3, 5), 6, True, False, id="b2-Cg10-cl-and-nchw-boundary-mid-group"),
    pytest.param(2, 16, 16, (4, 4), 8, False, False, id="b2-Cg4-nchw"),
]


@pytest.mark.parametrize("b,c1,c2,hw,groups,a_last,b_last", CASES)
def test_concat_and_stats_fp32(poisoned, b, c1, c2, hw, groups, a_last, b_last):
    a, s, norm = make(b, c1, c2, hw, torch.float32, groups, seed=c1 + c2 + b, a_last=a_last, b_last=b_last)
    y, st = concat_channels_triton(a, s, stats_for=norm)
    assert torch.equal(y, torch.cat([a, s], 1))
    assert y.is_contiguous(memory_format=torch.channels_last)
    mean64, scale64 = stats64(y, norm.weight, groups, norm.eps)
    assert relative_error(st.mean, mean64) <= 1e-5
    assert relative_error(st.scale, scale64) <= 1e-5
    assert int(stats_counter(y.device).item()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes(poisoned, dtype):
    a, s, norm = make(2, 24, 16, (5, 7), dtype, 4, seed=7, b_last=False)
    y, st = concat_channels_triton(a, s, stats_for=norm)
    assert torch.equal(y, torch.cat([a, s], 1))
    mean64, scale64 = stats64(y, norm.weight, 4, norm.eps)
    assert relative_error(st.mean, mean64) <= 1e-5 and relative_error(st.scale, scale64) <= 1e-5  # of the stored values


def test_second_call_same_bits(poisoned):
    a, s, norm = make(2, 30, 30, (3, 5), torch.float32, 6, seed=9)
    y1, st1 = concat_channels_triton(a, s, stats_for=norm)
    y2, st2 = concat_channels_triton(a, s, stats_for=norm)
    assert torch.equal(st1.mean, st2.mean) and torch.equal(st1.scale, st2.scale) and torch.equal(y1, y2)


def test_without_stats_is_a_plain_cat(poisoned):
    a, s, _ = make(1, 8, 24, (3, 3), torch.float32, 4, seed=2, a_last=False)
    assert torch.equal(concat_channels_triton(a, s), torch.cat([a, s], 1))


def test_dispatch():
    a, s, norm = make(1, 24, 16, (4, 3), torch.float32, 4, seed=3)
    with dispatch.force("triton"):
        y, st = dispatch.concat_channels(a, s, stats_for=norm)
        with dispatch.unfused("group_stats"):
            y_off, st_off = dispatch.concat_channels(a, s, stats_for=norm)
    with dispatch.force("torch"):
        y_ref, st_ref = dispatch.concat_channels(a, s, stats_for=norm)
    assert st is not None and st_off is None and st_ref is None
    assert torch.equal(y, y_ref) and torch.equal(y_off, y_ref)


def test_mismatched_inputs_fall_back_to_torch():
    a = torch.randn(1, 4, 3, 3, device=DEVICE)
    with pytest.raises(RuntimeError):  # torch's own error for sizes that do not concatenate
        concat_channels_triton(a, torch.randn(1, 4, 2, 3, device=DEVICE))
    y, st = concat_channels_triton(a, a.double(), stats_for=GroupNormIn(torch.ones(8), torch.zeros(8), 2))
    assert st is None and y.dtype == torch.float64


# ---- the statistics alone (issue 22 item 7): for convolutions that read a and b themselves


@pytest.mark.parametrize("b,c1,c2,hw,groups,a_last,b_last", CASES)
def test_statistics_alone_store_nothing(poisoned, b, c1, c2, hw, groups, a_last, b_last):
    """``concat_stats``: the concat's launch with its store off (its output argument is a's own storage, left as it
    was); the statistics those of the concatenation by the float64 formula, and the storing launch's bit for bit."""
    a, s, norm = make(b, c1, c2, hw, torch.float32, groups, seed=c1 + c2 + b, a_last=a_last, b_last=b_last)
    a_before, s_before = a.clone(), s.clone()
    with _triton.recording() as launches:
        concat_stats(a, s, norm)
    (kernel, args, kwargs), = launches
    named = dict(zip(concat_mod._CONCAT_JIT.arg_names, args))
    assert kernel is concat_mod._concat_stats_kernel and kwargs["STORE"] is False and named["Y"] is a
    st = concat_stats(a, s, norm)
    assert torch.equal(a, a_before) and torch.equal(s, s_before)
    mean64, scale64 = stats64(torch.cat([a, s], 1), norm.weight, groups, norm.eps)
    assert relative_error(st.mean, mean64) <= 1e-5
    assert relative_error(st.scale, scale64) <= 1e-5
    _, stored = concat_channels_triton(a, s, stats_for=norm)
    assert torch.equal(st.mean, stored.mean) and torch.equal(st.scale, stored.scale)
    assert int(stats_counter(a.device).item()) == 0


def test_statistics_alone_in_half_precision(poisoned):
    a, s, norm = make(2, 24, 16, (5, 7), torch.float16, 4, seed=5, b_last=False)
    st = concat_stats(a, s, norm)
    mean64, scale64 = stats64(torch.cat([a, s], 1), norm.weight, 4, norm.eps)
    assert relative_error(st.mean, mean64) <= 1e-5 and relative_error(st.scale, scale64) <= 1e-5


def test_statistics_alone_none_where_none_are_made():
    a, s, norm = make(1, 8, 24, (3, 3), torch.float32, 4, seed=6)
    assert concat_stats(a, s, norm._replace(groups=5)) is None  # 32 channels in 5 groups
    assert concat_stats(a, s[:, :, :2], norm) is None  # sizes that do not concatenate
    assert concat_stats(a, s, None) is None
    with dispatch.force("triton"):
        assert dispatch.concat_stats(a, s, norm) is not None
        with dispatch.unfused("group_stats"):
            assert dispatch.concat_stats(a, s, norm) is None
    with dispatch.force("torch"):
        assert dispatch.concat_stats(a, s, norm) is None
