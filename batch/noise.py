"""The noise of a UNet batch whose rows are different jobs: row j draws from job j's own source, so an image
depends only on its job line, not on the jobs it shares a batch with.

Each job's source is the Pipeline's default for a batch of one (``ImageNoise``: AUTOMATIC1111's per-image
generator of the job's seed, noise source and variation seed). A batch of one passes no noise at all and gets
that default from the Pipeline itself; if the Pipeline's default source changes, ``job_noise`` must follow it
(the tests compare a grouped image with a single one, and a single one with ``tritonsd generate``).
"""

from __future__ import annotations

import torch
from tritonsd.sampler.noise import ImageNoise


def job_noise(settings, shape, device) -> object:
    """The noise source ``Pipeline.prepare_latents`` uses by default for a batch of one of ``settings``
    (``shape``: the latent's [C, h, w])."""

    s = settings
    return ImageNoise(shape, s.seed, 1, s.rng, s.subseed, s.subseed_strength, device)


class StackedNoise:
    """A ``NoiseSource`` of one row per source; each draw is every source's draw stacked along the batch."""

    def __init__(self, sources: list):
        self.sources = sources

    def _draw(self, method: str, shape) -> torch.Tensor:
        return torch.cat([getattr(s, method)(shape) for s in self.sources])  # n x [1, *shape] -> [n, *shape]

    def start(self, shape) -> torch.Tensor:
        return self._draw("start", shape)

    def vae(self, shape) -> torch.Tensor:
        return self._draw("vae", shape)

    def ancestral(self, shape) -> torch.Tensor:
        return self._draw("ancestral", shape)
