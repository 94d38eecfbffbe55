"""``tritonsd bench plan``: a roofline plan of every launch of a denoising step, and of a whole image, on a named
GPU, without one. Every figure is a PREDICTION from counted FLOPs and bytes and the GPU's published peaks.

The rows are the launches the model makes, recorded on the meta device (``plan_walk``: the Triton launcher's
recorder and torch's dispatch log; ``plan_model``: the model, the sampler loop, the text encoders and the VAE);
``plan_costs`` gives each its FLOPs and minimum HBM bytes. A launch's predicted time is the roofline's
``max(flops / peak, bytes / bandwidth)`` (tensor-core peak for matrix products, the vector peak otherwise); the
per-op floor is their sum, the compute ideal ``total flops / tensor peak``, the predicted it/s ``1 / floor``.
Launch overheads, occupancy and caches are not modelled: a real step is slower than the floor. (So a split-K
convolution, whose launch fills the GPU's SMs where the unsplit one left most idle, gains nothing here: its row shows
SPLIT_K in its config and costs its workspace's bytes, written and read back, as if none stayed in L2.)

A measured-times file (``--measured``, written by a GPU run) maps a launch's key ``op|impl|shapes`` (each row's
key) to seconds, or holds ``{"launches": [{"key": ..., "measured_s": ...}]}``; a row whose key it holds shows
the measurement beside the prediction. (A row's key is not stored in the plan's JSON: it is
``op + "|" + impl + "|" + shapes`` of the row.)

``--controlnet N`` walks the step through N random full-size ControlNets at the model's widths (the controlled
UNet, as a captured loop calls it); each step row's ``part`` says which network launched it (``controlnet``,
``unet``, or ``sampler`` for the denoiser, CFG and the update) and ``per_step.parts`` totals each part.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from tritonsd.bench import plan_model
from tritonsd.bench.plan_costs import Cost, cost
from tritonsd.bench.plan_walk import Event
from tritonsd.devices import DTYPE_NAMES
from tritonsd.escape import escape
from tritonsd.kernels._triton import TABLES_DIR, TuningTables, assume_gpu
from tritonsd.outputs import atomic_write

LAUNCH_OVERHEAD_S = (1e-6, 2e-6)  # an assumed range of per-launch cost in a captured graph (not measured)
LABEL = "prediction (roofline from counted FLOPs and bytes; nothing measured)"
DEFAULT_STEPS = 20
PLAN_DTYPES = ("fp16", "bf16")


_tables: dict[str, TuningTables] = {}  # per GPU key, read once


class PlanError(ValueError):
    """Arguments the plan cannot take (unknown GPU, bad measured-times file)."""


def gpu_specs() -> dict[str, dict]:
    data = json.loads(resources.files("tritonsd.bench").joinpath("data/gpus.json").read_text())
    return data["gpus"]


@dataclass
class GPU:
    key: str
    name: str
    tensor_flops: float
    vector_flops: float
    hbm_bytes_s: float
    source: str
    device_name: str
    sms: int  # the launchers size split-K grids for it (kernels/conv.py)

    @classmethod
    def named(cls, key: str, dtype: str) -> GPU:
        specs = gpu_specs()
        if key not in specs:
            raise PlanError(f"unknown GPU {key!r}: expected one of {', '.join(specs)}")
        s = specs[key]
        return cls(key, s["name"], float(s["tensor_flops"][dtype]), float(s["vector_flops"]),
                   float(s["hbm_bytes_s"]), s["source"], s["device_name"], int(s["sms"]))

    def tuned(self, autotune: tuple) -> dict:
        """An autotuned launch's config in the tuning tables for this GPU (the user's cache, then the committed
        ``kernels/data/tuned``), or None: the autotuner picks one of ``configs`` on the GPU."""
        name, source, key, count = autotune
        if self.key not in _tables:
            _tables[self.key] = TuningTables(self.device_name, tables_dir=TABLES_DIR)
        hit = _tables[self.key].lookup(name, source, key) if source else None
        return {"configs": count, "tuned": None if hit is None else hit.get("config")}

    def time(self, c: Cost) -> float:
        """The roofline time of one launch: compute or memory, whichever is slower."""
        peak = self.tensor_flops if c.matmul else self.vector_flops
        return max(c.flops / peak, c.hbm_bytes / self.hbm_bytes_s)


def row(c: Cost, gpu: GPU, measured: dict[str, float]) -> dict:
    out = {"op": c.op, "impl": c.impl, "kernel": c.kernel, "shapes": c.shapes, "flops": c.flops,
           "hbm_bytes": c.hbm_bytes, "predicted_s": gpu.time(c)}
    if c.part:
        out["part"] = c.part
    if c.config:
        out["config"] = c.config
    if c.autotune is not None:
        out["autotune"] = gpu.tuned(c.autotune)
    if not c.flops_known:
        out["flops_unknown"] = True
    if c.key in measured:
        out["measured_s"] = measured[c.key]
    return out


def totals(costs: list[Cost], gpu: GPU) -> dict:
    flops = sum(c.flops for c in costs)
    floor = sum(gpu.time(c) for c in costs)
    by_impl = Counter(c.impl for c in costs)
    return {"launches": len(costs), "hbm_bytes": sum(c.hbm_bytes for c in costs), "flops": flops,
            "floor_s": floor, "ideal_s": flops / gpu.tensor_flops, "predicted_it_s": 1.0 / floor if floor else None,
            "launches_by_impl": dict(sorted(by_impl.items())),
            "with_launch_overhead": {"assumed_per_launch_s": list(LAUNCH_OVERHEAD_S),
                                     "floor_s": [floor + len(costs) * o for o in LAUNCH_OVERHEAD_S]},
            "unknown_flops_kernels": sorted({c.kernel for c in costs if not c.flops_known})}


def load_measured(path: Path | None) -> dict[str, float]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("launches"), list):
            return {str(r["key"]): float(r["measured_s"]) for r in data["launches"] if "measured_s" in r}
        if isinstance(data, dict):
            return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"cannot read measured times {escape(str(path))}: {escape(str(e).splitlines()[0])}") from None
    raise PlanError(f"{escape(str(path))}: expected {{key: seconds}} or {{\"launches\": [...]}}")


@dataclass
class Plan:
    model: str
    size: tuple[int, int]
    batch: int
    cfg: bool
    dtype: str
    steps: int
    hoists: bool
    controlnets: int
    gpu: GPU
    step: list[Cost]
    text: list[Cost]
    loop: list[Cost]
    vae: list[Cost]

    def to_json(self, measured: dict[str, float], command: list[str]) -> dict:
        gpu = self.gpu
        image = self.text + self.loop + self.vae
        return {
            "label": LABEL, "command": command, "model": self.model, "size": list(self.size), "batch": self.batch,
            "unet_batch": self.batch * (2 if self.cfg else 1), "cfg": self.cfg, "dtype": self.dtype,
            "hoists": self.hoists, "controlnets": self.controlnets,
            "gpu": {"key": gpu.key, "name": gpu.name, "tensor_flops": gpu.tensor_flops,
                    "vector_flops": gpu.vector_flops, "hbm_bytes_s": gpu.hbm_bytes_s, "sms": gpu.sms,
                    "source": gpu.source},
            "per_step": {**totals(self.step, gpu), "parts": {
                part: totals([c for c in self.step if c.part == part], gpu) for part in plan_model.PARTS
                if part != "controlnet" or self.controlnets}},
            "launches": [row(c, gpu, measured) for c in self.step],
            "image": {"steps": self.steps, **totals(image, gpu),
                      "parts": {"text": totals(self.text, gpu), "loop": totals(self.loop, gpu),
                                "vae_decode": totals(self.vae, gpu)},
                      "rows": {"text": [row(c, gpu, measured) for c in self.text],
                               "vae_decode": [row(c, gpu, measured) for c in self.vae]}},
        }


def _costs(events: list[Event]) -> list[Cost]:
    return [cost(e) for e in events]


def make_plan(model: str, size: tuple[int, int] | None = None, batch: int = 1, cfg: bool = True,
              dtype: str = "fp16", gpu: str = "h100", steps: int = DEFAULT_STEPS,
              text_heads: int | None = None, hoists: bool = True, controlnets: int = 0) -> Plan:
    if dtype not in PLAN_DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(PLAN_DTYPES)}, got {dtype!r}")
    if not 1 <= batch <= 64 or not 1 <= steps <= 500:
        raise PlanError("batch must be 1 to 64 and steps 1 to 500")
    if not 0 <= controlnets <= 8:
        raise PlanError(f"--controlnet must be 0 to 8, got {controlnets}")
    spec = GPU.named(gpu, dtype)
    built = plan_model.build(model, DTYPE_NAMES[dtype], text_heads)
    size = size or plan_model.native_size(built)
    # the launches this GPU would get: split-K convolutions fill its SMs, and its tuning tables say which fused
    # GEMMs run apart (cuBLAS and separate launches) there
    with assume_gpu(spec.sms, spec.device_name):
        walk = plan_model.walk_image(built, size, batch, cfg, DTYPE_NAMES[dtype], steps, hoists, controlnets)
    loop = _costs(walk.loop)
    by_event = {id(e): c for e, c in zip(walk.loop, loop)}
    step = [by_event[id(e)] for e in walk.step]
    return Plan(model, size, batch, cfg, dtype, steps, hoists, controlnets, spec, step, _costs(walk.text), loop,
                _costs(walk.vae))


# ---- text output


def _si(v: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.2f} {prefix}{unit}"
    return f"{v:.0f} {unit}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms"


def summary_lines(title: str, t: dict) -> list[str]:
    impl = ", ".join(f"{k} {v}" for k, v in t["launches_by_impl"].items())
    out = [f"{title}: {t['launches']} launches ({impl}); {_si(t['hbm_bytes'], 'B')} HBM; {_si(t['flops'], 'FLOP')}",
           f"  predicted floor {_ms(t['floor_s'])} (sum of per-launch rooflines), compute ideal {_ms(t['ideal_s'])}"
           f" ({t['floor_s'] / t['ideal_s']:.2f}x)" if t["ideal_s"] else f"  predicted floor {_ms(t['floor_s'])}"]
    if t["unknown_flops_kernels"]:
        out.append(f"  no FLOP formula for: {', '.join(t['unknown_flops_kernels'])} (counted as 0 FLOPs)")
    return out


def print_plan(data: dict, rows: bool = True, file=None) -> None:
    file = file or sys.stdout
    gpu = data["gpu"]
    print(f"PREDICTION for {escape(data['model'])} {data['size'][0]}x{data['size'][1]}, batch {data['batch']}"
          f"{' with CFG (UNet batch %d)' % data['unet_batch'] if data['cfg'] else ''}, {data['dtype']}, "
          f"on {gpu['name']} ({_si(gpu['tensor_flops'], 'FLOP/s')} tensor, {_si(gpu['hbm_bytes_s'], 'B/s')}): "
          "no GPU was used", file=file)
    if rows:
        print(f"{'#':>4} {'op':<20} {'impl':<7} {'GFLOP':>9} {'MB':>9} {'pred us':>9} {'meas us':>9}  shapes",
              file=file)
        for i, r in enumerate(data["launches"]):
            meas = f"{r['measured_s'] * 1e6:9.1f}" if "measured_s" in r else f"{'':>9}"
            print(f"{i:>4} {r['op'][:20]:<20} {r['impl']:<7} {r['flops'] / 1e9:9.2f} {r['hbm_bytes'] / 1e6:9.2f} "
                  f"{r['predicted_s'] * 1e6:9.1f} {meas}  {r['shapes']}", file=file)
    step = data["per_step"]
    for line in summary_lines("one step", step):
        print(line, file=file)
    if "controlnet" in step["parts"]:
        print("  by part: " + "; ".join(f"{name} {t['launches']} launches, {_si(t['flops'], 'FLOP')}, floor "
                                        f"{_ms(t['floor_s'])}" for name, t in step["parts"].items()), file=file)
    low, high = step["with_launch_overhead"]["floor_s"]
    print(f"  predicted {step['predicted_it_s']:.1f} it/s at the floor; {1 / high:.1f}-{1 / low:.1f} it/s with an "
          f"assumed {LAUNCH_OVERHEAD_S[0] * 1e6:.0f}-{LAUNCH_OVERHEAD_S[1] * 1e6:.0f} us per launch", file=file)
    image = data["image"]
    for line in summary_lines(f"one image ({image['steps']} steps, text encoders, VAE decode)", image):
        print(line, file=file)


def dumps(value, indent: int = 0) -> str:
    """JSON with nested objects indented and every launch row (a flat object) on one line: readable, diffable,
    a third of the size of fully indented JSON."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(inner + json.dumps(v) for v in value) + "\n" + pad + "]"
    return json.dumps(value)


