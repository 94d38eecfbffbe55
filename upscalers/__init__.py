"""Image upscalers as AUTOMATIC1111 v1.10.1 offers them for hires fix and its "Extras" tab: the built-in "None",
"Lanczos" and "Nearest" (``resize.py``), and upscaler model files from one folder (``--upscaler-dir``, webui's
``models/ESRGAN`` and friends in one) loaded through spandrel (``models.py``) and tiled as webui tiles them
(``tiles.py``). The latent modes of hires fix ("Latent", ...) are not image upscalers: ``sampler/upscale.py``.

    ups = Upscalers("models/upscalers")
    ups.names()                                    # ["None", "Lanczos", "Nearest", "4x-UltraSharp", ...]
    big = ups.resize(image, 1024, 1024, "4x-UltraSharp")
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tritonsd.upscalers.models import UpscalerModel, UpscalerModelError, load_upscaler_model, model_files
from tritonsd.upscalers.resize import BUILTIN, builtin_step, resize_image, upscale_by


class UnknownUpscalerError(ValueError):
    """An upscaler name that is neither built in nor a file in the upscaler folder."""


class Upscalers:
    """The built-in upscalers and the model files of ``directory`` (None: the built-ins only), by name; the last
    model used stays loaded."""

    def __init__(self, directory: str | Path | None = None, device="cpu"):
        self.directory = Path(directory) if directory is not None else None
        self.device = device
        self._loaded: UpscalerModel | None = None

    def files(self) -> dict[str, Path]:
        """``{name: file}`` of the model files, read from the folder now (files added later are found)."""
        return model_files(self.directory)

    def names(self) -> list[str]:
        return [*BUILTIN, *self.files()]

    def check(self, name: str) -> None:
        if name not in BUILTIN and name not in self.files():
            where = f" in {self.directory}" if self.directory is not None else " (no upscaler folder given)"
            raise UnknownUpscalerError(f"{name!r} is not an upscaler: choose one of {', '.join(self.names())}"
                                       f"{where}")

    def model(self, name: str) -> UpscalerModel:
        """The loaded model file ``name`` (``UpscalerModelError`` for a file that is not one)."""
        self.check(name)
        path = self.files()[name]
        if self._loaded is None or self._loaded.path != path:
            self._loaded = None
            self._loaded = load_upscaler_model(path, self.device)
        return self._loaded

    def resize(self, image: Image.Image, width: int, height: int, name: str) -> Image.Image:
        """``image`` at ``width`` x ``height`` through the upscaler ``name`` (webui's ``resize_image``)."""
        self.check(name)
        step = None
        if name not in BUILTIN:
            model = self.model(name)
            step = lambda im, _scale: model(im)  # noqa: E731 - a model upscales by its own factor
        return resize_image(image, width, height, name, step)

    def upscale_by(self, image: Image.Image, scale: float, name: str) -> Image.Image:
        """``image`` upscaled ``scale`` times by ``name`` (webui's ``Upscaler.upscale``, the Extras tab's)."""
        self.check(name)
        if name == "None":
            return image
        step = builtin_step(name) if name in BUILTIN else (lambda im, _s, m=self.model(name): m(im))
        return upscale_by(image, scale, step)


__all__ = ["UnknownUpscalerError", "UpscalerModel", "UpscalerModelError", "Upscalers", "load_upscaler_model"]
