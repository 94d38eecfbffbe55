"""File hashes as AUTOMATIC1111 v1.10.1 writes them into the infotext.

* ``Model hash``: ``sd_models.CheckpointInfo.shorthash`` = the first 10 hex digits of the sha256 of the whole
  checkpoint file (``hashes.sha256``, read in 1 MiB blocks). ``Model`` is the file name without its extension.
* ``VAE hash``: ``sd_vae.get_loaded_vae_hash()`` = the first 10 hex digits of the sha256 of the whole VAE file;
  ``VAE`` is ``sd_vae.get_loaded_vae_name()`` = ``os.path.basename`` of the VAE file, extension included (e.g.
  ``vae-ft-mse-840000-ema-pruned.safetensors``). Both are written only when an external VAE was loaded.

Hashing a multi-GB file takes seconds: callers compute these when an image is written, not at load time.
"""

from __future__ import annotations

import hashlib
import os

SHORT_HASH_DIGITS = 10
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the checkpoint file's sha256."""
    return sha256_file(path)[:SHORT_HASH_DIGITS]


def vae_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "VAE hash": the first 10 hex digits of the VAE file's sha256."""
    return sha256_file(path)[:SHORT_HASH_DIGITS]
