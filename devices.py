"""Device and dtype names from the command line or the API, checked once with a one-line error."""

from __future__ import annotations

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class DeviceError(RuntimeError):
    """A device was asked for that this machine or this torch build cannot provide."""


class DTypeError(ValueError):
    """A dtype name that is not one of ``DTYPES``."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> ``torch.device``."""
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else f"(CUDA {torch.version.cuda}) sees no GPU"
        raise DeviceError(f"device {name!r} was asked for, but torch.cuda.is_available() is False: this torch "
                          f"{torch.__version__} {build}; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {name!r} was asked for, but only {count} CUDA device(s) are visible")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32`` / ``fp16`` / ``bf16`` (or the torch names, or a float ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DTypeError(f"dtype {name} is not supported; expected float32, float16 or bfloat16")
        return name
    dtype = DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise DTypeError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16")
    return dtype