# ---- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a family (sd15, sd21, sdxl: the released layout, no weights needed) or a "
                                 "checkpoint file (only its tensors' shapes are read)")
    p.add_argument("--size", default=None, help="WxH in pixels (default: the model's native size)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--no-cfg", action="store_true", help="without classifier-free guidance (UNet batch = batch)")
    p.add_argument("--dtype", choices=PLAN_DTYPES, default="fp16")
    p.add_argument("--gpu", default="h100", help=f"the GPU to predict for: {', '.join(gpu_specs())} (default h100)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps of the whole-image figures")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the plan as JSON here")
    p.add_argument("--chart", type=Path, default=None, metavar="FILE.png",
                   help="a roofline chart of the step's launches (needs matplotlib: the 'plot' extra)")
    p.add_argument("--measured", type=Path, default=None, metavar="FILE",
                   help="measured launch times (JSON keyed by 'op|impl|shapes' of a row) to show beside the "
                        "predictions")
    p.add_argument("--text-heads", type=int, default=None, help="a checkpoint's text encoder heads, when neither "
                                                                   "its weights nor its YAML say")
    p.add_argument("--no-hoist", action="store_true", help="walk the loop without moving per-run and per-step-index "
                                                           "work out of the step (to see what the hoists save)")
    p.add_argument("--controlnet", type=int, default=0, metavar="N",
                   help="N random full-size ControlNets at the model's widths on every step (default 0); rows and "
                        "totals per part (controlnet, unet, sampler)")
    p.add_argument("--summary", action="store_true", help="totals only, no row per launch")


