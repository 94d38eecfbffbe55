"""Upscaler model files (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ... as people download them for AUTOMATIC1111's
``models/ESRGAN`` and the like): their weights read through the checkpoint reader, so a ``.pth`` goes through
torch's ``weights_only`` unpickler and our allowlist (``formats/checkpoint.py``) before anything else sees it.

Released files keep their weights bare or under one of the wrappers spandrel unwraps (``params_ema`` for
Real-ESRGAN, ``params``, ``model``, ``state_dict``, ...); the flat tensor dict goes to spandrel
(``tritonsd.upscalers.models``), which tells the architecture from the keys and shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint

UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")  # what webui's upscalers list in their folders
WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")  # spandrel's


class UpscalerFileError(CheckpointError):
    """A file that cannot be read as an upscaler model (one line)."""


def read_upscaler_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's weights, a flat ``{name: tensor}`` dict on the CPU; ``UpscalerFileError`` for anything else."""
    path = Path(path)
    if path.suffix.lower() not in UPSCALER_SUFFIXES:
        raise UpscalerFileError(f"{path.name}: not an upscaler model file (expected {', '.join(UPSCALER_SUFFIXES)})")
    try:
        return read_checkpoint(path, wrappers=WRAPPERS)
    except UpscalerFileError:
        raise
    except CheckpointError as e:
        raise UpscalerFileError(str(e)) from None


__all__ = ["UPSCALER_SUFFIXES", "UpscalerFileError", "read_upscaler_weights"]
