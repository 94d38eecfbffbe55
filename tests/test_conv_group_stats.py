"""GroupNorm statistics in the convolution's epilogue (issue 22, item 6) against float64 arithmetic written out
here: the (mean, rstd * gamma) a conv hands the GroupNorm that reads its output, at sizes where row tiles
straddle images and groups straddle column tiles (the interpreter's tile is 64 x 32), batch 1 and 2, every
dtype; the counter left at 0; and the next convolution normalising its input with them."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import conv as conv_mod
from tritonsd.kernels import dispatch
from tritonsd.kernels.conv import GroupNormIn, conv2d_triton
from tritonsd.kernels.group_norm import GroupStats, stats_counter
from tritonsd.testing.reference import relative_error

from kernel_checks import DEVICE, TOL, assert_matches, forbid_fallback, poison_allocations


@pytest.fixture
def poisoned(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN (outputs and the partials' workspace alike): an
    element left unwritten, or a workspace slot read that no tile wrote, shows."""
    forbid_fallback(monkeypatch, conv_mod, "conv2d_reference")
    poison_allocations(monkeypatch)


def stats64(y: torch.Tensor, gamma: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd * gamma) per (batch, channel) of y's groups, in float64."""
    b, c = y.shape[:2]
    yg = y.double().reshape(b, groups, -1)
    mean = yg.mean(-1)
    var = ((yg - mean[..., None]) ** 2).mean(-1)
    rstd = 1.0 / torch.sqrt(var + eps)
    cg = c // groups
    return mean.repeat_interleave(cg, 1), rstd.repeat_interleave(cg, 1) * gamma.double()[None]


def make(b, c_in, c_out, hw, dtype, groups, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c_in, *hw, generator=g) * 2.0 + 0.7).to(DEVICE, dtype)
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5).to(DEVICE, dtype)
    bias = (torch.randn(c_out, generator=g) + 1.0).to(DEVICE, dtype)  # off-centre groups: the mean matters
    norm = GroupNormIn((torch.randn(c_out, generator=g) * 0.5 + 1.0).to(DEVICE, dtype),
                       (torch.randn(c_out, generator=g) * 0.5).to(DEVICE, dtype), groups, 1e-5, True)
    return x.contiguous(memory_format=torch.channels_last), w, bias, norm


SHAPES = [  # b, c_in, c_out, (h, w), groups, stride
    pytest.param(2, 16, 60, (5, 7), 3, 1, id="b2-Cg20-straddles-columns-and-images"),
    pytest.param(2, 16, 40, (9, 9), 4, 1, id="b2-Cg10-81px-straddles-row-tiles"),
    pytest.param(1, 16, 40, (6, 5), 4, 1, id="b1-Cg10"),
    pytest.param(1, 16, 130, (3, 4), 2, 1, id="b1-Cg65-wider-than-a-column-tile"),
    pytest.param(2, 24, 32, (7, 6), 8, 2, id="b2-stride2-Cg4"),
]


