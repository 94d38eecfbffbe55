"""Reading kohya-format LoRA / LyCORIS ``.safetensors`` files, and their AUTOMATIC1111 "addnet" hash.

A file is a flat dict ``"<module>.<part>" -> tensor`` (``lora_unet_down_blocks_0_..._to_q.lora_down.weight``,
``....alpha``, ``....hada_w1_a``...). We split each key at its FIRST dot, as webui's ``load_network`` does, and
group the parts by module name. Every problem with the file itself is one ``LoraError`` line naming the file.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tritonsd.formats.checkpoint import (SAFETENSORS_SUFFIX, CheckpointError, read_checkpoint,
    validate_safetensors_header)

HASH_BLOCK = 1024 * 1024


class LoraError(ValueError):
    """A LoRA that cannot be used: unreadable file, unknown name, unsupported kind, another model family."""


@dataclass
class LoraFile:
    """One LoRA file: ``modules[name][part]`` (float tensors as stored) and the header's metadata."""

    path: Path
    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What a prompt calls it: the file stem (webui's default network name)."""
        return self.path.stem


def safe_text(text: str, limit: int = 120) -> str:
    """Text read from a file, fit for one line of output: control characters escaped, long text cut."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= limit else out[:limit] + "..."


def read_lora(path: str | Path) -> LoraFile:
    """Read and check a LoRA file (safetensors only; a truncated or malformed file is one ``LoraError``)."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise LoraError(f"{safe_text(path.name)}: only .safetensors LoRA files are supported")
    try:
        tensors = read_checkpoint(path)
        header = validate_safetensors_header(path)
    except CheckpointError as e:
        raise LoraError(f"LoRA {e}") from None
    if not tensors:
        raise LoraError(f"{safe_text(path.name)}: the LoRA file holds no tensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        if not part:
            raise LoraError(f"{safe_text(path.name)}: tensor {safe_text(key)!r} is not named <module>.<part> "
                            "(not a kohya LoRA file)")
        if not tensor.is_floating_point():
            raise LoraError(f"{safe_text(path.name)}: tensor {safe_text(key)!r} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise LoraError(f"{safe_text(path.name)}: tensor {safe_text(key)!r} holds NaN or Inf")
        modules.setdefault(module, {})[part] = tensor
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        metadata = {}
    return LoraFile(path, modules, {str(k): str(v) for k, v in metadata.items()})


def addnet_hash(path: str | Path) -> str:
    """sha256 (hex) of the file's bytes after the safetensors header (8-byte length + JSON), as webui's
    ``hashes.addnet_hash_safetensors``: the hash does not change when only the metadata does."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoraError(f"{safe_text(path.name)}: truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            f.seek(8 + header_len)
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                digest.update(block)
    except OSError as e:
        raise LoraError(f"{safe_text(path.name)}: cannot read ({e.strerror or e})") from None
    return digest.hexdigest()


def short_hash(path: str | Path) -> str:
    """The 12 hex digits webui shows and writes (``NetworkOnDisk.shorthash``)."""
    return addnet_hash(path)[:12]


def lora_hashes_value(named_hashes: list[tuple[str, str]]) -> str:
    """The ``Lora hashes`` infotext value: ``name: hash, name: hash`` with ':' and ',' removed from each name
    (``ExtraNetworkLora.activate``); the infotext writer quotes it (``sampler.infotext.quote``)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in named_hashes)
