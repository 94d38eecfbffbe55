"""Images in and out of the latent space: the VAE encode (a sampled posterior), the one decode-and-clamp, and
inpainting's image conditioning."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in latents or in the image."""


def check_finite(t: torch.Tensor, stage: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"NaN or Inf in the {stage} output")
    return t


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``DiagonalGaussianDistribution.sample()`` with the given noise: ``mean + exp(logvar / 2) * noise``."""
    return mean + torch.exp(0.5 * logvar) * noise


def encode_image(model, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``get_first_stage_encoding(encode_first_stage(image))``: scale_factor * a SAMPLE of the posterior.

    image [1 or B, 3, H, W] in [-1, 1]; noise [B, C, H/8, W/8] -> [B, C, H/8, W/8] float32."""
    vae = model.first_stage_model
    p = next(vae.parameters())
    with torch.no_grad():
        mean, logvar = model.encode_first_stage(image.to(p.device, p.dtype))
    mean, logvar = mean.float(), logvar.float()
    z = model.config.scale_factor * posterior_sample(mean, logvar, noise.to(mean.device))
    return check_finite(z, "VAE encoding of the init image")


def decode_clamped(guard, scale_factor: float, latents: torch.Tensor) -> torch.Tensor:
    """``clamp((decode_first_stage(latents) + 1) / 2, 0, 1)`` in float32, through the VAE decode guard (a
    non-finite half-precision decode is redone in float32): what the original scripts save."""
    dtype = next(guard.vae.parameters()).dtype
    with torch.no_grad():
        image = guard.decode((latents / scale_factor).to(dtype)).float()
    check_finite(image, "VAE decoding")
    return torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)


class InpaintConditioning(NamedTuple):
    mask: torch.Tensor  # [1, 1, H, W] binarised, 1 = repaint
    masked_image: torch.Tensor  # [1, 3, H, W] = image * (mask < 0.5)
    mask_latent: torch.Tensor  # [B, 1, h, w]
    masked_image_latents: torch.Tensor  # [B, 4, h, w]
    c_concat: torch.Tensor  # [B, 5, h, w] = cat([mask_latent, masked_image_latents], 1)


def inpaint_conditioning(model, image: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                         mask_weight: float = 1.0) -> InpaintConditioning:
    """runwayml ``inpaint_st.py``: the mask thresholded at 0.5 (``make_batch_sd``), ``masked_image = image *
    (mask < 0.5)``, the mask nearest-resized to the latent size, the masked image VAE-encoded with a SAMPLED
    posterior (``noise`` [B, 4, h, w]); the UNet sees ``cat([x, mask_latent, masked_image_latents], 1)``.
    ``mask_weight`` below 1: AUTOMATIC1111's "Conditional mask weight" (``inpainting_image_conditioning``:
    ``lerp(image, image * (1 - mask), mask_weight)``: the masked area keeps some of the image)."""
    device = noise.device
    image, mask = image.to(device, torch.float32), mask.to(device, torch.float32)
    mask = (mask >= 0.5).to(torch.float32)
    masked_image = image * (mask < 0.5) if mask_weight == 1.0 else \
        torch.lerp(image, image * (1.0 - mask), float(mask_weight))
    batch, latent_hw = noise.shape[0], tuple(noise.shape[-2:])
    mask_latent = F.interpolate(mask, size=latent_hw).expand(batch, -1, -1, -1)  # nearest
    masked_latents = encode_image(model, masked_image, noise)  # one encode, broadcast over the batch
    c_concat = torch.cat([mask_latent, masked_latents], dim=1)  # [B, 1 + 4, h, w]
    return InpaintConditioning(mask, masked_image, mask_latent, masked_latents, c_concat)
