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


def assert_matches(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The NaN-poisoned output was fully written and is within the dtype's bound of the reference."""
    from tritonsd.testing.reference import relative_error

    assert not torch.isnan(got).any(), "the kernel left elements unwritten"
    err = relative_error(got, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"
    return err


def poison_allocations(monkeypatch) -> None:
    """Every float tensor made with ``torch.empty`` from here on starts as NaN (outputs, statistics, workspaces):
    an element a kernel leaves unwritten, or a workspace slot it reads that nothing wrote, shows."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
    monkeypatch.setattr(torch, "empty", nan_empty)
