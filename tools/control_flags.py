"""``tritonsd generate``'s ControlNet flags: each ``--control MODEL`` starts a unit, and the ``--control-*`` flags
after it set that unit's fields (the A1111 extension's names, ``sampler/control.py``):

    --control canny.safetensors --control-image edges.png --control-weight 0.8 \\
    --control depth.pth --control-image depth.png --control-module none --control-start 0 --control-end 0.5

``MODEL`` is a file, or a name listed in ``--controlnet-dir`` (``name`` or ``name [hash]``, as the extension and
the infotext name it). With ``--from-png`` / ``--infotext`` whose text holds ``ControlNet N`` units, the PNG does
not hold their control images: ``--control-image`` flags given before any ``--control`` attach to those units in
order (one per unit), and their models are looked up in ``--controlnet-dir``; a ``--control`` replaces them all.
Every mistake here is bad usage (exit code 2), a control image that cannot be read included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tritonsd.control.models import attach_images, resolve_units
from tritonsd.sampler.control import ControlUnit, ControlUnitError
from tritonsd.tools.cli import UsageError

# flag -> ControlUnit field
FIELDS = {"--control-image": "image", "--control-module": "module", "--control-weight": "weight",
          "--control-start": "guidance_start", "--control-end": "guidance_end", "--control-mode": "control_mode",
          "--control-resize": "resize_mode", "--control-res": "processor_res", "--control-threshold-a": "threshold_a",
          "--control-threshold-b": "threshold_b", "--control-pixel-perfect": "pixel_perfect",
          "--control-hr-option": "hr_option"}
RESIZE_NAMES = {"just-resize": "Just Resize", "crop-and-resize": "Crop and Resize", "resize-and-fill": "Resize and Fill"}
HR_NAMES = {"both": "Both", "low": "Low res only", "high": "High res only"}


class _InOrder(argparse.Action):
    """Records (flag, value) in the order given, so each ``--control-*`` belongs to the ``--control`` before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        flags = list(getattr(namespace, "control_flags", None) or [])
        flags.append((self.option_strings[0], True if self.nargs == 0 else values))
        namespace.control_flags = flags


def add_control_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet (the A1111 extension's units; repeat --control for several)")
    g.set_defaults(control_flags=[])
    add = lambda *names, **kw: g.add_argument(*names, action=_InOrder, dest="control_flags", **kw)  # noqa: E731
    add("--control", metavar="MODEL", help="start a unit: a ControlNet file, or a name in --controlnet-dir")
    add("--control-image", type=Path, metavar="IMAGE",
        help="the unit's control image (default: the --init-image); before any --control: an image for the "
             "--from-png infotext's units, in order")
    add("--control-module", metavar="NAME", help="preprocessor: none (default: the image is the map), canny, invert")
    add("--control-weight", type=float, metavar="W", help="control weight, 0..2 (default 1)")
    add("--control-start", type=float, metavar="S", help="guidance start, 0..1 of the steps (default 0)")
    add("--control-end", type=float, metavar="E", help="guidance end, 0..1 of the steps (default 1)")
    add("--control-mode", metavar="MODE",
        help="balanced (default), prompt (My prompt is more important), control (ControlNet is more important)")
    add("--control-resize", metavar="MODE",
        help="the image to the generation's size: just-resize, crop-and-resize (default), resize-and-fill")
    add("--control-res", type=int, metavar="N", help="preprocessor resolution (default 512)")
    add("--control-threshold-a", type=float, metavar="F", help="canny's low threshold, 1..255 (default 100)")
    add("--control-threshold-b", type=float, metavar="F", help="canny's high threshold, 1..255 (default 200)")
    add("--control-pixel-perfect", nargs=0, help="preprocessor resolution from the image and the generation's size")
    add("--control-hr-option", metavar="WHICH", help="with --hires: both (default), low, high: the passes it acts in")
    g.add_argument("--controlnet-dir", type=Path, default=None, metavar="DIR",
                   help="ControlNet files, named by --control and the infotext's 'ControlNet N' units")


def control_units(args: argparse.Namespace, open_image, infotext_units=()) -> tuple | None:
    """The units the flags give (files read, models found), the infotext's units with the flags' images, or None
    when neither has any."""
    units, images = [], []
    for flag, value in getattr(args, "control_flags", None) or []:
        if flag == "--control":
            units.append({"model": value})
        elif not units:
            if flag != "--control-image":
                raise UsageError(f"{flag} needs a --control MODEL before it (each --control starts a unit)")
            images.append(value)
        elif FIELDS[flag] in units[-1]:
            raise UsageError(f"{flag} is given twice for the unit of --control {units[-1]['model']}")
        else:
            units[-1][FIELDS[flag]] = value
    directory = getattr(args, "controlnet_dir", None)
    if directory is not None and not directory.is_dir():
        raise UsageError(f"--controlnet-dir {directory} is not a directory")
    try:
        if units:
            if images:
                raise UsageError("--control-image before the first --control belongs to --from-png's units; "
                                 "with --control, give each unit's image after its --control")
            return resolve_units(tuple(_unit(u, open_image) for u in units), directory)
        if images and not infotext_units:
            raise UsageError("--control-image needs a --control MODEL before it (or --from-png / --infotext "
                             "holding ControlNet units)")
        if infotext_units:
            opened = [_open(p, open_image) for p in images]
            return resolve_units(attach_images(infotext_units, opened), directory)
    except ControlUnitError as e:
        raise UsageError(f"--control: {e}") from None
    return None


def _unit(fields: dict, open_image) -> ControlUnit:
    fields = dict(fields)
    if "image" in fields:
        fields["image"] = _open(fields["image"], open_image)
    if isinstance(fields.get("resize_mode"), str):
        fields["resize_mode"] = RESIZE_NAMES.get(fields["resize_mode"].lower(), fields["resize_mode"])
    if isinstance(fields.get("hr_option"), str):
        fields["hr_option"] = HR_NAMES.get(fields["hr_option"].lower(), fields["hr_option"])
    return ControlUnit(**fields)


def _open(path: Path, open_image):
    try:
        return open_image(path, "control image")
    except ValueError as e:
        raise UsageError(str(e)) from None
