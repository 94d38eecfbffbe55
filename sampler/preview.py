"""Live previews of a running loop, as AUTOMATIC1111's "Approx cheap" (``show_progress_type``): a fixed linear map
from the latent's channels to RGB, no weights and no VAE, at the latent's resolution (1/8 of the image's side).

The coefficients are webui v1.10's ``sd_vae_approx.cheap_approximation`` (SD 1.x / 2.x: the map from
https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2; SDXL its own), and the pixels
are ``sd_samplers_common.single_sample_to_image``'s: ``clamp(rgb * 0.5 + 0.5, 0, 1) * 255`` truncated to uint8.
With a TAESD decoder (``model/taesd.py``; A1111's "TAESD" preview type) the preview is its decode instead, at the
image's size. A1111 previews the loop's ``denoised`` (its prediction of the final latent), every
``show_progress_every_n_steps`` steps (default 10), the batch's images in one grid (``show_progress_grid``, on by
default)."""

from __future__ import annotations

import math

import numpy as np
import torch

# family -> [latent channel][r, g, b]: einsum("lxy,lr -> rxy")
CHEAP_RGB: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sd1": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}
CHEAP_RGB["sd2"] = CHEAP_RGB["sd1"]  # webui has one map for everything but SDXL
DEFAULT_EVERY = 10  # A1111's show_progress_every_n_steps


def cheap_rgb(latent: torch.Tensor, family: str) -> torch.Tensor:
    """``cheap_approximation``: latent [C, H, W] (C = 4) -> RGB [3, H, W] in about [-1, 1], float32."""
    coefs = torch.tensor(CHEAP_RGB[family], dtype=torch.float32, device=latent.device)
    if latent.ndim != 3 or latent.shape[0] != coefs.shape[0]:
        raise ValueError(f"a {family} preview takes a [{coefs.shape[0]}, H, W] latent, got {list(latent.shape)}")
    return torch.einsum("lxy,lr->rxy", latent.float(), coefs)


def preview_pixels(latent: torch.Tensor, family: str) -> np.ndarray:
    """The preview of one latent [C, H, W]: uint8 [H, W, 3], as ``single_sample_to_image`` makes it."""
    x = torch.clamp(cheap_rgb(latent, family) * 0.5 + 0.5, min=0.0, max=1.0)
    return (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)


def due(step: int, every: int) -> bool:
    """Whether step ``step`` (0-based, as the sampler's callback counts) gets a preview; ``every`` <= 0: none."""
    return every > 0 and step % every == 0


def taesd_pixels(decoder, latent: torch.Tensor) -> np.ndarray:
    """The TAESD preview of one latent [C, H, W]: uint8 [8H, 8W, 3] as webui makes it
    (``samples_to_images_tensor``: ``decoder(x) * 2 - 1``, then ``single_sample_to_image``'s ``* 0.5 + 0.5``,
    clamp, * 255, truncated), decoded in float32 on the decoder's device."""
    device = next(decoder.parameters()).device
    with torch.no_grad():
        x = decoder(latent[None].to(device=device, dtype=torch.float32))[0] * 2 - 1
    x = torch.clamp(x * 0.5 + 0.5, min=0.0, max=1.0)
    return (255.0 * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)


def grid(images: list[np.ndarray]) -> np.ndarray:
    """webui's ``images.image_grid`` with its defaults (``n_rows`` -1, ``grid_prevent_empty_spots`` off):
    ``round(sqrt(n))`` rows, filled row by row, black where the last row is short. uint8 [H, W, 3] each."""
    n = len(images)
    rows = min(max(round(math.sqrt(n)), 1), n)
    cols = math.ceil(n / rows)
    h, w, _ = images[0].shape
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return out
