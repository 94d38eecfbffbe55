"""The weight layout the convolution kernel reads (``kernels/conv.py``): logical shape [C_out, C_in, KH, KW],
memory order [KH, KW, C_in, C_out]. The model holds its conv weights that way (``model/layers.py`` ``Conv2d``),
so these live apart from the kernel: building a model needs them, not triton."""

from __future__ import annotations

import torch


def kernel_layout_strides(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int, int]:
    """The strides of a [C_out, C_in, KH, KW] weight stored in [KH, KW, C_in, C_out] memory order."""
    c_out, c_in, _, kw = shape
    return 1, c_out, kw * c_in * c_out, c_in * c_out


def has_kernel_layout(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [C_out, C_in, KH, KW] lies in memory as [KH, KW, C_in, C_out], dense (the strides of
    size-1 dimensions do not matter: 1x1 convolutions)."""
    if weight.dim() != 4:
        return False
    want = kernel_layout_strides(weight.shape)
    return all(size == 1 or st == w for size, st, w in zip(weight.shape, weight.stride(), want))


def to_kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` itself when it has the kernel layout; else a copy in it (same shape and values, new strides)."""
    if has_kernel_layout(weight):
        return weight
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # [KH, KW, C_in, C_out] memory order
