"""What the server can load or apply, found in its folders: checkpoints (``--checkpoint`` and ``--models-dir``),
VAEs (``--vae-dir``), LoRAs (``--lora-dir``) and embeddings (``--embeddings-dir``), named as A1111 names them
(``sd_models.CheckpointInfo``: title ``name [shorthash]``, model_name, sha256)."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tritonsd.serve.errors import NotFound, printable
from tritonsd.formats.hashes import sha256_file
from tritonsd.formats.checkpoint import CheckpointError, validate_safetensors_header
from tritonsd.formats.embeddings import EmbeddingError, embedding_files, load_embedding_file
from tritonsd.lora.apply import lora_names

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
DEMO_PREFIX = "demo:"
_STRIP_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")  # A1111's re_strip_checksum


@dataclass
class Checkpoint:
    path: str  # a file path, or "demo:sd1"
    name: str  # A1111's: the path relative to the models folder ("sub/model.safetensors")
    config: str | None = None  # a YAML beside it (or --config for --checkpoint)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def is_demo(self) -> bool:
        return self.path.startswith(DEMO_PREFIX)

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]

    @property
    def sha256(self) -> str | None:
        return self._sha256

    @property
    def shorthash(self) -> str | None:
        return self._sha256[:10] if self._sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    def hash_now(self) -> None:
        """Compute the sha256 (seconds for a multi-GB file; done in the background at start)."""
        if self._sha256 is None and not self.is_demo:
            self._sha256 = sha256_file(self.path)

    def aliases(self) -> set[str]:
        name_for_extra = os.path.splitext(os.path.basename(self.name))[0]
        names = {self.title, self.name, self.model_name, os.path.splitext(self.name)[0], self.path, name_for_extra}
        if self._sha256:
            names |= {self._sha256, self.shorthash, f"{name_for_extra} [{self.shorthash}]"}  # + the short title
        return names

    def item(self) -> dict:
        """``/sdapi/v1/sd-models``' row."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": self.path, "config": self.config}


def _files(directory: str | os.PathLike | None, suffixes: tuple[str, ...]) -> list[Path]:
    if directory is None or not Path(directory).is_dir():
        return []
    out = []
    for root, _dirs, files in os.walk(directory, followlinks=True):
        for fn in files:
            p = Path(root) / fn
            if p.suffix.lower() in suffixes and p.is_file():
                out.append(p)
    return sorted(out)


def _yaml_beside(path: Path) -> str | None:
    y = path.with_suffix(".yaml")
    return str(y) if y.is_file() else None


