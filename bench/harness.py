"""What the kernel benchmarks share: timing, the correctness gate, throughput, the environment record.

Each ``bench_<op>.py`` lists its cases (the real shapes of SD 1.5 at 512x512, SD 2.1 at 768x768 and SDXL at
1024x1024 from ``compile/shapes.py``, batch 2 for classifier-free guidance, and the text towers) and its
implementations (ours and the peers); :func:`run_case` checks every implementation against the float32
reference before timing it with ``triton.testing.do_bench`` (medians after warm-up). Run a script as a module
(``python -m tritonsd.bench.bench_attention``) or all of them through ``tritonsd bench kernels``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from tritonsd.devices import DTYPE_NAMES
from tritonsd.testing.reference import relative_error, strict_float32
from tritonsd.bench import environment

DTYPES = DTYPE_NAMES  # the benchmarks' --dtype names (devices' table)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}


SEED = 0  # the cases' inputs are drawn from this; the GPU run's correctness stage draws a fresh one per run


def case_generator(device: str = "cuda") -> torch.Generator:
    """The generator a case's ``make`` draws its inputs from (seeded with :data:`SEED`)."""
    return torch.Generator(device=device).manual_seed(SEED)


class BenchError(RuntimeError):
    """The benchmarks cannot run here (no CUDA device, the interpreter switched on, ...)."""


@dataclass
class Case:
    """One shape of one op. ``make(dtype)`` returns the inputs; ``work`` counts FLOPs (or bytes, see ``unit``)."""

    op: str
    model: str  # "sd15-512", "sd21-768", "text", ...
    name: str
    shape: dict
    make: Callable[[torch.dtype], tuple]
    work: float
    unit: str  # "TFLOP/s" or "GB/s"
    extra: dict = field(default_factory=dict)


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise BenchError("no CUDA device: the kernel benchmarks need a GPU (the Triton kernels are tested on the "
                         "CPU with TRITON_INTERPRET=1, but timings there mean nothing)")
    import os
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise BenchError("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels")
    return torch.device("cuda")


def to_float32(args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def error_text(e: Exception) -> str:
    """An exception as one row field: its type and its message's first line."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def judge(row: dict, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Record in ``row`` whether ``got`` is finite, its relative error against ``expected`` and, where it fails
    (non-finite, or over ``TOLERANCE[dtype]``), the error; True when it passed."""
    row["finite"] = bool(torch.isfinite(got).all())
    row["rel_error"] = relative_error(got, expected)
    bound = TOLERANCE[dtype]
    if not row["finite"]:
        row["error"] = "non-finite output (an element left unwritten, or an overflow)"
    elif not row["rel_error"] <= bound:
        row["error"] = f"relative error {row['rel_error']:.3g} > {bound:g}"
    return "error" not in row


def run_cases(cases: Iterable[Case], impls: dict[str, Callable], reference: Callable, dtype: torch.dtype,
              model: str | None = None) -> list[dict]:
    """``run_case`` over the cases of ``model`` (all when None)."""
    rows = []
    for case in cases:
        if model is None or case.model == model:
            rows += run_case(case, impls, reference, dtype)
    return rows


def run_case(case: Case, impls: dict[str, Callable], reference: Callable, dtype: torch.dtype,
             warmup_ms: int = 25, rep_ms: int = 100) -> list[dict]:
    """Rows (one per implementation): correctness against the float32 reference, then do_bench quantiles."""
    import triton.testing

    args = case.make(dtype)
    with strict_float32(), torch.no_grad():
        expected = reference(*to_float32(args))
    rows = []
    for impl_name, fn in impls.items():
        row = {"op": case.op, "model": case.model, "case": case.name, "shape": case.shape, "impl": impl_name,
               "dtype": str(dtype).removeprefix("torch."), **case.extra}
        try:
            with torch.no_grad():
                got = fn(*args)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a peer that does not support the shape is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            continue
        err = relative_error(got, expected)
        row["rel_error"] = err
        if not err <= TOLERANCE[dtype]:
            row["error"] = f"wrong result: relative error {err:.3g} > {TOLERANCE[dtype]:g}; not timed"
            rows.append(row)
            continue
        with torch.no_grad():
            med, p20, p80 = triton.testing.do_bench(lambda: fn(*args), warmup=warmup_ms, rep=rep_ms,
                                                    quantiles=[0.5, 0.2, 0.8])
        row.update(median_ms=med, p20_ms=p20, p80_ms=p80,
                   throughput=case.work / (med * 1e-3) / 1e12 if case.unit == "TFLOP/s"
                   else case.work / (med * 1e-3) / 1e9,
                   unit=case.unit)
        rows.append(row)
    del args, expected
    torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<10} {r['model']:<9} {r['case']:<34} {r['impl']:<16} -- {r['error']}")
        else:
            print(f"{r['op']:<10} {r['model']:<9} {r['case']:<34} {r['impl']:<16} {r['median_ms']:9.4f} ms "
                  f"{r['throughput']:8.1f} {r['unit']}  err {r['rel_error']:.1e}", flush=True)


def write_json(rows: list[dict], path: Path | None, command: list[str], dtype: str, name: str,
               git_commit: str | None = None) -> Path:
    if path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        device = (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu").replace(" ", "_")
        path = environment.results_dir() / f"{name}-{device}-{dtype}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**environment.record(command, git_commit), "dtype": dtype, "rows": rows}, indent=1))
    return path


def script_main(op: str, bench: Callable[[torch.dtype, str | None], list[dict]]) -> int:
    """``python -m tritonsd.bench.bench_<op> [--dtype fp16] [--model sd15-512] [--json PATH] [--git-commit SHA]``."""
    p = argparse.ArgumentParser(description=f"benchmark the {op} kernel against its peers")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--model", default=None, help="only cases of this model (sd15-512, sd21-768, ...)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/)")
    p.add_argument("--git-commit", default=None, help="record this commit (when the tree has no .git)")
    args = p.parse_args()
    try:
        require_cuda()
        rows = bench(DTYPES[args.dtype], args.model)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_rows(rows)
    print(f"wrote {write_json(rows, args.json, sys.argv, args.dtype, op, args.git_commit)}")
    return 0
