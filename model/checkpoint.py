"""Read original single-file checkpoints (``.safetensors`` and pickled ``.ckpt``) into a flat dict of tensors
(``keys.normalize_keys`` then maps their names to our modules').

Every malformed-file error is raised here as ``CheckpointError`` with the file name and the reason on one line.
The file is only ever opened for reading.

Pickles: ``torch.load(weights_only=True)`` refuses every global outside torch's own tensor-rebuilding set; the
released pytorch-lightning files also reference a few harmless globals (the ``ModelCheckpoint`` callback class,
numpy scalars and dtypes in the training bookkeeping). Those, and only those, are allowed, mapped to inert
placeholder classes defined here, for the duration of the load. Anything else (``os.system``, ``eval``, any other
class) is refused by the unpickler before it can be called.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# torch dtype of each safetensors dtype name (its itemsize gives the bytes per element)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: missing, truncated, not a checkpoint, or unsafe."""


# ---------------------------------------------------------------------------------------------------------------
# Inert stand-ins for the extra globals of the released pytorch-lightning pickles. They accept whatever the
# pickle passes and keep nothing: these entries are bookkeeping we ignore.


class _Inert:
    """Accepts any constructor arguments and any pickled state; does nothing with them."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class ModelCheckpointPlaceholder(_Inert):
    """Stands in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``."""


class NumpyDtypePlaceholder(_Inert):
    """Stands in for ``numpy.dtype`` (and numpy's per-dtype classes)."""


class NumpyScalarPlaceholder(_Inert):
    """Stands in for ``numpy.core.multiarray.scalar(dtype, raw_bytes)``."""


# The complete allowlist beyond torch's defaults. ``_codecs.encode`` (how protocol-2 pickles store bytes, used by
# the numpy scalars) is already in torch's weights-only default set, with the real, side-effect-free function.
ALLOWED_PICKLE_GLOBALS: tuple[tuple[type, str], ...] = (
    (ModelCheckpointPlaceholder, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (NumpyScalarPlaceholder, "numpy.core.multiarray.scalar"),
    (NumpyDtypePlaceholder, "numpy.dtype"),
    (NumpyDtypePlaceholder, "numpy.dtypes.Float64DType"),
    (NumpyDtypePlaceholder, "numpy.dtypes.Int64DType"),
)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or pickled ``.ckpt`` checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    Tensors keep their stored dtype. ``.ckpt``: the ``"state_dict"`` wrapper is optional; other top-level entries
    (lightning's epoch, global_step, callbacks) and a nested ``"state_dict"`` are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path.name}: empty file")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path)
    # unknown suffix: decide from the content (torch's zip container starts with "PK")
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return _read_pickle(path)
    try:
        return _read_safetensors(path)
    except CheckpointError:
        raise CheckpointError(f"{path.name}: not a checkpoint (neither safetensors nor a torch pickle; expected "
                              f"a .safetensors or .ckpt file)") from None


def read_checkpoint_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (names, shapes, dtypes; no data): all that config detection and
    ``inspect`` need. A ``.safetensors`` file is read from its validated header alone, so a multi-GB file takes
    milliseconds; a pickle has to be loaded whole."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {k: v.to("meta") for k, v in read_checkpoint(path).items()}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    header = validate_safetensors_header(path)
    return {name: torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device="meta")
            for name, info in header.items() if name != "__metadata__"}


def validate_safetensors_header(path: Path) -> dict:
    """Check the safetensors framing ourselves (so a lying or truncated file gives a clear error) and return the
    parsed header: 8-byte little-endian header length, a JSON object, and each tensor's data_offsets inside the
    data section with the size its dtype and shape imply."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name}: not a safetensors file (header length {header_len} is implausible)")
        if 8 + header_len > size:
            raise CheckpointError(f"{path.name}: truncated or not a safetensors file (header length {header_len} "
                                  f"exceeds the file size {size})")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_tensor_entry(path, name, info, data_len)
    return header


def _check_tensor_entry(path: Path, name: str, info, data_len: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{path.name}: bad safetensors header entry for {name!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise CheckpointError(f"{path.name}: tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{path.name}: tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{path.name}: truncated or corrupt: tensor {name!r} data_offsets [{begin}, {end}] "
                              f"lie outside the {data_len}-byte data section")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = _SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != numel * itemsize:
        raise CheckpointError(f"{path.name}: corrupt header: tensor {name!r} ({dtype} {shape}) needs "
                              f"{numel * itemsize} bytes but data_offsets span {end - begin}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    validate_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path.name}: unreadable safetensors file ({_one_line(e)})") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path.name}: not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_PICKLE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name}: {_unpickling_reason(str(e))}") from None
    except RuntimeError as e:
        if "central directory" in str(e) or "zip archive" in str(e):
            raise CheckpointError(f"{path.name}: truncated or corrupt (its zip archive is incomplete)") from None
        raise CheckpointError(f"{path.name}: truncated or not a torch checkpoint ({_one_line(e)})") from None
    except (EOFError, OSError, ValueError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path.name}: truncated or not a torch checkpoint ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    return _unwrap_state_dict(path, obj)


def _unpickling_reason(message: str) -> str:
    """One line from torch's multi-paragraph weights-only refusal."""
    refused = re.search(r"GLOBAL (\S+)|unrecognized function (.+?)(?:$| which)|new object for .*? got (\S+)",
                        message)
    if refused:
        what = next(g for g in refused.groups() if g).rstrip(".")
        return (f"refused to load: the pickle wants to call {what}, which is not a tensor or an allowed "
                f"bookkeeping entry (the code never ran)")
    detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", message, re.S)
    return f"truncated or not a torch checkpoint (bad pickle: {_one_line(detail.group(1) if detail else message)})"


def _unwrap_state_dict(path: Path, obj) -> dict[str, torch.Tensor]:
    """``{"state_dict": {...}, ...}`` or a bare dict -> the flat tensor dict (a nested "state_dict" dropped)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: not a checkpoint (the pickle holds a {type(obj).__name__}, not a dict)")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path.name}: not a checkpoint ('state_dict' is a {type(sd).__name__})")
    tensors = {k: v for k, v in sd.items() if k != "state_dict" and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name}: not a checkpoint (no tensors found)")
    if any(not isinstance(k, str) for k in tensors):
        raise CheckpointError(f"{path.name}: not a checkpoint (tensor names are not strings)")
    return tensors


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")
