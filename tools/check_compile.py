"""``tritonsd check-compile --arch sm_90[,sm_80,sm_86,sm_89] [--json FILE]``: compile every shipped kernel config
at the SD 1.5 / SD 2.1 / SDXL shapes for those GPUs, without a GPU, and print registers, spills, shared memory
and whether wgmma is used. Exits 1 on a compile failure, a spill in fp16/bf16, or an sm_90 matmul without wgmma.
The work lives in ``tritonsd.compile.check_compile``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tritonsd.devices import DTYPE_NAMES
from tritonsd.tools.cli import UsageError, plain_help
from tritonsd.compile import aot, check_compile, shapes
from tritonsd.compile.warmup import WarmupError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("check-compile", help="compile every kernel variant for GPU targets, without a GPU",
                              description=plain_help(__doc__))
    p.add_argument("--arch", default="sm_90", help="comma-separated targets (default sm_90)")
    p.add_argument("--models", default="sd15,sd21,sdxl", help="released shapes to use (default all three)")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16, fp32 (default fp16,bf16)")
    p.add_argument("--kernels", default=None, help="only these kernels: attention, conv, group_norm, layer_norm, "
                                                   "geglu (default all)")
    p.add_argument("--jobs", type=int, default=None, help="compile workers (default: the CPUs)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every row here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    archs = _csv(args.arch)
    try:
        archs = [f"sm_{aot.parse_arch(a)}" for a in archs]
    except aot.AotError as e:
        raise UsageError(str(e)) from None
    models, dtypes = _csv(args.models), _csv(args.dtypes)
    for m in models:
        if m not in shapes.RELEASED:
            raise UsageError(f"unknown model {m!r} (expected {', '.join(shapes.RELEASED)})")
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise UsageError(f"unknown dtype {d!r} (expected {', '.join(DTYPE_NAMES)})")
    start = time.perf_counter()
    try:
        launches = check_compile.representative_launches(models, dtypes, _csv(args.kernels) if args.kernels else None)
    except WarmupError as e:
        raise UsageError(str(e)) from None
    print(f"{len(launches)} variants x configs x {len(archs)} target(s)", file=sys.stderr)
    rows, report = check_compile.check(archs, launches, jobs=args.jobs)
    print(check_compile.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows)} compiles, {len(failed)} failed, {report.wall_seconds:.0f} s wall on {report.jobs} "
          f"worker(s), {report.compile_seconds:.0f} s of compiles", file=sys.stderr)
    if args.json is not None:
        import torch
        import triton

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "tritonsd " + " ".join(sys.argv[1:]), "triton": triton.__version__, "torch": torch.__version__,
            "archs": archs, "models": models, "dtypes": dtypes, "jobs": report.jobs,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "compile_seconds": round(report.compile_seconds, 1), "failed": len(failed),
            "rows": [asdict(r) for r in rows]}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if failed else 0
