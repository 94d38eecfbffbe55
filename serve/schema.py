"""A1111's request and response bodies (v1.10 ``modules/api/models.py``): the same field names and the same API
defaults (``StableDiffusionProcessing``'s: 50 steps, CFG 7, 512x512, sampler "Euler", seed -1), not the CLI's.

Each field is marked as one the server implements, one that does nothing here by nature
(``do_not_save_samples``: the server saves nothing) or one it does not implement (``restore_faces``,
``script_name``, an ``alwayson_scripts`` entry, ...). A request whose unimplemented fields ask for something (a
value that would change A1111's image: not a default, ``false``, an empty list, nor what real clients send on
every call, ``NEUTRAL``) is refused with a 422 naming them (``unsupported_fields``), unless the server runs with
``--ignore-unsupported``: then they are named in the response's info (``ignored_fields``) and the log. Unknown
keys ask A1111 for nothing (it drops them): they are named in ``ignored_fields`` only.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model
from tritonsd.sampler.infotext_parse import generation_settings, unsupported_keys
from tritonsd.serve.controlnet import script_args

IMPLEMENTED, NOOP, IGNORED = "implemented", "noop", "ignored"

# name -> (type, A1111's API default, how the server treats it)
COMMON: dict[str, tuple[Any, Any, str]] = {
    "prompt": (str, "", IMPLEMENTED),
    "negative_prompt": (Optional[str], "", IMPLEMENTED),
    "styles": (Optional[list[str]], None, IGNORED),
    "seed": (Optional[int], -1, IMPLEMENTED),
    "subseed": (Optional[int], -1, IMPLEMENTED),
    "subseed_strength": (Optional[float], 0.0, IMPLEMENTED),
    "seed_resize_from_h": (Optional[int], -1, IGNORED),
    "seed_resize_from_w": (Optional[int], -1, IGNORED),
    "sampler_name": (Optional[str], None, IMPLEMENTED),
    "scheduler": (Optional[str], None, IMPLEMENTED),
    "batch_size": (Optional[int], 1, IMPLEMENTED),
    "n_iter": (Optional[int], 1, IMPLEMENTED),
    "steps": (Optional[int], 50, IMPLEMENTED),
    "cfg_scale": (Optional[float], 7.0, IMPLEMENTED),
    "width": (Optional[int], 512, IMPLEMENTED),
    "height": (Optional[int], 512, IMPLEMENTED),
    "restore_faces": (Optional[bool], None, IGNORED),
    "tiling": (Optional[bool], None, IMPLEMENTED),  # None: A1111's ``opts.tiling``, off
    "do_not_save_samples": (Optional[bool], False, NOOP),
    "do_not_save_grid": (Optional[bool], False, NOOP),
    "eta": (Optional[float], None, IMPLEMENTED),
    "s_min_uncond": (Optional[float], None, IGNORED),
    "s_churn": (Optional[float], None, IGNORED),
    "s_tmax": (Optional[float], None, IGNORED),
    "s_tmin": (Optional[float], None, IGNORED),
    "s_noise": (Optional[float], None, IGNORED),
    "override_settings": (Optional[dict[str, Any]], None, IMPLEMENTED),
    "override_settings_restore_afterwards": (Optional[bool], True, IMPLEMENTED),
    "refiner_checkpoint": (Optional[str], None, IGNORED),
    "refiner_switch_at": (Optional[float], None, IGNORED),
    "disable_extra_networks": (Optional[bool], False, IGNORED),
    "firstpass_image": (Optional[str], None, IGNORED),
    "comments": (Optional[dict[str, Any]], None, NOOP),
    "sampler_index": (Optional[str], "Euler", IMPLEMENTED),
    "script_name": (Optional[str], None, IGNORED),
    "script_args": (Optional[list], [], NOOP),
    "send_images": (Optional[bool], True, IMPLEMENTED),
    "save_images": (Optional[bool], False, NOOP),
    "alwayson_scripts": (Optional[dict[str, Any]], {}, IGNORED),
    "force_task_id": (Optional[str], None, IMPLEMENTED),  # the job's task id (/internal/progress, interrupt)
    "infotext": (Optional[str], None, IMPLEMENTED),
}

TXT2IMG_ONLY = {
    "enable_hr": (Optional[bool], False, IMPLEMENTED),
    "denoising_strength": (Optional[float], None, IMPLEMENTED),  # the hires pass's; None: A1111's API 0.75
    "firstphase_width": (Optional[int], 0, IGNORED),  # the pre-1.0 hires fix's first-pass size
    "firstphase_height": (Optional[int], 0, IGNORED),
    "hr_scale": (Optional[float], 2.0, IMPLEMENTED),
    "hr_upscaler": (Optional[str], None, IMPLEMENTED),  # None: "Latent" (A1111's latent_upscale_default_mode)
    "hr_second_pass_steps": (Optional[int], 0, IMPLEMENTED),
    "hr_resize_x": (Optional[int], 0, IMPLEMENTED),
    "hr_resize_y": (Optional[int], 0, IMPLEMENTED),
    "hr_checkpoint_name": (Optional[str], None, IMPLEMENTED),  # a checkpoint of the catalog; None: the same
    "hr_sampler_name": (Optional[str], None, IMPLEMENTED),
    "hr_scheduler": (Optional[str], None, IMPLEMENTED),
    "hr_prompt": (Optional[str], "", IMPLEMENTED),
    "hr_negative_prompt": (Optional[str], "", IMPLEMENTED),
}
API_DENOISING_STRENGTH = 0.75  # A1111's API default for an omitted denoising_strength (its UI's hires default: 0.7)
SAME = {"hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "Use same sampler",
        "hr_scheduler": "Use same scheduler"}  # what A1111's UI sends for "the first pass's"

IMG2IMG_ONLY = {
    "init_images": (Optional[list[str]], None, IMPLEMENTED),
    "resize_mode": (Optional[int], 0, IMPLEMENTED),
    "denoising_strength": (Optional[float], 0.75, IMPLEMENTED),
    "image_cfg_scale": (Optional[float], None, NOOP),  # instruct-pix2pix models only
    "mask": (Optional[str], None, IMPLEMENTED),
    "mask_blur_x": (Optional[int], 4, IMPLEMENTED),
    "mask_blur_y": (Optional[int], 4, IMPLEMENTED),
    "mask_blur": (Optional[int], None, IMPLEMENTED),
    "mask_round": (Optional[bool], True, NOOP),
    "inpainting_fill": (Optional[int], 0, IMPLEMENTED),
    "inpaint_full_res": (Optional[bool], True, IMPLEMENTED),
    "inpaint_full_res_padding": (Optional[int], 0, IMPLEMENTED),
    "inpainting_mask_invert": (Optional[int], 0, IMPLEMENTED),
    "initial_noise_multiplier": (Optional[float], None, IGNORED),
    "latent_mask": (Optional[str], None, IGNORED),
    "include_init_images": (Optional[bool], False, IMPLEMENTED),
}

# values that leave A1111's behaviour as with the default: naming them as ignored would only be noise
# (s_tmax 0 is A1111's "no limit": ``s_tmax or inf``; webuiapi sends it, and eta 1.0, on every call)
NEUTRAL = {"s_noise": (1, 1.0), "s_tmax": (math.inf, 0), "initial_noise_multiplier": (1, 1.0),
           "hr_checkpoint_name": (SAME["hr_checkpoint_name"],)}


def _model(name: str, table: dict) -> type[BaseModel]:
    fields = {k: (t, Field(default=d)) for k, (t, d, _) in table.items()}
    return create_model(name, __config__=ConfigDict(extra="allow", protected_namespaces=()), **fields)


TXT2IMG_FIELDS = {**COMMON, **TXT2IMG_ONLY}
IMG2IMG_FIELDS = {**COMMON, **IMG2IMG_ONLY}
Txt2ImgRequest = _model("StableDiffusionProcessingTxt2Img", TXT2IMG_FIELDS)
Img2ImgRequest = _model("StableDiffusionProcessingImg2Img", IMG2IMG_FIELDS)


# generation_settings' name -> the request field it fills (A1111 v1.10's ``infotext`` request field)
_FROM_INFOTEXT = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps",
                  "sampler": "sampler_name", "schedule_type": "scheduler", "cfg_scale": "cfg_scale", "seed": "seed",
                  "width": "width", "height": "height", "subseed": "subseed", "subseed_strength": "subseed_strength",
                  "tiling": "tiling"}


_HIRES_FROM_INFOTEXT = {"hr_scale": "hr_scale", "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y",
                        "hr_second_pass_steps": "hr_second_pass_steps", "hr_upscaler": "hr_upscaler",
                        "hr_sampler": "hr_sampler_name", "hr_scheduler": "hr_scheduler", "hr_prompt": "hr_prompt",
                        "hr_negative_prompt": "hr_negative_prompt", "hr_checkpoint_name": "hr_checkpoint_name"}


def apply_infotext(req: BaseModel) -> tuple[BaseModel, list[str]]:
    """The request with the fields it did not send taken from its ``infotext`` (as A1111's
    ``apply_infotext``; values that do not parse are left out, one note each); (request, notes)."""
    if not req.infotext:
        return req, []

    parsed = generation_settings(req.infotext)
    sent = req.model_fields_set
    update = {field: parsed[name] for name, field in _FROM_INFOTEXT.items() if name in parsed and field not in sent}
    if "clip_skip" in parsed and "CLIP_stop_at_last_layers" not in (req.override_settings or {}):
        update["override_settings"] = {**(req.override_settings or {}), "CLIP_stop_at_last_layers": parsed["clip_skip"]}
    if "strength" in parsed and "denoising_strength" not in sent:
        update["denoising_strength"] = parsed["strength"]
    if parsed["enable_hr"] and "enable_hr" in type(req).model_fields and "enable_hr" not in sent:
        update["enable_hr"] = True
        update.update({field: parsed[name] for name, field in _HIRES_FROM_INFOTEXT.items()
                       if name in parsed and field not in sent})
    return req.model_copy(update=update), list(parsed["notes"])


def infotext_unsupported(req: BaseModel) -> list[str]:
    """The request's ``infotext`` keys that ask for what is not implemented (``infotext.<key>``)."""
    if not req.infotext:
        return []
    parsed = generation_settings(req.infotext)
    out = [f"infotext.{k}" for k in unsupported_keys(parsed)]
    if parsed.get("controlnet") and not script_args(getattr(req, "alwayson_scripts", None)):
        # the units' images are not in an infotext: they come with alwayson_scripts.controlnet or not at all
        out += [f"infotext.ControlNet {i}" for i in range(len(parsed["controlnet"]))]
    return out


