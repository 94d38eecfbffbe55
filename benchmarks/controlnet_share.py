"""The ControlNet's share of a sampler step: the denoising loop timed without a unit, with one and with two, on the
Pipeline's own path (CUDA graphs on CUDA: the control image changes between the timed runs and the loop is
captured once, which the result records).

    python3 benchmarks/controlnet_share.py --model sd15 --size 512 --steps 20 --repeat 5 --check --json FILE

``--model``: a key manifest of ``bench/random_weights.py`` (sd15, sd21-v, sdxl-base: full size, random weights;
the ControlNet then is random too, at the UNet's widths) or a checkpoint file with ``--controlnet FILE`` (the
fixtures, for a CPU smoke run). Per row: the loop's median milliseconds, per step, and the share of a controlled
step the ControlNet takes (``(controlled - plain) / controlled``).

``--check`` (stage 9 of ``benchmarks/gpu_plan.py``): another control image, weight, guidance start and end replay
the captured loop (no new capture), and each replay equals a fresh eager run of the same settings (relative error
within ``GRAPH_BOUND``, as ``tests/test_controlnet_graph.py``); the exit status is 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tritonsd.bench import environment
from tritonsd.model.controlnet import ControlNet, ControlNetConfig
from tritonsd.pipeline import Pipeline
from tritonsd.sampler.control import ControlUnit
from tritonsd.testing.reference import relative_error

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # the released ControlNets' input_hint_block
GRAPH_BOUND = 1e-2  # float16 graph replay vs the eager float16 loop (tests/test_controlnet_graph.py's bound)
CHECK_STEPS = 8  # the check's loops: the replays and the eager runs they are compared with


def random_controlnet(unet, seed: int = 0) -> ControlNet:
    """A ControlNet at the UNet's widths with random weights (``bench.random_weights.fill_random_``'s rule)."""
    from tritonsd.bench.random_weights import fill_random_  # lazy: only for the full-size models

    cfg = unet.cfg
    param = next(unet.parameters())
    with torch.device("meta"):
        net = ControlNet(ControlNetConfig(unet=cfg, hint_widths=(3, *HINT_WIDTHS, cfg.model_channels)))
    net = net.to(dtype=param.dtype).to_empty(device=param.device)
    return fill_random_(net, seed).eval().requires_grad_(False)


def load_pipeline(args) -> tuple[Pipeline, object]:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if Path(args.model).is_file():
        from tritonsd.model.load import load_model  # lazy: a file instead of a manifest

        model = load_model(args.model, text_heads=args.text_heads, dtype=dtype, device=device)
        pipe = Pipeline(model)
        if args.controlnet is None:
            raise SystemExit("controlnet_share: error: --model FILE needs --controlnet FILE")
        return pipe, pipe.controlnet(args.controlnet)
    from tritonsd.bench.random_weights import build_random_model  # lazy: full-size models

    pipe = Pipeline(build_random_model(args.model, dtype=dtype, device=device, text_heads=args.text_heads))
    net = pipe.controlnet(args.controlnet) if args.controlnet else random_controlnet(pipe.model.model.diffusion_model)
    return pipe, net


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(pipe: Pipeline, settings, repeat: int, images: list[torch.Tensor], units) -> list[float]:
    """Milliseconds of ``denoise`` per run (the first, which compiles and captures, not counted); each run takes
    the next control image."""
    cond = pipe.encode(settings)
    times = []
    for i in range(repeat + 1):
        image = images[i % len(images)]
        s = settings if not units else pipe.settings(
            settings, controls=tuple(ControlUnit(u, image=image, weight=0.8) for u in units))
        latents = pipe.prepare_latents(s)
        _sync(pipe.device)
        start = time.perf_counter()
        with torch.no_grad():
            pipe.denoise(latents, cond, s)
        _sync(pipe.device)
        if i:
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def recapture_check(pipe: Pipeline, net, settings, size: int) -> dict:
    """One unit changed between runs (image, weight, guidance start, guidance end): the runner's captures before
    and after each run, and each run's relative error against a fresh eager run (``use_graphs=False``)."""
    g = torch.Generator().manual_seed(3)
    first, second = (torch.rand(1, 3, size, size, generator=g) for _ in range(2))
    variants = (dict(image=first, weight=1.0), dict(image=second, weight=0.4, guidance_start=0.3),
                dict(image=first, weight=0.8, guidance_end=0.5), dict(image=second, weight=0.6, guidance_start=0.2,
                                                                      guidance_end=0.7))
    base = pipe.settings(settings, steps=CHECK_STEPS)
    cond = pipe.encode(base)
    runs = []
    for fields in variants:
        s = pipe.settings(base, controls=(ControlUnit(net, **fields),))
        captures = pipe._runner.captures if pipe._runner is not None else 0
        with torch.no_grad():
            replayed = pipe.denoise(pipe.prepare_latents(s), cond, s)
            plain = pipe.settings(s, use_graphs=False)
            eager = pipe.denoise(pipe.prepare_latents(plain), cond, plain)
        runs.append({"changed": sorted(fields),
                     "captures_before": captures,
                     "captures_after": pipe._runner.captures if pipe._runner is not None else 0,
                     "relative_error": relative_error(replayed.float(), eager.float()),
                     "bit_equal": bool(torch.equal(replayed, eager))})
    recaptured = any(r["captures_after"] != r["captures_before"] for r in runs[1:])
    worst = max(r["relative_error"] for r in runs)
    return {"steps": CHECK_STEPS, "graphs": pipe._runner is not None, "runs": runs, "recaptured": recaptured,
            "worst_relative_error": worst, "bound": GRAPH_BOUND,
            "ok": not recaptured and worst <= GRAPH_BOUND}


