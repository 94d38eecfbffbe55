"""Convolution with a fused epilogue. (Triton kernel: to be written; the reference is final.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                     padding: int = 0, emb: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """``(conv2d(x) + bias + emb[:, :, None, None] + residual) * scale``, each term optional."""
    y = F.conv2d(x, weight, bias, stride, padding)
    if emb is not None:
        y = y + emb[:, :, None, None]
    if residual is not None:
        y = y + residual
    if scale is not None:
        y = y * scale
    return y


def conv2d_triton(x, weight, bias=None, stride=1, padding=0, emb=None, residual=None, scale=None):
    raise NotImplementedError("Triton convolution is not written yet")