def command(args: argparse.Namespace) -> list[str]:
    """The command line that makes this plan (recorded in the JSON), rebuilt from the parsed flags."""
    out = ["tritonsd", "bench", "plan", str(args.model)]
    for flag, value, default in (("--size", args.size, None), ("--batch", args.batch, 1),
                                 ("--dtype", args.dtype, "fp16"), ("--gpu", args.gpu, "h100"),
                                 ("--steps", args.steps, DEFAULT_STEPS), ("--text-heads", args.text_heads, None),
                                 ("--controlnet", args.controlnet, 0)):
        if value != default:
            out += [flag, str(value)]
    if args.no_cfg:
        out.append("--no-cfg")
    if args.no_hoist:
        out.append("--no-hoist")
    for flag, value in (("--measured", args.measured), ("--json", args.json), ("--chart", args.chart)):
        if value is not None:
            out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    """The command; ``PlanError`` / ``PlanModelError`` for flags it cannot take (the CLI exits 2 on them)."""
    size = plan_model.parse_size(args.size) if args.size else None
    measured = load_measured(args.measured)
    plan = make_plan(args.model, size, args.batch, not args.no_cfg, args.dtype, args.gpu, args.steps,
                     args.text_heads, not args.no_hoist, args.controlnet)
    data = plan.to_json(measured, command(args))
    print_plan(data, rows=not args.summary)
    if args.json is not None:
        text = dumps(data) + "\n"
        atomic_write(args.json, lambda f: f.write(text.encode()))
        print(f"wrote {escape(str(args.json))}")
    if args.chart is not None:
        from tritonsd.bench import plan_chart  # lazy: matplotlib is an optional extra
        try:
            plan_chart.write_chart(data, args.chart)
        except plan_chart.ChartUnavailable as e:
            print(f"tritonsd bench plan: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {escape(str(args.chart))}")
    return 0


