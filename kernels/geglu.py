"""GEGLU gate of the transformer feed-forward. (Triton kernel: to be written; the reference is final.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2F] -> a * gelu(gate) [..., F] (exact erf GELU), (a, gate) = x.chunk(2, -1) as the original."""
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


def geglu_triton(x):
    raise NotImplementedError("Triton GEGLU is not written yet")
