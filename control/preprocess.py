"""Control maps from control images, as the AUTOMATIC1111 extension (Mikubill/sd-webui-controlnet) makes them.

One unit's map, in the extension's order (``scripts/controlnet.py`` ``get_control``):

1. the image: the unit's, else the img2img init image;
2. pixel perfect: ``processor_res`` = the extension's ``pixel_perfect_resolution`` of the image for the
   generation's size and the resize mode;
3. the preprocessor (``preprocess``): ``none`` (the image), ``canny`` (``resize_image_with_pad`` to
   ``processor_res`` on the short side, OpenCV's ``Canny`` with the two thresholds, the padding cut off), ``invert``
   (255 - image);
4. the map to the generation's size (``fit``, the extension's ``detectmap_proc``): "Just Resize" stretches,
   "Crop and Resize" scales to cover and crops the middle, "Resize and Fill" scales to fit and fills the rest with
   the median border colour; every resize is the extension's ``high_quality_resize`` (binary maps are resized,
   re-binarised by Otsu's threshold and, when they are one-pixel edges such as canny's, thinned again);
5. ``[1, 3, H, W]`` float32 = map / 255.

OpenCV (``opencv-python-headless``, the ``controlnet`` extra) is imported only where a module or a resize needs it.
"""

from __future__ import annotations

import numpy as np
import torch

from tritonsd.sampler.inpaint import resize_image
from tritonsd.sampler.control import (ControlUnit, ControlUnitError, RESIZE_MODES, check_units, hwc3, module_of,
                                      resize_mode_of)

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = RESIZE_MODES


def detect(unit: ControlUnit, width: int, height: int, init_image=None, *, init_resize_mode=None,
           preprocess_size: tuple[int, int] | None = None, crop=None) -> torch.Tensor:
    """The unit's control map for an image of width x height: [1, 3, height, width] float32 in [0, 1].

    ``init_image``: the img2img init image (PIL, uint8 HxWx3, or [1, 3, H, W] in [-1, 1] as the settings hold
    it), used when the unit has no image; ``init_resize_mode``: img2img's resize mode (0..3, 3 being Just Resize
    as the extension's ``resize_mode_from_value`` reads it), which the extension uses for the init image instead
    of the unit's. The extension preprocesses webui's init image as sent (before img2img resizes it): give that
    image where the sizes differ. ``preprocess_size``: (width, height) pixel perfect
    computes with (the extension takes the first pass's size for the hires pass too); default: width x height.
    ``crop``: "only masked" inpainting's region (``sources``), which every image is cut to first.

    A unit image given as a tensor with module "none" at exactly width x height is returned as it is (a control
    map made elsewhere keeps its float values; [B, 3, H, W]: one map per image of the batch); every other image
    goes through the extension's 8-bit path.
    """
    (unit,) = check_units([unit])
    image, resize_mode = _source(unit, init_image, init_resize_mode, crop)
    if isinstance(image, torch.Tensor):
        if unit.module == "none" and tuple(image.shape[-2:]) == (height, width):
            return image
        if image.shape[0] != 1:
            raise ControlUnitError(f"a batch of {image.shape[0]} control maps must be at the generation's size "
                                   f"({width}x{height}) with module none")
        image = tensor_to_uint8(image)
    return to_tensor(detect_map(unit, image, width, height, resize_mode, preprocess_size))


def shown_map(unit: ControlUnit, width: int, height: int, init_image=None, *, init_resize_mode=None,
              preprocess_size: tuple[int, int] | None = None, crop=None) -> np.ndarray:
    """The map ``detect`` makes, as the HxWx3 uint8 picture the extension shows (and appends to the API's
    images); a tensor image goes through the 8-bit path."""
    (unit,) = check_units([unit])
    image, resize_mode = _source(unit, init_image, init_resize_mode, crop)
    if isinstance(image, torch.Tensor):
        image = tensor_to_uint8(image[:1])
    return detect_map(unit, image, width, height, resize_mode, preprocess_size)


def sources(s) -> dict:
    """``detect`` / ``shown_map``'s keywords for checked GenerationSettings ``s``: the init image as sent (the
    extension's ``p.init_images[0]``), img2img's resize mode, and with "only masked" inpainting the region every
    unit's image is cut to: ((x1, y1, x2, y2), the mask's size, the generation's size)."""
    crop = None
    prepared = s.inpaint
    if prepared is not None and prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        crop = ((x, y, x + w, y + h), prepared.overlay.size, (s.width, s.height))
    init = s.init_image if s.control_init_image is None else s.control_init_image
    return {"init_image": init, "init_resize_mode": s.resize_mode, "crop": crop}


