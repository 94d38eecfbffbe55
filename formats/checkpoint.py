"""Read original single-file checkpoints (``.safetensors`` and pickled ``.ckpt``) into a flat dict of tensors
(``keys.normalize_keys`` then maps their names to our modules').

Every malformed-file error is raised here as ``CheckpointError`` with the file name and the reason on one line;
text taken from the file (tensor names, metadata, dtype strings, pickle globals) is escaped with
``tritonsd.escape`` first. The file is only ever opened for reading, and nothing is read or allocated before
the sizes that decide it have been checked against the file: a safetensors header is validated field by field
(and its JSON's nesting and number lengths before it is parsed); a zip-format ``.ckpt`` has every member's
declared size bounded before torch reads one; a legacy-format file's pickles are walked first (every global
stubbed: nothing is imported or called) so a truncated file is reported as truncated. Pickles are bounded to
MAX_PICKLE_BYTES, which also bounds the time torch's pure-Python unpickler can take.

Pickles: ``torch.load(weights_only=True)`` refuses every global outside torch's own tensor-rebuilding set; the
released pytorch-lightning files also reference a few harmless globals (the ``ModelCheckpoint`` callback class,
numpy scalars and dtypes in the training bookkeeping). Those, and only those, are allowed, mapped to inert
placeholder classes defined here, for the duration of the load. Anything else (``os.system``, ``eval``, any other
class) is refused by the unpickler before it can be called.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tritonsd.escape import escape, quote

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (decimal, not 100 MiB)
MAX_JSON_DEPTH = 8  # a valid header nests 3 deep ({name: {"shape": [...]}}); deeper is refused before parsing
MAX_JSON_DIGITS = 20  # 2**64 - 1 has 20 digits; a longer number is refused before parsing
# A checkpoint's pickle (data.pkl, or a legacy file's object pickle): released SD files hold well under 1 MiB.
# torch's weights-only unpickler is pure Python (about a microsecond per opcode), so this also bounds the time.
MAX_PICKLE_BYTES = 4 * 1024 * 1024
ZIP_EXPANSION = 2  # the members of a zip checkpoint may decompress to at most this many times the file's size
_INT64_LIMIT = 2**63

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


def read_checkpoint(path: str | Path, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or pickled ``.ckpt`` checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    Tensors keep their stored dtype. ``.ckpt``: the weights may sit under the first of ``wrappers`` the pickle's
    dict has (``"state_dict"``; upscaler files use ``"params_ema"``, ``"params"``, ...); other top-level entries
    (lightning's epoch, global_step, callbacks) and a nested ``"state_dict"`` are dropped.
    """
    path = Path(path)
    size = _regular_file_size(path)
    head = _read_head(path, 8)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, wrappers)
    # unknown suffix: decide from the content (torch's zip container starts with "PK")
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return _read_pickle(path, wrappers)
    try:
        return _read_safetensors(path)
    except CheckpointError:
        raise CheckpointError(f"{_name(path)}: not a checkpoint (neither safetensors nor a torch pickle; expected "
                              f"a .safetensors or .ckpt file; {size} bytes)") from None


def read_checkpoint_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (names, shapes, dtypes; no data): all that config detection and
    ``inspect`` need. A ``.safetensors`` file is read from its validated header alone, so a multi-GB file takes
    milliseconds; a pickle has to be loaded whole."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {k: v.to("meta") for k, v in read_checkpoint(path).items()}
    _regular_file_size(path)
    header = validate_safetensors_header(path)
    return {name: torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device="meta")
            for name, info in header.items() if name != "__metadata__"}


def require_float_weights(weights: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], source: str = "") -> None:
    """Refuse, by name, a tensor under one of ``prefixes`` (the model's modules) that is not a floating-point
    tensor: an int or bool tensor where a weight belongs would be silently cast on loading. Call it on the
    normalised weights (position_ids, an int64 buffer, is dropped by then). ``source``: the file name for the
    message."""
    for name, t in weights.items():
        if name.startswith(prefixes) and not t.is_floating_point():
            where = f"{source}: " if source else ""
            raise CheckpointError(f"{where}tensor {quote(name)} is {str(t.dtype).removeprefix('torch.')}, but the "
                                  f"model needs floating-point weights there")


