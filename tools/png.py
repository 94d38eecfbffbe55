"""PNG output with the generation settings in a ``parameters`` text chunk, in the format AUTOMATIC1111
writes and reads (so existing tools show them), written atomically (no partial file on failure)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..model.hashes import model_hash  # noqa: F401  (moved to model/hashes.py; importers use it from here)

SAMPLER_NAMES = {  # our sampler id -> the name AUTOMATIC1111 writes
    ("ddim", False): "DDIM",
    ("plms", False): "PLMS",
    ("euler", False): "Euler",
    ("euler_a", False): "Euler a",
    ("dpmpp_2m", False): "DPM++ 2M",
    ("dpmpp_2m", True): "DPM++ 2M Karras",
    ("euler", True): "Euler Karras",
    ("euler_a", True): "Euler a Karras",
}


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str
    model: str
    extra: dict[str, object] | None = None  # e.g. {"Denoising strength": 0.6}

    def render(self) -> str:
        """prompt, then ``Negative prompt: ...`` (when not empty), then one line of ``Key: value`` pairs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": _number(self.cfg_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
        }
        for key, value in (self.extra or {}).items():
            fields[key] = _number(value) if isinstance(value, float) else value
        lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
        return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:g}"


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> 8-bit RGB, rounded as AUTOMATIC1111 / the original scripts do (255 * x, truncated)."""
    array = (255.0 * image.detach().float().clamp(0, 1)).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def write_png(path: str | os.PathLike, image: Image.Image, parameters: str) -> Path:
    """Write ``image`` with a ``parameters`` tEXt chunk; atomic: a temporary file renamed into place."""
    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=".tritonsd-", suffix=".png", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600); an output image is not
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_parameters(path: str | os.PathLike) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")
