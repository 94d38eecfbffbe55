"""ControlNet in the server, as the A1111 extension (Mikubill/sd-webui-controlnet) serves it.

* Requests: ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`` (the script's name in any case:
  ``webuiapi`` sends "ControlNet") in txt2img (hires fix included: ``hr_option``) and img2img / inpainting
  (a unit without an image uses the init image). Each unit is a dict with the extension's field names
  (``ControlNetUnit``: module, model, weight, image, resize_mode, processor_res, threshold_a / _b,
  guidance_start / _end, pixel_perfect, control_mode, hr_option; the old aliases input_image, guidance,
  lowvram). As in the extension, a unit is used only with ``"enabled": true`` (its field's default is false);
  entries that are not dicts are skipped. Fields that would change the image and are not implemented
  (``advanced_weighting``, ``effective_region_mask``, a ``mask``, ...) are a 422 naming them; fields with no
  effect here (``low_vram``, ...) are ignored.
* Responses: as the extension's ``postprocess``, each enabled unit's detected map is appended to ``images``
  (after the generated ones; with hires fix its map at the second pass's size, then the first's) unless the
  unit has ``"save_detected_map": false`` or the option ``control_net_no_detectmap`` (``/sdapi/v1/options`` or
  ``override_settings``) is true; ``info``'s infotexts and seeds stay the generated images'.
* ``model`` is a title of ``/controlnet/model_list`` (``name [hash]``) or a name (``--controlnet-dir``); never
  a path.
* Routes: ``/controlnet/version``, ``/controlnet/model_list``, ``/controlnet/module_list``
  (``alias_names``), ``/controlnet/detect`` (the preprocessor alone; ``controlnet_images``, which ``webuiapi``
  sends, is taken for the extension's ``controlnet_input_images``).
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from tritonsd.control.models import list_models, resolve_units
from tritonsd.control.preprocess import preprocess, shown_map, sources
from tritonsd.sampler.control import ControlUnit, ControlUnitError, check_units, control_image, module_of, \
    sorted_modules
from tritonsd.serve.errors import BadRequest, printable
from tritonsd.serve.images import decode_image
from tritonsd.sampler.upscale import hires_target

SCRIPT = "controlnet"
API_VERSION = 3  # the extension's ``external_code.get_api_version``
ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
UNIT_FIELDS = ("module", "model", "weight", "image", "resize_mode", "processor_res", "threshold_a", "threshold_b",
               "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option")
# fields that change the image and are not implemented: (field, the values that ask for nothing)
NOT_IMPLEMENTED = {"advanced_weighting": (None,), "effective_region_mask": (None, ""), "mask": (None, ""),
                   "ipadapter_input": (None,), "input_mode": ("simple", None), "animatediff_batch": (False, None),
                   "union_control_type": ("Unknown", None), "batch_images": (None, "", [])}
MAX_DETECT_IMAGES = 16


def script_args(scripts) -> list | None:
    """The ``args`` of the request's ControlNet entry (its name in any case), or None when there is none."""
    if not isinstance(scripts, dict):
        return None
    for name, entry in scripts.items():
        if isinstance(name, str) and name.lower() == SCRIPT:
            args = entry.get("args") if isinstance(entry, dict) else entry
            if args is None:
                return []
            if not isinstance(args, list):
                raise BadRequest(f"alwayson_scripts.{printable(name)}.args must be a list of ControlNet units")
            return args
    return None


def is_controlnet(name) -> bool:
    return isinstance(name, str) and name.lower() == SCRIPT


def _enabled_units(scripts):
    """(where, fields with the aliases renamed) of each enabled unit of the request, in order."""
    for i, arg in enumerate(script_args(scripts) or []):
        if not isinstance(arg, dict):
            continue
        fields = {ALIASES.get(k, k): v for k, v in arg.items()}
        if fields.get("enabled", False):
            yield f"alwayson_scripts.controlnet.args[{i}]", fields


def units_from_request(scripts, controlnet_dir) -> tuple:
    """The request's enabled units, checked (images decoded, names normalised) and their models found in
    ``controlnet_dir``; a BadRequest (422) naming the unit otherwise."""
    units = []
    for where, fields in _enabled_units(scripts):
        asked = [k for k, neutral in NOT_IMPLEMENTED.items() if k in fields and fields[k] not in neutral]
        if asked:
            raise BadRequest(f"{where}: not implemented by tritonsd, and the image would differ: "
                             f"{', '.join(asked)}", "UnsupportedFields")
        values = {k: fields[k] for k in UNIT_FIELDS if fields.get(k) is not None}
        values["image"] = _image(where, values.get("image"))
        try:
            (unit,) = check_units([ControlUnit(**{"model": None, **values})])
            (unit,) = resolve_units([unit], controlnet_dir, allow_paths=False)
        except ControlUnitError as e:
            raise BadRequest(f"{where}: {str(e).removeprefix('unit 0: ')}") from None
        units.append(unit)
    return tuple(units)


