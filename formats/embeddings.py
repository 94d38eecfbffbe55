"""Textual-inversion embeddings as AUTOMATIC1111 (v1.10.1, ``textual_inversion.py``) loads and triggers them.

Files in a directory (recursively, sorted; empty files ignored), named by their file stem, which is the word that
triggers them in a prompt:

* ``.pt`` / ``.bin``: ``{"string_to_param": {token: [n, w]}, ...}`` (A1111 / original TI; ``step``,
  ``sd_checkpoint``, ``sd_checkpoint_name`` kept), or a diffusers-style ``{token: [w] or [n, w]}``;
* ``.safetensors``: kohya SDXL ``{"clip_l": [n, wl], "clip_g": [n, wg]}``, or any single tensor (kohya SD1's
  ``emb_params``).

Pickles are read with ``torch.load(weights_only=True)`` and the checkpoint module's allowlist, plus an inert
stand-in for ``torch.nn.ParameterDict`` (older TI files pickle ``string_to_param`` as one). A file whose width does
not fit the model (SD1 / SD2: the text width; SDXL: CLIP-L + OpenCLIP widths, split as the towers) is skipped with
one line naming it; so is a file that cannot be read. The ``TI hashes`` infotext value uses the first 12 hex
digits of the file's sha256, as A1111's ``Embedding.shorthash``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from tritonsd.escape import escape
from tritonsd.formats.checkpoint import ALLOWED_PICKLE_GLOBALS, CheckpointError, check_pickle_container, read_checkpoint

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")
MAX_EMBEDDING_BYTES = 64 << 20  # released embeddings are kilobytes; a larger file is refused before it is read
MAX_VECTORS = 1000  # A1111's own training tab stops at 75


class EmbeddingError(ValueError):
    """An embedding file that cannot be used (one line, naming the file)."""


class _ParameterDictPlaceholder:
    """Stands in for ``torch.nn.modules.container.ParameterDict`` while unpickling: keeps only its parameters."""

    def __init__(self, *args, **kwargs) -> None:
        self._parameters: dict = {}

    def __setstate__(self, state) -> None:
        params = state.get("_parameters", {}) if isinstance(state, dict) else {}
        self._parameters = {k: v for k, v in params.items() if isinstance(v, torch.Tensor)}


_EMBEDDING_PICKLE_GLOBALS = (*ALLOWED_PICKLE_GLOBALS,
                             (_ParameterDictPlaceholder, "torch.nn.modules.container.ParameterDict"))


def printable(text: str) -> str:
    """A file-derived name with control characters escaped, safe to print on one line (``tritonsd.escape``)."""
    return escape(text)


@dataclass
class Embedding:
    name: str
    vec: torch.Tensor | dict[str, torch.Tensor]  # [vectors, width] float32, or SDXL {"clip_l", "clip_g"}
    vectors: int
    shape: int  # total width (SDXL: clip_l + clip_g)
    filename: str = ""
    hash: str = ""  # sha256 of the file, hex
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def vectors_for(self, key: str) -> torch.Tensor:
        """The [n, width] rows for one tower ("clip_l" / "clip_g"; a plain embedding serves every tower)."""
        return self.vec[key] if isinstance(self.vec, dict) else self.vec


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_pickle(path: Path):
    try:
        check_pickle_container(path)  # the checkpoint reader's zip / pickle bounds, before torch.load
    except CheckpointError as e:
        raise EmbeddingError(str(e)) from None
    try:
        with torch.serialization.safe_globals(list(_EMBEDDING_PICKLE_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's multi-line protocol warnings on odd files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EmbeddingError(f"{printable(path.name)}: refused to load (the pickle holds something other than "
                             f"tensors and plain data)") from None
    except Exception as e:  # torch's unpickler raises many types (struct.error, ...) on a damaged file
        raise EmbeddingError(f"{printable(path.name)}: not a readable torch file ({type(e).__name__})") from None


def _as_rows(t, path: Path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2) or t.numel() == 0:
        raise EmbeddingError(f"{printable(path.name)}: the embedding is not a [vectors, width] float tensor")
    if t.dim() == 2 and t.shape[0] > MAX_VECTORS:
        raise EmbeddingError(f"{printable(path.name)}: {t.shape[0]} vectors; the limit is {MAX_VECTORS}")
    if not torch.isfinite(t).all():
        raise EmbeddingError(f"{printable(path.name)}: the embedding holds NaN or Inf")
    return (t.unsqueeze(0) if t.dim() == 1 else t).detach().to(torch.float32)


def embedding_from_data(data, name: str, path: Path) -> Embedding:
    """``create_embedding_from_data``: the three layouts A1111 recognises."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"{printable(path.name)}: not an embedding (holds a {type(data).__name__})")
    extra = {}
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{printable(path.name)}: embedding file has multiple (or no) terms in it")
        vec = _as_rows(next(iter(params.values())), path)
        shape, vectors = vec.shape[-1], vec.shape[0]
        extra = {k: data.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
        extra = {k: v if isinstance(v, (int, str)) else None for k, v in extra.items()}
    elif all(k in data for k in SDXL_KEYS):
        vec = {k: _as_rows(data[k], path) for k in SDXL_KEYS}
        shape = vec["clip_g"].shape[-1] + vec["clip_l"].shape[-1]
        vectors = vec["clip_g"].shape[0]
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vec = _as_rows(next(iter(data.values())), path)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise EmbeddingError(f"{printable(path.name)}: neither a textual-inversion embedding nor a diffusers "
                             f"concept")
    return Embedding(name=name, vec=vec, vectors=int(vectors), shape=int(shape), filename=str(path), **extra)


def load_embedding_file(path: str | Path) -> Embedding:
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EmbeddingError(f"{printable(path.name)}: cannot read ({e.strerror or e})") from None
    if not path.is_file():
        raise EmbeddingError(f"{printable(path.name)}: not a regular file")
    if size > MAX_EMBEDDING_BYTES:
        raise EmbeddingError(f"{printable(path.name)}: {size:,} bytes is not an embedding (the limit is "
                             f"{MAX_EMBEDDING_BYTES:,})")
    if suffix == ".safetensors":
        try:
            data = read_checkpoint(path)
        except CheckpointError as e:
            raise EmbeddingError(str(e)) from None
    elif suffix in (".pt", ".bin"):
        data = _read_pickle(path)
    else:
        raise EmbeddingError(f"{printable(path.name)}: not an embedding file ({', '.join(EMBEDDING_SUFFIXES)})")
    embedding = embedding_from_data(data, path.stem, path)
    embedding.hash = _sha256(path)
    return embedding


@dataclass
class EmbeddingDatabase:
    """Loaded embeddings for one model, looked up by the token ids of their names (A1111's ``ids_lookup``).

    ``widths``: the text towers' widths with their vector keys, e.g. ``{"clip_l": 768}`` (SD1; SD2 uses the key
    "clip_l" too, as A1111) or ``{"clip_l": 768, "clip_g": 1280}`` (SDXL). ``tokenizer`` gives the name ids (A1111
    uses the model's first tokenizer).
    """

    tokenizer: object
    widths: dict[str, int]
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> one-line reason
    _lookup: dict[int, list[tuple[list[int], Embedding]]] = field(default_factory=dict)

    @property
    def expected_shape(self) -> int:
        return sum(self.widths.values())

    def fits(self, embedding: Embedding) -> bool:
        if embedding.shape != self.expected_shape:
            return False
        if isinstance(embedding.vec, dict):
            return all(embedding.vec[k].shape[-1] == w for k, w in self.widths.items())
        return len(self.widths) == 1

    def register(self, embedding: Embedding) -> None:
        ids = list(self.tokenizer.encode(embedding.name))
        if not ids:
            raise EmbeddingError(f"{printable(embedding.name)}: the name has no tokens to trigger it")
        old = self.embeddings.get(embedding.name)
        if old is not None:
            for entries in self._lookup.values():
                entries[:] = [e for e in entries if e[1] is not old]
        entries = self._lookup.setdefault(ids[0], [])
        entries.append((ids, embedding))
        entries.sort(key=lambda e: len(e[0]), reverse=True)
        self.embeddings[embedding.name] = embedding

    def add(self, embedding: Embedding) -> str | None:
        """Register if it fits; else record it as skipped and return the one-line reason."""
        if not self.fits(embedding):
            reason = (f"embedding {printable(embedding.name)} skipped: width {embedding.shape} does not fit this "
                      f"model ({self.expected_shape})")
            self.skipped[embedding.name] = reason
            return reason
        self.register(embedding)
        return None

    def find_at(self, tokens: Sequence[int], offset: int):
        for ids, embedding in self._lookup.get(tokens[offset], ()):
            if list(tokens[offset:offset + len(ids)]) == ids:
                return embedding, len(ids)
        return None, 0


def embedding_files(directory: str | Path) -> list[Path]:
    """Embedding files under ``directory`` (recursively, links followed), sorted, empty files left out."""
    out = []
    for root, _dirs, files in os.walk(directory, followlinks=True):
        for fn in files:
            p = Path(root) / fn
            if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file() and p.stat().st_size > 0:
                out.append(p)
    return sorted(out)


def load_embeddings(directory: str | Path, tokenizer, widths: dict[str, int]) -> tuple[EmbeddingDatabase,
                                                                                       list[str]]:
    """(database, messages): every usable file of ``directory`` registered; one message line per file skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EmbeddingError(f"embeddings directory {printable(str(directory))} does not exist")
    db = EmbeddingDatabase(tokenizer=tokenizer, widths=dict(widths))
    messages = []
    for path in embedding_files(directory):
        try:
            reason = db.add(load_embedding_file(path))
        except EmbeddingError as e:
            reason = f"embedding file skipped: {e}"
            db.skipped[path.stem] = reason
        if reason:
            messages.append(reason)
    return db, messages


def ti_hashes(used_per_call: Sequence[Sequence[Embedding]]) -> str:
    """The ``TI hashes`` infotext value as A1111 accumulates it: each encoder call (one text tower, one batch of
    prompts) puts its own ``name: shorthash`` entries (names without ':' and ',') before the value so far. So an
    SDXL prompt lists each embedding twice, once per tower, as A1111 does."""
    value = ""
    for used in used_per_call:
        unique = {e.name: e for e in used}
        entries = [f"{n.replace(':', '').replace(',', '')}: {e.shorthash}" for n, e in unique.items()
                   if e.shorthash]
        if entries:
            value = ", ".join(entries + ([value] if value else []))
    return value


__all__ = ["Embedding", "EmbeddingDatabase", "EmbeddingError", "embedding_files", "embedding_from_data",
           "load_embedding_file", "load_embeddings", "ti_hashes"]
