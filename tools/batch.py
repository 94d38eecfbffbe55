"""``tritonsd batch JOBS.jsonl --out DIR``: one image per job line, here or on a Ray cluster (``--ray``).

A thin shell over ``tritonsd.batch``: flags -> its arguments; a bad job line is reported (stderr and
``DIR/results.jsonl``) and the others run. Exit codes: 0 every line done, 1 some line failed or the run could not
go on, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonsd.devices import DTYPE_NAMES, device_type
from tritonsd.tools.cli import UsageError
from tritonsd.tools.generate import check_cpu_dtype, load_spec_of
from tritonsd.batch import BatchError, run_batch as batch
from tritonsd.batch.jobs import escape
from tritonsd.tools.progress import progress_enabled


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch", help="many prompts to many images (JSONL jobs), on one GPU or across a Ray cluster",
        description="Generate one image per line of JOBS.jsonl (AUTOMATIC1111 txt2img field names: prompt, "
                    "negative_prompt, seed, steps, sampler_name, scheduler, cfg_scale, width, height; plus id, "
                    "required, and loras). Writes DIR/<id>.png with the infotext and DIR/results.jsonl; ids "
                    "already done are skipped, so a rerun resumes.")
    p.add_argument("jobs", type=Path, metavar="JOBS.jsonl", help="one JSON object per line")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", type=str, required=True, metavar="PATH",
                       help=".safetensors or .ckpt file, or demo:sd1")
    model.add_argument("--config", type=Path, default=None, metavar="YAML", help="the original inference YAML")
    model.add_argument("--vae", type=Path, default=None, metavar="FILE", help="an external VAE")
    model.add_argument("--text-heads", type=int, default=None, metavar="N",
                       help="attention heads of the text towers (not in the weights)")
    model.add_argument("--parameterization", choices=("eps", "v"), default=None)
    model.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                       help="where <lora:name:w> in prompts and bare names in \"loras\" are looked up")
    model.add_argument("--embeddings-dir", type=Path, default=None, metavar="DIR",
                       help="textual-inversion embeddings, used where a prompt names their file")
    model.add_argument("--upscaler-dir", type=Path, default=None, metavar="DIR",
                       help="upscaler model files for hr_upscaler (ESRGAN, ...; needs spandrel)")
    model.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                       help="where a job's hr_checkpoint_name is looked up (default: --checkpoint's folder)")
    model.add_argument("--controlnet-dir", type=Path, default=None, metavar="DIR",
                       help="ControlNet files that the lines' \"controlnet\" units name without a path")
    run_ = p.add_argument_group("runtime")
    run_.add_argument("--group-size", type=int, default=1, metavar="N",
                      help="up to N jobs of one size and sampler settings share a UNet batch (default: 1)")
    run_.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|local|ADDRESS",
                      help="run on Ray Data: auto (the cluster this machine belongs to; the default when the "
                           "flag has no value), local (start one here) or a cluster address")
    run_.add_argument("--workers", type=int, default=None, metavar="N",
                      help="Ray actors (default: the cluster's GPU count, 1 without GPUs)")
    run_.add_argument("--device", default=None, metavar="DEVICE",
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    run_.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None)
    run_.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")
    run_.add_argument("--quiet", action="store_true", help="no progress bar, no per-line error messages")
    p.set_defaults(run=run)


def check_usage(args: argparse.Namespace) -> None:
    if args.group_size < 1:
        raise UsageError(f"--group-size must be at least 1, got {args.group_size}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.workers is not None and args.ray is None:
        raise UsageError("--workers applies to --ray runs")
    if args.text_heads is not None and args.text_heads < 1:
        raise UsageError(f"--text-heads must be at least 1, got {args.text_heads}")
    check_cpu_dtype(device_type(args.device), args.dtype)


def run(args: argparse.Namespace) -> int:
    check_usage(args)
    if not args.jobs.is_file():
        raise BatchError(f"jobs file not found: {args.jobs}")
    spec = load_spec_of(args)
    if args.ray in (None, "local"):  # a remote cluster's workers may see other files and devices: they check
        spec = spec.check()

    def report_line(result) -> None:
        if result.error is not None and not args.quiet:
            what = f" ({escape(result.id, 60)})" if result.id else ""
            print(f"tritonsd batch: line {result.line}{what}: {result.error}", file=sys.stderr, flush=True)

    report = batch(args.jobs, args.out, spec=spec, group_size=args.group_size, ray=args.ray,
                   workers=args.workers, progress=progress_enabled(args.quiet), on_result=report_line,
                   controlnet_dir=args.controlnet_dir)
    print(f"{len(report.written)} written, {len(report.skipped)} already done, {len(report.errors)} failed "
          f"in {report.seconds:.1f} s; see {report.results}", file=sys.stderr)
    return 1 if report.errors else 0