# ---------------------------------------------------------------------------------------------------------------
# safetensors


def validate_safetensors_header(path: Path) -> dict:
    """Check the safetensors framing ourselves (so a lying or truncated file gives a clear error) and return the
    parsed header: 8-byte little-endian header length (at most safetensors' 100,000,000), a JSON object whose
    nesting and number lengths are checked before it is parsed, each tensor entry well-formed, and the tensors'
    data_offsets tiling the data section exactly, as safetensors itself requires."""
    size = path.stat().st_size
    with _open(path) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{_name(path)}: truncated safetensors file ({size} bytes, no header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{_name(path)}: not a safetensors file (header length {header_len} is over "
                                  f"safetensors' limit of {MAX_HEADER_BYTES:,} bytes)")
        if 8 + header_len > size:
            raise CheckpointError(f"{_name(path)}: truncated or not a safetensors file (header length "
                                  f"{header_len} exceeds the file size {size})")
        raw = f.read(header_len)
    header = _parse_header_json(path, raw)
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        _check_unicode(path, name, "tensor name")
        if name == "__metadata__":
            _check_metadata(path, info)
        else:
            spans.append((*_check_tensor_entry(path, name, info, data_len), name))
    _check_tiling(path, spans, data_len)
    return header


def _parse_header_json(path: Path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{_name(path)}: not a safetensors file (header is not UTF-8 text)") from None
    _check_json_bounds(path, raw)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"{_name(path)}: corrupt header: {quote(e.args[0])} appears twice") from None
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise CheckpointError(f"{_name(path)}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{_name(path)}: not a safetensors file (header is not a JSON object)")
    return header


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


# a JSON string (the unrolled form: linear time, no backtracking), and a run of more digits than any valid number
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_LONG_NUMBER = re.compile(rb"\d{%d,}" % (MAX_JSON_DIGITS + 1))
_BRACKET_STEP = np.zeros(256, dtype=np.int8)  # +1 for an opening bracket, -1 for a closing one, 0 otherwise
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def _check_json_bounds(path: Path, raw: bytes) -> None:
    """Before ``json.loads`` sees the header: no nesting deeper than MAX_JSON_DEPTH (the parser recurses) and no
    number longer than MAX_JSON_DIGITS digits (int() refuses 4,300 and is quadratic below that). Strings are
    blanked first, so brackets and digits inside names and metadata do not count."""
    structure = _JSON_STRING.sub(b'""', raw)
    if _LONG_NUMBER.search(structure):
        raise CheckpointError(f"{_name(path)}: corrupt header (a number with more than {MAX_JSON_DIGITS} digits)")
    steps = _BRACKET_STEP[np.frombuffer(structure, dtype=np.uint8)]
    depth = 0
    for start in range(0, len(steps), 1 << 20):  # bounded memory for a 100 MB header
        running = np.cumsum(steps[start:start + (1 << 20)], dtype=np.int64) + depth
        if running.size and running.max() > MAX_JSON_DEPTH:
            raise CheckpointError(f"{_name(path)}: corrupt header (JSON nested deeper than {MAX_JSON_DEPTH} "
                                  f"levels; a safetensors header nests 3)")
        depth = int(running[-1]) if running.size else depth


def _check_metadata(path: Path, meta) -> None:
    """``__metadata__`` is absent, null or an object of strings (what safetensors accepts)."""
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{_name(path)}: corrupt header (__metadata__ must map names to strings)")
    for key, value in meta.items():
        _check_unicode(path, key, "__metadata__ key")
        _check_unicode(path, value, "__metadata__ value")


def _check_unicode(path: Path, text: str, what: str) -> None:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which Python accepts and safetensors refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{_name(path)}: corrupt header: {what} {quote(text, 80)} is not valid Unicode (a "
                              f"lone surrogate)") from None


def _check_tensor_entry(path: Path, name: str, info, data_len: int) -> tuple[int, int]:
    """One header entry: a known dtype string, a shape of non-negative ints whose element count times the dtype's
    size is the span of its data_offsets, which lie inside the data section. Returns (begin, end)."""
    what = lambda: f"{_name(path)}: tensor {quote(name)}"  # noqa: E731 - escaped only for an error (2,500 keys)
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{what()}: bad safetensors header entry (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{what()} has unsupported dtype {_excerpt(dtype)} (known: "
                              f"{', '.join(_SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(type(s) is int and 0 <= s < _INT64_LIMIT for s in shape)):
        raise CheckpointError(f"{what()} has a bad shape {_excerpt(shape)} (expected a list of non-negative "
                              f"integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{what()} has bad data_offsets {_excerpt(offsets)} (expected [begin, end])")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{_name(path)}: truncated or corrupt: tensor {quote(name)} data_offsets "
                              f"[{begin}, {end}] lie outside the {data_len}-byte data section")
    numel = 1
    for s in shape:
        numel *= s
    nonzero = 1
    for s in shape:
        nonzero *= s or 1
    if nonzero >= _INT64_LIMIT:  # strides would overflow int64 even when a zero dimension makes it empty
        raise CheckpointError(f"{what()} has a bad shape {_excerpt(shape)} (too many elements)")
    itemsize = _SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != numel * itemsize:
        raise CheckpointError(f"{_name(path)}: corrupt header: tensor {quote(name)} ({dtype} {_excerpt(shape)}) needs "
                              f"{numel * itemsize} bytes but data_offsets span {end - begin}")
    return begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' data must follow each other with no gap or overlap and fill the data section (safetensors
    refuses anything else on loading; ``inspect`` reads the header alone and must refuse it too)."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{_name(path)}: corrupt header: tensor {quote(name)} data_offsets [{begin}, "
                                  f"{end}] {problem}")
        position = end
    if position != data_len:
        raise CheckpointError(f"{_name(path)}: corrupt header: the tensors cover {position} of the "
                              f"{data_len}-byte data section")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    validate_safetensors_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{_name(path)}: unreadable safetensors file ({_one_line(e)})") from None
    except MemoryError:
        raise CheckpointError(f"{_name(path)}: too large to load into memory") from None


