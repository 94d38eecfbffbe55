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

from dataclasses import dataclass

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
