"""The AUTOMATIC1111 infotext, and PNGs carrying it in a ``parameters`` text chunk, in the format AUTOMATIC1111
writes and reads (so existing tools show them), written atomically (no partial file on failure)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tritonsd.control.models import model_title
from tritonsd.outputs import atomic_write, write_numbered
from tritonsd.sampler import registry
from tritonsd.sampler.rng import infotext_rng


# the keys ``processing.create_infotext`` (v1.10) writes first, in its order; the others (``extra_generation_params``:
# the hires fields, TI and Lora hashes, ...) follow in the order they were set
A1111_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
               "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
               "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight",
               "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling")


@dataclass
class Infotext:
    """AUTOMATIC1111's ``parameters`` text: the prompt, ``Negative prompt: ...`` (when not empty), then one line
    of ``Key: value`` pairs in the order ``processing.create_infotext`` (v1.10) writes them (``A1111_ORDER``, then
    the other ``extra`` keys in their order); None values are left out, as there."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str | None
    model: str | None
    extra: dict[str, object] | None = None  # Schedule type, VAE hash, Denoising strength, Hires upscale, ...

    def render(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        given = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": _number(self.cfg_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
        }
        for key, value in (self.extra or {}).items():
            given[key] = _number(value) if isinstance(value, float) else value
        fields = {k: given[k] for k in A1111_ORDER if k in given}
        fields.update({k: v for k, v in given.items() if k not in fields})
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
        return "\n".join(lines)


def generation_infotext(s, index: int = 0, *, model: str | None, model_hash: str | None, vae: str | None = None,
                        vae_hash: str | None = None, ti_hashes: str | None = None,
                        lora_hashes: str | None = None, hr_checkpoint: str | None = None,
                        inpainting_model: bool = False) -> str:
    """The infotext of image ``index`` of a generation with settings ``s`` (resolved ``GenerationSettings``), as
    AUTOMATIC1111 writes it: the sampler and schedule by their A1111 names, the image's own seed, variation seed,
    img2img or hires strength, clip skip, noise source, tiling, hires fix's fields, and the files that shaped the image
    (VAE, embeddings, LoRAs). ``hr_checkpoint``: the hires pass's other checkpoint as webui names it
    (``name [hash]``, ``formats.checkpoint_names.short_title``), None for the same one. ``inpainting_model``: a
    9-channel model, for which webui writes ``Conditional mask weight`` in every mode (its option, a float:
    ``1.0``)."""
    spec = registry.get(s.sampler)
    variation = s.subseed_strength > 0
    extra = {"VAE hash": vae_hash,
             "VAE": vae,
             "Variation seed": (s.subseed or 0) + index if variation else None,
             "Variation seed strength": float(s.subseed_strength) if variation else None,
             "Denoising strength": float(s.strength) if s.mode != "txt2img" or s.enable_hr else None,
             "Conditional mask weight": str(float(s.inpainting_mask_weight)) if inpainting_model else None,
             "Clip skip": s.clip_skip if s.clip_skip > 1 else None,
             "RNG": infotext_rng(s.rng),
             "Tiling": "True" if s.tiling else None,
             **control_infotext(s),
             **inpaint_infotext(s),
             "Schedule type": spec.a1111_schedule(s.karras),
             **(hires_infotext(s, hr_checkpoint) if s.enable_hr else {}),
             "TI hashes": ti_hashes if s.prompt_syntax == "a1111" else None,
             "Lora hashes": lora_hashes or None}
    return Infotext(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=s.steps, sampler=spec.a1111_name,
                    cfg_scale=s.cfg_scale, seed=s.seed + index, width=s.width, height=s.height,
                    model_hash=model_hash, model=model, extra=extra).render()


# (infotext label, ControlUnit field): the extension's ``ControlNetUnit.infotext_fields``, in its order
CONTROL_FIELDS = (("Module", "module"), ("Model", "model"), ("Weight", "weight"), ("Resize Mode", "resize_mode"),
                  ("Processor Res", "processor_res"), ("Threshold A", "threshold_a"), ("Threshold B", "threshold_b"),
                  ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"),
                  ("Pixel Perfect", "pixel_perfect"), ("Control Mode", "control_mode"))