# ---------------------------------------------------------------------------------------------------------------
# Pickles


def check_pickle_container(path: str | Path) -> None:
    """The bounds every pickled file gets before ``torch.load`` reads a byte of it (a regular, non-empty file; a
    zip container checked from its central directory, or legacy pickles walked without running them): also what
    the embedding reader uses. CheckpointError (one line) otherwise."""
    path = Path(path)
    _regular_file_size(path)
    head = _read_head(path, 4)
    if head.startswith(b"PK\x03\x04"):
        _check_zip_checkpoint(path)
    elif head[:1] == b"\x80":
        _check_legacy_pickles(path)
    else:
        raise CheckpointError(f"{_name(path)}: not a torch checkpoint (neither a zip archive nor a pickle)")


def _read_pickle(path: Path, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    check_pickle_container(path)
    try:
        with warnings.catch_warnings():  # the checks above decide; torch's warnings would be a second line
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(ALLOWED_PICKLE_GLOBALS)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{_name(path)}: {_unpickling_reason(str(e))}") from None
    except MemoryError:
        raise CheckpointError(f"{_name(path)}: bad checkpoint (too large to load into memory)") from None
    except Exception as e:  # noqa: BLE001 - torch's readers raise any type on malformed input; each is one line
        raise CheckpointError(f"{_name(path)}: {_load_failure(e)}") from None
    return _unwrap_state_dict(path, obj, wrappers)


def _load_failure(e: Exception) -> str:
    """One line for an exception out of ``torch.load`` on a file whose framing passed our checks."""
    text = str(e)
    if isinstance(e, EOFError) or "unexpected EOF" in text:
        return f"truncated (the data ends early: {_one_line(e)})"
    if isinstance(e, RuntimeError) and ("central directory" in text or "zip archive" in text):
        return "truncated or corrupt (its zip archive is incomplete)"
    return f"bad checkpoint (truncated or not a torch checkpoint: {type(e).__name__}: {_one_line(e)})"


def _unpickling_reason(message: str) -> str:
    """One line from torch's multi-paragraph weights-only refusal."""
    refused = re.search(r"GLOBAL (\S+)|unrecognized function (.+?)(?:$| which)|new object for .*? got (\S+)",
                        message)
    if refused:
        what = next(g for g in refused.groups() if g).rstrip(".")
        return (f"refused to load: the pickle wants to call {escape(what, 120)}, which is not a tensor or an "
                f"allowed bookkeeping entry (the code never ran)")
    detail = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", message, re.S)
    return (f"bad checkpoint (truncated or not a torch checkpoint: bad pickle: "
            f"{_one_line(detail.group(1) if detail else message)})")


def _check_zip_checkpoint(path: Path) -> None:
    """The zip container, from its central directory, before torch reads a byte of any member: a torch
    checkpoint (a ``data.pkl``, not a TorchScript archive), members torch can read (stored or deflated) that lie
    inside the file, and declared sizes bounded: ``data.pkl`` at most MAX_PICKLE_BYTES, all members together at
    most ZIP_EXPANSION times the file (torch's reader allocates each member's declared size and decompresses no
    further than that)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError):
        raise CheckpointError(f"{_name(path)}: truncated or corrupt (its zip archive is incomplete)") from None
    except OSError as e:
        raise CheckpointError(f"{_name(path)}: cannot read ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - zipfile raises ValueError, struct.error, ... on a mangled directory
        raise CheckpointError(f"{_name(path)}: truncated or corrupt zip archive ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    names = [m.filename for m in members]
    if any(_zip_inner(n) == "constants.pkl" or _zip_inner(n).startswith("code/") for n in names):
        raise CheckpointError(f"{_name(path)}: a TorchScript archive (a compiled model), not a checkpoint of "
                              f"weights; refused")
    if not any(_zip_inner(n) == "data.pkl" for n in names):
        raise CheckpointError(f"{_name(path)}: not a torch checkpoint (its zip archive has no data.pkl)")
    total = 0
    for m in members:
        what = f"{_name(path)}: zip member {quote(m.filename, 80)}"
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{what} uses compression method {m.compress_type}, which torch cannot read")
        if m.compress_type == zipfile.ZIP_STORED and m.file_size != m.compress_size:
            raise CheckpointError(f"{what} is corrupt (stored, but its sizes differ: {m.file_size} and "
                                  f"{m.compress_size})")
        if m.header_offset + m.compress_size > size:
            raise CheckpointError(f"{_name(path)}: truncated or corrupt: zip member {quote(m.filename, 80)} "
                                  f"extends past the end of the file")
        if _zip_inner(m.filename) == "data.pkl" and m.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{what} would decompress to {m.file_size:,} bytes (a checkpoint's pickle is "
                                  f"at most {MAX_PICKLE_BYTES:,}); refused before reading it")
        total += m.file_size
    if total > ZIP_EXPANSION * size:
        raise CheckpointError(f"{_name(path)}: its zip members would decompress to {total:,} bytes, over "
                              f"{ZIP_EXPANSION} times the file's {size:,}; refused before reading them")


def _zip_inner(name: str) -> str:
    """A member's path below the archive's top-level folder (torch writes ``<archive name>/data.pkl``)."""
    return name.split("/", 1)[1] if "/" in name else name


_LEGACY_PICKLES = 5  # magic number, protocol version, sys_info, the object, the storage keys; then raw storages


class _Stub:
    """What every global becomes while a pickle is only being walked: accepts any call and any state."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, item) -> None:
        pass

    def extend(self, items) -> None:
        pass


class _WalkingUnpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler, see below
    """An unpickler with every global replaced by ``_Stub`` and persistent ids by None: it parses and builds
    plain containers only, so nothing named by the file is ever imported or called. Used to find where each
    pickle of a legacy file ends (and whether the file ends first). The pure-Python implementation, not the C
    one: its memo is a dict, where the C unpickler sizes an array by the largest BINPUT index a (hostile) file
    names, which took gigabytes and over a minute on a fuzzed file."""

    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):
        return None