def run(args) -> dict:
    pipe, net = load_pipeline(args)
    settings = pipe.settings(prompt="a house by a lake", seed=1, steps=args.steps, width=args.size,
                             height=args.size, sampler=args.sampler, batch_size=args.batch)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 3, args.size, args.size, generator=g) for _ in range(2)]
    rows = []
    # captured (CUDA graphs, where the device has them) and eager: the share in both
    for graphs in ((True, False) if pipe.device.type == "cuda" else (False,)):
        plain = None
        for count in (0, 1, 2):
            s = pipe.settings(settings, use_graphs=graphs)
            before = pipe._runner.captures if pipe._runner is not None else 0
            times = time_loop(pipe, s, args.repeat, images, [net] * count)
            ms = statistics.median(times)
            captures = (pipe._runner.captures if pipe._runner is not None else 0) - before
            row = {"units": count, "graphs": graphs, "loop_ms": ms, "step_ms": ms / args.steps, "runs": len(times),
                   "captures": captures}
            if count == 0:
                plain = ms
            else:
                row["controlnet_share"] = (ms - plain) / ms
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": str(args.model), "size": args.size, "batch": args.batch, "steps": args.steps,
              "sampler": args.sampler, "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
              "controlnet": str(args.controlnet) if args.controlnet else "random", "rows": rows,
              "residuals": net.config.residuals, "environment": environment.record(sys.argv, args.git_commit)}
    if args.check:
        result["recapture_check"] = check = recapture_check(pipe, net, settings, args.size)
        print(json.dumps({k: v for k, v in check.items() if k != "runs"}), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="a key manifest (sd15, sd21-v, sdxl-base) or a checkpoint file")
    p.add_argument("--controlnet", default=None, help="a ControlNet file (default: random at the UNet's widths)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--text-heads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check", action="store_true",
                   help="also: changing the unit's image / weight / start / end does not re-capture, and each "
                        "replay equals a fresh eager run")
    p.add_argument("--git-commit", default=None, help="the commit the results record (default: git's)")
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    args = p.parse_args(argv)
    result = run(args)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    check = result.get("recapture_check")
    if check is not None and not check["ok"]:
        print(f"controlnet_share: the check failed: recaptured {check['recaptured']}, worst relative error "
              f"{check['worst_relative_error']:.3g} (bound {GRAPH_BOUND})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
