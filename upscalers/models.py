"""Upscaler model files through spandrel (the library webui 1.8+ and ComfyUI load them with), read first by our
own reader (``formats/upscaler_file.py``: torch ``weights_only`` and the allowlist), then handed to spandrel as a
state dict, which tells the architecture (ESRGAN, Real-ESRGAN's compact net, SwinIR, DAT, HAT, ...) from it.

spandrel is an optional extra (``pip install 'tritonsd[upscale]'``). It imports torchvision for two models that
are not upscalers (LaMa inpainting, RestoreFormer face restoration); where torchvision is missing (the CPU-only
torch wheel has none that loads beside it) spandrel is imported with a stand-in that lets those two modules load
and raises if they are ever run, and the stand-in is removed from ``sys.modules`` again at once.

Tiling follows webui's upscaler classes: SwinIR and SCUNet through ``tensor_upscale`` (tile 192 / 256, overlap 8,
``SWIN_tile`` / ``SCUNET_tile``), every other architecture through ``grid_upscale`` (``ESRGAN_tile`` 192, overlap 8).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tritonsd.formats.upscaler_file import UPSCALER_SUFFIXES, UpscalerFileError, read_upscaler_weights
from tritonsd.upscalers import tiles

ESRGAN_TILE, ESRGAN_OVERLAP = 192, 8  # webui's ESRGAN_tile / ESRGAN_tile_overlap (DAT_tile the same)
TENSOR_TILED = {"SwinIR": (192, 8), "SCUNet": (256, 8)}  # webui's SWIN_tile / SCUNET_tile and their overlaps


class UpscalerModelError(UpscalerFileError):
    """An upscaler file spandrel cannot use, or spandrel missing (one line)."""


def import_spandrel():
    """The spandrel module (see the module docstring for the torchvision stand-in)."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise UpscalerModelError("upscaler models need spandrel: pip install 'tritonsd[upscale]'")
    if _torchvision_loads():
        import spandrel

        return spandrel
    stand_in = _torchvision_stand_in()
    sys.modules.update(stand_in)
    try:
        import spandrel
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    return spandrel


def _torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401 - a torchvision built for another torch fails here
    except Exception:  # noqa: BLE001 - any failure means spandrel cannot use it either
        return False
    return True


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """``torchvision.transforms.functional`` with the three names spandrel's LaMa / RestoreFormer import."""

    def missing(*_args, **_kwargs):
        raise UpscalerModelError("this model needs torchvision, which is not installed")

    class InterpolationMode:
        NEAREST, BILINEAR, BICUBIC = "nearest", "bilinear", "bicubic"

    root, transforms, functional = (types.ModuleType(n) for n in
                                    ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
    functional.InterpolationMode, functional.rotate, functional.normalize = InterpolationMode, missing, missing
    root.transforms, transforms.functional = transforms, functional
    return {m.__name__: m for m in (root, transforms, functional)}


@dataclass
class UpscalerModel:
    """A loaded upscaler model: its name (the file's stem, as webui lists it), architecture and scale."""

    name: str
    path: Path
    descriptor: object  # spandrel's ImageModelDescriptor

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.name

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    def to(self, device) -> "UpscalerModel":
        self.descriptor.to(torch.device(device))
        return self

    def _like(self) -> torch.Tensor:
        return next(self.descriptor.model.parameters())

    def __call__(self, image: Image.Image, tile: int | None = None, overlap: int | None = None) -> Image.Image:
        """One application of the model to an 8-bit image, tiled as webui tiles this architecture (``tile`` /
        ``overlap`` override its defaults; ``tile=0``: no tiling)."""
        tensor_tiles = TENSOR_TILED.get(self.architecture)
        if tensor_tiles is not None:
            t, o = tensor_tiles
            return tiles.tensor_upscale(self.descriptor, image, t if tile is None else tile,
                                        o if overlap is None else overlap, self.scale, self._like())
        return tiles.grid_upscale(self.descriptor, image, ESRGAN_TILE if tile is None else tile,
                                  ESRGAN_OVERLAP if overlap is None else overlap, self._like())


def load_upscaler_model(path: str | Path, device="cpu") -> UpscalerModel:
    """The model in ``path``; ``UpscalerModelError`` (one line) for a file that is not one spandrel knows."""
    path = Path(path)
    weights = read_upscaler_weights(path)
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device=torch.device(device)).load_from_state_dict(weights)
    except spandrel.UnsupportedModelError:
        raise UpscalerModelError(f"{path.name}: not an upscaler model spandrel knows (its weights match no "
                                 "supported architecture)") from None
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UpscalerModelError(f"{path.name}: cannot build its model ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3 \
            or descriptor.output_channels != 3:
        raise UpscalerModelError(f"{path.name}: a {descriptor.architecture.name} model, not an RGB image upscaler")
    descriptor.model.eval()
    return UpscalerModel(path.stem, path, descriptor)


def model_files(directory: str | Path | None) -> dict[str, Path]:
    """``{name: file}`` of the upscaler files in ``directory`` (not recursive), by webui's name: the file's stem."""
    if directory is None or not Path(directory).is_dir():
        return {}
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES)
    return {p.stem: p for p in files}


__all__ = ["UpscalerModel", "UpscalerModelError", "import_spandrel", "load_upscaler_model", "model_files"]