def _source(unit: ControlUnit, init_image, init_resize_mode, crop=None) -> tuple:
    """(the image the unit preprocesses, its resize mode): the unit's own, else the init image with img2img's
    resize mode (the extension's ``choose_input_image``); cut to ``crop`` when given."""
    if unit.image is not None:
        image, mode = unit.image, unit.resize_mode
    elif init_image is None:
        raise ControlUnitError("the unit has no image and there is no init image to use instead")
    else:
        mode = unit.resize_mode if init_resize_mode is None else resize_mode_of(int(init_resize_mode))
        image = _init_image(init_image)
    if crop is not None:
        if isinstance(image, torch.Tensor):
            image = tensor_to_uint8(image[:1])
        image = crop_to_region(image, RESIZE_MODES.index(mode), *crop)
    return image, mode


def crop_to_region(image: np.ndarray, mode: int, region: tuple, mask_size: tuple, size: tuple) -> np.ndarray:
    """The extension's ``try_crop_image_with_a1111_mask`` ("only masked" inpainting, its default
    ``inpaint_crop_input_image``): webui's ``resize_image`` to the mask's size by ``mode``, the crop region cut
    out, ``resize_image`` "Resize and Fill" to the generation's size (PIL's filters act per channel, so the
    extension's channel-by-channel resize is the RGB resize)."""
    from PIL import Image  # lazy: PIL only for "only masked" inpainting with ControlNet

    picture = resize_image(mode, Image.fromarray(np.ascontiguousarray(image)), *mask_size).crop(region)
    return np.asarray(resize_image(2, picture, *size)).copy()


def detect_map(unit: ControlUnit, image: np.ndarray, width: int, height: int, resize_mode: str | None = None,
               preprocess_size: tuple[int, int] | None = None) -> np.ndarray:
    """Steps 2-4 on an HxWx3 uint8 image: the control map as HxWx3 uint8 at width x height."""
    resize_mode = unit.resize_mode if resize_mode is None else resize_mode
    res = unit.processor_res
    if unit.pixel_perfect:
        pw, ph = preprocess_size if preprocess_size is not None else (width, height)
        res = pixel_perfect_resolution(image, ph, pw, resize_mode)
    detected = preprocess(unit.module, image, res, unit.threshold_a, unit.threshold_b)
    return fit(detected, resize_mode, height, width)


def to_tensor(detected_map: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 3, H, W] float32 / 255 (the extension's ``get_pytorch_control``)."""
    return (torch.from_numpy(np.ascontiguousarray(detected_map)).float() / 255.0).permute(2, 0, 1)[None].contiguous()


def tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [0, 1] -> HxWx3 uint8 (round to nearest)."""
    return (t[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def _init_image(init_image) -> np.ndarray:
    if isinstance(init_image, torch.Tensor):  # the settings' init image, in [-1, 1]
        t = init_image if init_image.dim() == 4 else init_image[None]
        return tensor_to_uint8((t.float() + 1.0) / 2.0)
    if isinstance(init_image, np.ndarray):
        return hwc3(init_image)
    return hwc3(np.array(init_image.convert("RGB")))


# ---------------------------------------------------------------- pixel perfect


def pixel_perfect_resolution(image: np.ndarray, target_h: int, target_w: int, resize_mode: str) -> int:
    """The extension's ``external_code.pixel_perfect_resolution``: the short side the image has once scaled to
    the target as the resize mode scales it (to fit for "Resize and Fill", to cover otherwise), rounded half to
    even (numpy's round)."""
    raw_h, raw_w = image.shape[:2]
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if resize_mode == RESIZE_AND_FILL else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))


# ---------------------------------------------------------------- preprocessors


def preprocess(module: str, image: np.ndarray, resolution, threshold_a, threshold_b) -> np.ndarray:
    """The preprocessor's output (HxWx3 uint8) for an HxWx3 uint8 image: what /controlnet/detect returns."""
    name = module_of(module).name
    if name == "none":
        return image
    if name == "invert":
        return 255 - hwc3(image)
    cv2 = _cv2()
    padded, (h, w) = resize_with_pad(image, resolution)
    edges = cv2.Canny(padded, int(threshold_a), int(threshold_b))
    return np.ascontiguousarray(cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)[:h, :w])


def resize_with_pad(image: np.ndarray, resolution) -> tuple[np.ndarray, tuple[int, int]]:
    """The extension's ``resize_image_with_pad``: the short side scaled to ``resolution`` (cubic when enlarging,
    area otherwise; sides rounded half to even), then edge-padded to multiples of 64. Returns the padded image and
    the (h, w) to cut the result back to."""
    cv2 = _cv2()
    image = hwc3(image)
    raw_h, raw_w = image.shape[:2]
    k = float(resolution) / float(min(raw_h, raw_w))
    h, w = int(np.round(float(raw_h) * k)), int(np.round(float(raw_w) * k))
    if h < 1 or w < 1:
        raise ControlUnitError(f"processor_res {resolution} scales a {raw_w}x{raw_h} image to nothing")
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = _pad64(h), _pad64(w)
    return np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge"), (h, w)


def _pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


# ---------------------------------------------------------------- the map to the generation's size


