"""Activation shapes of the real models at their native resolutions, batch 2 (classifier-free guidance).

UNet levels as (channels, latent side); SD 1.5 uses 8 heads everywhere, SD 2.1 heads of 64 channels.
The lowest level (SD 1.5: 1280 at 8x8) has no transformer; the middle block has one at that size.
"""

from __future__ import annotations

BATCH = 2  # cond + uncond
CONTEXT = 77

MODELS = {
    # name: (latent side, UNet levels [(channels, side)], heads fn(channels) -> heads, text width, VAE latent side)
    "sd15-512": {"latent": 64, "levels": [(320, 64), (640, 32), (1280, 16), (1280, 8)],
                 "heads": lambda c: 8, "context_dim": 768},
    "sd21-768": {"latent": 96, "levels": [(320, 96), (640, 48), (1280, 24), (1280, 12)],
                 "heads": lambda c: c // 64, "context_dim": 1024},
}

# VAE decoder blocks (channels, side in latent units * scale) at batch 1: 512 at the latent size, then x2, x4, x8
VAE_LEVELS = [(512, 1), (512, 2), (512, 4), (256, 8), (128, 8)]
# text towers: (name, width, heads), 77 tokens, causal
TEXT = [("clip-l", 768, 12), ("openclip-h", 1024, 16)]
