"""ControlNet units as the AUTOMATIC1111 extension (Mikubill/sd-webui-controlnet) defines them.

A unit names a ControlNet file, a control image and how to apply it. The extension's field names are kept, so a
unit reads the same in Python, on the command line (``--control*``), in a server request
(``alwayson_scripts.controlnet.args``), in a batch line and in the infotext (``ControlNet 0: "Module: ..."``).

Who does what:
- ``check_units`` (here) takes the spellings the extension takes and normalises them: ``resize_mode`` and
  ``control_mode`` as ints (0, 1, 2) or names, ``module`` by name or label, the image as a PIL image, an 8-bit
  array, a float tensor or base64 text; ``processor_res`` / thresholds outside the module's slider fall back to
  the module's default, as the extension's ``bound_check_params`` does;
- ``control/preprocess.py`` turns ``image`` into the control map (``module``, ``processor_res``, thresholds,
  ``resize_mode``, ``pixel_perfect``);
- ``control/models.py`` lists a ControlNet folder as the extension does (``name [hash]``) and resolves names;
- ``formats/controlnet_file.py`` reads the file, ``model/controlnet.py`` is the network;
- ``control/apply.py`` turns the units into per-step scales (``weight``, ``control_mode``,
  ``guidance_start`` / ``guidance_end``, ``hr_option``) and the residuals the UNet adds to its skips.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

# The extension's ``ControlMode`` values, and the short names the command line takes.
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_MODE_NAMES = {"balanced": CONTROL_MODES[0], "prompt": CONTROL_MODES[1], "control": CONTROL_MODES[2]}

# The extension's ``ResizeMode`` values, in the order of their ints (``ResizeMode.int_value``); its
# ``resize_mode_from_value`` also takes 3 ("Just Resize (Latent upscale)") as Just Resize, and these old names:
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
RESIZE_MODE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                       "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill",
                       "just_resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}

# The extension's ``HiResFixOption``: which passes of a hires-fix run the unit acts in.
HR_OPTIONS = ("Both", "Low res only", "High res only")

MAX_IMAGE_SIDE = 8192  # pixels per side of a control image (the generation's own limit, settings.MAX_SIDE)


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's sliders (the extension's ``PreprocessorParameter``): a value outside
    [minimum, maximum] (-1 above all) means ``value``."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    value: float = 0.5
    visible: bool = False

    def pick(self, given: float):
        """``given``, or the default where it is outside the slider (the default's own type, so checking a checked
        unit again changes nothing)."""
        return self.value if given < self.minimum or given > self.maximum or given == self.value else given

    def api_json(self) -> dict:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}


_RESOLUTION = Slider("Resolution", 64, 2048, 8, 512, True)  # the extension's default ``slider_resolution``


@dataclass(frozen=True)
class Module:
    """A preprocessor as the extension registers it (``scripts/preprocessor/model_free_preprocessors.py``)."""

    name: str
    label: str
    priority: int  # ``sorting_priority``: the module list's order
    resolution: Slider = _RESOLUTION
    slider_1: Slider = Slider()
    slider_2: Slider = Slider()
    soft_in_hr_fix: bool = False  # ``use_soft_projection_in_hr_fix``: the hires pass injects softly


# The preprocessors implemented (those that need no network of their own); /controlnet/module_list names these.
MODULES = {m.name: m for m in (
    Module("none", "none", 10),
    Module("canny", "canny", 100, slider_1=Slider("Low Threshold", 1, 255, 1, 100, True),
           slider_2=Slider("High Threshold", 1, 255, 1, 200, True), soft_in_hr_fix=True),
    Module("invert", "invert (from white bg & black line)", 20, resolution=Slider()),
)}


def sorted_modules() -> list[Module]:
    """The extension's ``get_sorted_preprocessors``: "none" first, then by priority and label, descending."""
    rest = sorted((m for m in MODULES.values() if m.name != "none"),
                  key=lambda m: str(m.priority).zfill(8) + m.label, reverse=True)
    return [MODULES["none"], *rest]


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet unit; defaults are the extension's ``ControlNetUnit``'s. Equal units have equal fields and
    equal image pixels (an array or tensor image compares by value)."""

    model: object  # a ControlNet file path, a name listed by /controlnet/model_list, or a loaded ControlNet
    image: object = None  # PIL image, HxW(x1/3/4) uint8 array, [1, 3, H, W] tensor in [0, 1] or base64 text;
    # None: the init image (img2img)
    module: str = "none"  # preprocessor: "none" (the image is the control map), "canny", "invert"
    weight: float = 1.0  # 0..2, as the extension's field
    resize_mode: str = "Crop and Resize"  # or 0 / 1 / 2, or an old alias
    processor_res: int = -1  # -1: the module's default (512)
    threshold_a: float = -1  # -1: the module's default (canny: 100)
    threshold_b: float = -1  # -1: the module's default (canny: 200)
    guidance_start: float = 0.0  # the unit acts while start <= step / steps <= end (both ends inclusive)
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"  # or 0 / 1 / 2, or "balanced" / "prompt" / "control"
    hr_option: str = "Both"  # hires fix: "Both", "Low res only", "High res only"

    def __eq__(self, other) -> bool:
        if not isinstance(other, ControlUnit):
            return NotImplemented
        names = [f.name for f in fields(self) if f.name != "image"]
        return all(getattr(self, n) == getattr(other, n) for n in names) and _same_image(self.image, other.image)

    __hash__ = None  # images are not hashable


def _same_image(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b)) and a.dtype == b.dtype
    return type(a) is type(b) and not isinstance(a, (torch.Tensor, np.ndarray)) and a == b


class ControlUnitError(ValueError):
    """A unit the pipeline cannot honour (one line, for every door)."""


def check_units(units) -> tuple:
    """The units as a tuple of checked ``ControlUnit``s (names normalised to the extension's, the image decoded)."""
    if isinstance(units, ControlUnit):
        units = (units,)
    if not isinstance(units, (list, tuple)):
        raise ControlUnitError(f"must be a list of ControlUnit, got {type(units).__name__}")
    return tuple(_check_unit(i, u) for i, u in enumerate(units))


def module_of(name) -> Module:
    """The preprocessor by its name or label (as the extension's ``get_preprocessor``; names also in any case)."""
    if isinstance(name, str):
        for m in MODULES.values():
            if name in (m.name, m.label) or name.lower() == m.name:
                return m
    known = ", ".join(m.name for m in sorted_modules())
    shown = name if not isinstance(name, str) else name[:60].encode("unicode_escape").decode()
    raise ControlUnitError(f"unknown module {shown!r} (implemented: {known})")


def resize_mode_of(value) -> str:
    """The extension's ``resize_mode_from_value``: 0 / 1 / 2 (3: Just Resize), a name or an old alias."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value in (0, 1, 2, 3):
        return RESIZE_MODES[0 if value == 3 else value]
    elif isinstance(value, str):
        name = RESIZE_MODE_ALIASES.get(value, value)
        if name in RESIZE_MODES:
            return name
    raise ControlUnitError(f"resize_mode must be one of {', '.join(RESIZE_MODES)} (or 0, 1, 2), got {value!r}")


def control_mode_of(value) -> str:
    """A control mode by the extension's name, its int (0, 1, 2, as webuiapi sends it) or the short names."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) and value in (0, 1, 2):
        return CONTROL_MODES[value]
    elif isinstance(value, str):
        name = CONTROL_MODE_NAMES.get(value.lower(), value)
        if name in CONTROL_MODES:
            return name
    raise ControlUnitError(f"control_mode must be one of {', '.join(CONTROL_MODES)} (or 0, 1, 2, or "
                           f"{', '.join(CONTROL_MODE_NAMES)}), got {value!r}")


def _check_unit(index: int, unit) -> ControlUnit:
    if not isinstance(unit, ControlUnit):
        raise ControlUnitError(f"unit {index} must be a ControlUnit, got {type(unit).__name__}")
    try:
        return _checked(unit)
    except ControlUnitError as e:
        raise ControlUnitError(f"unit {index}: {e}") from None


def _checked(unit: ControlUnit) -> ControlUnit:
    module = module_of(unit.module)
    mode = control_mode_of(unit.control_mode)
    resize = resize_mode_of(unit.resize_mode)
    if unit.hr_option not in HR_OPTIONS:
        raise ControlUnitError(f"hr_option must be one of {', '.join(HR_OPTIONS)}, got {unit.hr_option!r}")
    if not isinstance(unit.pixel_perfect, bool):
        raise ControlUnitError(f"pixel_perfect must be true or false, got {unit.pixel_perfect!r}")
    numbers = {name: _number(name, getattr(unit, name))
               for name in ("weight", "guidance_start", "guidance_end", "processor_res", "threshold_a", "threshold_b")}
    if not 0.0 <= numbers["weight"] <= 2.0:
        raise ControlUnitError(f"weight must be within 0..2, got {numbers['weight']:g}")
    start, end = numbers["guidance_start"], numbers["guidance_end"]
    if not 0.0 <= start <= end <= 1.0:
        raise ControlUnitError(f"needs 0 <= guidance_start <= guidance_end <= 1, got {start:g} and {end:g}")
    if unit.model is None or (isinstance(unit.model, str) and unit.model.strip() in ("", "None")):
        raise ControlUnitError("names no ControlNet model")
    res = module.resolution.pick(numbers["processor_res"])
    return replace(unit, module=module.name, control_mode=mode, resize_mode=resize,
                   weight=numbers["weight"], guidance_start=start, guidance_end=end,
                   processor_res=int(res) if float(res).is_integer() else res,
                   threshold_a=module.slider_1.pick(numbers["threshold_a"]),
                   threshold_b=module.slider_2.pick(numbers["threshold_b"]),
                   image=control_image(unit.image))


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ControlUnitError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- control images


def control_image(value):
    """A control image as the preprocessors take it: an HxWx3 uint8 array (the extension's ``HWC3``: gray
    repeated, alpha blended onto white), or a [1, 3, H, W] float32 tensor in [0, 1] kept as given (a control map
    made elsewhere; [B, 3, H, W] gives each image of a batch its own map, with module "none" at the generation's
    size); None stays None (the init image is used). Base64 text (with or without a ``data:`` prefix)
    is decoded; a file name is not opened (the doors read files themselves)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _decode_base64(value)
    if isinstance(value, torch.Tensor):
        return _tensor_image(value)
    if _is_pil(value):
        value = _pil_array(value)
    if not isinstance(value, np.ndarray):
        raise ControlUnitError(f"image must be a PIL image, a uint8 array, a tensor or base64 text, got "
                               f"{type(value).__name__}")
    return hwc3(value)


def hwc3(x: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 (the extension's ``annotator.util.HWC3``)."""
    if x.dtype != np.uint8:
        raise ControlUnitError(f"an image array must be uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ControlUnitError(f"an image array must be HxW or HxWx1/3/4, got shape {list(x.shape)}")
    _check_side(x.shape[1], x.shape[0])
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def _check_side(w: int, h: int) -> None:
    if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
        raise ControlUnitError(f"image is {w}x{h}; each side must be within 1..{MAX_IMAGE_SIDE}")


def _tensor_image(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[0] < 1 or t.shape[1] != 3 or not t.is_floating_point():
        raise ControlUnitError(f"an image tensor must be float [1, 3, H, W] in 0..1 (or [B, 3, H, W]: one map per "
                               f"image, module none), got {str(t.dtype)[6:]} {list(t.shape)}")
    _check_side(t.shape[3], t.shape[2])
    t = t.detach().float()
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0.0 or float(t.max()) > 1.0:
        raise ControlUnitError("an image tensor must hold finite values in 0..1")
    return t


def _is_pil(value) -> bool:
    from PIL import Image  # lazy: PIL only where a PIL image is given

    return isinstance(value, Image.Image)


def _pil_array(image) -> np.ndarray:
    _check_side(*image.size)
    if image.mode in ("RGB", "RGBA", "L"):
        return np.array(image)
    if image.mode in ("LA", "P", "PA") or "transparency" in image.info:
        return np.array(image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _decode_base64(text: str):
    from PIL import Image, UnidentifiedImageError  # lazy: PIL only where base64 text is given

    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=False)
        image = Image.open(io.BytesIO(data))
        _check_side(*image.size)  # before the pixels are decoded
        image.load()
    except ControlUnitError:
        raise
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError):
        raise ControlUnitError("image is not an image (expected a PNG / JPEG / WebP, base64-encoded)") from None
    return image