def value(req: BaseModel, name: str, table: dict):
    """A field's value, A1111's default where the client sent null."""
    v = getattr(req, name)
    return table[name][1] if v is None else v


def _neutral(name: str, v, default) -> bool:
    if v is None or v is False or v == default or v in NEUTRAL.get(name, ()):
        return True
    return isinstance(v, (str, list, dict, int, float)) and not isinstance(v, bool) and not v


def unsupported_fields(req: BaseModel, table: dict) -> list[str]:
    """Unimplemented fields sent with a value that would change A1111's image (``alwayson_scripts`` entries by
    name: ``alwayson_scripts.<name>``), sorted."""
    out = [k for k, (_, d, how) in table.items()
           if how == IGNORED and k != "alwayson_scripts" and not _neutral(k, getattr(req, k), d)]
    scripts = getattr(req, "alwayson_scripts", None)
    if isinstance(scripts, dict):
        out += [f"alwayson_scripts.{name}" for name, args in scripts.items()
                if not _neutral(name, args, None) and not (isinstance(name, str) and name.lower() == "controlnet")]
    elif not _neutral("alwayson_scripts", scripts, {}):
        out.append("alwayson_scripts")
    return sorted(out)


def ignored_fields(req: BaseModel, table: dict) -> list[str]:
    """Unknown keys sent with a value (sorted): A1111 drops them too, so they change nothing."""
    return sorted(k for k, v in (req.model_extra or {}).items() if not _neutral(k, v, None))


def parameters(req: BaseModel, img2img: bool) -> dict:
    """The response's ``parameters``: the request with A1111's defaults filled in (init images and the mask
    left out unless ``include_init_images``, as A1111 does)."""
    out = req.model_dump(exclude=set(req.model_extra or {}))
    if img2img and not out.get("include_init_images"):
        out["init_images"] = None
        out["mask"] = None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


class PNGInfoRequest(BaseModel):
    image: str


class ProgressQuery(BaseModel):
    skip_current_image: bool = False