def fit(detected_map: np.ndarray, resize_mode: str, h: int, w: int) -> np.ndarray:
    """The extension's ``detectmap_proc`` for image maps: the map (HxWx3 uint8) at h x w by the resize mode."""
    detected_map = hwc3(detected_map)
    if resize_mode == JUST_RESIZE:
        return np.ascontiguousarray(high_quality_resize(detected_map, w, h))
    old_h, old_w = detected_map.shape[:2]
    k0, k1 = float(h) / float(old_h), float(w) / float(old_w)
    if resize_mode == RESIZE_AND_FILL:
        k = min(k0, k1)
        border = np.concatenate([detected_map[0, :, :], detected_map[-1, :, :],
                                 detected_map[:, 0, :], detected_map[:, -1, :]], axis=0)  # [2W + 2H, 3]
        background = np.tile(np.median(border, axis=0).astype(detected_map.dtype)[None, None], [h, w, 1])
        scaled = high_quality_resize(detected_map, _round(old_w * k), _round(old_h * k))
        new_h, new_w = scaled.shape[:2]
        top, left = max(0, (h - new_h) // 2), max(0, (w - new_w) // 2)
        background[top:top + new_h, left:left + new_w] = scaled
        return np.ascontiguousarray(background)
    k = max(k0, k1)
    scaled = high_quality_resize(detected_map, _round(old_w * k), _round(old_h * k))
    new_h, new_w = scaled.shape[:2]
    top, left = max(0, (new_h - h) // 2), max(0, (new_w - w) // 2)
    return np.ascontiguousarray(scaled[top:top + h, left:left + w])


def _round(x: float) -> int:
    return int(np.round(x))


def high_quality_resize(x: np.ndarray, w: int, h: int) -> np.ndarray:
    """The extension's ``high_quality_resize`` (Lvmin Zhang's) for HxWx3 uint8 maps: maps of 3..199 colours
    (segmentations) by nearest neighbour; others by area when shrinking, cubic otherwise; a binary map (two
    colours, one below 16 and one above 240) is averaged to one channel and re-binarised by Otsu's threshold, and
    when it is made of one-pixel edges it is first thinned by non-maximum suppression and afterwards by
    ``lvmin_thin`` (with pruning when enlarging)."""
    if x.shape[0] == h and x.shape[1] == w:
        return x
    cv2 = _cv2()
    smaller, bigger = w * h < x.shape[0] * x.shape[1], w * h > x.shape[0] * x.shape[1]
    colors = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    binary = one_pixel_edge = False
    if colors == 2:
        binary = bool(np.min(x) < 16 and np.max(x) > 240)
        if binary:
            ones = np.ones((3, 3), dtype=np.uint8)
            opened = cv2.dilate(cv2.erode(x, ones, iterations=1), ones, iterations=1)
            one_pixel_edge = int(np.count_nonzero(opened < x)) * 2 > int(np.count_nonzero(x > 127))
    if 2 < colors < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (w, h), interpolation=interpolation)
    if binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_pixel_edge:
            y = edge_nms(y)
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = thin(y, prune=bigger)
        else:
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([y] * 3, axis=2)
    return y


def edge_nms(x: np.ndarray) -> np.ndarray:
    """The extension's ``nake_nms``: keep a pixel where it is the maximum of its 3-pixel line in some direction
    (horizontal, vertical, the two diagonals)."""
    cv2 = _cv2()
    lines = (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
             np.eye(3, dtype=np.uint8), np.fliplr(np.eye(3, dtype=np.uint8)).copy())
    y = np.zeros_like(x)
    for line in lines:
        np.putmask(y, cv2.dilate(x, kernel=line) == x, x)
    return y


def _rotations(*patterns: list) -> list[np.ndarray]:
    """Each pattern turned by 0, 90, 180 and 270 degrees, in the extension's order (all patterns per turn)."""
    base = [np.array(p, dtype=np.int32) for p in patterns]
    return [np.rot90(p, k=k, axes=(0, 1)) for k in range(4) for p in base]


# hit-or-miss patterns of ``scripts/lvminthin.py``: 1 must be set, -1 must be clear, 0 either
_THIN = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNE = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _thin_pass(x: np.ndarray, patterns) -> tuple[np.ndarray, bool]:
    """One pass: for each pattern in turn, clear the pixels it hits. Returns (x, whether nothing changed)."""
    cv2 = _cv2()
    done = True
    for pattern in patterns:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, pattern) > 127)
        x[hits] = 0
        done = done and hits[0].shape[0] == 0
    return x, done


def thin(x: np.ndarray, prune: bool = True) -> np.ndarray:
    """The extension's ``lvmin_thin``: up to 32 thinning passes until one changes nothing, then one pruning pass."""
    for _ in range(32):
        x, done = _thin_pass(x, _THIN)
        if done:
            break
    if prune:
        x, _ = _thin_pass(x, _PRUNE)
    return x


def _cv2():
    try:
        import cv2  # lazy: OpenCV is the optional `controlnet` extra
    except ImportError:
        raise ControlUnitError("the canny preprocessor and control-map resizing need OpenCV: "
                               "pip install 'tritonsd[controlnet]' (opencv-python-headless)") from None
    return cv2