def _check_legacy_pickles(path: Path) -> None:
    """A legacy-format (pre-zip) checkpoint is a run of pickles followed by raw storage bytes. Walk the pickles
    (``_WalkingUnpickler``: nothing named by the file is imported or called) so a file cut inside one is reported
    as truncated, not by whatever torch's unpickler makes of a half-read opcode, and so no pickle longer than
    MAX_PICKLE_BYTES reaches torch's pure-Python unpickler. Each walk sees at most MAX_PICKLE_BYTES + 1 bytes."""
    size = path.stat().st_size
    with _open(path) as f:
        for _ in range(_LEGACY_PICKLES):
            begin = f.tell()
            chunk = f.read(MAX_PICKLE_BYTES + 1)
            window = io.BytesIO(chunk)
            try:
                _WalkingUnpickler(window).load()
            except MemoryError:
                raise CheckpointError(f"{_name(path)}: bad checkpoint (its pickle does not fit in memory)") from None
            except Exception as e:  # noqa: BLE001 - any malformed pickle: UnpicklingError, ValueError, TypeError ...
                ran_out = window.tell() >= len(chunk)
                if ran_out and len(chunk) > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{_name(path)}: bad checkpoint (a pickle longer than "
                                          f"{MAX_PICKLE_BYTES:,} bytes; refused before running it)") from None
                if ran_out:
                    raise CheckpointError(f"{_name(path)}: truncated (the file ends inside its pickle stream, "
                                          f"{size} bytes)") from None
                raise CheckpointError(f"{_name(path)}: bad checkpoint (not a torch pickle: {type(e).__name__}: "
                                      f"{_one_line(e)})") from None
            f.seek(begin + window.tell())


