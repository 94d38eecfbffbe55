"""Structure-aware mutations of real checkpoints, for the reader fuzzers (tests/test_fuzz_readers.py under
Hypothesis, benchmarks/fuzz_readers.py for the long run and atheris).

A mutation starts from a seed file (the fixtures sd1-tiny.safetensors and sd1-tiny.ckpt, and the ckpt's weights
re-saved in torch's legacy format) and changes one thing of one class: the safetensors header framing or JSON,
a tensor's offsets, dtype, shape or name, the zip container's members, the pickle's opcodes, or the file's
length. Every choice goes through a ``Draw`` (Hypothesis data, a seeded ``random.Random`` or atheris' data
provider), so a failing case is reproducible from its draws. ``check_outcome`` is the property: every outcome
is our ``CheckpointError`` with one printable line naming the file, or a clean load.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import random
import struct
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

CLASSES = ("header", "offsets", "dtypes", "shapes", "names", "zip_members", "pickle_opcodes", "truncation")

INTERESTING_INTS = (0, 1, 2, 3, 4, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62,
                    2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -2, -(2**63), 10**30)
NASTY_TEXT = ("", " ", "\x1b[2J\x1b]0;pwned\x07", "line\nforged", "\u202egpj.exe", "\x00", "\ud800", "é東🙂",
              "x" * 10_000, "__metadata__", "model.diffusion_model.out.2.weight", "../../etc/passwd", "\x9b31m")


class Draw:
    """The choices a mutation makes."""

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, options: Sequence):
        return options[self.integer(0, len(options) - 1)]

    def raw(self, n: int) -> bytes:
        return bytes(self.integer(0, 255) for _ in range(n))


class RandomDraw(Draw):
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def raw(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class HypothesisDraw(Draw):
    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def raw(self, n: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=n, max_size=n))


class AtherisDraw(Draw):
    def __init__(self, provider) -> None:
        self.p = provider

    def integer(self, lo: int, hi: int) -> int:
        return self.p.ConsumeIntInRange(lo, hi)

    def raw(self, n: int) -> bytes:
        return self.p.ConsumeBytes(n).ljust(n, b"\0")


# ---------------------------------------------------------------------------------------------------------------
# Seeds


@dataclass
class SafetensorsSeed:
    header: dict
    data: bytes  # the data section

    @classmethod
    def parse(cls, blob: bytes) -> SafetensorsSeed:
        (n,) = struct.unpack("<Q", blob[:8])
        return cls(json.loads(blob[8:8 + n]), blob[8 + n:])


@dataclass
class ZipSeed:
    members: list[tuple[str, bytes]]  # in archive order; data.pkl first

    @classmethod
    def parse(cls, blob: bytes) -> ZipSeed:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return cls([(i.filename, z.read(i.filename)) for i in z.infolist()])

    def pickle_name(self) -> str:
        return next(n for n, _ in self.members if n.endswith("/data.pkl"))


@dataclass
class LegacySeed:
    blob: bytes
    main: tuple[int, int]  # the main pickle's [begin, end) in the file

    @classmethod
    def parse(cls, blob: bytes) -> LegacySeed:
        f = io.BytesIO(blob)
        bounds = []
        for _ in range(5):  # magic, protocol, sys_info, the object, storage keys
            begin = f.tell()
            for _op in pickletools.genops(f):
                pass
            bounds.append((begin, f.tell()))
        return cls(blob, bounds[3])


@dataclass
class Seeds:
    safetensors: SafetensorsSeed
    zip: ZipSeed
    legacy: LegacySeed
    blobs: dict[str, bytes]  # kind -> the seed file's bytes

    @classmethod
    def load(cls, fixtures: Path) -> Seeds:
        import torch

        st = (fixtures / "sd1-tiny.safetensors").read_bytes()
        ck = (fixtures / "sd1-tiny.ckpt").read_bytes()
        weights = torch.load(io.BytesIO(ck), map_location="cpu", weights_only=True)
        buf = io.BytesIO()
        torch.save(weights, buf, _use_new_zipfile_serialization=False)
        legacy = buf.getvalue()
        return cls(SafetensorsSeed.parse(st), ZipSeed.parse(ck), LegacySeed.parse(legacy),
                   {"safetensors": st, "zip": ck, "legacy": legacy})


@dataclass
class Case:
    cls: str
    what: str  # a short description of the mutation
    suffix: str
    data: bytes


# ---------------------------------------------------------------------------------------------------------------
# Building files back


def safetensors_file(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len % 2**64) + raw + data


def zip_file(members: list[tuple[str, bytes]],
             compress: Callable[[str], int] = lambda name: zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
        warnings.simplefilter("ignore")  # "Duplicate name": a duplicated member is one of the mutations
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = compress(name)
            z.writestr(info, data)
    return out.getvalue()


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _with_entry(seed: SafetensorsSeed, draw: Draw, **change) -> tuple[dict, str]:
    name = draw.choice(_tensor_names(seed.header))
    header = dict(seed.header)
    header[name] = {**header[name], **change}
    return header, name


def _value(draw: Draw, kinds: Sequence[str]) -> object:
    kind = draw.choice(kinds)
    if kind == "int":
        return draw.choice(INTERESTING_INTS) + draw.integer(-2, 2)
    if kind == "text":
        return draw.choice(NASTY_TEXT)
    return {"null": None, "true": True, "false": False, "float": 4.0, "list": [], "nested": [[4]],
            "object": {"a": 1}, "inf": 1e308 * 10}[kind]


# ---------------------------------------------------------------------------------------------------------------
# Mutations by class


def mutate_header(s: Seeds, draw: Draw) -> Case:
    seed = s.safetensors
    raw = json.dumps(seed.header).encode()
    how = draw.integer(0, 5)
    if how == 0:
        n = draw.choice(INTERESTING_INTS + (len(raw) - 1, len(raw) + 1, len(raw) + 8, 100_000_000, 100_000_001,
                                            100 * 1024 * 1024))
        return Case("header", f"header length {n}", ".safetensors", safetensors_file(raw, seed.data, n))
    if how == 1:
        b = bytearray(raw)
        for _ in range(draw.integer(1, 8)):
            b[draw.integer(0, len(b) - 1)] = draw.integer(0, 255)
        return Case("header", "header bytes flipped", ".safetensors", safetensors_file(bytes(b), seed.data))
    if how == 2:
        at = draw.integer(0, len(raw))
        if draw.integer(0, 1):
            cut = raw[:at] + raw[at + draw.integer(1, 64):]
        else:
            cut = raw[:at] + draw.choice((b"{", b"[", b"}", b"]", b",", b'"', b"\\", b"\xff", b"\x00",
                                          b"99999999999999999999999")) + raw[at:]
        return Case("header", "header bytes inserted or deleted", ".safetensors", safetensors_file(cut, seed.data))
    if how == 3:
        depth = draw.choice((9, 100, 5_000, 200_000))
        body = draw.choice((b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth))
        return Case("header", f"JSON nested {depth} deep", ".safetensors",
                    safetensors_file(b'{"x": ' + body + b"}", seed.data))
    if how == 4:
        digits = draw.choice((21, 25, 100, 4_300, 4_301, 50_000))
        name = draw.choice(_tensor_names(seed.header))
        entry = json.dumps({**seed.header[name], "shape": [0]}).replace("[0]", "[" + "7" * digits + "]")
        text = raw.decode().replace(json.dumps(name) + ": " + json.dumps(seed.header[name]),
                                    json.dumps(name) + ": " + entry)
        return Case("header", f"a {digits}-digit number", ".safetensors", safetensors_file(text.encode(), seed.data))
    top = draw.choice((b"[]", b'"x"', b"1", b"null", b"{}", b"\xef\xbb\xbf" + raw, b"  " + raw + b"  ",
                       raw + b" trailing", raw[:-1] + b', "' + b"\\ud800" + b'": 1}'))
    meta = draw.choice((None, 1, [], {"a": 1}, {"a": None}, {"a": "x" * 1000}))
    if draw.integer(0, 1):
        return Case("header", "header top level replaced", ".safetensors", safetensors_file(top, seed.data))
    return Case("header", f"__metadata__ {str(meta)[:20]}", ".safetensors",
                safetensors_file({"__metadata__": meta, **seed.header}, seed.data))


def mutate_offsets(s: Seeds, draw: Draw) -> Case:
    seed = s.safetensors
    name = draw.choice(_tensor_names(seed.header))
    begin, end = seed.header[name]["data_offsets"]
    how = draw.integer(0, 3)
    if how == 0:
        offsets = [begin + draw.integer(-9, 9), end + draw.integer(-9, 9)]
    elif how == 1:
        offsets = [draw.choice(INTERESTING_INTS), draw.choice(INTERESTING_INTS + (end, len(seed.data)))]
    elif how == 2:
        other = draw.choice(_tensor_names(seed.header))
        offsets = list(seed.header[other]["data_offsets"])
    else:
        offsets = draw.choice(([begin], [begin, end, end], [str(begin), end], [float(begin), end], None, begin,
                               [[begin], end], [True, end], {"begin": begin}))
    header = dict(seed.header)
    header[name] = {**header[name], "data_offsets": offsets}
    return Case("offsets", f"offsets {str(offsets)[:40]}", ".safetensors", safetensors_file(header, seed.data))


_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "F8_E4M3",
           "F8_E5M2", "F8_E8M0", "C64", "F4", "f32", "F32 ", "Q7", "", "F32\x1b[31m", "F128")


def mutate_dtypes(s: Seeds, draw: Draw) -> Case:
    dtype = draw.choice(_DTYPES) if draw.integer(0, 3) else _value(draw, ("int", "null", "list", "object", "true"))
    header, name = _with_entry(s.safetensors, draw, dtype=dtype)
    return Case("dtypes", f"dtype {dtype!r}"[:60], ".safetensors", safetensors_file(header, s.safetensors.data))


def mutate_shapes(s: Seeds, draw: Draw) -> Case:
    seed = s.safetensors
    name = draw.choice(_tensor_names(seed.header))
    shape = list(seed.header[name]["shape"])
    how = draw.integer(0, 4)
    if how == 0 and shape:
        shape[draw.integer(0, len(shape) - 1)] = draw.choice(INTERESTING_INTS)
    elif how == 1:
        shape = draw.choice(([2**63], [2**64], [True], [[4]], [], [0], [-1], [4.0], ["4"], None, 4, [0, 2**62, 4],
                             [1] * 70, [1] * 1000, [0] * 65, [2**32, 2**32, 0]))
    elif how == 2:
        shape = shape[::-1] + draw.choice(([], [1], [1, 1]))  # same element count: a clean load
    elif how == 3 and shape:
        shape[draw.integer(0, len(shape) - 1)] *= draw.choice((2, 0))
    else:
        shape.insert(draw.integer(0, len(shape)), draw.choice((1, 0, 2)))
    header = dict(seed.header)
    header[name] = {**header[name], "shape": shape}
    return Case("shapes", f"shape {str(shape)[:40]}", ".safetensors", safetensors_file(header, seed.data))


def mutate_names(s: Seeds, draw: Draw) -> Case:
    if draw.integer(0, 1):
        seed = s.safetensors
        old = draw.choice(_tensor_names(seed.header))
        new = draw.choice(NASTY_TEXT + tuple(_tensor_names(seed.header)[:3]))
        if new in seed.header and new != old:  # a duplicate name, which a dict cannot hold: splice the JSON
            raw = json.dumps(seed.header).replace(json.dumps(old) + ":", json.dumps(new) + ":", 1).encode()
            return Case("names", "duplicate tensor name", ".safetensors", safetensors_file(raw, seed.data))
        header = {(new if k == old else k): v for k, v in seed.header.items()}
        return Case("names", f"renamed to {new[:20]!r}", ".safetensors", safetensors_file(header, seed.data))
    # a string in the pickle (tensor names, storage keys, locations), re-encoded with its new length
    pkl = dict(s.zip.members)[s.zip.pickle_name()]
    strings = [(op, arg, pos) for op, arg, pos in _ops(pkl) if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
    op, arg, pos = draw.choice(strings)
    new = draw.choice(NASTY_TEXT + ("99999", "cuda:0", "meta", "0", "storage"))
    encoded = new.encode("utf-8", "surrogatepass")
    length = 1 + (4 if op.name == "BINUNICODE" else 1) + len(arg.encode("utf-8", "surrogatepass"))
    replacement = b"X" + struct.pack("<I", len(encoded)) + encoded
    return _zip_with_pickle(s, "names", f"pickle string {arg[:20]!r} -> {new[:20]!r}",
                            pkl[:pos] + replacement + pkl[pos + length:])


_GLOBALS = (("os", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("torch._utils", "_rebuild_tensor_v2"),
            ("_codecs", "encode"), ("collections", "OrderedDict"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
            ("torch", "LongStorage"), ("torch", "BoolStorage"), ("numpy.core.multiarray", "scalar"),
            ("torch._utils", "_rebuild_parameter"), ("torch", "Size"), ("os\x1b[2J", "sys\ntem"), ("torch", "device"),
            ("torch._utils", "_rebuild_sparse_tensor"), ("torch._utils", "_rebuild_qtensor"))


def mutate_pickle(s: Seeds, draw: Draw) -> Case:
    legacy = draw.integer(0, 3) == 0
    if legacy:
        begin, end = s.legacy.main
        pkl = s.legacy.blob[begin:end]
    else:
        pkl = dict(s.zip.members)[s.zip.pickle_name()]
    ops = _ops(pkl)
    how = draw.integer(0, 5)
    op, arg, pos = draw.choice(ops)
    nxt = next((p for _, _, p in ops if p > pos), len(pkl))
    if how == 0:
        b = bytearray(pkl)
        for _ in range(draw.integer(1, 4)):
            b[draw.integer(0, len(b) - 1)] = draw.integer(0, 255)
        new, what = bytes(b), "bytes flipped"
    elif how == 1:
        ints = [(o, a, p) for o, a, p in ops if o.name in ("BININT1", "BININT2", "BININT", "LONG1")]
        o, a, p = draw.choice(ints)
        v = draw.choice(INTERESTING_INTS) + draw.integer(-1, 1)
        end_ = next(q for _, _, q in ops if q > p)
        new, what = pkl[:p] + _int_op(v) + pkl[end_:], f"int {a} -> {v}"
    elif how == 2:
        globs = [(o, a, p) for o, a, p in ops if o.name == "GLOBAL"]
        o, a, p = draw.choice(globs)
        module, name = draw.choice(_GLOBALS)
        end_ = next(q for _, _, q in ops if q > p)
        new = pkl[:p] + b"c" + module.encode() + b"\n" + name.encode() + b"\n" + pkl[end_:]
        what = f"GLOBAL {a} -> {module} {name}"
    elif how == 3:
        new, what = pkl[:pos] + pkl[nxt:], f"{op.name} deleted"
    elif how == 4:
        new, what = pkl[:pos] + pkl[pos:nxt] + pkl[pos:], f"{op.name} duplicated"
    else:
        new, what = pkl[:pos] + draw.raw(draw.integer(1, 6)) + pkl[pos:], f"bytes inserted before {op.name}"
    if legacy:
        begin, end = s.legacy.main
        return Case("pickle_opcodes", "legacy: " + what, ".ckpt", s.legacy.blob[:begin] + new + s.legacy.blob[end:])
    return _zip_with_pickle(s, "pickle_opcodes", what, new)


def mutate_zip(s: Seeds, draw: Draw) -> Case:
    members = list(s.zip.members)
    root = members[0][0].split("/")[0]
    how = draw.integer(0, 6)
    i = draw.integer(0, len(members) - 1) if draw.integer(0, 2) else draw.integer(0, 6)  # the small records first
    name, data = members[i]
    if how == 0:
        del members[i]
        what = f"{name} removed"
    elif how == 1:
        new = draw.choice((f"{root}/constants.pkl", f"{root}/code/x.py", f"other/{name.split('/', 1)[1]}",
                           name.replace("data.pkl", "data.pk1"), name + "\x1b[2J", f"{root}/data.pkl"))
        members[i] = (new, data)
        what = f"{name} renamed {new!r}"
    elif how == 2:
        extra = draw.choice(((f"{root}/constants.pkl", b"\x80\x02}."), (f"{root}/extra", b"x" * 100),
                             (name, data)))
        members.insert(draw.integer(0, len(members)), extra)
        what = f"{extra[0]} added"
    elif how == 3:
        new_data = draw.choice((data[:-1], data + b"\0", b"", data * 2, b"garbage", b"big", b"little"))
        members[i] = (name, new_data)
        what = f"{name} content changed"
    elif how == 4:
        method = draw.choice((zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA))
        everything = method == zipfile.ZIP_DEFLATED and draw.integer(0, 1)  # (bzip2/lzma of 13 MB: seconds)
        blob = zip_file(members, lambda n: method if everything or n == name else zipfile.ZIP_STORED)
        return Case("zip_members", f"compressed with {method}", ".ckpt", blob)
    elif how == 5:
        return Case("zip_members", "central directory field patched", ".ckpt",
                    _patch_central_directory(zip_file(members), draw))
    else:
        blob = bytearray(s.blobs["zip"])
        cd = _central_directory_offset(bytes(blob))
        for _ in range(draw.integer(1, 6)):
            blob[draw.integer(cd, len(blob) - 1)] = draw.integer(0, 255)
        return Case("zip_members", "central directory bytes flipped", ".ckpt", bytes(blob))
    return Case("zip_members", what, ".ckpt", zip_file(members))


def mutate_truncation(s: Seeds, draw: Draw) -> Case:
    kind = draw.choice(("safetensors", "zip", "legacy"))
    blob = s.blobs[kind]
    n = draw.choice((draw.integer(0, 64), draw.integer(0, len(blob) - 1), len(blob) - draw.integer(1, 4096)))
    suffix = ".safetensors" if kind == "safetensors" else ".ckpt"
    return Case("truncation", f"{kind} cut to {max(n, 0)} bytes", suffix, blob[:max(n, 0)])


MUTATORS: dict[str, Callable[[Seeds, Draw], Case]] = {
    "header": mutate_header, "offsets": mutate_offsets, "dtypes": mutate_dtypes, "shapes": mutate_shapes,
    "names": mutate_names, "zip_members": mutate_zip, "pickle_opcodes": mutate_pickle,
    "truncation": mutate_truncation,
}


def make_case(seeds: Seeds, draw: Draw) -> Case:
    return MUTATORS[draw.choice(CLASSES)](seeds, draw)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


_OPS_CACHE: dict[int, list] = {}


def _ops(pkl: bytes) -> list:
    key = hash(pkl)
    if key not in _OPS_CACHE:
        _OPS_CACHE[key] = list(pickletools.genops(pkl))
    return _OPS_CACHE[key]


def _int_op(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = pickle.encode_long(v)
    return b"\x8a" + bytes([len(raw)]) + raw


def _zip_with_pickle(s: Seeds, cls: str, what: str, pkl: bytes) -> Case:
    name = s.zip.pickle_name()
    members = [(n, pkl if n == name else d) for n, d in s.zip.members]
    return Case(cls, what, ".ckpt", zip_file(members))


def _central_directory_offset(blob: bytes) -> int:
    eocd = blob.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<I", blob, eocd + 16)
    if offset == 0xFFFFFFFF:  # zip64: the real offset is in the zip64 end record
        z64 = blob.rfind(b"PK\x06\x06")
        (offset,) = struct.unpack_from("<Q", blob, z64 + 48)
    return offset


def _patch_central_directory(blob: bytes, draw: Draw) -> bytes:
    """One field of one central-directory entry (or of the end record) set to an interesting value."""
    data = bytearray(blob)
    cd = _central_directory_offset(blob)
    entries = []
    at = cd
    while data[at:at + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        entries.append(at)
        at += 46 + n + m + k
    fields = {"method": (10, "<H"), "crc": (16, "<I"), "compressed size": (20, "<I"),
              "uncompressed size": (24, "<I"), "name length": (28, "<H"), "local header offset": (42, "<I")}
    if draw.integer(0, 4) == 0:  # the end record: entry counts, directory size and offset
        eocd = blob.rfind(b"PK\x05\x06")
        off, fmt = draw.choice(((8, "<H"), (10, "<H"), (12, "<I"), (16, "<I")))
        limit = 2 ** (8 * struct.calcsize(fmt)) - 1
        struct.pack_into(fmt, data, eocd + off, min(draw.choice(INTERESTING_INTS) % (limit + 1), limit))
        return bytes(data)
    entry = draw.choice(entries)
    field = draw.choice(tuple(fields))
    off, fmt = fields[field]
    limit = 2 ** (8 * struct.calcsize(fmt)) - 1
    value = draw.choice(INTERESTING_INTS + (8, 12, 14, 99)) % (limit + 1)
    struct.pack_into(fmt, data, entry + off, value)
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------------
# The property


@dataclass
class Outcome:
    result: str  # "loaded" or "refused"
    seconds: float
    message: str = ""


def check_outcome(path: Path, time_limit: float = 10.0) -> Outcome:
    """Read ``path`` with every reader; raise AssertionError unless each ends in a clean load or our one-line
    CheckpointError naming the file, within ``time_limit``, with the file unchanged and the readers agreeing."""
    from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint, read_checkpoint_shapes

    before = (path.stat().st_size, path.stat().st_mtime_ns)
    start = time.perf_counter()
    results = []
    # a pickle's shapes come from loading it whole (the same path): only a .safetensors file has two readers
    readers = (read_checkpoint, read_checkpoint_shapes) if path.suffix == ".safetensors" else (read_checkpoint,)
    for reader in readers:
        try:
            out = reader(path)
        except CheckpointError as e:
            msg = str(e)
            assert "\n" not in msg and "\r" not in msg, f"{reader.__name__}: multi-line message {msg!r}"
            assert all(ch == " " or ch.isprintable() for ch in msg), f"{reader.__name__}: raw control in {msg!r}"
            assert msg.startswith(path.name + ":") or msg.startswith(str(path) + ":"), msg
            msg.encode("utf-8")
            results.append(("refused", msg))
        else:
            assert isinstance(out, dict) and all(isinstance(k, str) for k in out), reader.__name__
            results.append(("loaded", {k: (tuple(v.shape), v.dtype) for k, v in out.items()}))
    seconds = time.perf_counter() - start
    assert seconds < time_limit, f"took {seconds:.1f} s"
    assert (path.stat().st_size, path.stat().st_mtime_ns) == before, "the input changed"
    (a, a_detail), (b, b_detail) = results[0], results[-1]
    assert a == b, f"the readers disagree: read_checkpoint {a} ({str(a_detail)[:200]}), shapes {b} " \
                   f"({str(b_detail)[:200]})"
    if a == "loaded":
        assert a_detail == b_detail, "read_checkpoint and read_checkpoint_shapes see different tensors"
    return Outcome(a, seconds, a_detail if a == "refused" else "")
