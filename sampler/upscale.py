"""Hires fix's arithmetic as AUTOMATIC1111 v1.10.1 does it (``modules/processing.py``
``StableDiffusionProcessingTxt2Img.calculate_target_resolution`` / ``sample_hr_pass``, ``modules/shared.py``
``latent_upscale_modes``, ``sd_samplers_common.setup_img2img_steps``): the second pass's size, the latent
upscale modes, and its step counts. No model here: ``pipeline.py`` runs these between its stages.

The size: ``hr_scale`` (``int(side * scale)``) or ``hr_resize_x`` / ``hr_resize_y``. With one side given, the other
follows the first pass's aspect ratio (integer division); with both and another aspect ratio, the latent is
upscaled to COVER the target and the extra latent rows / columns are cropped, ``t // 2`` before and
``(t + 1) // 2`` after (``truncate = (upscale_to - target) // 8``).

The steps: webui's "fixed steps" rule, which its hires pass always uses: the second pass runs ``hr_steps`` steps
(``hr_second_pass_steps``, 0: the first pass's) on the schedule of ``int(hr_steps / min(strength, 0.999))`` steps,
from index ``steps' - t_enc - 1`` with ``t_enc = hr_steps - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# webui's ``shared.latent_upscale_modes``: name -> (torch interpolate mode, antialias)
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"  # webui's UI default (and ``latent_upscale_default_mode``)
VAE_FACTOR = 8  # webui's ``opt_f``


def is_latent_mode(name: str) -> bool:
    return name in LATENT_UPSCALE_MODES


@dataclass(frozen=True)
class HiresTarget:
    """Where the second pass works: the upscale covers ``upscale_to`` (pixels; its latent is ``upscale_to // 8``
    cells), then ``truncate`` latent cells are cropped on each axis. ``width`` x ``height`` is the final image."""

    upscale_to_x: int
    upscale_to_y: int
    truncate_x: int = 0
    truncate_y: int = 0

    @property
    def width(self) -> int:
        return (self.upscale_to_x // VAE_FACTOR - self.truncate_x) * VAE_FACTOR

    @property
    def height(self) -> int:
        return (self.upscale_to_y // VAE_FACTOR - self.truncate_y) * VAE_FACTOR

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the interpolate, before the crop."""
        return self.upscale_to_y // VAE_FACTOR, self.upscale_to_x // VAE_FACTOR


def hires_target(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0) -> HiresTarget:
    """``calculate_target_resolution`` for a first pass of ``width`` x ``height``."""
    if resize_x == 0 and resize_y == 0:
        return HiresTarget(int(width * scale), int(height * scale))
    if resize_y == 0:
        return HiresTarget(resize_x, resize_x * height // width)
    if resize_x == 0:
        return HiresTarget(resize_y * width // height, resize_y)
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    return HiresTarget(to_x, to_y, (to_x - resize_x) // VAE_FACTOR, (to_y - resize_y) // VAE_FACTOR)


def crop_latent(x: torch.Tensor, target: HiresTarget) -> torch.Tensor:
    """webui's truncate crop of [B, C, h, w]: ``t // 2`` cells before, ``(t + 1) // 2`` after, on each axis."""
    ty, tx = target.truncate_y, target.truncate_x
    return x[:, :, ty // 2: x.shape[2] - (ty + 1) // 2, tx // 2: x.shape[3] - (tx + 1) // 2]


def interpolate_latent(x: torch.Tensor, target: HiresTarget, mode: str) -> torch.Tensor:
    """``F.interpolate`` of the first pass's latents [B, C, h, w] to ``target.latent_size`` with the named latent
    mode's torch mode and antialias (``align_corners`` left at None, as webui), before the crop."""
    torch_mode, antialias = LATENT_UPSCALE_MODES[mode]
    return F.interpolate(x, size=target.latent_size, mode=torch_mode, antialias=antialias)


def upscale_latent(x: torch.Tensor, target: HiresTarget, mode: str) -> torch.Tensor:
    """The second pass's starting latents of a latent mode: interpolate, then crop."""
    return crop_latent(interpolate_latent(x, target, mode), target)


def hires_steps(steps: int, strength: float) -> tuple[int, int]:
    """``setup_img2img_steps`` with fixed steps (webui's hires pass): (schedule length, t_enc) for running
    ``steps`` steps at ``strength``; strength 0 gives (0, steps - 1): no step runs."""
    if strength <= 0:
        return 0, steps - 1
    return int(steps / min(strength, 0.999)), steps - 1


def img2img_t_enc(steps: int, strength: float) -> int:
    """``setup_img2img_steps`` without fixed steps (webui's img2img): ``int(min(strength, 0.999) * steps)``; the
    sampler then runs ``t_enc + 1`` steps."""
    return int(min(strength, 0.999) * steps)


__all__ = ["DEFAULT_UPSCALER", "HiresTarget", "LATENT_UPSCALE_MODES", "crop_latent", "hires_steps", "hires_target",
           "img2img_t_enc", "interpolate_latent", "is_latent_mode", "upscale_latent"]
