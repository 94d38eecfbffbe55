"""``tritonsd bench plan``: the plan is right about itself (its FLOPs against torch's FLOP counter, its launch list
against the launches the recorder records), its bytes against hand counts, and its command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tritonsd.bench import plan as P
from tritonsd.bench import plan_model as M
from tritonsd.bench.plan_costs import cost, unique_bytes
from tritonsd.bench.plan_walk import record
from tritonsd.compile import variants
from tritonsd.kernels import dispatch
from tritonsd.kernels._triton import innermost
from tritonsd.kernels.conv import to_kernel_layout
from tritonsd.model.controlnet import ControlNet, ControlNetConfig
from tritonsd.model.unet import CrossAttention
from tritonsd.tools import cli


def _plan_flops(events) -> int:
    costs = [cost(e) for e in events]
    assert all(c.flops_known for c in costs), {c.kernel for c in costs if not c.flops_known}
    return sum(c.flops for c in costs)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """torch's own SDPA formula for the CPU's SDPA kernel, which its counter's registry lacks (it holds the CUDA
    ones): without it, attention would count as free on the CPU."""
    return sdpa_flop_count(query, key, value)  # the counter passes shapes


def _counted_flops(fn) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def test_plan_flops_match_torchs_counter_on_the_tiny_fixture_model(models):
    """The plan walks the UNet on the meta device with the kernels CUDA would pick (Triton convolutions and
    attention, which torch's counter cannot see); torch's counter runs the real fixture UNet on the CPU through
    the torch reference (its convolutions, SDPA and matmuls). The two FLOP totals agree within 1%."""
    model = models("sd1-tiny")
    meta = M.build_from_config(model.config, torch.float32)
    planned = _plan_flops(M.walk_unet(meta, (64, 64), 2, torch.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, model.config.unet.context_dim, generator=g)
    t = torch.full((2,), 500.0)
    with dispatch.force("torch"), torch.no_grad():
        counted = _counted_flops(lambda: model.apply_model(x, t, ctx))
    assert counted > 0 and abs(planned - counted) <= 0.01 * counted, (planned, counted)


@pytest.mark.parametrize("family,size", [("sd15", (512, 512)), ("sdxl", (1024, 1024))])
def test_plan_flops_match_torchs_counter_at_released_sizes(family, size):
    """The same check at a released model's real shapes: torch's counter over the reference path on the meta
    device (nothing computed), the plan over the Triton path."""
    meta = M.build(family, torch.float16)
    planned = _plan_flops(M.walk_unet(meta, size, 2, torch.float16))
    cfg = meta.config.unet
    x = torch.empty(2, 4, size[1] // 8, size[0] // 8, device="meta")
    ctx = torch.empty(2, 77, cfg.context_dim, device="meta", dtype=torch.float16)
    y = torch.empty(2, cfg.adm_in_channels, device="meta", dtype=torch.float16) if cfg.adm_in_channels else None
    t = torch.full((2,), 500.0, device="meta")
    with dispatch.force("torch"), torch.no_grad():
        counted = _counted_flops(lambda: meta.apply_model(x, t, ctx, y=y))
    assert abs(planned - counted) <= 0.01 * counted, (planned, counted)


def test_the_launch_list_is_the_recorded_launches():
    """Every Triton row of the plan, in order, is a launch the kernel recorder records for the same forward
    (``compile/variants.record``, what warm-up and check-compile compile), and nothing else is Triton."""
    meta = M.build("sd15", torch.float16)
    events = M.walk_unet(meta, (512, 512), 2, torch.float16)
    planned = [innermost(e.kernel) for e in events if e.kind == "triton"]
    cfg = meta.config.unet
    x = torch.empty(2, 4, 64, 64, device="meta")
    ctx = torch.empty(2, 77, cfg.context_dim, device="meta", dtype=torch.float16)
    recorded = variants.record(lambda: meta.apply_model(x, torch.full((2,), 500.0, device="meta"), ctx))
    assert planned == [innermost(r.resolve()) for r in recorded]
    assert [cost(e).kernel for e in events if e.kind == "triton"][:3] == [
        # the first ResBlock: GroupNorm statistics, their merge into per-channel mean and scale, the conv that
        # applies them as it loads its input
        "group_norm._group_stats_kernel", "group_norm._group_affine_kernel", "conv._conv2d_kernel"]
    assert planned and {cost(e).impl for e in events} <= {"triton", "cuBLAS", "cuDNN", "torch"}


def test_bytes_and_flops_of_a_linear_and_a_convolution_by_hand():
    """A Linear reads x, W and the bias and writes y; the Triton convolution with a time-embedding add reads x, W,
    the bias and the [B, C_out] vector and writes y (the dummies it passes for what it turned off are the output
    itself, not counted twice)."""
    f16 = dict(device="meta", dtype=torch.float16)
    x, w, b = torch.empty(2, 320, **f16), torch.empty(1280, 320, **f16), torch.empty(1280, **f16)
    [mm] = [cost(e) for e in record(lambda: torch.nn.functional.linear(x, w, b))]
    assert (mm.impl, mm.flops) == ("cuBLAS", 2 * 2 * 320 * 1280)
    assert mm.hbm_bytes == 2 * (2 * 320 + 320 * 1280 + 1280 + 2 * 1280)
    img = torch.empty(2, 320, 64, 64, **f16).contiguous(memory_format=torch.channels_last)
    kernel = torch.empty(320, 320, 3, 3, **f16)
    bias, emb = torch.empty(320, **f16), torch.empty(2, 320, **f16)
    rows = [cost(e) for e in record(lambda: dispatch.conv2d(img, to_kernel_layout(kernel), bias, 1, 1, emb=emb))]
    [conv] = [r for r in rows if r.impl == "triton"]
    assert conv.flops == 2 * (2 * 320 * 64 * 64) * 320 * 9
    assert conv.hbm_bytes == 2 * (2 * 320 * 64 * 64 * 2 + 320 * 320 * 9 + 320 + 2 * 320)


def test_a_split_k_convolution_counts_its_workspace_written_and_read_back():
    """SD 1.5's 8x8 level (UNet batch 2: 128 pixels, 1280 -> 1280 channels) fills less than two waves of an H100:
    the row shows SPLIT_K, and its bytes are x, W, y, the float32 partials written once and read back by each
    tile's finishing program (all but its own: SPLIT - 1 of them), and the tiles' int32 counts."""
    f16 = dict(device="meta", dtype=torch.float16)
    img = torch.empty(2, 1280, 8, 8, **f16).contiguous(memory_format=torch.channels_last)
    kernel = to_kernel_layout(torch.empty(1280, 1280, 3, 3, **f16))
    [conv] = [cost(e) for e in record(lambda: dispatch.conv2d(img, kernel, None, 1, 1))]
    split = conv.config["SPLIT_K"]
    assert split > 1 and f"Ws=[{split},128,1280]" in conv.shapes
    tiles = int(conv.shapes.split("Counters=[")[1].rstrip("]"))
    partials = split * 128 * 1280 * 4
    assert conv.hbm_bytes == 2 * (2 * 1280 * 64) * 2 + 1280 * 1280 * 9 * 2 + partials + partials // split * (
        split - 1) + 4 * tiles
    with dispatch.unfused("split_k"):
        [apart] = [cost(e) for e in record(lambda: dispatch.conv2d(img, kernel, None, 1, 1))]
    assert "SPLIT_K" not in apart.config and apart.hbm_bytes == 2 * (2 * 1280 * 64) * 2 + 1280 * 1280 * 9 * 2


def test_the_plan_sizes_split_k_for_the_named_gpu():
    """The launches are recorded for the --gpu's SM count (gpus.json): 132 on an H100, 108 on an A100, so an
    under-filled convolution splits less on the A100 (two waves are fewer programs there)."""
    def splits(gpu):
        plan = P.make_plan("sd15", steps=1, gpu=gpu)
        return [c.config.get("SPLIT_K", 1) for c in plan.step if c.op == "conv2d"]
    h100, a100 = splits("h100"), splits("a100")
    assert len(h100) == len(a100) and max(h100) > 1
    assert all(a <= h for a, h in zip(a100, h100)) and a100 != h100


def test_unique_bytes_counts_a_broadcast_dimension_once():
    t = torch.empty(1, 320, device="meta", dtype=torch.float16).expand(2, 320)
    assert unique_bytes(t) == 640
    assert unique_bytes(torch.empty(3, 5, device="meta")) == 60


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json_schema_and_labels(tmp_path, capsys):
    path = tmp_path / "plan.json"
    rc, out, err = _run(["bench", "plan", "sd15", "--steps", "4", "--json", str(path), "--summary"], capsys)
    assert rc == 0, err
    assert out.startswith("PREDICTION for sd15 512x512") and "no GPU was used" in out
    data = json.loads(path.read_text())
    assert data["label"].startswith("prediction")
    assert data["command"] == ["tritonsd", "bench", "plan", "sd15", "--steps", "4", "--json", str(path)]
    assert data["gpu"]["key"] == "h100" and data["gpu"]["source"].startswith("https://")
    step = data["per_step"]
    assert set(step) >= {"launches", "hbm_bytes", "flops", "floor_s", "ideal_s", "predicted_it_s"}
    rows = data["launches"]
    assert step["launches"] == len(rows) and all({"op", "impl", "flops", "hbm_bytes", "predicted_s"} <= set(r)
                                                  for r in rows)
    assert step["hbm_bytes"] == sum(r["hbm_bytes"] for r in rows) and step["flops"] == sum(r["flops"] for r in rows)
    assert step["floor_s"] == pytest.approx(sum(r["predicted_s"] for r in rows))
    assert step["ideal_s"] == pytest.approx(step["flops"] / 989.4e12)
    assert step["predicted_it_s"] == pytest.approx(1 / step["floor_s"])
    image = data["image"]
    assert image["steps"] == 4 and set(image["parts"]) == {"text", "loop", "vae_decode"}
    assert image["launches"] == sum(p["launches"] for p in image["parts"].values())
    # the whole loop: four steps (the first makes what the run makes once) and the loop's set-up
    assert image["parts"]["loop"]["launches"] > 4 * step["launches"]


def test_measured_times_sit_beside_the_predictions(tmp_path, capsys):
    plan = P.make_plan("sd15", steps=3)
    row = plan.to_json({}, [])["launches"][11]
    key = f"{row['op']}|{row['impl']}|{row['shapes']}"
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"launches": [{"key": key, "measured_s": 1.5e-5}]}))
    out_json = tmp_path / "plan.json"
    rc, out, err = _run(["bench", "plan", "sd15", "--steps", "3", "--measured", str(measured), "--json", str(out_json)],
                        capsys)
    assert rc == 0, err
    rows = json.loads(out_json.read_text())["launches"]
    hits = [r for r in rows if "measured_s" in r]
    assert hits and all(f"{r['op']}|{r['impl']}|{r['shapes']}" == key and r["measured_s"] == 1.5e-5 for r in hits)
    assert "15.0" in out.splitlines()[2 + 11]


@pytest.mark.parametrize("argv,message", [
    (["bench", "plan", "sd99"], "unknown model 'sd99'"),
    (["bench", "plan", "sd15", "--size", "500x512"], "multiples of 8"),
    (["bench", "plan", "sd15", "--size", "big"], "WxH"),
    (["bench", "plan", "sd15", "--gpu", "v100"], "unknown GPU 'v100'"),
    (["bench", "plan", "sd15", "--controlnet", "-1"], "--controlnet must be 0 to 8"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_the_hoists_take_exactly_the_per_run_work_out_of_the_step():
    """SD 1.5, 3 steps, CFG: the steady step with the hoists has the FLOPs of the step without them less, exactly,
    the cross-attention keys and values (16 layers, 2 x 77 context rows) and the time MLP and the 22 ResBlock
    projections ([2, 1280]), counted here from the modules' shapes; and fewer launches."""
    meta = M.build("sd15", torch.float16)
    unet = meta.model.diffusion_model
    cross = [m for m in unet.modules() if isinstance(m, CrossAttention) and m.to_k.in_features == 768]
    kv = sum(2 * (2 * 2 * 77 * m.to_k.in_features * m.to_k.out_features) for m in cross)
    time = sum(2 * 2 * lin.in_features * lin.out_features for lin in
               [unet.time_embed[0], unet.time_embed[2], *(b.emb_layers[1] for b in unet.res_blocks())])
    steps = {}
    for hoisted in (False, True):
        walk = M.walk_image(meta, (512, 512), 1, True, torch.float16, steps=3, hoists=hoisted)
        steps[hoisted] = [cost(e) for e in walk.step]
    assert len(cross) == 16 and len(unet.res_blocks()) == 22
    assert sum(c.flops for c in steps[False]) - sum(c.flops for c in steps[True]) == kv + time
    assert len(steps[True]) <= len(steps[False]) - (2 * 16 + 2 + 22)


def test_controlnet_part_flops_match_torchs_counter_on_the_controlnet_alone(models):
    """``--controlnet 1`` on the tiny fixture model: the steady step's ``controlnet`` rows (its forward and the
    residuals' scaling, walked on the meta device through the Triton kernels) against torch's counter over a
    random ControlNet at the same widths run alone on the CPU (the torch reference, the hint features made before,
    as a run makes them once). Without the hoists, so that the step holds the whole forward."""
    model = models("sd1-tiny")
    meta = M.build_from_config(model.config, torch.float32)
    walk = M.walk_image(meta, (64, 64), 1, True, torch.float32, steps=3, hoists=False, controlnets=1)
    step = [cost(e) for e in walk.step]
    assert {c.part for c in step} == {"controlnet", "unet", "sampler"}
    planned = sum(c.flops for c in step if c.part == "controlnet")
    cfg = model.config.unet
    torch.manual_seed(0)
    net = ControlNet(ControlNetConfig(unet=cfg, hint_widths=(3, *M.HINT_WIDTHS, cfg.model_channels))).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    t = torch.full((2,), 500.0)
    with dispatch.force("torch"), torch.no_grad():
        hint = net.hint_features(torch.rand(1, 3, 64, 64, generator=g))
        counted = _counted_flops(lambda: net(x, t, ctx, guided_hint=hint))
    assert counted > 0 and abs(planned - counted) <= 0.01 * counted, (planned, counted)
    unet_flops = sum(c.flops for c in step if c.part == "unet")
    assert abs(unet_flops - _plan_flops(M.walk_unet(meta, (64, 64), 2, torch.float32))) <= 0.01 * unet_flops


def test_cli_controlnet_adds_its_launches_and_part_totals(tmp_path, capsys):
    """SD 1.5 with one ControlNet: more launches and FLOPs per step than without, every step row marked with its
    part, and the JSON's per-part totals adding up to the step's."""
    data = {}
    for n in (0, 1):
        path = tmp_path / f"plan{n}.json"
        argv = ["bench", "plan", "sd15", "--steps", "3", "--json", str(path), "--summary"]
        rc, out, err = _run(argv + (["--controlnet", "1"] if n else []), capsys)
        assert rc == 0, err
        data[n] = json.loads(path.read_text())
    plain, controlled = data[0]["per_step"], data[1]["per_step"]
    assert data[1]["controlnets"] == 1 and "--controlnet" in data[1]["command"]
    assert "--controlnet" not in data[0]["command"] and set(plain["parts"]) == {"unet", "sampler"}
    assert controlled["launches"] > plain["launches"] and controlled["flops"] > plain["flops"]
    parts = controlled["parts"]
    assert set(parts) == {"controlnet", "unet", "sampler"} and parts["controlnet"]["flops"] > 0
    rows = data[1]["launches"]
    assert all(r["part"] in parts for r in rows)
    for key in ("launches", "flops", "hbm_bytes"):
        assert sum(p[key] for p in parts.values()) == controlled[key]
    assert parts["controlnet"]["flops"] == sum(r["flops"] for r in rows if r["part"] == "controlnet")
    assert "by part: controlnet" in out


def test_a_narrow_first_convolution_hands_the_triton_convolutions_channels_last_without_a_copy():
    """conv_in (4 input channels) runs cuDNN, which writes channels-last for a channels-last input; the Triton
    convolution reading its output then copies nothing (the plan walk's meta convolution follows cuDNN's layout
    rule rather than the meta kernel's contiguous answer)."""
    x = torch.empty(2, 4, 16, 16, device="meta", dtype=torch.float16)  # NCHW latents
    w_in = torch.empty(32, 4, 3, 3, device="meta", dtype=torch.float16)
    w_next = to_kernel_layout(torch.empty(32, 32, 3, 3, device="meta", dtype=torch.float16))
    outs = []

    def step():
        y = dispatch.conv2d(x, w_in, None, 1, 1)
        outs.append(y)
        dispatch.conv2d(y, w_next, None, 1, 1, residual=y)

    events = record(step)
    names = [str(e.func) if e.kind == "aten" else e.kernel.fn.__name__ if hasattr(e.kernel, "fn") else "triton"
             for e in events]
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    copies = [e for e in events if e.kind == "aten" and "clone" in str(e.func) and e.out.shape[1] == 32]
    assert copies == [], names
    assert sum(e.kind == "triton" for e in events) == 1 and "aten.convolution.default" in names


def test_the_decoders_concatenation_is_read_but_never_written():
    """SD 1.5's first output block (8x8, UNet batch 2, h and skip 1280 wide each; issue 22 item 7): the concat's
    launch with its store off costs exactly the [2, 2560, 8, 8] fp16 write less than the storing one, and the 1x1
    shortcut reading h and skip apart reads both, its weight, and writes its output (split-K off: no workspace)."""
    f16 = dict(device="meta", dtype=torch.float16)
    cl = torch.channels_last
    h = torch.empty(2, 1280, 8, 8, **f16).contiguous(memory_format=cl)
    skip = torch.empty(2, 1280, 8, 8, **f16).contiguous(memory_format=cl)
    norm = dispatch.GroupNormIn(torch.empty(2560, **f16), torch.empty(2560, **f16), 32, 1e-5, True)
    [alone] = [c for c in map(cost, record(lambda: dispatch.concat_stats(h, skip, norm))) if c.impl == "triton"]
    [stored] = [c for c in map(cost, record(lambda: dispatch.concat_channels(h, skip, stats_for=norm)))
                if c.impl == "triton"]
    assert alone.op == stored.op == "concat" and "A=Y=[2,1280,8,8]" in alone.shapes
    assert stored.hbm_bytes - alone.hbm_bytes == 2 * 2560 * 64 * 2
    w = to_kernel_layout(torch.empty(1280, 2560, 1, 1, **f16))
    with dispatch.unfused("split_k"):
        [conv] = [cost(e) for e in record(lambda: dispatch.conv2d(h, w, None, 1, 0, x2=skip))]
    assert conv.config["TWO_INPUTS"] and "X2=[2,1280,8,8]" in conv.shapes
    assert conv.flops == 2 * (2 * 1280 * 64) * 2560
    assert conv.hbm_bytes == 2 * (2 * 1280 * 64) * 2 + 1280 * 2560 * 2 + 2 * 1280 * 64 * 2
