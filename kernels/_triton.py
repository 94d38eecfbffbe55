"""What the Triton launchers share: interpreter detection, config choice, argument checks.

``TRITON_INTERPRET=1`` is read by ``triton.jit`` when a kernel is decorated, i.e. when a kernel module is
imported; the launchers read it at the same moment so that the interpreter (CPU tensors, numpy semantics) and
the compiled path (CUDA tensors) never get mixed up.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterator

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelArgumentError(ValueError):
    """Arguments a kernel (and its reference) cannot take: wrong ranks, mismatched shapes or dtypes."""


class KernelDeviceError(RuntimeError):
    """A Triton kernel was asked to run on tensors it cannot reach (CPU tensors without the interpreter)."""


AUTOTUNE = os.environ.get("TRITONSD_AUTOTUNE", "1") != "0"  # 0: the first shipped config only (tests, checks)


def configs(tuned: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """The autotune candidates; the single ``interpreted`` one under the interpreter (tuning it is pointless);
    with ``TRITONSD_AUTOTUNE=0`` (read at import, like ``TRITON_INTERPRET``) the first shipped config alone, so
    correctness runs on a GPU compile one binary per kernel variant instead of one per config."""
    if INTERPRET:
        return [interpreted]
    return tuned if AUTOTUNE else tuned[:1]


def is_recording() -> bool:
    """Whether launches are being recorded (:func:`recording`): meta tensors then stand for CUDA ones."""
    return _recorder.get() is not None


def check_device(*tensors: torch.Tensor | None) -> None:
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors. While launches are recorded
    (:func:`recording`), meta tensors stand for CUDA ones."""
    recording_now = _recorder.get() is not None
    for t in tensors:
        if t is None or (recording_now and t.is_meta):
            continue
        if INTERPRET and t.is_cuda:
            raise KernelDeviceError("TRITON_INTERPRET=1 is set, but the tensors are on CUDA; unset it to run "
                                    "the compiled kernels")
        if not INTERPRET and not t.is_cuda:
            raise KernelDeviceError(f"the Triton kernels need CUDA tensors (got a {t.device} tensor); set "
                                    "TRITON_INTERPRET=1 before importing tritonsd to run them on the CPU")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: full IEEE float32 for float32 inputs (TF32 would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """The dtype tl.dot operands are cast to: the input's own dtype (a no-op cast), except bfloat16 under the
    interpreter, whose bfloat16 tl.dot returns garbage (triton 3.9): there the tiles are multiplied as the
    float32 values they hold, which is exact."""
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


# ---- launching: every launcher goes through launch(), so that launches can be recorded (to know which kernel
# variants a model needs, without a GPU) and autotuned keys looked up in the persistent tuning cache.

_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("tritonsd_launch_recorder", default=None)


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Record the launches made inside the block as (kernel, args, kwargs) instead of running them; the
    launchers then accept meta tensors, so a whole model can be walked on the meta device."""
    launches: list[tuple[Any, tuple, dict]] = []
    token = _recorder.set(launches)
    try:
        yield launches
    finally:
        _recorder.reset(token)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or record it (see :func:`recording`). Autotuned kernels first look
    their key up in the persistent tuning cache (kernels/tuning.py), and store the winner after tuning."""
    launches = _recorder.get()
    if launches is not None:
        launches.append((kernel, args, kwargs))
        return
    if INTERPRET or not isinstance(kernel, triton.runtime.Autotuner):
        kernel[grid](*args, **kwargs)
        return
    from tritonsd.compile import tuning

    tuning.tuned_launch(kernel, grid, args, kwargs)
