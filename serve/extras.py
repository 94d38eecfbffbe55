"""A1111's "Extras" upscale as an API route (``/sdapi/v1/extra-single-image``, v1.10's ``postprocessing_upscale``):
one image upscaled by a named upscaler (the built-in ones and the model files of ``--upscaler-dir``), by a factor
(``resize_mode`` 0, ``upscaling_resize``) or to a size (``resize_mode`` 1, ``upscaling_resize_w`` / ``_h``, with
``upscaling_crop``: the result centred on a canvas of that size), optionally blended with a second upscaler's
result (``upscaler_2`` at ``extras_upscaler_2_visibility``). Face restoration fields are accepted and ignored.
The upscaling runs on the device's worker, between generations.
"""

from __future__ import annotations

from typing import Any, Optional

from PIL import Image
from pydantic import BaseModel, ConfigDict

from tritonsd.serve.errors import BadRequest, NotFound, printable
from tritonsd.serve.images import decode_image, png_b64
from tritonsd.serve.limits import MAX_SIDE
from tritonsd.serve.worker import Job
from tritonsd.upscalers import Upscalers

MAX_SCALE = 8.0  # A1111's slider


class ExtrasSingleImageRequest(BaseModel):
    """A1111's ``ExtrasSingleImageRequest`` (the fields of the upscale; the others are accepted)."""

    model_config = ConfigDict(extra="allow")
    image: str = ""
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0
    codeformer_visibility: float = 0
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: Optional[str] = "None"
    upscaler_2: Optional[str] = "None"
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False


def _upscaler(upscalers, name: Optional[str], field: str) -> Optional[str]:
    """The upscaler's name, None for "None" (no upscale, as A1111)."""
    if name in (None, "None"):
        return None
    if not isinstance(name, str) or name not in upscalers.names():
        raise NotFound(f"{field}: could not find upscaler named {printable(name)}", "UpscalerNotFound")
    return name


def _target(req: ExtrasSingleImageRequest, image: Image.Image) -> tuple[float, dict[str, Any]]:
    """(scale, infotext fields) of the request for ``image``."""
    if req.resize_mode == 1:
        w, h = req.upscaling_resize_w, req.upscaling_resize_h
        if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
            raise BadRequest(f"upscaling_resize_w / _h must be between 1 and {MAX_SIDE}, got {w}x{h}")
        return max(w / image.width, h / image.height), {"Postprocess upscale to": f"{w}x{h}"}
    if req.resize_mode != 0:
        raise BadRequest(f"resize_mode must be 0 (scale by) or 1 (scale to), got {printable(req.resize_mode)}")
    scale = req.upscaling_resize
    if not 0 < scale <= MAX_SCALE:
        raise BadRequest(f"upscaling_resize must be above 0 and at most {MAX_SCALE:g}, got {printable(scale)}")
    if max(image.width, image.height) * scale > MAX_SIDE:
        raise BadRequest(f"upscaling_resize {scale:g} makes the image larger than {MAX_SIDE} pixels per side")
    return scale, {"Postprocess upscale by": f"{scale:g}"}


def upscale_request(req: ExtrasSingleImageRequest, upscalers) -> dict:
    """The response of ``/sdapi/v1/extra-single-image`` (``{"html_info", "image"}``), computed here."""
    image = decode_image("image", req.image).convert("RGB")
    first = _upscaler(upscalers, req.upscaler_1, "upscaler_1")
    second = _upscaler(upscalers, req.upscaler_2, "upscaler_2")
    scale, info = _target(req, image)
    if first is not None:
        out = upscalers.upscale_by(image, scale, first)
        info["Postprocess upscaler"] = first
        if second is not None and req.extras_upscaler_2_visibility > 0:
            other = upscalers.upscale_by(image, scale, second)
            out = Image.blend(out, other.convert(out.mode), req.extras_upscaler_2_visibility)
            info["Postprocess upscaler 2"] = second
        if req.resize_mode == 1 and req.upscaling_crop:
            w, h = req.upscaling_resize_w, req.upscaling_resize_h
            canvas = Image.new("RGB", (w, h))
            canvas.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
            out = canvas
            info["Postprocess crop to"] = f"{w}x{h}"
        image = out
    text = ", ".join(f"{k}: {v}" for k, v in info.items())
    return {"html_info": f"<p>{text}</p>", "image": png_b64(image)}


def extras_job(req: ExtrasSingleImageRequest) -> Job:
    def run(worker):
        pipe = worker.host.pipe
        upscalers = pipe.upscalers if pipe is not None else Upscalers(worker.host.spec.upscaler_dir)
        return upscale_request(req, upscalers)

    return Job("extras", run)


__all__ = ["ExtrasSingleImageRequest", "extras_job", "upscale_request"]
