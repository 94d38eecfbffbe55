"""Device and dtype names from the command line or the API, checked once with a one-line error.

The dtype table is the one place a dtype name is parsed or printed: ``DTYPE_NAMES`` (the names the command line
takes and the records print: fp32, fp16, bf16), ``DTYPE_ALIASES`` (torch's names and ``half``, accepted too) and
``dtype_name`` for the way back.
"""

from __future__ import annotations

import torch

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
DTYPES = {**DTYPE_NAMES, **{alias: DTYPE_NAMES[name] for alias, name in DTYPE_ALIASES.items()}}  # every name
_NAME_OF = {dtype: name for name, dtype in DTYPE_NAMES.items()}


class DeviceError(ValueError, RuntimeError):
    """A device was asked for that this machine or this torch build cannot provide. A ValueError (a choice the
    user made) and, as before, a RuntimeError."""


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
        raise DeviceError(f"device {name!r} was asked for, but CUDA is not available (torch.cuda.is_available() "
                          f"is False: this torch {torch.__version__} {build}); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {name!r} was asked for, but only {count} CUDA device(s) are visible")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32`` / ``fp16`` / ``bf16`` (or an alias of ``DTYPE_ALIASES``, or a float ``torch.dtype``) ->
    ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        if name not in _NAME_OF:
            raise DTypeError(f"dtype {name} is not supported; expected float32, float16 or bfloat16")
        return name
    dtype = DTYPES.get(str(name).strip().lower())
    if dtype is None:
        raise DTypeError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return dtype


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name of a dtype (``torch.float16``, ``"float16"`` or ``"half"`` -> ``"fp16"``)."""
    return _NAME_OF[resolve_dtype(dtype)]


def default_dtype(device: str | torch.device) -> str:
    """What a load computes in when no dtype is given: fp16 on CUDA, fp32 elsewhere."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def device_type(name: str | None) -> str | None:
    """The type of a device name ("cuda:1" -> "cuda"; None and "auto" -> None), read without asking torch what
    this machine has (a Ray cluster's workers may have what this one lacks)."""
    if name is None or name.strip().lower() == "auto":
        return None
    return name.split(":", 1)[0].strip().lower()
