"""``tritonsd bench``: benchmarks, one sub-subcommand each (``kernels`` now; others register in BENCHES).

``tritonsd bench kernels [--op NAME] [--model NAME] [--dtype fp16] [--json PATH] [--git-commit SHA]`` runs
``tritonsd.bench.bench_<op>`` and writes every row, with the device, its driver and clocks, the torch/triton
versions, the git commit and this command, to ``benchmarks/results/`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from tritonsd.devices import DTYPE_NAMES
from tritonsd.tools.cli import UsageError
from tritonsd.bench import e2e as bench_e2e
from tritonsd.bench import plan as bench_plan

KERNEL_OPS = ("attention", "group_norm", "layer_norm", "geglu", "conv")


class BenchSetupError(RuntimeError):
    """The benchmark scripts cannot be found or cannot run here."""


def _load(name: str) -> ModuleType:
    """A module of the installed ``tritonsd.bench`` package (``harness``, ``bench_conv``, ...)."""
    return importlib.import_module(f"tritonsd.bench.{name}")


def add_kernels_parser(sub) -> None:
    p = sub.add_parser("kernels", help="time the Triton kernels against torch eager, SDPA backends and cuDNN",
                       description="Time each Triton kernel and its peers at the real SD 1.5 (512x512) and SD 2.1 "
                                   "(768x768) shapes, batch 2, after checking each against the float32 reference.")
    p.add_argument("--op", choices=KERNEL_OPS, action="append", help="only this op (repeatable; default: all)")
    p.add_argument("--model", default=None, help="only cases of this model: sd15-512, sd21-768, text")
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="fp16")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the results here (default: benchmarks/results/kernels-DEVICE-DTYPE-TIME.json)")
    p.add_argument("--git-commit", default=None, help="record this commit (when the tree has no .git; else "
                                                      "$TRITONSD_GIT_COMMIT, else git)")


def run_kernels(args: argparse.Namespace) -> int:
    harness = _load("harness")
    try:
        harness.require_cuda()
    except harness.BenchError as e:
        raise BenchSetupError(str(e)) from None
    rows = []
    for op in args.op or KERNEL_OPS:
        module = _load(f"bench_{op}")
        op_rows = module.bench(harness.DTYPES[args.dtype], args.model)
        harness.print_rows(op_rows)
        rows += op_rows
    path = harness.write_json(rows, args.json, ["tritonsd", *sys.argv[1:]], args.dtype, "kernels", args.git_commit)
    failed = [r for r in rows if r["impl"] == "triton" and "error" in r]
    print(f"wrote {path}")
    if failed:
        print(f"{len(failed)} Triton case(s) failed: " + ", ".join(f"{r['op']}/{r['case']}" for r in failed),
              file=sys.stderr)
        return 1
    return 0


# ---- e2e: whole-image speed vs diffusers, in tritonsd.bench.e2e (its arguments and run live there)


def add_e2e_parser(sub) -> None:
    p = sub.add_parser("e2e", help="whole-image speed of full-size random-weight models vs diffusers",
                       description=bench_e2e.__doc__.splitlines()[0])
    bench_e2e.add_arguments(p)


def run_e2e(args: argparse.Namespace) -> int:
    return bench_e2e.run(args)


# ---- plan: a roofline plan of every launch of a step, no GPU needed (tritonsd.bench.plan)


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="predicted roofline of every launch of a step and an image (no GPU needed)",
                       description=bench_plan.__doc__.splitlines()[0])
    bench_plan.add_arguments(p)


def run_plan(args: argparse.Namespace) -> int:
    try:
        return bench_plan.run(args)
    except (bench_plan.PlanError, bench_plan.plan_model.PlanModelError) as e:
        raise UsageError(str(e)) from None


# name -> (adds its parser to the bench sub-subparsers, runs it)
BENCHES = {"kernels": (add_kernels_parser, run_kernels), "e2e": (add_e2e_parser, run_e2e),
           "plan": (add_plan_parser, run_plan)}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (kernels, e2e, plan)",
                              description="Benchmarks; see each subcommand.")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for add, _ in BENCHES.values():
        add(sub)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _, run_bench = BENCHES[args.bench_command]
    return run_bench(args)
