"""Where a loaded model came from, for the infotext: the checkpoint (or the built-in model's config file), the
YAML used and the external VAE. Hashes are computed on demand (``model/hashes.py``), never at load time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonsd.formats.hashes import model_hash, vae_hash


@dataclass(frozen=True)
class LoadedFrom:
    checkpoint: Path  # the weights file; for a built-in model, the config JSON it is built from
    config: Path | None = None  # the original YAML used (given or found beside the checkpoint)
    vae: Path | None = None  # an external VAE file replacing the checkpoint's

    @property
    def model_name(self) -> str:
        """AUTOMATIC1111's "Model": the checkpoint's file name without its extension."""
        return self.checkpoint.stem

    @property
    def vae_name(self) -> str | None:
        """AUTOMATIC1111's "VAE": the VAE file's name with its extension; None when the checkpoint's own."""
        return self.vae.name if self.vae is not None else None

    def model_hash(self) -> str:
        return model_hash(self.checkpoint)

    def vae_hash(self) -> str | None:
        return vae_hash(self.vae) if self.vae is not None else None
