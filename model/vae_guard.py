"""VAE decode guarded against half-precision overflow.

The SD VAE decoder's activations can exceed float16's range (65504; SDXL's VAE does so at every size), which
turns the image into NaN / Inf. ``VAEDecodeGuard`` checks the decoded image and, when a float16 / bfloat16 VAE
produced a non-finite value, decodes the same latents again with a float32 copy of the VAE (made on the first
failure, then kept), warning once per guard. A float32 VAE has nothing to retry with: its output is returned
as is for the caller's finiteness check.

Each Pipeline holds one guard for its model's VAE (so the warning comes once per pipeline and the float32 copy
is reused) and decodes through it.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


class VAEDecodeNaNWarning(RuntimeWarning):
    """A half-precision VAE decode produced NaN / Inf and was redone in float32."""


def _module_dtype(vae: nn.Module) -> torch.dtype:
    return next(vae.parameters()).dtype


class VAEDecodeGuard:
    """``decode(z)`` through ``vae.decode``; a non-finite half-precision result is redone in float32."""

    def __init__(self, vae: nn.Module):
        self.vae = vae
        self.warned = False
        self.retries = 0
        self._vae_fp32: nn.Module | None = None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 4, h, w] -> image [B, 3, 8h, 8w]; float32 when it was retried."""
        image = self.vae.decode(z)
        dtype = _module_dtype(self.vae)
        if dtype not in HALF_DTYPES or bool(torch.isfinite(image).all()):
            return image
        if not self.warned:
            name = str(dtype).replace("torch.", "")
            warnings.warn(f"VAE decode produced NaN in {name}; retried in float32", VAEDecodeNaNWarning,
                          stacklevel=2)
            self.warned = True
        self.retries += 1
        return self.float32_vae().decode(z.float())

    def float32_vae(self) -> nn.Module:
        """A float32 copy of the VAE (made once; holds about 335 MB for the SD VAE)."""
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.vae).to(torch.float32).eval().requires_grad_(False)
        return self._vae_fp32
