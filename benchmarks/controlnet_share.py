"""The ControlNet's share of a sampler step: the denoising loop timed without a unit, with one and with two, on the
Pipeline's own path (CUDA graphs on CUDA: the control image changes between the timed runs and the loop is
captured once, which the result records).

    python3 benchmarks/controlnet_share.py --model sd15 --size 512 --steps 20 --repeat 5 --json FILE

``--model``: a key manifest of ``bench/random_weights.py`` (sd15, sd21-v, sdxl-base: full size, random weights;
the ControlNet then is random too, at the UNet's widths) or a checkpoint file with ``--controlnet FILE`` (the
fixtures, for a CPU smoke run). Per row: the loop's median milliseconds, per step, and the share of a controlled
step the ControlNet takes (``(controlled - plain) / controlled``).
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

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # the released ControlNets' input_hint_block


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


def run(args) -> dict:
    pipe, net = load_pipeline(args)
    settings = pipe.settings(prompt="a house by a lake", seed=1, steps=args.steps, width=args.size,
                             height=args.size, sampler=args.sampler, batch_size=args.batch)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 3, args.size, args.size, generator=g) for _ in range(2)]
    rows = []
    plain = None
    for count in (0, 1, 2):
        before = pipe._runner.captures if pipe._runner is not None else 0
        times = time_loop(pipe, settings, args.repeat, images, [net] * count)
        ms = statistics.median(times)
        captures = (pipe._runner.captures if pipe._runner is not None else 0) - before
        row = {"units": count, "loop_ms": ms, "step_ms": ms / args.steps, "runs": len(times),
               "captures": captures, "graphs": pipe._runner is not None}
        if count == 0:
            plain = ms
        else:
            row["controlnet_share"] = (ms - plain) / ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": str(args.model), "size": args.size, "batch": args.batch, "steps": args.steps,
            "sampler": args.sampler, "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "controlnet": str(args.controlnet) if args.controlnet else "random", "rows": rows,
            "residuals": net.config.residuals, "environment": environment.record(sys.argv)}


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
    p.add_argument("--json", type=Path, default=None, dest="json_out")
    args = p.parse_args(argv)
    result = run(args)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
