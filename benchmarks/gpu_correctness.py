"""Stage 1 of the GPU run: every Triton kernel at the SD shapes against torch, on fresh random inputs.

For each case of the kernel benchmarks (``bench_<op>.cases()``: the real SD 1.5 / SD 2.1 / SDXL / text shapes), and
each fused GEMM of ``gpu_fusions.cases()`` (``kernels/linear.py``'s prologue and epilogues at the transformer shapes), the
inputs are drawn from a seed picked for this run (recorded), the reference is computed from float32 copies,
the allocator's free memory is filled with NaN just before the kernel runs (so an output element the kernel
never writes shows up as NaN instead of a stale value) and the result must be finite with
``max|out - ref| / max|ref|`` within the dtype's bound (1e-2 for fp16 / bf16, 1e-4 for fp32).
``python3 benchmarks/gpu_correctness.py --dtype fp16 --models sd15-512,text --json FILE``; exits 1 on any
failure.
"""

from __future__ import annotations

import argparse
import importlib
import secrets
import sys
from pathlib import Path

import torch

from tritonsd.testing.reference import strict_float32
from tritonsd.bench import environment, harness

OPS = ("attention", "group_norm", "layer_norm", "geglu", "conv")
POISON_BYTES = 2 * 2 ** 30


def poison_free_memory(nbytes: int = POISON_BYTES) -> None:
    """Return every cached block to the driver, then cache one NaN-filled block of ``nbytes``: the kernel's
    outputs, allocated next by the caching allocator, are carved out of it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    block = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    block.fill_(float("nan"))
    del block  # back to the allocator's cache, still NaN


def check_case(module, case, dtype: torch.dtype) -> dict:
    row = {"op": case.op, "model": case.model, "case": case.name, "shape": case.shape,
           "dtype": str(dtype).removeprefix("torch.")}
    try:
        args = case.make(dtype)
        with strict_float32(), torch.no_grad():
            expected = module.REFERENCE(*harness.to_float32(args))
        poison_free_memory()
        with torch.no_grad():
            got = module.TRITON(*args)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - one failing case (OutOfResources, a shape refused) is a row, not the end
        row["error"] = harness.error_text(e)
        return row
    harness.judge(row, got, expected, dtype)
    return row


def run(dtype: torch.dtype, models: list[str] | None, seed: int) -> list[dict]:
    harness.SEED = seed
    rows = []
    for op in OPS:
        module = importlib.import_module(f"tritonsd.bench.bench_{op}")
        for case in module.cases():
            if models and case.model not in models:
                continue
            row = check_case(module, case, dtype)
            rows.append(row)
            status = row.get("error") or f"ok  err {row['rel_error']:.1e}"
            print(f"{row['op']:<10} {row['model']:<9} {row['case']:<34} {status}", flush=True)
    for case in _fusions().cases():  # the fused GEMMs (kernels/linear.py): prologue / epilogue per case
        if models and case.model not in models:
            continue
        row = {"op": "linear", **_fusions().run_case(case, dtype, time_it=False)}
        rows.append(row)
        status = row.get("error") or f"ok  err {row['rel_error']:.1e}"
        print(f"{row['op']:<10} {row['model']:<9} {row['case']:<34} {status}  ({row['kind']})", flush=True)
    return rows


def _fusions():
    """benchmarks/gpu_fusions.py, this script's sibling (imported as a neighbour when run as a script)."""
    try:
        import gpu_fusions  # lazy: a sibling script, not a package
    except ImportError:
        from benchmarks import gpu_fusions  # lazy: likewise, from the checkout's root
    return gpu_fusions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/gpu_correctness.py", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(harness.DTYPES), default="fp16")
    p.add_argument("--models", default=None, help="comma-separated case models (sd15-512, sd21-768, text)")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: a fresh one, recorded)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        harness.require_cuda()
    except harness.BenchError as e:
        print(f"gpu_correctness: error: {e}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    rows = run(harness.DTYPES[args.dtype], models, seed)
    failed = [r for r in rows if "error" in r]
    print(f"{len(rows) - len(failed)}/{len(rows)} cases within bound (seed {seed})")
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**environment.record(git_commit_override=args.git_commit),
                                         "bench": "gpu-correctness", "dtype": args.dtype, "seed": seed,
                                         "bound": harness.TOLERANCE[harness.DTYPES[args.dtype]],
                                         "failed": len(failed), "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
