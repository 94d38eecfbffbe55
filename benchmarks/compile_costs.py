"""Measure, without a GPU, what the GPU run's planner needs: sm_90 compile seconds per task and the speed-up of
2 compile workers over 1 (``python benchmarks/compile_costs.py speedup|sample``; results as JSON on stdout).

On a shared machine the wall clock measures the neighbours as much as us, so CPU seconds (this process and its
workers, ``getrusage``) are recorded beside it: the CPU-time speed-up ``2 * cpu(1 worker) / cpu(2 workers)``
is what 2 idle cores would give (it charges the workers' start-up and the parent's share), and the planner
uses it. Each measurement compiles into a fresh, empty Triton cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_warmup(argv: list[str], jobs: int) -> dict:
    """``tritonsd warmup ARGV --jobs JOBS`` in a fresh process and a fresh cache: wall and CPU seconds."""
    with tempfile.TemporaryDirectory(prefix="tritonsd-cc-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        env.pop("TRITON_INTERPRET", None)
        cpu0, t0 = _cpu_children(), time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "warmup", *argv, "--jobs", str(jobs)],
                             env=env, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    summary = [line for line in out.stdout.splitlines() if line.startswith("sm_")]
    return {"jobs": jobs, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rc": out.returncode,
            "summary": summary[0] if summary else out.stderr.strip().splitlines()[-1:]}


def speedup(argv: list[str]) -> dict:
    one, two = timed_warmup(argv, 1), timed_warmup(argv, 2)
    return {"warmup_args": argv, "one_worker": one, "two_workers": two,
            "speedup_wall": round(one["wall_s"] / two["wall_s"], 3),
            "speedup_cpu": round(min(2.0, 2 * one["cpu_s"] / two["cpu_s"]), 3),
            "load_average": os.getloadavg(), "cpus": os.cpu_count()}


def sample(checkpoint: str, size: int, dtype: str, kernel: str, n: int) -> dict:
    """Compile ``n`` tasks of one kernel (evenly over its variants and configs) in this process, one by one:
    seconds of each, wall and CPU (this process's and its children's: ptxas runs as a child)."""
    from tritonsd.compile import precompile, shapes, variants
    from tritonsd.devices import resolve_dtype
    from tritonsd.formats.checkpoint import read_checkpoint_shapes
    from tritonsd.model.config import detect_config

    config = (shapes.released(checkpoint) if checkpoint in shapes.RELEASED else
              detect_config(read_checkpoint_shapes(checkpoint), text_heads=2))
    dt = resolve_dtype(dtype)
    launches = [la for la in variants.unique(variants.model_launches(config, [(size, size)], (2,), dt))
                if la.module.endswith("." + kernel)]
    tasks = precompile.tasks_for(launches, ["sm_90"])
    step = max(1, len(tasks) // n)
    chosen = tasks[::step][:n]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tritonsd-cc-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        for task in chosen:
            c0, t0 = time.process_time() + _cpu_children(), time.perf_counter()
            result = precompile.run_task(task)
            rows.append({"config": result.config, "wall_s": round(time.perf_counter() - t0, 2),
                         "cpu_s": round(time.process_time() + _cpu_children() - c0, 2), "error": result.error})
    cpu = [r["cpu_s"] for r in rows if not r["error"]]
    return {"kernel": kernel, "dtype": dtype, "size": size, "tasks_total": len(tasks), "rows": rows,
            "median_cpu_s": statistics.median(cpu) if cpu else None, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/compile_costs.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speedup", help="1 vs 2 workers on `tritonsd warmup ARGS` (after --)")
    s.add_argument("warmup_args", nargs=argparse.REMAINDER)
    m = sub.add_parser("sample", help="per-task compile seconds of one kernel at a checkpoint's shapes")
    m.add_argument("checkpoint", help="a checkpoint, or sd15 / sd21 / sdxl (released shapes)")
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--dtype", default="fp32")
    m.add_argument("--kernel", default="conv")
    m.add_argument("-n", type=int, default=6)
    args = p.parse_args(argv)
    if args.command == "speedup":
        print(json.dumps(speedup([a for a in args.warmup_args if a != "--"]), indent=1))
    else:
        print(json.dumps(sample(args.checkpoint, args.size, args.dtype, args.kernel, args.n), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
