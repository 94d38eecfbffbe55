"""AUTOMATIC1111's inpainting (v1.10 ``processing.StableDiffusionProcessingImg2Img.init`` / ``sample``,
``apply_overlay``, ``create_binary_mask``, ``images.resize_image``, ``masking``), the one implementation every
door uses (``GenerationSettings.check`` prepares, ``Pipeline.prepare_latents`` / ``denoise`` / ``to_pil`` run it).

Pixels (PIL and numpy):

* the init image is flattened onto white and resized to width x height (``resize_mode`` 0 just resize, 1 crop
  and resize, 2 resize and fill; 3, latent upscale, is resized as 0);
* the mask is made binary (an RGBA mask's alpha, else its grey), inverted on request (``inpainting_mask_invert``)
  and blurred (a Gaussian of ``mask_blur_x`` / ``mask_blur_y`` with OpenCV's kernel size, one axis after the
  other);
* "only masked" (``inpaint_full_res``): the mask's bounding box, padded by ``inpaint_full_res_padding`` and
  widened to the output's aspect, is cut out of the original and resized to width x height; the result is
  pasted back into the original's frame;
* ``inpainting_fill`` 0 ("fill") repaints the masked area with blurred colours of its surroundings
  (``masking.fill``) before the VAE encode; 1 ("original") keeps it;
* the original pixels outside the mask are composited over the result (the blurred mask as alpha,
  ``apply_overlay``), so the unmasked area comes back unchanged.

Latents (torch), for the init latent ``z0`` of a 4-channel model:

* the latent mask is the processed mask resized to the latent size (Pillow's default filter), divided by 255 and
  rounded: ``nmask`` (1 = repaint) and ``mask = 1 - nmask``;
* ``inpainting_fill`` 2 ("latent noise"): ``z0 = z0 * mask + noise(seed) * nmask``; 3 ("latent nothing"):
  ``z0 = z0 * mask``;
* every denoiser output is blended ``denoised * nmask + z0 * mask`` (``sd_samplers_cfg_denoiser.CFGDenoiser``
  ``apply_blend``, after denoising), and so is the sampler's result (``sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps


class InpaintError(ValueError):
    """Images or inpainting settings that cannot be honoured (one line for the user)."""


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
        raise InpaintError(f"an image of {im.width}x{im.height} cannot be fitted to {width}x{height} with "
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


FILL_MODES = ("fill", "original", "latent noise", "latent nothing")  # inpainting_fill 0..3, A1111's labels


def fill_mode(value) -> int:
    """``inpainting_fill`` as 0..3 from the number or A1111's label ("fill", "original", "latent noise",
    "latent nothing")."""
    if isinstance(value, str) and value.lower() in FILL_MODES:
        return FILL_MODES.index(value.lower())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= 3:
        return int(value)
    raise InpaintError(f"must be 0..3 or one of {', '.join(FILL_MODES)}, got {value!r}")


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``masking.fill``: the masked area painted with ever less blurred copies of the unmasked pixels."""
    image_mod = Image.new("RGBA", image.size)
    image_masked = Image.new("RGBa", image.size)
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


@dataclass
class Prepared:
    """What the model gets and what the paste-back needs."""

    image: Image.Image  # RGB, width x height (filled when inpainting_fill is 0)
    mask: Image.Image | None  # L, width x height, 0 / 255 (None: plain img2img): the 9-channel model's mask
    overlay: Image.Image | None  # RGBA: the original where it is kept (alpha = 255 - mask)
    paste_to: tuple[int, int, int, int] | None  # x, y, w, h in the overlay's frame ("only masked")
    notes: list[str]
    latent_mask: Image.Image | None = None  # L, width x height: the processed (blurred) mask, 0..255
    extra: dict | None = None  # A1111's infotext keys of the inpainting (Mask blur, Inpaint area, ...)


