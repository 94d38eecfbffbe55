"""ControlNet units as the AUTOMATIC1111 extension (Mikubill/sd-webui-controlnet) defines them.

A unit names a ControlNet file, a control image and how to apply it. The extension's field names are kept, so a
unit reads the same in Python, on the command line (``--control*``), in a server request
(``alwayson_scripts.controlnet.args``), in a batch line and in the infotext (``ControlNet 0: "Module: ..."``).

Who does what:
- ``control/preprocess.py`` turns ``image`` into the control map (``module``, ``processor_res``, thresholds,
  ``resize_mode``, ``pixel_perfect``);
- ``formats/controlnet_file.py`` reads the file, ``model/controlnet.py`` is the network;
- ``control/apply.py`` turns the units into per-step scales (``weight``, ``control_mode``,
  ``guidance_start`` / ``guidance_end``) and the residuals the UNet adds to its skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# The extension's ``ControlMode`` values, and the short names the command line takes.
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_MODE_NAMES = {"balanced": CONTROL_MODES[0], "prompt": CONTROL_MODES[1], "control": CONTROL_MODES[2]}

# The extension's ``ResizeMode`` values (its ``external_code.resize_mode_from_value`` also takes 0, 1, 2).
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit; defaults are the extension's ``ControlNetUnit``'s."""

    model: object  # a ControlNet file path, a name listed by /controlnet/model_list, or a loaded ControlNet
    image: object = None  # PIL image, HxWx3 uint8 array or [1, 3, H, W] tensor in [0, 1]; None: the init image
    module: str = "none"  # preprocessor: "none" (the image is the control map), "canny", "invert"
    weight: float = 1.0
    resize_mode: str = "Crop and Resize"
    processor_res: int = -1  # -1: the module's default (512)
    threshold_a: float = -1  # -1: the module's default (canny: 100)
    threshold_b: float = -1  # -1: the module's default (canny: 200)
    guidance_start: float = 0.0  # the unit acts while start <= step / steps <= end (both ends inclusive)
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"


class ControlUnitError(ValueError):
    """A unit the pipeline cannot honour (one line, for every door)."""


def check_units(units) -> tuple:
    """The units as a tuple of checked ``ControlUnit``s (names of modes normalised to the extension's)."""
    if isinstance(units, ControlUnit):
        units = (units,)
    if not isinstance(units, (list, tuple)):
        raise ControlUnitError(f"must be a list of ControlUnit, got {type(units).__name__}")
    return tuple(_check_unit(i, u) for i, u in enumerate(units))


def _check_unit(index: int, unit) -> ControlUnit:
    if not isinstance(unit, ControlUnit):
        raise ControlUnitError(f"unit {index} must be a ControlUnit, got {type(unit).__name__}")
    mode = CONTROL_MODE_NAMES.get(unit.control_mode, unit.control_mode)
    if mode not in CONTROL_MODES:
        raise ControlUnitError(f"unit {index}: control_mode must be one of {', '.join(CONTROL_MODES)} (or "
                               f"{', '.join(CONTROL_MODE_NAMES)}), got {unit.control_mode!r}")
    if unit.resize_mode not in RESIZE_MODES:
        raise ControlUnitError(f"unit {index}: resize_mode must be one of {', '.join(RESIZE_MODES)}, "
                               f"got {unit.resize_mode!r}")
    for name in ("weight", "guidance_start", "guidance_end"):
        value = getattr(unit, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ControlUnitError(f"unit {index}: {name} must be a finite number, got {value!r}")
    if not 0.0 <= unit.guidance_start <= unit.guidance_end <= 1.0:
        raise ControlUnitError(f"unit {index}: needs 0 <= guidance_start <= guidance_end <= 1, got "
                               f"{unit.guidance_start:g} and {unit.guidance_end:g}")
    return replace(unit, control_mode=mode, weight=float(unit.weight),
                   guidance_start=float(unit.guidance_start), guidance_end=float(unit.guidance_end))