def control_infotext(s) -> dict:
    """``ControlNet 0``, ``ControlNet 1``, ...: each unit as the extension's ``ControlNetUnit.serialize`` writes
    it (``Module: canny, Model: name [hash], Weight: 1.0, ...``, values as Python's ``str``); the extension sets
    them before webui's init, so they come before the inpainting and hires keys. A unit with a ',' or ':' in a
    value is left out, as the extension leaves it (it could not be read back)."""
    out = {}
    for i, unit in enumerate(getattr(s, "controls", None) or ()):
        values = {label: model_title(unit.model) if name == "model" else str(getattr(unit, name))
                  for label, name in CONTROL_FIELDS}
        if all("," not in v and ":" not in v for v in values.values()):
            out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in values.items())
    return out


def inpaint_infotext(s) -> dict:
    """The keys A1111's img2img ``init`` adds for a mask, in its order (Mask mode, Mask blur, Inpaint area,
    Masked area padding, Masked content); they come after RNG and before the sampler's Schedule type, as
    ``init`` runs before the sampler. Empty unless the settings were prepared from a mask
    (``GenerationSettings.inpaint``)."""
    prepared = getattr(s, "inpaint", None)
    if prepared is None or not prepared.extra:
        return {}
    extra = dict(prepared.extra)
    if s.inpainting_fill in (2, 3):  # set by init after the pixels, with the init latent
        extra["Masked content"] = ("latent noise", "latent nothing")[s.inpainting_fill - 2]
    return extra


def hires_infotext(s, checkpoint: str | None = None) -> dict[str, object]:
    """The hires fields of the infotext, in the order webui's ``StableDiffusionProcessingTxt2Img.init`` sets them
    (None: not written): the other checkpoint's ``name [hash]`` (``checkpoint``, None for the same one), the
    sampler and prompts where they differ from the first pass's, the second pass's
    schedule where it names one the first pass's "Schedule type" does not, the size, the steps when given, the
    upscaler."""
    spec, hr = registry.get(s.sampler), s.hires_pass()
    hr_spec = registry.get(hr.sampler)
    hr_label = hr_spec.schedule_label(hr.karras)
    return {"Hires checkpoint": checkpoint,
            "Hires sampler": hr_spec.a1111_name if s.hr_sampler is not None and hr.sampler != s.sampler else None,
            "Hires prompt": hr.prompt if hr.prompt != s.prompt else None,
            "Hires negative prompt": hr.negative_prompt if hr.negative_prompt != s.negative_prompt else None,
            "Hires schedule type": hr_label if hr_label != spec.schedule_label(s.karras) else None,
            "Hires upscale": float(s.hr_scale) if s.hr_resize_x == 0 and s.hr_resize_y == 0 else None,
            "Hires resize": f"{s.hr_resize_x}x{s.hr_resize_y}" if s.hr_resize_x or s.hr_resize_y else None,
            "Hires steps": s.hr_second_pass_steps or None,
            "Hires upscaler": s.hr_upscaler}


def quote(value) -> str:
    """AUTOMATIC1111's ``infotext_utils.quote``: a value holding ',', ':' or a newline is written as a JSON
    string, so the line of ``Key: value`` pairs splits back unambiguously."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(x: float) -> str:
    return f"{x:g}"


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> 8-bit RGB, rounded as AUTOMATIC1111 / the original scripts do (255 * x, truncated)."""
    array = (255.0 * image.detach().float().clamp(0, 1)).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def write_png(path: str | os.PathLike, image: Image.Image, parameters: str) -> Path:
    """Write ``image`` with a ``parameters`` tEXt chunk, atomically (``tritonsd.outputs``: a temporary file in the
    target's directory, renamed into place; nothing is left on failure)."""

    return atomic_write(Path(path), lambda f: image.save(f, format="PNG", pnginfo=png_info(parameters)))


def png_info(parameters: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info


def read_parameters(path: str | os.PathLike) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")


def save_numbered(out: Path, image: Image.Image, parameters: str, seed: int | None) -> Path:
    """``out/NNNNN-<seed>.png`` (``NNNNN.png`` without a seed), numbered after the files already there as
    AUTOMATIC1111 numbers them; written whole before the name appears, never overwriting, and concurrent runs
    writing into one directory never share a number (``tritonsd.outputs.write_numbered``)."""

    suffix = "" if seed is None else f"-{seed}"
    return write_numbered(out, lambda n: f"{n:05d}{suffix}.png",
                          lambda f: image.save(f, format="PNG", pnginfo=png_info(parameters)))
