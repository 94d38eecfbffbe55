"""File hashes as AUTOMATIC1111 v1.10.1 writes them into the infotext.

* ``Model hash``: ``sd_models.CheckpointInfo.shorthash`` = the first 10 hex digits of the sha256 of the whole
  checkpoint file (``hashes.sha256``, read in 1 MiB blocks). ``Model`` is the file name without its extension.
* ``VAE hash``: ``sd_vae.get_loaded_vae_hash()`` = the first 10 hex digits of the sha256 of the whole VAE file;
  ``VAE`` is ``sd_vae.get_loaded_vae_name()`` = ``os.path.basename`` of the VAE file, extension included (e.g.
  ``vae-ft-mse-840000-ema-pruned.safetensors``). Both are written only when an external VAE was loaded.

Hashing a multi-GB file takes seconds: callers compute these when an image is written, not at load time, and
the full sha256 is kept in ``hashes.json`` in the tuning cache's folder, keyed by real path, size and mtime, so a
second process never hashes the file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from tritonsd.outputs import atomic_write

SHORT_HASH_DIGITS = 10
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


HASH_CACHE = "hashes.json"  # in the tuning cache's folder (``kernels._triton.cache_dir``)
_cache_lock = threading.Lock()


def _cache_path() -> Path:
    from tritonsd.kernels._triton import cache_dir  # lazy: imports triton, which must not load before the CLI sets TRITON_INTERPRET

    return cache_dir() / HASH_CACHE


def _file_key(path: str | os.PathLike) -> tuple[str, dict]:
    """(the file's real path, what must not have changed for a cached hash to hold: size and mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_sha256(path: str | os.PathLike) -> str:
    """``sha256_file(path)``, kept on disk keyed by the real path, size and mtime (as A1111's ``cache.json``):
    a second process reads it instead of hashing gigabytes again. A cache that cannot be read or written is
    skipped, never an error."""
    real, stamp = _file_key(path)
    entry = _read_cache().get(real)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and \
            isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(real)
    with _cache_lock:
        data = _read_cache()
        data[real] = {**stamp, "sha256": digest}
        try:
            _cache_path().parent.mkdir(parents=True, exist_ok=True)
            atomic_write(_cache_path(), lambda f: f.write(json.dumps(data, indent=1).encode()))
        except OSError:
            pass
    return digest


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the checkpoint file's sha256 (cached on disk)."""
    return cached_sha256(path)[:SHORT_HASH_DIGITS]


def vae_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "VAE hash": the first 10 hex digits of the VAE file's sha256 (cached on disk)."""
    return cached_sha256(path)[:SHORT_HASH_DIGITS]
