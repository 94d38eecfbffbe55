"""nn building blocks whose parameters keep torch's names (``weight``, ``bias``) but whose forward goes
through ``kernels.dispatch``, so the model never calls a kernel directly."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import dispatch


class GroupNorm(nn.GroupNorm):
    """GroupNorm with statistics in float32 (the original's GroupNorm32), optionally fused with SiLU."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return dispatch.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu=silu)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.layer_norm(x, self.weight, self.bias, self.eps)


class Conv2d(nn.Conv2d):
    """Conv2d with the fused epilogue of ``dispatch.conv2d`` (time-embedding add, residual add, scale)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
        return dispatch.conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0],
                               emb=emb, residual=residual, scale=scale)