@pytest.mark.parametrize("b,c_in,c_out,hw,groups,stride", SHAPES)
def test_stats_match_the_formula_fp32(poisoned, b, c_in, c_out, hw, groups, stride):
    x, w, bias, norm = make(b, c_in, c_out, hw, torch.float32, groups, seed=c_out + b)
    y, st = conv2d_triton(x, w, bias, stride, 1, stats_for=norm)
    assert isinstance(st, GroupStats)
    mean64, scale64 = stats64(y, norm.weight, groups, norm.eps)
    assert not torch.isnan(y).any()
    assert relative_error(st.mean, mean64) <= 1e-5
    assert relative_error(st.scale, scale64) <= 1e-5
    assert int(stats_counter(y.device).item()) == 0


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("b,c_in,c_out,hw,groups,stride", SHAPES[:2] + SHAPES[3:4])
def test_stats_of_a_split_k_launch(poisoned, b, c_in, c_out, hw, groups, stride, split):
    """Split K with the statistics epilogue (the 8x8 level's convolutions feed GroupNorms): each tile's finishing
    program stores the tile's partial, every program is counted, the launch's last merges them. 72 input channels
    are 3 chunks of the interpreter's BLOCK_K (32) at every tap: each split sums real work."""
    x, w, bias, norm = make(b, 72, c_out, hw, torch.float32, groups, seed=c_out + b + split)
    y, st = conv2d_triton(x, w, bias, stride, 1, stats_for=norm, split_k=split)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), bias.double(), stride, 1)
    assert_matches(y, ref, torch.float32)
    mean64, scale64 = stats64(y, norm.weight, groups, norm.eps)
    assert relative_error(st.mean, mean64) <= 1e-5
    assert relative_error(st.scale, scale64) <= 1e-5
    assert int(stats_counter(y.device).item()) == 0
    assert all(not kept.any() for kept in conv_mod._COUNTERS[y.device])  # the split counts reset too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_stats_are_of_the_stored_values(poisoned, dtype):
    """In fp16/bf16 the statistics are the stored (rounded) tensor's, as the unfused GroupNorm reads it."""
    x, w, bias, norm = make(2, 16, 60, (5, 7), dtype, 3, seed=11)
    y, st = conv2d_triton(x, w, bias, 1, 1, stats_for=norm)
    mean64, scale64 = stats64(y, norm.weight, 3, norm.eps)
    assert relative_error(st.mean, mean64) <= 1e-5
    assert relative_error(st.scale, scale64) <= 1e-5


def test_epilogue_changes_nothing_else_and_repeats_bit_for_bit(poisoned):
    x, w, bias, norm = make(2, 16, 40, (9, 9), torch.float32, 4, seed=3)
    plain = conv2d_triton(x, w, bias, 1, 1)
    y1, st1 = conv2d_triton(x, w, bias, 1, 1, stats_for=norm)
    assert int(stats_counter(x.device).item()) == 0
    y2, st2 = conv2d_triton(x, w, bias, 1, 1, stats_for=norm)
    assert torch.equal(plain, y1) and torch.equal(y1, y2)
    assert torch.equal(st1.mean, st2.mean) and torch.equal(st1.scale, st2.scale)


def group_norm_conv64(y, norm, w2, bias2):
    """silu(group_norm(y)) then a 3x3 conv, in float64."""
    b, c = y.shape[:2]
    yg = y.double().reshape(b, norm.groups, -1)
    mean = yg.mean(-1, keepdim=True)
    var = ((yg - mean) ** 2).mean(-1, keepdim=True)
    h = ((yg - mean) / torch.sqrt(var + norm.eps)).reshape(y.shape)
    h = h * norm.weight.double()[None, :, None, None] + norm.bias.double()[None, :, None, None]
    h = h * torch.sigmoid(h)
    return torch.nn.functional.conv2d(h, w2.double(), bias2.double(), 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("b", [1, 2])
def test_next_conv_normalises_with_them(poisoned, dtype, b):
    """conv -> (stats) -> GroupNorm + SiLU in the next conv's load, which launches nothing for its statistics."""
    x, w, bias, norm = make(b, 16, 60, (5, 7), dtype, 3, seed=20 + b)
    g = torch.Generator().manual_seed(b)
    w2 = (torch.randn(24, 60, 3, 3, generator=g) / (9 * 60) ** 0.5).to(DEVICE, dtype)
    bias2 = torch.randn(24, generator=g).to(DEVICE, dtype)
    y, st = conv2d_triton(x, w, bias, 1, 1, stats_for=norm)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv_mod, "group_norm_affine", lambda *a, **k: calls.append(a))
        out = torch.full((b, 24, 5, 7), float("nan"), device=DEVICE, dtype=dtype)
        got = conv2d_triton(y, w2, bias2, 1, 1, norm_in=norm._replace(stats=st), out=out)
    assert calls == []
    assert_matches(got, group_norm_conv64(y, norm, w2, bias2), dtype)


def test_groups_that_do_not_divide_give_no_stats(poisoned):
    x, w, bias, norm = make(1, 16, 30, (4, 4), torch.float32, 4, seed=5)
    y, st = conv2d_triton(x, w, bias, 1, 1, stats_for=norm)
    assert st is None and not torch.isnan(y).any()