def saved_maps(scripts, no_detectmap) -> tuple[bool, ...]:
    """Per enabled unit, whether its detected map joins the response's images: its ``save_detected_map`` (the
    extension's default: true), none at all under the option ``control_net_no_detectmap``."""
    return tuple(not no_detectmap and bool(fields.get("save_detected_map", True))
                 for _, fields in _enabled_units(scripts))


def detected_maps(s, saved: tuple[bool, ...]) -> list[str]:
    """The detected maps the extension's ``postprocess`` appends to ``processed.images`` once per request (after
    every image of every iteration), as base64 PNGs: per unit with ``saved``, with hires fix its map at the second
    pass's size first (``get_control`` stores it first), then at the first pass's size. ``s``: the checked
    settings; a unit of weight 0 and one that sits out a pass show their maps too, as there."""
    sizes = [(s.width, s.height)]
    if s.enable_hr:
        target = hires_target(s.width, s.height, s.hr_scale, s.hr_resize_x, s.hr_resize_y)
        sizes.insert(0, (target.upscale_to_x, target.upscale_to_y))
    out = []
    for unit, save in zip(s.controls, saved):
        if save:
            out.extend(_png_b64(shown_map(unit, w, h, preprocess_size=(s.width, s.height), **sources(s)))
                       for w, h in sizes)
    return out


def _image(where: str, value):
    """A unit's ``image``: base64 text (decoded under the server's pixel limit), ``{"image": ..., "mask": ...}``
    or ``[image, mask]`` without a mask; "" and None: the init image."""
    if isinstance(value, dict):
        value, mask = value.get("image"), value.get("mask")
    elif isinstance(value, list) and len(value) == 2:
        value, mask = value
    else:
        mask = None
    if mask not in (None, ""):
        raise BadRequest(f"{where}: a mask with the image is not implemented by tritonsd", "UnsupportedFields")
    if value in (None, ""):
        return None
    return decode_image(f"{where}.image", value)


# ---------------------------------------------------------------- routes


def module_list(alias_names: bool = False) -> dict:
    """The extension's ``/controlnet/module_list``: the implemented preprocessors, and each one's sliders."""
    modules = sorted_modules()
    names = [m.label if alias_names else m.name for m in modules]
    detail = {name: {"model_free": False,
                     "sliders": [s.api_json() for s in (m.resolution, m.slider_1, m.slider_2) if s.visible]}
              for name, m in zip(names, modules)}
    return {"module_list": names, "module_detail": detail}


def model_list(controlnet_dir) -> dict:
    return {"model_list": list(list_models(controlnet_dir))}


def detect(body: dict) -> dict:
    """The extension's ``/controlnet/detect``: each image through the preprocessor at ``processor_res`` (its
    slider's default where out of range), as base64 PNGs."""
    name = body.get("controlnet_module", "none")
    try:
        module = module_of(name)
    except ControlUnitError as e:
        raise BadRequest(f"Module not available: {e}") from None
    images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
    if not isinstance(images, list) or not images:
        raise BadRequest("No image selected")
    if len(images) > MAX_DETECT_IMAGES:
        raise BadRequest(f"controlnet_input_images holds {len(images)} images; the limit is {MAX_DETECT_IMAGES}")
    if body.get("controlnet_masks"):
        raise BadRequest("controlnet_masks: no implemented preprocessor takes a mask", "UnsupportedFields")
    try:
        (unit,) = check_units([ControlUnit(model="detect", module=module.name,
                                           processor_res=_number(body, "controlnet_processor_res"),
                                           threshold_a=_number(body, "controlnet_threshold_a"),
                                           threshold_b=_number(body, "controlnet_threshold_b"))])
        out = []
        for i, text in enumerate(images):
            image = control_image(decode_image(f"controlnet_input_images[{i}]", text))
            out.append(preprocess(unit.module, image, unit.processor_res, unit.threshold_a, unit.threshold_b))
    except ControlUnitError as e:
        raise BadRequest(str(e).removeprefix("unit 0: ")) from None
    return {"info": "Success", "images": [_png_b64(x) for x in out]}


def _number(body: dict, key: str):
    value = body.get(key, -1)
    return -1 if value is None else value


def _png_b64(array: np.ndarray) -> str:
    """A detected map as webui's ``encode_pil_to_base64`` sends it: a PNG, base64, no data: prefix."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
