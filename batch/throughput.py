"""Images per hour of ``tritonsd batch`` on one device, per group size (the issue's GPU figure: 512x512, 20
steps, DPM++ 2M Karras, CFG 7.5, on one GPU).

    python -m tritonsd.batch.throughput --random sd15 --out benchmarks/results/batch-throughput-h100.json
    python -m tritonsd.batch.throughput --checkpoint v1-5-pruned-emaonly.safetensors --group-sizes 1 4 8

A model with random weights (``--random``: a released layout from the fixtures' key manifests) costs what the
released one costs. Per group size: a warm-up unit (compile, tuning, CUDA-graph capture: the per-worker cost,
reported apart), then ``--images`` jobs through ``BatchWorker`` exactly as a batch run does, PNG encoding
included; the file writes are the driver's and not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from tritonsd.batch.jobs import read_jobs
from tritonsd.batch.run import make_units
from tritonsd.batch.worker import BatchWorker
from tritonsd.bench.random_weights import build_random_model
from tritonsd.devices import DTYPE_NAMES, resolve_dtype
from tritonsd.load_spec import LoadSpec
from tritonsd.pipeline import Pipeline, load_spec


def make_pipe(args):
    if args.checkpoint:
        return load_spec(LoadSpec(args.checkpoint, device=args.device, dtype=args.dtype))
    model = build_random_model(args.random, dtype=resolve_dtype(args.dtype or "fp16"), device=args.device or "cuda")
    return Pipeline(model, name=f"random-{args.random}", model_hash="0000000000")


def jobs_for(count: int, size: int, steps: int, offset: int) -> list:
    lines = [json.dumps({"id": f"j{offset + i}", "prompt": f"a photograph of object number {offset + i}",
                         "negative_prompt": "blurry", "seed": offset + i, "steps": steps, "width": size,
                         "height": size}) for i in range(count)]
    jobs, bad = read_jobs(lines)
    assert not bad, bad
    return jobs


def measure(pipe, group_size: int, images: int, size: int, steps: int) -> dict:
    worker = BatchWorker(pipe, group_size)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    warm = worker.run(jobs_for(group_size, size, steps, 10 ** 6))
    sync()
    warmup_s = time.perf_counter() - t0
    assert all(r.error is None for r in warm), [r.error for r in warm]
    units = make_units(jobs_for(images, size, steps, 0), group_size)
    t0 = time.perf_counter()
    done = 0
    for unit in units:
        done += sum(r.error is None for r in worker.run(unit))
    sync()
    seconds = time.perf_counter() - t0
    return {"group_size": group_size, "images": done, "seconds": round(seconds, 3),
            "images_per_hour": round(3600 * done / seconds, 1), "seconds_per_image": round(seconds / done, 4),
            "warmup_s": round(warmup_s, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonsd.batch.throughput", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint file (or demo:sd1)")
    src.add_argument("--random", help="a released layout with random weights: sd15, sd21, sdxl")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=32, help="timed images per group size (default 32)")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None)
    p.add_argument("--out", type=Path, default=None, metavar="JSON", help="write the results here")
    args = p.parse_args(argv)

    pipe = make_pipe(args)
    rows = [measure(pipe, n, args.images, args.size, args.steps) for n in args.group_sizes]
    gpu = torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else None
    record = {"what": "tritonsd batch throughput, one worker", "model": pipe.name, "device": str(pipe.device),
              "gpu": gpu, "dtype": str(pipe.dtype).replace("torch.", ""), "size": args.size, "steps": args.steps,
              "sampler": "dpmpp_2m (Karras)", "cfg_scale": 7.5, "torch": torch.__version__,
              "python": platform.python_version(), "command": " ".join(sys.argv), "rows": rows}
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
