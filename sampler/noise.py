"""Where a generation's randomness comes from: a ``NoiseSource`` gives, per image of the batch, the start noise
x_T, the VAE posterior samples and the per-step ancestral / eta noise, each [batch, *shape] float32.

``CPUNoise`` (the parity fixtures' source): image ``i`` draws x_T as the FIRST ``randn`` of
``torch.Generator("cpu").manual_seed(seed + i)``, and its VAE / ancestral noise from two more CPU generators
seeded from ``seed + i``; so image ``i`` of a batch is image 0 of a batch of one with seed ``seed + i``, and a
seed gives the same numbers on the CPU and the GPU. The Pipeline takes any object with the same three methods
(e.g. the stored noise of a reference run).
"""

from __future__ import annotations

from typing import Protocol

import torch

SEED_RANGE = 2 ** 64
_STREAMS = {"start": 0, "vae": 1, "ancestral": 2}  # per-image noise streams


class NoiseSource(Protocol):
    def start(self, shape) -> torch.Tensor: ...

    def vae(self, shape) -> torch.Tensor: ...

    def ancestral(self, shape) -> torch.Tensor: ...


def derived_seed(seed: int, stream: str) -> int:
    """Seed of one per-image noise stream; "start" is the seed itself (x_T as documented)."""
    return (seed + _STREAMS[stream] * 0x9E3779B97F4A7C15) % SEED_RANGE


class CPUNoise:
    """Per-image CPU generators for the start noise, VAE posterior samples and ancestral / eta noise; the
    draws are moved to ``device``."""

    def __init__(self, seed: int, batch: int, device: torch.device | str = "cpu"):
        self.device = device
        self.generators = {name: [torch.Generator("cpu").manual_seed(derived_seed(seed + i, name))
                                  for i in range(batch)] for name in _STREAMS}

    def _draw(self, stream: str, shape) -> torch.Tensor:
        rows = [torch.randn(list(shape), generator=g, dtype=torch.float32) for g in self.generators[stream]]
        return torch.stack(rows).to(self.device)  # [batch, *shape]

    def start(self, shape) -> torch.Tensor:
        return self._draw("start", shape)

    def vae(self, shape) -> torch.Tensor:
        return self._draw("vae", shape)

    def ancestral(self, shape) -> torch.Tensor:
        return self._draw("ancestral", shape)
