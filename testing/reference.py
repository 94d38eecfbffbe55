"""Reference files in the fixtures' format: where they are, how to read them, how to compare against them."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

FIXTURES_ENV = "TRITONSD_FIXTURES"


class GroupError(ValueError):
    """A group cannot be recomputed from what the reference file holds (or is of a kind we do not know)."""


def fixtures_dir() -> Path:
    """``$TRITONSD_FIXTURES`` if set, else ``../shared/fixtures`` beside the repository checkout."""
    env = os.environ.get(FIXTURES_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


def load_reference(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``NAME.reference.safetensors`` and the ``NAME.reference.json`` beside it."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path))
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return tensors, meta


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max|a - b| / max|reference|, in float64 (the fixtures' definition)."""
    a = actual.detach().to("cpu", torch.float64)
    b = reference.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} does not match the reference's {tuple(b.shape)}")
    denom = b.abs().max().item()
    err = (a - b).abs().max().item()
    if denom == 0.0:
        return err
    return err / denom


@contextlib.contextmanager
def strict_float32():
    """No TF32 in cuBLAS / cuDNN inside the block (float32 references and parity; restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
