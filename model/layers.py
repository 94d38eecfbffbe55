"""nn building blocks shared by the UNet, the VAE and the text towers. Parameters keep torch's names
(``weight``, ``bias``) but forwards go through ``kernels.dispatch``, so the model never calls a kernel directly."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from tritonsd.kernels import dispatch
from tritonsd.kernels.conv_layout import has_kernel_layout, to_kernel_layout


class GroupNorm(nn.GroupNorm):
    """GroupNorm with statistics in float32 (the original's GroupNorm32), optionally fused with SiLU."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return dispatch.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu=silu)

    def as_prologue(self, silu: bool = False, stats: dispatch.GroupStats | None = None) -> dispatch.GroupNormIn:
        """This norm (then SiLU) for ``Conv2d(..., norm_in=...)``: applied while the conv loads its input.
        ``stats``: the input's (mean, scale) for this norm, made by the kernel that wrote it (``out_norm``
        below); None: the conv computes them. Also what a producer is given as ``out_norm``."""
        return dispatch.GroupNormIn(self.weight, self.bias, self.num_groups, self.eps, silu, stats)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.layer_norm(x, self.weight, self.bias, self.eps)

    def as_prologue(self) -> dispatch.Norm:
        """This norm for ``dispatch.linear(..., norm=...)``: applied while the next GEMM loads its input."""
        return dispatch.Norm(self.weight, self.bias, self.eps)


class Conv2d(nn.Conv2d):
    """Conv2d with the fused epilogue of ``dispatch.conv2d`` (time-embedding add, residual add, scale).

    The rule: a ``Conv2d`` always holds its weight in the conv kernel's layout (``kernels/conv.py``): shape
    [C_out, C_in, KH, KW] as usual, memory order [KH, KW, C_in, C_out]. It is set when the module is built and
    again after a load that assigns a tensor of another layout (``load_state_dict(..., assign=True)``; a load
    that copies keeps the parameter's strides). So the Triton kernel reads the parameter's own storage, the one
    a LoRA switch writes into and a captured CUDA graph reads: no second, packed copy can go stale. Every conv
    follows the rule, also those the dispatch sends to the reference (``F.conv2d`` takes any strides, with the
    same results). ``state_dict()`` gives the weight contiguous in the original layout (a copy), as checkpoint
    files hold it; ``state_dict(keep_vars=True)`` gives the parameter itself.

    The one exception: ``kernel_layout`` False (set by ``model/sd.py`` ``load_weights_`` for a model loaded on
    the CPU without forced Triton, where only ``F.conv2d`` runs) keeps an assigned weight in the file's layout,
    mapped from the file rather than copied; were the Triton kernel forced on it later, it repacks the weight
    for each call (``kernels/conv.py``), with the same results.

    ``padding_mode`` is read at every call: "circular" wraps the padding around (tiling); ``circular_padding``
    sets it for the length of a run.
    """

    kernel_layout = True  # see the class docstring

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._weight_to_kernel_layout()

    def _weight_to_kernel_layout(self) -> None:
        if self.kernel_layout and not has_kernel_layout(self.weight):
            self.weight = nn.Parameter(to_kernel_layout(self.weight.detach()), self.weight.requires_grad)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._weight_to_kernel_layout()  # assign=True takes the given tensor with its own strides

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:
            destination[prefix + "weight"] = destination[prefix + "weight"].contiguous()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                scale: float | None = None, norm_in: dispatch.GroupNormIn | None = None,
                upsample: int = 1, x2: torch.Tensor | None = None) -> torch.Tensor:
        """``x2``: a second input, read as ``torch.cat([x, x2], 1)`` (``dispatch.conv2d``)."""
        return dispatch.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], emb=emb,
                               residual=residual, scale=scale, circular=self.padding_mode == "circular",
                               norm_in=norm_in, upsample=upsample, x2=x2)

    def forward_stats(self, x: torch.Tensor, out_norm: GroupNorm | None = None,
                      **kwargs) -> tuple[torch.Tensor, dispatch.GroupStats | None]:
        """``forward(x, **kwargs)`` and, when ``out_norm`` (the GroupNorm that reads the output next) is given and
        the Triton kernel runs, that norm's statistics from the conv's epilogue; else None (the norm's consumer
        then computes them itself)."""
        if out_norm is None:
            return self(x, **kwargs), None
        return dispatch.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0],
                               circular=self.padding_mode == "circular", stats_for=out_norm.as_prologue(), **kwargs)


def in_norm(layer: nn.Module) -> GroupNorm | None:
    """The GroupNorm a layer applies first to its input (``layer.in_norm``), whose statistics the layer before
    it may compute in its epilogue; None for layers that read their input as it is."""
    return getattr(layer, "in_norm", None)


@contextlib.contextmanager
def circular_padding(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every ``Conv2d`` in ``module`` pads circularly (``enabled``) or with zeros inside the block, and gets its
    own mode back after it: AUTOMATIC1111's tiling (``sd_hijack.apply_circular`` sets ``padding_mode`` on every
    conv of the model for a generation), scoped to one run. Nesting restores the outer block's modes."""
    convs = [m for m in module.modules() if isinstance(m, Conv2d)]
    before = [c.padding_mode for c in convs]
    for conv in convs:
        conv.padding_mode = "circular" if enabled else "zeros"
    try:
        yield
    finally:
        for conv, mode in zip(convs, before):
            conv.padding_mode = mode


def stacked_rows(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights [N_i, K] as one [sum N_i, K] tensor without a copy, when they lie one after the other in one
    storage, dense (as :func:`stack_rows_` puts them); None otherwise. On the meta device (launch recording)
    every storage address is 0: equal shapes and adjacent offsets are then taken as stacked."""
    first = weights[0]
    if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
           or not w.is_contiguous() for w in weights):
        return None
    offset, ptr = first.storage_offset(), first.untyped_storage().data_ptr()
    for w in weights:
        if w.untyped_storage().data_ptr() != ptr or w.storage_offset() != offset:
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())


def stack_rows_(params: list[nn.Parameter]) -> None:
    """Make ``params`` (each [N_i, K]) views of one [sum N_i, K] storage, in order, keeping the Parameter objects
    (what LoRA's ``copy_`` writes into, what a captured graph reads); a no-op when they already are."""
    if stacked_rows(params) is not None or any(p.dim() != 2 for p in params):
        return
    first = params[0]
    # [sum N_i, K], filled row block by row block: torch.cat would do the same, but on the meta device (the
    # model is built there) it imports torch._dynamo, a second of every process's start
    fused = torch.empty((sum(p.shape[0] for p in params), first.shape[1]), dtype=first.dtype, device=first.device)
    start = 0
    with torch.no_grad():
        for p in params:
            fused[start:start + p.shape[0]].copy_(p.detach())
            p.data = fused[start:start + p.shape[0]]
            start += p.shape[0]


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (the UNet's and the VAE decoder's ``upsample.conv``): one launch, the
    conv reading the upsampled image's pixels from x (``dispatch.conv2d(..., upsample=2)``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, upsample=2)

    def forward_stats(self, x: torch.Tensor, out_norm: GroupNorm | None = None):
        """``forward`` and ``out_norm``'s statistics of the output (see ``Conv2d.forward_stats``)."""
        return self.conv.forward_stats(x, out_norm, upsample=2)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding as the original's (openaimodel's and sgm's ``timestep_embedding``): [B] -> [B, dim] =
    [cos(t * f), sin(t * f)] with f = max_period ** (-i / half), in float32 (odd dim: zero-padded). ``timesteps``
    may be fractional (k-diffusion passes interpolated t); SDXL's size conditioning embeds pixel sizes with it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
