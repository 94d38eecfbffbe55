"""What every kernel test shares: the device (CUDA, else the CPU under Triton's interpreter, which
tests/conftest.py switches on), the relative-error bounds per dtype, and a guard that the kernel itself ran."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def forbid_fallback(monkeypatch, module, reference_name: str) -> None:
    """Make the launcher's fallback to ``module.<reference_name>`` an error: the kernel itself must run."""
    def fail(*args, **kwargs):
        raise AssertionError("the launcher fell back to the reference")
    monkeypatch.setattr(module, reference_name, fail)