class Catalog:
    """The checkpoints, VAEs, LoRAs and embeddings; ``refresh()`` re-reads the folders."""

    def __init__(self, checkpoint: str, *, config: str | None = None, models_dir=None, vae_dir=None, lora_dir=None,
                 embeddings_dir=None):
        self.models_dir, self.vae_dir = models_dir, vae_dir
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self._lock = threading.Lock()
        if checkpoint.startswith(DEMO_PREFIX):
            self.main = Checkpoint(checkpoint, checkpoint)
        else:
            p = Path(checkpoint).resolve()
            self.main = Checkpoint(str(p), p.name, config or _yaml_beside(p))
        self.checkpoints: list[Checkpoint] = [self.main]
        self._hashing = threading.Lock()  # held by the one hashing pass
        self._hash_again = threading.Event()  # a refresh during a pass: one more round for what it found
        self._listed: dict[str, tuple] = {}  # path -> (file signature, listing row or None): LoRA / embedding rows
        self.refresh()

    def refresh(self) -> None:
        known = {c.path: c for c in self.checkpoints}
        found = [self.main]
        for p in _files(self.models_dir, CHECKPOINT_SUFFIXES):
            path = str(p.resolve())
            if path == self.main.path:
                continue
            c = known.get(path) or Checkpoint(path, p.relative_to(self.models_dir).as_posix(), _yaml_beside(p))
            found.append(c)
        with self._lock:
            self.checkpoints = found

    def hash_all(self) -> None:
        for c in list(self.checkpoints):
            try:
                c.hash_now()
            except OSError:
                pass

    def start_hashing(self) -> bool:
        """Hash the checkpoints not hashed yet on a background thread, one pass at a time: called while a pass
        runs, it asks that pass for one more round (which hashes only what is new) instead of starting a second
        reader of the same files. True when it started a pass."""
        self._hash_again.set()
        if not self._hashing.acquire(blocking=False):
            return False

        def run():
            try:
                while self._hash_again.is_set():
                    self._hash_again.clear()
                    self.hash_all()
            finally:
                self._hashing.release()

        threading.Thread(target=run, name="tritonsd-hash", daemon=True).start()
        return True

    def find_checkpoint(self, name) -> Checkpoint:
        """By A1111's aliases: title, name, model_name, short or full hash; NotFound otherwise."""
        if not isinstance(name, str) or not name.strip():
            raise NotFound(f"model {printable(name)!r} not found")
        wanted = name.strip()
        stripped = _STRIP_CHECKSUM.sub("", wanted)  # "name [hash]" of a file not hashed yet: by its name (A1111's)
        for pass_ in (0, 1):
            for text in dict.fromkeys((wanted, stripped)):
                for c in self.checkpoints:
                    if text in c.aliases():
                        return c
            if pass_ == 0:
                self.refresh()
        raise NotFound(f"model {printable(wanted)!r} not found; GET /sdapi/v1/sd-models lists the models")

    # ------------------------------------------------------------ VAEs

    def vaes(self) -> list[dict]:
        return [{"model_name": p.name, "filename": str(p)} for p in _files(self.vae_dir, VAE_SUFFIXES)]

    def find_vae(self, name) -> str | None:
        """None for the checkpoint's own VAE ("Automatic", "None", ""), else the file's path; NotFound."""
        if name is None or (isinstance(name, str) and name.strip() in ("", "Automatic", "None")):
            return None
        if isinstance(name, str):
            for p in _files(self.vae_dir, VAE_SUFFIXES):
                if name.strip() in (p.name, p.stem, str(p)):
                    return str(p)
        raise NotFound(f"VAE {printable(name)!r} not found; GET /sdapi/v1/sd-vae lists them")

    # ------------------------------------------------------------ LoRAs and embeddings

    def loras(self) -> list[dict]:
        """A1111's ``/sdapi/v1/loras`` rows (the built-in Lora extension's): exactly the names ``<lora:name>``
        resolves (``lora.apply.lora_names``: one ``.safetensors`` file per name), whose header reads as a
        safetensors header; checked once per file version."""
        if self.lora_dir is None or not Path(self.lora_dir).is_dir():
            return []
        out = []
        for name, p in lora_names(self.lora_dir).items():
            row = self._cached_row(p, lambda p=p, name=name: self._lora_row(name, p))
            if row is not None:
                out.append(row)
        return out

    @staticmethod
    def _lora_row(name: str, p: Path) -> dict | None:
        try:
            validate_safetensors_header(p)
        except (CheckpointError, OSError):
            return None
        return {"name": name, "alias": name, "path": str(p), "metadata": {}}

    def _cached_row(self, p: Path, make):
        """``make()``'s row for file ``p``, made again only when the file changed (size, mtime, inode)."""
        try:
            st = p.stat()
        except OSError:
            return None
        signature = (st.st_size, st.st_mtime_ns, st.st_ino)
        key = str(p)
        cached = self._listed.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        row = make()
        with self._lock:
            self._listed[key] = (signature, row)
        return row

    def embeddings(self) -> dict:
        """A1111's ``/sdapi/v1/embeddings``: every readable file under ``loaded``, unreadable ones under
        ``skipped`` (whether a width fits the model is checked when a prompt uses it). A file is read once per
        version (size, mtime), not on every call."""

        loaded, skipped = {}, {}
        if self.embeddings_dir is None or not Path(self.embeddings_dir).is_dir():
            return {"loaded": loaded, "skipped": skipped}
        for p in embedding_files(self.embeddings_dir):
            row = self._cached_row(p, lambda p=p: self._embedding_row(p))
            if row is None:
                continue
            name, info, ok = row
            (loaded if ok else skipped)[name] = info
        return {"loaded": loaded, "skipped": skipped}

    @staticmethod
    def _embedding_row(p: Path) -> tuple[str, dict, bool]:
        try:
            e = load_embedding_file(p)
        except (EmbeddingError, OSError, ValueError, RuntimeError):
            return p.stem, {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 0,
                            "vectors": 0}, False
        return e.name, {"step": e.step, "sd_checkpoint": e.sd_checkpoint, "sd_checkpoint_name": e.sd_checkpoint_name,
                        "shape": e.shape, "vectors": e.vectors}, True