def test_dispatch_returns_stats_unless_unfused():
    x, w, bias, norm = make(1, 16, 40, (4, 5), torch.float32, 4, seed=6)
    with dispatch.force("triton"):
        y, st = dispatch.conv2d(x, w, bias, 1, 1, stats_for=norm)
        with dispatch.unfused("group_stats"):
            y_off, st_off = dispatch.conv2d(x, w, bias, 1, 1, stats_for=norm)
    with dispatch.force("torch"):
        y_ref, st_ref = dispatch.conv2d(x, w, bias, 1, 1, stats_for=norm)
    assert st is not None and st_off is None and st_ref is None
    assert torch.equal(y, y_off) and relative_error(y, y_ref) <= TOL[torch.float32]


@pytest.fixture(scope="module")
def tiny_unet(models):
    return models("sd1-tiny").model.diffusion_model


def _unet_inputs(unet, batch, hw):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, *hw, generator=g).to(DEVICE)
    context = torch.randn(batch, 77, unet.cfg.context_dim, generator=g).to(DEVICE)
    return x, torch.tensor([500.0] * batch, device=DEVICE), context


@pytest.mark.slow  # two UNet passes under the interpreter: ~45 s per case
@pytest.mark.parametrize("batch,hw", [(1, (8, 8)), (2, (6, 10))])
def test_unet_takes_every_groupnorm_statistic_from_its_producer(tiny_unet, monkeypatch, batch, hw):
    """The whole UNet on the Triton kernels: no GroupNorm statistics launched apart (conv_in, the ResBlocks'
    convs, proj_out, Down/Upsample and the skip concats make them all), the result the torch ops' within the
    fp32 parity bound and the unfused Triton run's within 1e-5."""
    unet = tiny_unet.to(DEVICE)
    x, t, context = _unet_inputs(unet, batch, hw)
    calls = []
    affine = conv_mod.group_norm_affine
    monkeypatch.setattr(conv_mod, "group_norm_affine", lambda *a, **k: calls.append(1) or affine(*a, **k))
    with torch.no_grad():
        with dispatch.force("torch"):
            ref = unet(x, t, context)
        with dispatch.force("triton"):
            got = unet(x, t, context)
            fused_calls, calls[:] = len(calls), []
            with dispatch.unfused("group_stats"):
                apart = unet(x, t, context)
    norms = sum(1 for m in unet.modules() if type(m).__name__ == "GroupNorm")
    assert fused_calls == 0 and len(calls) == norms  # apart: each norm's two statistics launches
    assert relative_error(got, ref) <= 1e-4
    assert relative_error(got, apart) <= 1e-5


def test_the_sd15_plan_launches_no_groupnorm_statistics_but_conv_ins(tmp_path, capsys):
    """The plan of one SD 1.5 step (a prediction, recorded on the meta device with "auto"): every GroupNorm's
    statistics come from its producer's epilogue except the first ResBlock's, whose input conv_in (4 channels)
    runs cuDNN; the 12 skip concats are Triton concats computing them (without storing the concatenation); the
    issue's launch budget holds."""
    import json

    from tritonsd.tools import cli

    path = tmp_path / "plan.json"
    assert cli.main(["bench", "plan", "sd15", "--steps", "2", "--json", str(path), "--summary"]) == 0
    capsys.readouterr()
    rows = json.loads(path.read_text())["launches"]
    ops = [r["op"] for r in rows]
    assert ops.count("group_stats") == ops.count("group_affine") == 1
    assert ops[ops.index("group_stats") - 1] == "convolution"  # right after conv_in (cuDNN)
    assert ops.count("concat") == 12 and "cat" not in ops[:ops.index("cfg_combine")]  # the UNet's part
    # SD 1.5's output blocks all have a conv shortcut: each concat launch stores nothing (its Y is its A), the
    # ResBlock's convs read h and skip themselves (issue 22 item 7)
    assert all("A=Y=" in r["shapes"] for r in rows if r["op"] == "concat")
    assert len(rows) <= 260
