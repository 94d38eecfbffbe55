"""Where a generation's randomness comes from: a ``NoiseSource`` gives, per image of the batch, the start noise
x_T, the VAE posterior samples and the per-step ancestral / eta noise, each [batch, *shape] float32.

``ImageNoise`` is AUTOMATIC1111's (``sampler/rng.py``'s ``ImageRNG``): image ``i`` has seed ``seed + i`` and its
own generator of the chosen source (``nv``: CUDA's ``torch.randn`` reproduced on any device, the default;
``gpu``; ``cpu``), whose first draw is x_T (blended with the variation seed's by ``subseed_strength``) and whose
later draws are the ancestral / eta noise; so image ``i`` of a batch is image 0 of a batch of one with seed
``seed + i``, on the CPU and the GPU alike. The VAE posterior samples (img2img, inpainting) come from a second
generator per image, seeded from ``seed + i`` (``derived_seed``). The Pipeline takes any object with the same
three methods (e.g. a reference run's stored noise).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from tritonsd.sampler.rng import ImageRNG, create_generator
from tritonsd.sampler.seeds import SEED_RANGE

_STREAMS = {"start": 0, "vae": 1}


class NoiseSource(Protocol):
    def start(self, shape) -> torch.Tensor: ...

    def vae(self, shape) -> torch.Tensor: ...

    def ancestral(self, shape) -> torch.Tensor: ...


def derived_seed(seed: int, stream: str) -> int:
    """Seed of one per-image noise stream; "start" is the seed itself."""
    return (seed + _STREAMS[stream] * 0x9E3779B97F4A7C15) % SEED_RANGE


class ImageNoise:
    """AUTOMATIC1111's per-image noise for a batch of ``batch`` images from ``seed`` (see the module docstring);
    draws land on ``device``."""

    def __init__(self, shape: Sequence[int], seed: int, batch: int, source: str = "nv",
                 subseed: int | None = None, subseed_strength: float = 0.0, device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self.seeds = [(seed + i) % SEED_RANGE for i in range(batch)]
        subseeds = None if subseed is None else [(subseed + i) % SEED_RANGE for i in range(batch)]
        self.rng = ImageRNG(self.shape, self.seeds, subseeds=subseeds, subseed_strength=subseed_strength,
                            source=source, device=device)
        self.source, self.device = source, device
        self._vae = None

    def _check(self, shape) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"noise of shape {tuple(shape)} asked of a source made for {self.shape}")

    def start(self, shape) -> torch.Tensor:
        self._check(shape)
        return self.rng.next()  # the first call: the start noise

    def ancestral(self, shape) -> torch.Tensor:
        self._check(shape)
        return self.rng.next()

    def vae(self, shape) -> torch.Tensor:
        if self._vae is None:
            self._vae = [create_generator(derived_seed(s, "vae"), self.source, self.device) for s in self.seeds]
        return torch.stack([g.randn(shape) for g in self._vae])