def prepare(init: Image.Image, mask: Image.Image | None, width: int, height: int, *, resize_mode: int = 0,
            blur_x: int = 4, blur_y: int = 4, invert: bool = False, full_res: bool = True,
            full_res_padding: int = 0, inpainting_fill: int = 1) -> Prepared:
    """A1111's ``StableDiffusionProcessingImg2Img.init`` on the pixels (see the module docstring)."""
    notes: list[str] = []
    image = flatten(init)
    if mask is None:
        return Prepared(resize_image(resize_mode, image, width, height), None, None, None, notes)
    extra: dict = {}
    m = binary_mask(mask)
    if invert:
        m = ImageOps.invert(m)
        extra["Mask mode"] = "Inpaint not masked"
    m = blur_mask(m, blur_x, blur_y)
    if blur_x > 0 or blur_y > 0:
        extra["Mask blur"] = blur_x if blur_x == blur_y else None  # A1111's mask_blur property
    region = crop_region(m, full_res_padding) if full_res else None
    if full_res and region is None:
        notes.append("the mask is empty: inpaint area 'only masked' fell back to the whole image")
    if region is not None:
        if m.size != image.size:
            raise InpaintError(f"the mask is {m.width}x{m.height} but the init image is "
                               f"{image.width}x{image.height}")
        region = expand_crop_region(region, width, height, m.width, m.height)
        x1, y1, x2, y2 = region
        model_mask = resize_image(2, m.crop(region), width, height)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        mask_for_overlay, overlay_base = m, image
        model_image = resize_image(2, image.crop(region), width, height)
        extra.update({"Inpaint area": "Only masked", "Masked area padding": full_res_padding})
    else:
        model_mask = resize_image(resize_mode, m, width, height)
        mask_for_overlay = model_mask.point(lambda v: min(255, v * 2))  # np.clip(mask * 2, 0, 255)
        paste_to = None
        overlay_base = resize_image(resize_mode, image, width, height)
        model_image = overlay_base
    overlay = Image.new("RGBa", overlay_base.size)
    overlay.paste(overlay_base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    if inpainting_fill != 1:
        model_image = fill(model_image, model_mask)
        if inpainting_fill == 0:
            extra["Masked content"] = "fill"
    rounded = model_mask.convert("L").point(lambda v: 255 if v >= 128 else 0)  # torch.round(v / 255)
    return Prepared(model_image, rounded, overlay.convert("RGBA"), paste_to, notes, model_mask, extra)


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


# ---------------------------------------------------------------- latents


def mask_image(mask: torch.Tensor) -> Image.Image:
    """A [1, 1, H, W] mask tensor in [0, 1] as the 8-bit L image A1111 works on."""
    return Image.fromarray((mask[0, 0].detach().float().cpu().numpy() * 255.0).round().astype(np.uint8), mode="L")


def latent_masks(mask: Image.Image, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, nmask) [channels, height, width] float32: ``latmask`` of ``init`` -- the processed mask resized to
    the latent size with Pillow's default filter, /255, rounded (``mask_round``); nmask = latmask (1 = repaint),
    mask = 1 - latmask (1 = keep)."""
    latmask = np.asarray(mask.convert("RGB").resize((width, height)), dtype=np.float32)[..., 0] / 255  # [h, w]
    latmask = np.around(latmask)
    nmask = torch.from_numpy(np.tile(latmask[None], (channels, 1, 1)))  # [C, h, w]
    return 1.0 - nmask, nmask


def fill_latent(init_latent: torch.Tensor, fill: int, mask: torch.Tensor, nmask: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """``inpainting_fill`` on the init latent: 2 (latent noise) ``z0 * mask + noise * nmask``, 3 (latent nothing)
    ``z0 * mask``; 0 and 1 act on the pixels (``prepare``)."""
    if fill == 2:
        return init_latent * mask + noise * nmask
    if fill == 3:
        return init_latent * mask
    return init_latent


@dataclass
class LatentBlend:
    """The per-step latent masking of a 4-channel model: ``x * nmask + init_latent * mask``."""

    init_latent: torch.Tensor  # [B, C, h, w]
    mask: torch.Tensor  # [C, h, w], 1 = keep
    nmask: torch.Tensor  # [C, h, w], 1 = repaint

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.nmask + self.init_latent * self.mask


class BlendedDenoiser:
    """A sigma-space denoiser whose output is blended with the init latent (``CFGDenoiser.forward``'s
    ``apply_blend``, after denoising, as A1111 v1.10 does by default)."""

    def __init__(self, inner, blend: LatentBlend):
        self.inner, self.blend = inner, blend

    def __call__(self, x, sigma, **kwargs):
        return self.blend(self.inner(x, sigma, **kwargs))


class BlendedTimestepDenoiser:
    """A timestep-space denoiser (DDIM, PLMS) that is given the blended latent: A1111 v1.10's
    ``CFGDenoiserTimesteps`` sets ``mask_before_denoising``, so ``apply_blend`` runs on the model's input
    (``x * nmask + init_latent * mask``, the init latent as it is, un-noised) while the sampler's own latent is
    left alone; pred_x0 is left to the sampler, which derives it from its own latent and the eps, as webui's
    ``sd_samplers_timesteps_impl`` does (for a v model the eps is the one of the blended input, as webui's
    ``CompVisTimestepsVDenoiser`` computes it)."""

    def __init__(self, inner, blend: LatentBlend):
        self.inner, self.blend = inner, blend

    def __call__(self, x, t, **kwargs):
        e_t, _pred_x0 = self.inner(self.blend(x), t, **kwargs)
        return e_t, None
