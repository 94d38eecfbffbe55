"""Builders of malformed checkpoints, one per defect class of issue 16, for the hardening and CLI tests.

Each case is ``(suffix, build) -> bytes`` plus the words its one-line error must contain. Everything is built
here from first principles (json, struct, zipfile, pickle opcodes) or from ``torch.save``; nothing is computed by
the readers under test.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
CONTROL_NAME = "evil\x1b]0;pwned\x07\x1b[2J\nsecond line\u202egpj.exe"


def safetensors_bytes(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def one_tensor(**entry) -> bytes:
    """A one-tensor file (4 float32 of data) whose header entry has ``entry``'s fields changed."""
    return safetensors_bytes({"w": {**F32, **entry}}, bytes(16))


def torch_save_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def rezip(archive: bytes, replace: dict[str, bytes] | None = None, compression: int = zipfile.ZIP_STORED,
          add: dict[str, bytes] | None = None) -> bytes:
    """``archive`` (a torch zip checkpoint) rewritten by Python's zipfile, with members' contents replaced by
    inner name (``data.pkl``) and members added."""
    replace, add = replace or {}, add or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as zin, zipfile.ZipFile(out, "w", compression=compression) as zout:
        root = zin.namelist()[0].split("/")[0]
        for name in zin.namelist():
            inner = name.split("/", 1)[1]
            zout.writestr(name, replace.get(inner, zin.read(name)))
        for inner, data in add.items():
            zout.writestr(f"{root}/{inner}", data)
    return out.getvalue()


def small_ckpt() -> bytes:
    return torch_save_bytes({"state_dict": {"model.diffusion_model.w": torch.arange(4, dtype=torch.float32)}})


