"""External VAE files (``load_model(..., vae=PATH)``, ``--vae FILE``), as AUTOMATIC1111 v1.10.1 loads them.

``sd_vae.load_vae_dict`` reads the file with the checkpoint reader, drops every key starting with ``loss`` (the
discriminator / LPIPS weights the released ``.pt`` VAEs carry) and ``model_ema.decay`` / ``model_ema.num_updates``,
and loads the rest strictly into ``first_stage_model``. Here: ``.safetensors`` or a pickled ``.pt`` / ``.ckpt``
through the same safe reader as checkpoints (torch ``weights_only`` with the narrow allowlist), keys bare
(``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) or under ``first_stage_model.``; every
``model_ema.*`` key is set aside too. Anything else, or a shape that does not fit the model's VAE, is a one-line
error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint
from tritonsd.formats.keys import EMA, UNET, VAE, VAE_PARTS

_IGNORED = ("loss", EMA)
_DIFFUSERS_VAE = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")


class VAEFileError(CheckpointError):
    """An external VAE file that is not a VAE, or not one that fits the model."""


def load_vae_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The VAE weights of an external VAE file, with bare keys (``encoder.*``, ``decoder.*``, ...), in their
    stored dtype on the CPU."""
    return vae_weights(read_checkpoint(path), path)


def vae_weights(raw: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """The VAE entries of a VAE file's tensors (``raw``, as read from ``path``), keys made bare; the extras
    AUTOMATIC1111 skips set aside; anything else refused."""
    path = Path(path)
    weights: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for key, value in raw.items():
        if key.startswith(_IGNORED):
            continue
        bare = key[len(VAE):] if key.startswith(VAE) else key
        if bare.startswith(VAE_PARTS):
            weights[bare] = value
        else:
            other.append(key)
    if any(k.startswith(_DIFFUSERS_VAE) for k in weights):
        raise VAEFileError(f"{path.name}: a diffusers-layout VAE (encoder.down_blocks.*); an original-layout VAE "
                           f"file (encoder.down.*) is needed")
    if any(k.startswith(UNET) for k in other):
        raise VAEFileError(f"{path.name}: a full model checkpoint ({UNET}* keys), not a VAE file")
    if other:
        raise VAEFileError(f"{path.name}: not a VAE file: {len(other)} keys outside {', '.join(VAE_PARTS)} (e.g. "
                           f"{', '.join(sorted(other)[:3])})")
    if not weights:
        raise VAEFileError(f"{path.name}: no VAE weights (no {', '.join(VAE_PARTS)} keys)")
    return weights


def check_vae_fits(path: str | Path, weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> None:
    """One line naming what does not fit when ``weights`` (bare keys) cannot replace a VAE whose state dict has
    the ``expected`` shapes."""
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if tuple(weights[k].shape) != tuple(expected[k]))
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with another shape (e.g. {k}: file {list(weights[k].shape)}, model "
                        f"{list(expected[k])})")
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise VAEFileError(f"{Path(path).name}: the VAE does not fit this model's: {'; '.join(problems)}")
