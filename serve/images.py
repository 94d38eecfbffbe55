"""Images in and out of the API: base64 (raw or a ``data:`` URL) decoded with Pillow under a pixel limit, and PNGs
encoded with their ``parameters`` text chunk exactly as ``Pipeline.save`` writes them (so the bytes match)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from tritonsd.serve.errors import BadRequest, TooLarge, printable

MAX_IMAGE_PIXELS = 4096 * 4096  # an input image larger than this is refused before its pixels are read
_DATA_URL = re.compile(r"^data:[^,;]*(;[^,]*)?,", re.IGNORECASE)
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/_-]*={0,2}$")


class ImageDecodeError(BadRequest):
    def __init__(self, detail: str):
        super().__init__(detail, "ImageDecodeError")


def b64_bytes(field: str, text) -> bytes:
    """The bytes of a base64 string, raw or a ``data:`` URL (standard or URL-safe alphabet, whitespace ignored)."""
    if not isinstance(text, str):
        raise ImageDecodeError(f"{field}: expected a base64 string, got {type(text).__name__}")
    text = text.strip()
    m = _DATA_URL.match(text)
    if m is not None:
        if ";base64" not in (m.group(1) or "").lower():
            raise ImageDecodeError(f"{field}: a data: URL must be base64-encoded")
        text = text[m.end():]
    data = re.sub(r"\s+", "", text).encode("ascii", "replace")
    if not data or not _B64_CHARS.match(data):
        raise ImageDecodeError(f"{field}: not valid base64")
    data = data.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    data += b"=" * (-len(data) % 4)  # clients often drop the padding
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{field}: not valid base64") from None


def decode_image(field: str, text, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A fully loaded PIL image from base64 text; its size is checked from the header before any pixel is
    decoded (a decompression bomb costs nothing)."""
    data = b64_bytes(field, text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise TooLarge(f"{field}: the image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            image.load()
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"{field}: {printable(e)}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{field}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{field}: the image data is broken ({printable(e, 120)})") from None
    return image


def png_bytes(image: Image.Image) -> bytes:
    """The PNG of ``image`` with its ``parameters`` infotext in a tEXt chunk, the way ``Pipeline.save`` writes
    files (``sampler/infotext.py``'s ``write_png``), so the server's bytes equal the saved file's."""
    info = PngInfo()
    info.add_text("parameters", image.info.get("parameters", ""))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def png_b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def text_items(image: Image.Image) -> dict[str, str]:
    """The image's text metadata other than ``parameters`` (A1111's png-info ``items``), JSON-safe."""
    return {str(k): v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
