"""Resizing an image to a size with a named upscaler, as AUTOMATIC1111 v1.10.1 does it (``images.resize_image``
with resize mode 0, ``upscaler.Upscaler.upscale`` and the built-in ``Lanczos`` / ``Nearest`` / ``None``):

* "None" (or a greyscale image): one Lanczos resize to the size.
* any other upscaler, when the size is larger (``scale = max(w / width, h / height) > 1``): the upscaler runs
  until the image covers ``int(width * scale) // 8 * 8`` x ... (at most 3 times: a 4x model once for 4x, twice
  for 8x), a Lanczos resize to that size if it is not exactly it, then a Lanczos resize to the asked size if that
  differs. "Lanczos" / "Nearest" resize by the whole scale in one go; a model by its own factor each time.
"""

from __future__ import annotations

from typing import Callable

from PIL import Image

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST
BUILTIN = ("None", "Lanczos", "Nearest")  # webui's built-in image upscalers, in its list's order

Step = Callable[[Image.Image, float], Image.Image]  # one application of an upscaler at the asked scale


def builtin_step(name: str) -> Step:
    """``UpscalerLanczos`` / ``UpscalerNearest``'s ``do_upscale``; "None" returns the image."""
    resample = {"Lanczos": LANCZOS, "Nearest": NEAREST}.get(name)
    if resample is None:
        return lambda image, _scale: image
    return lambda image, scale: image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)


def upscale_by(image: Image.Image, scale: float, step: Step) -> Image.Image:
    """``Upscaler.upscale``: ``step`` until the image covers the destination (a multiple of 8), then Lanczos."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        before = image.size
        image = step(image, scale)
        if image.size == before:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def resize_image(image: Image.Image, width: int, height: int, name: str, step: Step | None = None) -> Image.Image:
    """``images.resize_image(0, image, width, height, upscaler_name=name)``; ``step`` is the upscaler's own for a
    model (the built-ins need none)."""
    if name == "None" or image.mode == "L":
        return image.resize((width, height), resample=LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(image, scale, step or builtin_step(name))
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


__all__ = ["BUILTIN", "builtin_step", "resize_image", "upscale_by"]
