"""A1111's img2img image handling (v1.10 ``processing.StableDiffusionProcessingImg2Img.init`` and
``apply_overlay``, ``images.resize_image``, ``masking``), in PIL and numpy:

* the init image is flattened onto white and resized to width x height (``resize_mode`` 0 just resize, 1 crop
  and resize, 2 resize and fill; 3, latent upscale, is resized as 0);
* the mask is made binary (an RGBA mask's alpha, else its grey), inverted on request and blurred (a Gaussian of
  ``mask_blur_x`` / ``mask_blur_y`` with OpenCV's kernel size); the model gets it rounded to 0 / 1;
* "only masked" (``inpaint_full_res``): the mask's bounding box, padded and widened to the output's aspect, is
  cut out of the original and resized to width x height; the result is pasted back into the original's frame;
* the original pixels outside the mask are composited over the result (the blurred mask as alpha), so the
  unmasked area comes back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from tritonsd.serve.errors import BadRequest

LANCZOS = Image.Resampling.LANCZOS
MAX_WORK_PIXELS = 1 << 26  # an intermediate image of resize_image may be at most this large
BACKGROUND = (255, 255, 255)  # A1111's img2img_background_color default


def flatten(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels over white (``images.flatten``)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        background.alpha_composite(image)
        image = background
    return image.convert("RGB")


def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """``images.resize_image`` without an upscaler: 0 resize, 1 crop and resize, 2 resize and fill."""
    if mode not in (1, 2):
        return im.resize((width, height), resample=LANCZOS)
    ratio, src_ratio = width / height, im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    src_w, src_h = max(1, src_w), max(1, src_h)
    if src_w * src_h > MAX_WORK_PIXELS:  # an extreme aspect ratio scaled to cover the output
        raise BadRequest(f"an image of {im.width}x{im.height} cannot be fitted to {width}x{height} with "
                         f"resize_mode {mode}: its aspect ratio is too extreme")
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new(im.mode if im.mode in ("RGB", "L") else "RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:  # stretch the edge rows / columns into the bands left empty
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return res


def binary_mask(image: Image.Image) -> Image.Image:
    """``create_binary_mask``: an RGBA mask with any transparency is its alpha thresholded at 128, else grey."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


def _gauss_1d(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """OpenCV's ``GaussianBlur`` along one axis: kernel size 2*int(2.5*sigma+0.5)+1, reflect-101 borders."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(k, dtype=np.float64) - (k - 1) / 2
    kernel = np.exp(-(x * x) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    pad = [(0, 0), (0, 0)]
    pad[axis] = (k // 2, k // 2)
    padded = np.pad(a, pad, mode="reflect" if a.shape[axis] > 1 else "edge")
    out = np.zeros_like(a, dtype=np.float64)
    n = a.shape[axis]
    for i in range(k):  # [H, W] accumulated shifted copies
        out += kernel[i] * (padded[i:i + n] if axis == 0 else padded[:, i:i + n])
    return out


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    a = np.asarray(mask, dtype=np.float64)  # [H, W]
    if blur_x > 0:
        a = np.clip(np.rint(_gauss_1d(a, blur_x, axis=1)), 0, 255)
    if blur_y > 0:
        a = np.clip(np.rint(_gauss_1d(a, blur_y, axis=0)), 0, 255)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """The mask's bounding box grown by ``pad`` (clipped to the image); None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(region, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """``masking.expand_crop_region``: widen the box to the output's aspect ratio, kept inside the image."""
    x1, y1, x2, y2 = region
    ratio_crop, ratio_out = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio_out:
        diff = int((x2 - x1) / ratio_out - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= image_h:
            y1, y2 = y1 - (y2 - image_h), image_h
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, image_h)
    else:
        diff = int((y2 - y1) * ratio_out - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= image_w:
            x1, x2 = x1 - (x2 - image_w), image_w
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, image_w)
    return x1, y1, x2, y2


@dataclass
class Prepared:
    """What the model gets and what the paste-back needs."""

    image: Image.Image  # RGB, width x height
    mask: Image.Image | None  # L, width x height, 0 / 255 (None: plain img2img)
    overlay: Image.Image | None  # RGBA: the original where it is kept (alpha = 255 - mask)
    paste_to: tuple[int, int, int, int] | None  # x, y, w, h in the overlay's frame ("only masked")
    notes: list[str]


def prepare(init: Image.Image, mask: Image.Image | None, width: int, height: int, *, resize_mode: int = 0,
            blur_x: int = 4, blur_y: int = 4, invert: bool = False, full_res: bool = True,
            full_res_padding: int = 0) -> Prepared:
    notes: list[str] = []
    image = flatten(init)
    if mask is None:
        return Prepared(resize_image(resize_mode, image, width, height), None, None, None, notes)
    m = binary_mask(mask)
    if invert:
        m = ImageOps.invert(m)
    m = blur_mask(m, blur_x, blur_y)
    region = None
    if full_res:
        region = crop_region(m, full_res_padding)
        if region is None:
            notes.append("the mask is empty: inpaint area 'only masked' fell back to the whole image")
            full_res = False
    if full_res and region is not None:
        if m.size != image.size:
            m = m.resize(image.size, resample=LANCZOS)
            region = crop_region(m, full_res_padding) or (0, 0, m.width, m.height)
        mask_for_overlay = m
        region = expand_crop_region(region, width, height, m.width, m.height)
        x1, y1, x2, y2 = region
        model_mask = resize_image(2, m.crop(region), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        overlay_base = image
        model_image = resize_image(2, image.crop(region), width, height)
    else:
        model_mask = resize_image(resize_mode, m, width, height)
        mask_for_overlay = model_mask.point(lambda v: min(255, v * 2))
        paste_to = None
        overlay_base = resize_image(resize_mode, image, width, height)
        model_image = overlay_base
    overlay = Image.new("RGBa", overlay_base.size)
    overlay.paste(overlay_base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    rounded = model_mask.convert("L").point(lambda v: 255 if v >= 128 else 0)  # torch.round(v / 255)
    return Prepared(model_image, rounded, overlay.convert("RGBA"), paste_to, notes)


def paste_back(result: Image.Image, prepared: Prepared) -> Image.Image:
    """``apply_overlay``: the result put into the original's frame, the kept pixels composited over it; the
    result's ``info`` (infotext, seed) carried over."""
    if prepared.overlay is None:
        return result
    image = result
    if prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        base = Image.new("RGBA", prepared.overlay.size)
        base.paste(resize_image(1, result, w, h), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(prepared.overlay)
    out = image.convert("RGB")
    out.info.update(result.info)
    return out
