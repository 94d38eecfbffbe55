"""``tritonsd warmup (CHECKPOINT | --model sd15|sd21|sdxl) [--size 512x512 ...] [--batch 1,2] [--arch sm_90]``:
compile every kernel variant those shapes need, in parallel, into Triton's on-disk cache (and, on a GPU with a
checkpoint, tune each autotune key once into the persistent tuning cache), so that the first image does not
wait for it. The work lives in ``tritonsd.compile.warmup``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tritonsd.devices import DTYPE_NAMES
from tritonsd.tools.cli import UsageError, plain_help
from tritonsd.compile import aot, shapes
from tritonsd.formats.checkpoint import read_checkpoint_shapes
from tritonsd.model.config import detect_config
from tritonsd.compile.warmup import WarmupError, warmup



def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not m:
        raise UsageError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    return h, w


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("warmup", help="pre-compile (and on a GPU, tune) the kernels for given shapes",
                              description=plain_help(__doc__))
    p.add_argument("checkpoint", nargs="?", type=Path, help="a checkpoint (.safetensors / .ckpt); only its header "
                                                            "is read unless tuning on a GPU")
    p.add_argument("--model", choices=("sd15", "sd21", "sdxl"), help="a released model's shapes instead")
    p.add_argument("--size", action="append", default=None, help="WIDTHxHEIGHT, repeatable (default: native)")
    p.add_argument("--batch", default="1,2", help="comma-separated UNet batches (default 1,2: CFG)")
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="fp16")
    p.add_argument("--arch", default=None, help="target, e.g. sm_90 (default: this GPU's)")
    p.add_argument("--jobs", type=int, default=None, help="compile workers (default: the CPUs)")
    p.add_argument("--kernels", default=None, help="only these kernels (comma-separated)")
    p.add_argument("--no-vae", dest="vae", action="store_false", help="the UNet and text kernels only")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace):
    if (args.checkpoint is None) == (args.model is None):
        raise UsageError("give a checkpoint or --model, not both")
    if args.model:
        return shapes.released(args.model)

    return detect_config(read_checkpoint_shapes(args.checkpoint))


def run(args: argparse.Namespace) -> int:
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch {args.batch!r}: expected comma-separated integers") from None
    if not batches or min(batches) < 1:
        raise UsageError("--batch: batches must be positive")
    sizes = [parse_size(s) for s in args.size] if args.size else None
    arch = None
    if args.arch:
        try:
            arch = f"sm_{aot.parse_arch(args.arch)}"
        except aot.AotError as e:
            raise UsageError(str(e)) from None
    config = _config(args)
    if sizes is None and not hasattr(config, "size"):
        sizes = [{"sdxl": (1024, 1024), "sd2": (768, 768)}.get(config.family, (512, 512))]
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    dtype = DTYPE_NAMES[args.dtype]
    try:
        report = warmup(config, sizes=sizes, batches=batches, dtype=dtype, arch=arch, jobs=args.jobs,
                        kernels=kernels, vae=args.vae)
    except WarmupError as e:
        raise UsageError(str(e)) from None
    print(report.summary())
    for r in report.compile.failures:
        print(f"  failed: {r.task.launch.name} {r.config}: {r.error}", file=sys.stderr)
    return 1 if report.compile.failures else 0
