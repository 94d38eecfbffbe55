"""The CLIP text tower (SD1 ``cond_stage_model.``, SDXL ``conditioner.embedders.0.``) in transformers'
``CLIPTextModel`` layout: ``transformer.text_model.{embeddings, encoder.layers.N, final_layer_norm}``, so the
checkpoint's keys below the prefix load strictly (its ``embeddings.position_ids`` buffer is not a parameter here:
the loader drops it). quick_gelu, causal mask, no padding mask: padding positions get features and are part of
the context. Computation runs in the parameters' dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tritonsd.kernels import dispatch
from tritonsd.model.layers import LayerNorm
from tritonsd.model.text_config import TextConfig, TextConfigError, check_tokens
from tritonsd.prompt.tokenizer import EOS_ID, CLIPTokenizer, get_tokenizer

CLIP_PAD_ID = EOS_ID  # transformers' CLIPTokenizer pads with <|endoftext|>


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = dispatch.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_width)
        self.layer_norm2 = LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.positions, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # [B, N] -> [B, N, W]
        return self.token_embedding(tokens) + self.position_embedding.weight[:tokens.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.width, eps=cfg.eps)

    def hidden_state(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """transformers' ``hidden_states[index]``: the embeddings (0) or layer ``index``'s output, no final norm."""
        x = self.embeddings(tokens)
        for layer in self.encoder.layers[:index]:
            x = layer(x)
        return x

    def last_hidden_state(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.hidden_state(tokens, len(self.encoder.layers)))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class FrozenCLIPEmbedder(nn.Module):
    """CLIP ViT-L text encoder as ``ldm`` / ``sgm`` ``FrozenCLIPEmbedder`` uses it.

    layer "last": ``last_hidden_state`` (after ``final_layer_norm``; SD1). layer "hidden": ``hidden_states[
    layer_idx]`` WITHOUT the final norm (SDXL; layer_idx defaults to the penultimate layer, negative counts from
    the end as a Python index into the ``layers + 1`` hidden states).
    """

    LAYERS = ("last", "hidden")

    def __init__(self, cfg: TextConfig, layer: str = "last", layer_idx: int | None = None):
        super().__init__()
        if cfg.kind != "clip":
            raise TextConfigError(f"FrozenCLIPEmbedder needs a transformers-layout CLIP config, got {cfg.kind!r}")
        if layer not in self.LAYERS:
            raise TextConfigError(f"unsupported CLIP text layer {layer!r}; expected one of {self.LAYERS}")
        if layer == "hidden":
            layer_idx = cfg.layers - 1 if layer_idx is None else int(layer_idx)
            if not -(cfg.layers + 1) <= layer_idx <= cfg.layers:
                raise TextConfigError(f"layer_idx {layer_idx} is outside the {cfg.layers + 1} hidden states")
            layer_idx %= cfg.layers + 1
        self.config = cfg
        self.layer = layer
        self.layer_idx = layer_idx
        self.transformer = CLIPTextModel(cfg)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return get_tokenizer("transformers")

    @property
    def output_dim(self) -> int:
        return self.config.width

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts, pad_id=CLIP_PAD_ID, length=self.config.positions)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N] token ids -> [B, N, width] features."""
        check_tokens(tokens, self.config.positions)
        tokens = tokens.to(self.transformer.text_model.embeddings.token_embedding.weight.device)
        if self.layer == "last":
            return self.transformer.text_model.last_hidden_state(tokens)
        return self.transformer.text_model.hidden_state(tokens, self.layer_idx)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(prompts))
