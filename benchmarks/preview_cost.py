"""What live previews cost the denoising loop: time per step with previews off, every 10 steps and every step,
with the loop CUDA-graphed and without, on the Pipeline's own path, the previews made as the server makes them
(``serve/previews.Previews``: "Approx cheap", PNG-encoded on its own thread).

    python3 benchmarks/preview_cost.py --model sd15 --size 512 --steps 20 --repeat 5 --json FILE

``--model``: a key manifest of ``bench/random_weights.py`` (sd15, sd21-v, sdxl-base: full size, random weights) or
a checkpoint file (the fixtures, for a CPU smoke run). Each run is timed on the device with CUDA events around
``denoise`` (the first run of each row, which compiles and captures, not counted; on the CPU the wall clock).
Per row: ``graphs``, ``every`` (0: off), the median loop and step milliseconds, ``overhead`` against the same
``graphs`` with previews off, and how many previews the last run delivered (``previews``; a graphed loop's come
from the preview tap's reader thread: ``sampler/graph_preview.py``).
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
from tritonsd.pipeline import Pipeline
from tritonsd.serve.previews import Previews

PERIODS = (0, 10, 1)  # off, A1111's default, every step


def load_pipeline(args) -> Pipeline:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if Path(args.model).is_file():
        from tritonsd.model.load import load_model  # lazy: a file instead of a manifest

        return Pipeline(load_model(args.model, text_heads=args.text_heads, dtype=dtype, device=device))
    from tritonsd.bench.random_weights import build_random_model  # lazy: full-size models

    return Pipeline(build_random_model(args.model, dtype=dtype, device=device, text_heads=args.text_heads))


def step_callback(previews: Previews, family: str, counted: list):
    """A step callback as ``serve/jobs.py`` makes one: the eager loop offers its ``denoised``, a graphed loop's
    preview tap hands host copies to ``preview``; ``counted`` gets each step offered."""
    def step(d: dict) -> None:
        latent = d.get("denoised", d.get("x"))
        if latent is not None and previews.offer(d["i"], latent, family):
            counted.append(d["i"])
    step.preview_every = previews.every

    def preview(i: int, latent: torch.Tensor) -> None:
        if previews.offer(i, latent, family):
            counted.append(i)
    step.preview = preview
    return step


def time_loop(pipe: Pipeline, settings, every: int, repeat: int) -> tuple[list[float], int]:
    """Milliseconds of ``denoise`` per run (the first not counted) and the previews the last run delivered."""
    cond = pipe.encode(settings)
    previews = Previews(every=every)
    cuda = pipe.device.type == "cuda"
    times, counted = [], []
    for i in range(repeat + 1):
        latents = pipe.prepare_latents(settings)
        previews.reset()
        counted.clear()
        callback = step_callback(previews, pipe.config.family, counted)
        if cuda:
            torch.cuda.synchronize(pipe.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe.denoise(latents, cond, settings, callback)
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1000.0
        if i:
            times.append(ms)
    deadline = time.monotonic() + 5  # a graphed loop's previews come from a thread: let the last ones arrive
    want = len([s for s in range(settings.steps) if every > 0 and s % every == 0])
    while len(counted) < want and time.monotonic() < deadline:
        time.sleep(0.01)
    return times, len(counted)


def run(args) -> dict:
    pipe = load_pipeline(args)
    rows = []
    for graphs in (True, False):
        settings = pipe.settings(prompt="a house by a lake", seed=1, steps=args.steps, width=args.size,
                                 height=args.size, sampler=args.sampler, batch_size=args.batch, use_graphs=graphs)
        off = None
        for every in PERIODS:
            times, delivered = time_loop(pipe, settings, every, args.repeat)
            ms = statistics.median(times)
            row = {"graphs": graphs and pipe.device.type == "cuda", "every": every, "loop_ms": ms,
                   "step_ms": ms / args.steps, "runs": len(times), "previews": delivered}
            if every == 0:
                off = ms
            else:
                row["overhead"] = (ms - off) / off
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"model": str(args.model), "size": args.size, "batch": args.batch, "steps": args.steps,
            "sampler": args.sampler, "device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "timing": "cuda events" if pipe.device.type == "cuda" else "wall clock", "rows": rows,
            "captures": pipe._runner.captures if pipe._runner is not None else 0,
            "environment": environment.record(sys.argv)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="a key manifest (sd15, sd21-v, sdxl-base) or a checkpoint file")
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
