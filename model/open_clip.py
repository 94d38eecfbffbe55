"""The OpenCLIP text tower (SD2 ``cond_stage_model.``, SDXL ``conditioner.embedders.1.``) in open_clip's
layout: ``model.{token_embedding, positional_embedding, transformer.resblocks.N, ln_final, text_projection,
logit_scale}``, so the checkpoint's keys below the prefix load strictly. GELU (erf), causal mask, no padding
mask. ``FrozenOpenCLIPEmbedder`` is SD2's encoder, ``FrozenOpenCLIPEmbedder2`` SDXL's (features and pooled).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tritonsd.kernels import dispatch
from tritonsd.model.layers import LayerNorm
from tritonsd.model.text_config import TextConfig, TextConfigError, check_tokens
from tritonsd.prompt.tokenizer import CLIPTokenizer, get_tokenizer

OPEN_CLIP_PAD_ID = 0  # open_clip.tokenize pads with 0


class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout: packed q/k/v input projection, then out_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, W] -> 3 x [B, N, W]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(dispatch.attention(q, k, v, self.heads, causal=True))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as open_clip's nn.GELU


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = OpenCLIPMLP(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip ``CLIP`` with its visual tower deleted. ``text_projection`` and ``logit_scale`` are kept as
    parameters (SD2 does not use them) so that the checkpoint loads strictly."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.positions, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim or cfg.width))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def block_outputs(self, tokens: torch.Tensor, blocks: int) -> torch.Tensor:
        """Output of the first ``blocks`` residual blocks (no ln_final). [B, N] -> [B, N, W]."""
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        for block in self.transformer.resblocks[:blocks]:
            x = block(x)
        return x

    def pool(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ln_final(last)[row, first end token] @ text_projection (the end token has the highest id)."""
        x = self.ln_final(last)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection


_OPEN_CLIP_SKIP = {"last": 0, "penultimate": 1}


class _OpenCLIPEmbedderBase(nn.Module):
    def __init__(self, cfg: TextConfig, layer: str):
        super().__init__()
        if cfg.kind != "open_clip":
            raise TextConfigError(f"{type(self).__name__} needs an open_clip config, got {cfg.kind!r}")
        if layer not in _OPEN_CLIP_SKIP:
            raise TextConfigError(f"unsupported OpenCLIP text layer {layer!r}; expected one of "
                                  f"{tuple(_OPEN_CLIP_SKIP)}")
        if _OPEN_CLIP_SKIP[layer] >= cfg.layers:
            raise TextConfigError(f"layer {layer!r} needs more than the tower's {cfg.layers} block(s)")
        self.config = cfg
        self.layer = layer
        self.model = OpenCLIPTextModel(cfg)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return get_tokenizer("open_clip")

    @property
    def output_dim(self) -> int:
        return self.config.width

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts, pad_id=OPEN_CLIP_PAD_ID, length=self.config.positions)

    def _prepare(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, self.config.positions)
        return tokens.to(self.model.token_embedding.weight.device)


class FrozenOpenCLIPEmbedder(_OpenCLIPEmbedderBase):
    """SD2's text encoder: output of the first L - skip blocks (penultimate: the last block skipped), then
    ``ln_final``."""

    def __init__(self, cfg: TextConfig, layer: str = "penultimate"):
        super().__init__(cfg, layer)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self._prepare(tokens)
        x = self.model.block_outputs(tokens, self.config.layers - _OPEN_CLIP_SKIP[self.layer])
        return self.model.ln_final(x)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(prompts))


class FrozenOpenCLIPEmbedder2(_OpenCLIPEmbedderBase):
    """SDXL's OpenCLIP (bigG) encoder, ``legacy: False``: the chosen layer's output WITHOUT ``ln_final``, plus
    the pooled, projected end-token feature of the last block (``pooled_dim`` wide)."""

    def __init__(self, cfg: TextConfig, layer: str = "penultimate"):
        super().__init__(cfg, layer)

    @property
    def pooled_dim(self) -> int:
        return self.model.text_projection.shape[1]

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] -> (features [B, N, width], pooled [B, pooled_dim])."""
        tokens = self._prepare(tokens)
        blocks = self.model.transformer.resblocks
        x = self.model.block_outputs(tokens, len(blocks) - 1)
        last = blocks[-1](x)
        features = x if self.layer == "penultimate" else last
        return features, self.model.pool(last, tokens)

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_tokens(self.tokenize(prompts))
