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

from tritonsd.outputs import atomic_write, write_numbered
from tritonsd.sampler import registry
from tritonsd.sampler.rng import infotext_rng


@dataclass
class Infotext:
    """AUTOMATIC1111's ``parameters`` text: the prompt, ``Negative prompt: ...`` (when not empty), then one line
    of ``Key: value`` pairs in the order ``processing.create_infotext`` (v1.10) writes them; None values are
    left out, as there."""

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
    extra: dict[str, object] | None = None  # VAE hash, Denoising strength, Schedule type, ... (in that order)

    def render(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": _number(self.cfg_scale),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model,
        }
        for key, value in (self.extra or {}).items():
            fields[key] = _number(value) if isinstance(value, float) else value
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
        return "\n".join(lines)


def generation_infotext(s, index: int = 0, *, model: str | None, model_hash: str | None, vae: str | None = None,
                        vae_hash: str | None = None, ti_hashes: str | None = None,
                        lora_hashes: str | None = None) -> str:
    """The infotext of image ``index`` of a generation with settings ``s`` (resolved ``GenerationSettings``), as
    AUTOMATIC1111 writes it: the sampler and schedule by their A1111 names, the image's own seed, variation seed,
    img2img strength, clip skip, noise source, and the files that shaped the image (VAE, embeddings, LoRAs)."""
    spec = registry.get(s.sampler)
    variation = s.subseed_strength > 0
    extra = {"VAE hash": vae_hash,
             "VAE": vae,
             "Variation seed": (s.subseed or 0) + index if variation else None,
             "Variation seed strength": float(s.subseed_strength) if variation else None,
             "Denoising strength": float(s.strength) if s.mode == "img2img" else None,
             "Clip skip": s.clip_skip if s.clip_skip > 1 else None,
             "RNG": infotext_rng(s.rng),
             "Schedule type": spec.a1111_schedule(s.karras),
             "TI hashes": ti_hashes if s.prompt_syntax == "a1111" else None,
             "Lora hashes": lora_hashes or None}
    return Infotext(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=s.steps, sampler=spec.a1111_name,
                    cfg_scale=s.cfg_scale, seed=s.seed + index, width=s.width, height=s.height,
                    model_hash=model_hash, model=model, extra=extra).render()


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
