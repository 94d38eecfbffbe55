"""Images users name on the command line or in a batch line (init images, masks, control images, PNGs to read
back): read whole, at a bounded size, with one escaped line for anything Pillow cannot read."""

from __future__ import annotations

import warnings
from pathlib import Path

from tritonsd.escape import escape

MAX_IMAGE_PIXELS = 8192 * 8192  # an input image larger than this is refused before its pixels are decoded


class ImageFileError(ValueError):
    """An image file that is missing, not a regular file, too large or not an image."""


def open_image(path: Path, what: str):
    """A PIL image fully read from ``path``, a regular file of at most ``MAX_IMAGE_PIXELS`` (the settings convert
    CMYK, palette and 16-bit images and check the rest); ``what`` names it in the error."""
    from PIL import Image, UnidentifiedImageError  # Pillow's plugins load on first use: not at import time

    path = Path(path)
    if not path.exists():
        raise ImageFileError(f"{what} not found: {escape(path)}")
    if not path.is_file():
        raise ImageFileError(f"{what} {escape(path)} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ImageFileError(f"{what} {escape(path)} is {im.width}x{im.height}: more than the "
                                         f"{MAX_IMAGE_PIXELS:,} pixels tritonsd reads")
                im.load()
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageFileError(f"{what} {escape(path)} is refused as a decompression bomb ({escape(e)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, ImageFileError):
            raise
        reason = "not an image Pillow can read" if isinstance(e, UnidentifiedImageError) else escape(e)
        raise ImageFileError(f"cannot open {what} {escape(path)}: {reason}") from None