def _unwrap_state_dict(path: Path, obj, wrappers: tuple[str, ...] = ("state_dict",)) -> dict[str, torch.Tensor]:
    """``{"state_dict": {...}, ...}`` (or another of ``wrappers``) or a bare dict -> the flat tensor dict (a
    nested "state_dict" dropped).
    Each tensor must be a plain dense CPU tensor whose elements its storage holds (a stride-0 view could
    otherwise claim terabytes backed by a few bytes)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{_name(path)}: not a checkpoint (the pickle holds a {type(obj).__name__}, not a "
                              f"dict)")
    wrapper = next((w for w in wrappers if w in obj), None)
    sd = obj if wrapper is None else obj[wrapper]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{_name(path)}: not a checkpoint ({wrapper!r} is a {type(sd).__name__})")
    tensors = {k: v for k, v in sd.items() if k != "state_dict" and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{_name(path)}: not a checkpoint (no tensors found)")
    if any(not isinstance(k, str) for k in tensors):
        raise CheckpointError(f"{_name(path)}: not a checkpoint (tensor names are not strings)")
    for name, t in tensors.items():
        _check_loaded_tensor(path, name, t)
    return tensors


def _check_loaded_tensor(path: Path, name: str, t: torch.Tensor) -> None:
    """A plain dense CPU tensor, every element of which lies inside its storage, none of them shared with
    another (a stride-0 view of one float could otherwise claim a terabyte)."""
    what = f"{_name(path)}: tensor {quote(name)}"
    if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
        raise CheckpointError(f"{what} is not a plain dense tensor ({t.layout}, {t.dtype}, {t.device.type})")
    if t.numel() == 0:
        return
    storage_bytes = t.untyped_storage().nbytes()
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    inside = min(t.stride(), default=1) >= 0 and (last + 1) * t.element_size() <= storage_bytes
    if not inside or t.numel() * t.element_size() > storage_bytes:
        raise CheckpointError(f"{what} claims {t.numel():,} elements of {str(t.dtype).removeprefix('torch.')} "
                              f"but its storage holds {storage_bytes:,} bytes")


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _name(path: Path) -> str:
    """The file's name for a message (escaped: a file name can hold control characters too)."""
    return escape(path.name)


def _regular_file_size(path: Path) -> int:
    """The size of ``path``, which must exist, be a regular file (not a FIFO or a device: reading one could block
    forever) and not be empty."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{escape(path)}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{escape(path)}: cannot read ({escape(e.strerror or e)})") from None
    if not path.is_file():
        raise CheckpointError(f"{escape(path)}: not a regular file")
    if st.st_size == 0:
        raise CheckpointError(f"{_name(path)}: empty file")
    return st.st_size


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{_name(path)}: cannot read ({escape(e.strerror or e)})") from None


def _read_head(path: Path, n: int) -> bytes:
    with _open(path) as f:
        return f.read(n)


def _excerpt(value) -> str:
    """A JSON value from the header, shown short and escaped."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return escape(text, 60)


def _one_line(e: BaseException) -> str:
    return escape(" ".join(str(e).split()), 200)
