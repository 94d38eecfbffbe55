"""``tritonsd merge CHECKPOINT --lora FILE:W [--lora FILE:TE_W:UNET_W ...] --out MERGED.safetensors``: bake LoRAs
into a checkpoint.

The output keeps the original layout: exactly the input's tensor keys, shapes and dtypes (EMA weights, schedule
buffers and everything else the runtime ignores included), so plain ``safetensors`` and other tools load it.
Changed weights are computed as ``LoraState.apply`` computes them (float32, rounded to the stored dtype once),
from the file's own tensors. The file is written to a temporary name in the target folder and renamed into
place: a failure leaves nothing behind. The input's safetensors metadata is kept, plus
``tritonsd.merged_loras`` (what was merged, with each file's addnet hash).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tritonsd.tools.cli import UsageError
from tritonsd.formats.checkpoint import SAFETENSORS_SUFFIX, read_checkpoint, validate_safetensors_header
from tritonsd.formats.keys import normalize_keys
from tritonsd.lora.apply import (LoraSpec, deltas_by_weight, merge_all, parse_lora_arg, read_and_compute,
    unmatched_warning)
from tritonsd.formats.lora_file import LoraError, addnet_hash, safe_text


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="bake LoRAs into a checkpoint (original layout, .safetensors)",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("checkpoint", type=Path, help=".safetensors or .ckpt file")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:W|:TE_W:UNET_W]",
                   help="a LoRA .safetensors file and its multiplier(s) (default 1.0; W sets both); repeatable")
    p.add_argument("--out", type=Path, required=True, metavar="MERGED.safetensors", help="the merged checkpoint")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != SAFETENSORS_SUFFIX:
        raise UsageError(f"--out must be a .safetensors file, got {safe_text(args.out.name)}")
    if args.out.exists() and args.checkpoint.exists() and args.out.resolve() == args.checkpoint.resolve():
        raise UsageError("--out must not be the input checkpoint")
    if not args.out.parent.is_dir():
        raise UsageError(f"--out folder {safe_text(str(args.out.parent))} does not exist")
    try:
        specs = [parse_lora_arg(text) for text in args.lora]
    except LoraError as e:
        raise UsageError(str(e)) from None
    report = merge_checkpoint(args.checkpoint, specs, args.out)
    for message in report.warnings:
        print(f"tritonsd merge: warning: {message}", file=sys.stderr)
    for lora in report.loras:
        print(f"{safe_text(lora['name'])}: te {lora['te']:g}, unet {lora['unet']:g}, {lora['matched']} modules "
              f"merged, {lora['unmatched']} unmatched")
    print(f"{report.weights_changed} of {report.tensors} tensors changed; wrote {args.out}")
    return 0


@dataclass
class MergeReport:
    loras: list[dict]
    weights_changed: int
    tensors: int
    warnings: list[str]


def merge_checkpoint(checkpoint: str | Path, specs: list[LoraSpec], out: str | Path) -> MergeReport:
    """Write ``checkpoint`` with ``specs`` baked in to ``out`` (see the module docstring)."""
    checkpoint, out = Path(checkpoint), Path(out)
    raw = read_checkpoint(checkpoint)
    key_of = normalized_to_file_keys(raw)
    shapes = {ours: tuple(raw[theirs].shape) for ours, theirs in key_of.items()}
    files, all_deltas = read_and_compute(specs, shapes)
    changed = merge_all(deltas_by_weight(all_deltas), lambda ours: raw[key_of[ours]])
    merged = {**raw, **{key_of[ours]: value for ours, value in changed.items()}}
    entries = [{"name": f.name, "file": f.path.name, "addnet_hash": addnet_hash(f.path), "te": s.te_multiplier,
                "unet": s.unet_multiplier} for f, s in zip(files, specs)]
    metadata = _metadata(checkpoint)
    metadata["tritonsd.merged_loras"] = json.dumps(entries)
    write_safetensors_atomic(merged, out, metadata)
    loras = [{**e, "matched": d.matched, "unmatched": len(d.unmatched)} for e, d in zip(entries, all_deltas)]
    messages = [m for m in map(unmatched_warning, all_deltas) if m]
    return MergeReport(loras, len(changed), len(raw), messages)


def normalized_to_file_keys(raw: dict[str, torch.Tensor]) -> dict[str, str]:
    """Our (normalised) key -> the file's key, for every tensor the modules hold."""
    probes = {key: torch.empty(0) for key in raw}  # distinct objects: found again after renaming
    file_key = {id(t): key for key, t in probes.items()}
    return {ours: file_key[id(t)] for ours, t in normalize_keys(probes).weights.items()}


def _metadata(checkpoint: Path) -> dict[str, str]:
    if checkpoint.suffix.lower() != SAFETENSORS_SUFFIX:
        return {}
    meta = validate_safetensors_header(checkpoint).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Save to a temporary file beside ``out`` and rename it into place (removed again on any failure)."""
    from safetensors.torch import save_file

    tensors = _unshared(tensors)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp makes it 0600, and save_file keeps (or recreates) that: after the write, a plain new file's mode,
        # the one PNGs get (0666 less the umask)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (possible in pickles) and non-contiguous ones: copy those."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out