def with_pickle(pkl: bytes) -> bytes:
    """A torch zip checkpoint whose data.pkl is ``pkl`` (hand-written opcodes)."""
    return rezip(small_ckpt(), {"data.pkl": pkl})


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _unicode(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def codec_call(*args: bytes) -> bytes:
    """``_codecs.encode(*args)`` as protocol-2 opcodes (the call protocol-2 pickles use to store bytes)."""
    return b"\x80\x02" + _global("_codecs", "encode") + b"(" + b"".join(args) + b"tR."


def deflate_bomb(gigabytes: float, member: str = "data.pkl") -> bytes:
    """A zip checkpoint whose ``member`` is ``gigabytes`` GB of zeros, deflated (about 1 MB per GB). The deflate
    stream is built from one fully flushed 16 MiB block repeated (each such block compresses to the same bytes),
    so building it costs a CRC pass, not gigabytes of compression."""
    chunk = bytes(1 << 24)
    n = max(2, int(gigabytes * 1e9) // len(chunk))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    repeat = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    stream = first + repeat * (n - 1) + c.flush()
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    archive = rezip(small_ckpt(), {member: stream})
    return _relabel_member(archive, member, method=zipfile.ZIP_DEFLATED, crc=crc, size=n * len(chunk))


def lying_deflate() -> bytes:
    """data.pkl deflated, declaring (in both headers) 64 bytes but inflating to 16 MiB: the declared size must
    be what bounds the read."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(b"\x80\x02" + bytes(16 << 20)) + c.flush()
    archive = rezip(small_ckpt(), {"data.pkl": stream})
    return _relabel_member(archive, "data.pkl", method=zipfile.ZIP_DEFLATED, crc=0, size=64)


def _relabel_member(archive: bytes, inner: str, method: int, crc: int, size: int) -> bytes:
    """Rewrite a stored member's compression method, CRC and uncompressed size in its local header and its
    central-directory entry (so a raw deflate stream written as "stored" becomes a deflated member)."""
    data = bytearray(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        name = next(n for n in z.namelist() if n.endswith("/" + inner)).encode()
    # signature, offset of its name, offsets of method, CRC, uncompressed size
    for sig, name_at, method_at, crc_at, size_at in ((b"PK\x03\x04", 30, 8, 14, 22), (b"PK\x01\x02", 46, 10, 16, 24)):
        start = 0
        while (at := data.find(sig, start)) >= 0:
            if data[at + name_at:at + name_at + len(name)] == name:
                struct.pack_into("<H", data, at + method_at, method)
                struct.pack_into("<I", data, at + crc_at, crc)
                struct.pack_into("<I", data, at + size_at, size)
            start = at + 4
    return bytes(data)


def legacy_ckpt() -> bytes:
    return torch_save_bytes({"model.diffusion_model.w": torch.arange(8, dtype=torch.float32)},
                            _use_new_zipfile_serialization=False)


def torchscript_bytes() -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit's deprecation notices (building the archive is not under test)
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    suffix: str
    build: Callable[[], bytes]
    expect: tuple[str, ...]  # words the one-line message must contain


CASES: tuple[Case, ...] = (
    # safetensors header: dtype strings only, from the known set
    Case("dtype_list", ".safetensors", lambda: one_tensor(dtype=["F32"]), ("unsupported dtype",)),
    Case("dtype_number", ".safetensors", lambda: one_tensor(dtype=32), ("unsupported dtype",)),
    Case("dtype_unknown", ".safetensors", lambda: one_tensor(dtype="Q7"), ("unsupported dtype",)),
    # shapes: non-negative ints, no overflow
    Case("shape_2_63", ".safetensors", lambda: one_tensor(shape=[2**63]), ("bad shape",)),
    Case("shape_2_64", ".safetensors", lambda: one_tensor(shape=[2**64]), ("bad shape",)),
    Case("shape_true", ".safetensors", lambda: one_tensor(shape=[True, 4]), ("bad shape",)),
    Case("shape_nested", ".safetensors", lambda: one_tensor(shape=[[4]]), ("bad shape",)),
    Case("shape_float", ".safetensors", lambda: one_tensor(shape=[4.0]), ("bad shape",)),
    Case("shape_negative", ".safetensors", lambda: one_tensor(shape=[-4]), ("bad shape",)),
    Case("shape_empty_but_huge", ".safetensors",
         lambda: safetensors_bytes({"w": {"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [0, 0]}}, b""),
         ("too many elements",)),
    Case("shape_span_mismatch", ".safetensors", lambda: one_tensor(shape=[4, 4]), ("needs 64 bytes", "span 16")),
    # offsets
    Case("offsets_outside", ".safetensors", lambda: one_tensor(data_offsets=[0, 64]), ("outside",)),
    Case("offsets_backwards", ".safetensors", lambda: one_tensor(data_offsets=[16, 0]), ("outside",)),
    Case("offsets_gap", ".safetensors",
         lambda: safetensors_bytes({"w": {**F32, "data_offsets": [16, 32]}}, bytes(32)), ("gap",)),
    Case("offsets_overlap", ".safetensors",
         lambda: safetensors_bytes({"a": F32, "b": F32}, bytes(16)), ("overlaps",)),
    Case("offsets_uncovered", ".safetensors", lambda: safetensors_bytes({"w": F32}, bytes(24)), ("cover 16 of",)),
    # JSON bounded before parsing
    Case("json_deep", ".safetensors", lambda: safetensors_bytes(b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                                                                 b""), ("nested deeper",)),
    Case("json_digits", ".safetensors",
         lambda: safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 16]}}',
                                   bytes(16)), ("more than 20 digits",)),
    Case("header_limit", ".safetensors", lambda: safetensors_bytes({"w": F32}, bytes(16), header_len=100_000_001),
         ("100,000,000",)),
    Case("header_not_json", ".safetensors", lambda: safetensors_bytes(b"{oops}", bytes(16)), ("not JSON",)),
    Case("header_duplicate_name", ".safetensors",
         lambda: safetensors_bytes(b'{"w": ' + json.dumps(F32).encode() + b', "w": ' + json.dumps(F32).encode()
                                   + b"}", bytes(16)), ("appears twice",)),
    Case("metadata_not_strings", ".safetensors",
         lambda: safetensors_bytes({"__metadata__": {"format": 1}, "w": F32}, bytes(16)), ("__metadata__",)),
    # names are untrusted text
    Case("control_characters_in_name", ".safetensors",
         lambda: safetensors_bytes({CONTROL_NAME: {**F32, "dtype": "F32\x1b[31m"}}, bytes(16)),
         ("unsupported dtype", "\\x1b", "\\u202e")),
    Case("name_lone_surrogate", ".safetensors",
         lambda: safetensors_bytes(b'{"w\\ud800": ' + json.dumps(F32).encode() + b"}", bytes(16)),
         ("not valid Unicode", "\\ud800")),
    # .ckpt: every unpickler error is the one-line bad-checkpoint error
    Case("ckpt_saved_id_not_tuple", ".ckpt", lambda: with_pickle(b"\x80\x02K\x01Q."),
         ("bad checkpoint", "AssertionError")),
    Case("ckpt_global_with_control_characters", ".ckpt",
         lambda: with_pickle(b"\x80\x02" + _global("os", "sys\x1b[2Jtem") + b"(tR."), ("refused", "\\x1b[2J")),
    Case("ckpt_unknown_codec", ".ckpt", lambda: with_pickle(codec_call(_unicode("abc"), _unicode("no-such-codec"))),
         ("bad checkpoint", "LookupError")),
    Case("ckpt_type_error", ".ckpt", lambda: with_pickle(codec_call(b"K\x01")), ("bad checkpoint", "TypeError")),
    Case("ckpt_deflate_bomb", ".ckpt", lambda: deflate_bomb(2.0), ("would decompress", "refused before reading")),
    Case("ckpt_deflated_storage_bomb", ".ckpt", lambda: deflate_bomb(1.0, "data/0"),
         ("would decompress to", "over 2 times the file", "refused before reading")),
    Case("ckpt_pickle_too_long", ".ckpt", lambda: with_pickle(b"\x80\x02" + b"N" * (5 << 20) + b"}."),
         ("would decompress to 5,242,884 bytes", "refused before reading")),
    Case("ckpt_legacy_pickle_too_long", ".ckpt",
         lambda: legacy_ckpt().replace(b"\x80\x02}", b"\x80\x02" + b"N" * (5 << 20) + b"}", 1),
         ("a pickle longer than 4,194,304 bytes",)),
    Case("ckpt_lying_deflate", ".ckpt", lambda: lying_deflate(), ("bad checkpoint",)),
    Case("ckpt_bzip2_member", ".ckpt", lambda: rezip(small_ckpt(), compression=zipfile.ZIP_BZIP2),
         ("compression method 12",)),
    Case("ckpt_truncated_zip", ".ckpt", lambda: small_ckpt()[:-100], ("truncated",)),
    Case("ckpt_legacy_truncated_in_pickle", ".ckpt", lambda: legacy_ckpt()[:200], ("truncated",)),
    Case("ckpt_legacy_truncated_in_data", ".ckpt", lambda: legacy_ckpt()[:-5], ("truncated",)),
    Case("ckpt_torchscript", ".ckpt", torchscript_bytes, ("TorchScript",)),
    Case("ckpt_stride_zero_view", ".ckpt",
         lambda: torch_save_bytes({"model.diffusion_model.w": torch.zeros(1).expand(1_000_000)}),
         ("claims 1,000,000 elements",)),
)
