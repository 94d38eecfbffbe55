"""The seed range, one place: what a seed may be and where a random one is drawn from."""

from __future__ import annotations

import secrets

SEED_RANGE = 2 ** 64  # torch.Generator.manual_seed takes [0, 2**64); image i uses seed + i
RANDOM_SEEDS = 2 ** 32  # a random seed is drawn from AUTOMATIC1111's range


def random_seed() -> int:
    """A seed for a generation that names none, drawn from AUTOMATIC1111's range (``RANDOM_SEEDS``)."""
    return secrets.randbelow(RANDOM_SEEDS)
