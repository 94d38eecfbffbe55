"""Text encoders of Stable Diffusion 1.x / 2.x and the SDXL conditioner.

Every module's attribute path is the checkpoint key below its prefix, so a state dict loads strictly:

* ``FrozenCLIPEmbedder`` (SD1 ``cond_stage_model.``, SDXL ``conditioner.embedders.0.``): transformers'
  ``CLIPTextModel`` layout, ``transformer.text_model.{embeddings, encoder.layers.N, final_layer_norm}``;
  quick_gelu, causal mask. (The checkpoints' ``embeddings.position_ids`` buffer is not a parameter here: the
  loader drops it.)
* ``FrozenOpenCLIPEmbedder`` (SD2 ``cond_stage_model.``) and ``FrozenOpenCLIPEmbedder2`` (SDXL
  ``conditioner.embedders.1.``): open_clip's text tower, ``model.{token_embedding, positional_embedding,
  transformer.resblocks.N, ln_final, text_projection, logit_scale}``; GELU (erf), causal mask.
* ``GeneralConditioner`` (SDXL ``conditioner.``): the text embedders plus parameter-free Fourier embedders of
  the size / crop conditioning.

Neither encoder uses a padding mask: padding positions get features and are part of the context.
Computation runs in the parameters' dtype (float32 as the originals when loaded as float32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch
from .layers import LayerNorm, timestep_embedding
from .tokenizer import CONTEXT_LENGTH, EOS_ID, CLIPTokenizer, get_tokenizer

CLIP_PAD_ID = EOS_ID  # transformers' CLIPTokenizer pads with <|endoftext|>
OPEN_CLIP_PAD_ID = 0  # open_clip.tokenize pads with 0
LAYER_NORM_EPS = 1e-5


class TextConfigError(ValueError):
    """The text-encoder weights are missing, inconsistent, or asked for an unsupported layout."""


@dataclass(frozen=True)
class TextConfig:
    """Shapes of one text tower, read from its weights (``heads`` is not in the weights: width // 64 unless
    given)."""

    kind: str  # "clip" (transformers CLIPTextModel keys) or "open_clip"
    width: int
    layers: int
    heads: int
    mlp_width: int
    vocab_size: int
    positions: int
    projection_dim: int | None = None  # open_clip's text_projection output width
    eps: float = LAYER_NORM_EPS


# --------------------------------------------------------------------------------------------------------------
# Shapes from weights

_CLIP_ROOT = "transformer.text_model."
_OPEN_CLIP_ROOT = "model."


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise TextConfigError(f"text encoder weight {key!r} is missing from the checkpoint")
    return tuple(state_dict[key].shape)


def _count_blocks(state_dict: Mapping[str, torch.Tensor], block_prefix: str) -> int:
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not indices or indices != set(range(len(indices))):
        raise TextConfigError(f"text encoder blocks under {block_prefix!r} are missing or not numbered 0..N-1 "
                              f"(found {sorted(indices)})")
    return len(indices)


def text_config_from_weights(state_dict: Mapping[str, torch.Tensor], prefix: str,
                             heads: int | None = None) -> TextConfig:
    """Read one text tower's shapes from the keys under ``prefix`` (e.g. ``"cond_stage_model."``).

    The kind is "clip" when ``<prefix>transformer.text_model.`` keys exist, "open_clip" for ``<prefix>model.``.
    """
    if any(k.startswith(prefix + _CLIP_ROOT) for k in state_dict):
        root = prefix + _CLIP_ROOT
        vocab, width = _shape(state_dict, root + "embeddings.token_embedding.weight")
        positions, _ = _shape(state_dict, root + "embeddings.position_embedding.weight")
        layers = _count_blocks(state_dict, root + "encoder.layers.")
        mlp_width, _ = _shape(state_dict, root + "encoder.layers.0.mlp.fc1.weight")
        kind, projection = "clip", None
    elif any(k.startswith(prefix + _OPEN_CLIP_ROOT) for k in state_dict):
        root = prefix + _OPEN_CLIP_ROOT
        vocab, width = _shape(state_dict, root + "token_embedding.weight")
        positions, _ = _shape(state_dict, root + "positional_embedding")
        layers = _count_blocks(state_dict, root + "transformer.resblocks.")
        mlp_width, _ = _shape(state_dict, root + "transformer.resblocks.0.mlp.c_fc.weight")
        _, projection = _shape(state_dict, root + "text_projection")
        kind = "open_clip"
    else:
        raise TextConfigError(f"no text encoder weights under {prefix!r} (expected {prefix}{_CLIP_ROOT}* or "
                              f"{prefix}{_OPEN_CLIP_ROOT}*)")
    if heads is None:
        heads = max(1, width // 64)
    if heads < 1 or width % heads:
        raise TextConfigError(f"text encoder width {width} is not divisible into {heads} attention heads")
    if positions < 2:
        raise TextConfigError(f"text encoder has {positions} positions; at least 2 are needed")
    return TextConfig(kind=kind, width=width, layers=layers, heads=heads, mlp_width=mlp_width,
                      vocab_size=vocab, positions=positions, projection_dim=projection)


# --------------------------------------------------------------------------------------------------------------
# transformers CLIPTextModel layout


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


def _check_tokens(tokens: torch.Tensor, positions: int) -> None:
    if tokens.dim() != 2 or tokens.shape[1] > positions:
        raise TextConfigError(f"token ids must be [B, N<={positions}], got {tuple(tokens.shape)}")


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
        _check_tokens(tokens, self.config.positions)
        tokens = tokens.to(self.transformer.text_model.embeddings.token_embedding.weight.device)
        if self.layer == "last":
            return self.transformer.text_model.last_hidden_state(tokens)
        return self.transformer.text_model.hidden_state(tokens, self.layer_idx)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(prompts))


# --------------------------------------------------------------------------------------------------------------
# open_clip text tower layout


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
        _check_tokens(tokens, self.config.positions)
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


# --------------------------------------------------------------------------------------------------------------
# SDXL conditioner


class ConcatTimestepEmbedderND(nn.Module):
    """Embeds each of the D numbers of a row independently with ``timestep_embedding`` and concatenates:
    [B, D] -> [B, D * outdim]. No parameters."""

    def __init__(self, outdim: int = 256):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x[:, None]
        b, d = x.shape
        # [B, D] -> [B*D] -> [B*D, outdim] -> [B, D*outdim]
        return timestep_embedding(x.reshape(b * d), self.outdim).reshape(b, d * self.outdim)


SDXL_BASE_INPUTS = ("txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SDXL_REFINER_INPUTS = ("txt", "original_size_as_tuple", "crop_coords_top_left", "aesthetic_score")
_CONDITION_ARGS = {"original_size": "original_size_as_tuple", "crop_coords_top_left": "crop_coords_top_left",
                   "target_size": "target_size_as_tuple", "aesthetic_score": "aesthetic_score"}


def _condition_rows(value: Any, batch: int, name: str) -> torch.Tensor:
    """Per-row numbers as [B, D]: a [B, D] tensor / list of B tuples, or one tuple (or number) for every row."""
    t = torch.as_tensor(value)
    if t.dim() <= 1:
        t = t.reshape(1, -1).expand(batch, -1)
    if t.dim() != 2 or t.shape[0] != batch:
        raise TextConfigError(f"{name} must be one tuple or one tuple per prompt ({batch}), got shape "
                              f"{tuple(torch.as_tensor(value).shape)}")
    return t


class GeneralConditioner(nn.Module):
    """sgm's ``GeneralConditioner``: runs each embedder on its input and concatenates 3-D outputs into
    ``crossattn`` (channels) and 2-D outputs into ``vector``, in embedder order.

    ``input_keys[i]`` names embedder i's input: "txt" (prompts) or a size key such as "original_size_as_tuple".
    """

    def __init__(self, embedders: Sequence[nn.Module], input_keys: Sequence[str]):
        super().__init__()
        if len(embedders) != len(input_keys):
            raise TextConfigError("GeneralConditioner needs one input key per embedder")
        self.embedders = nn.ModuleList(embedders)
        self.input_keys = tuple(input_keys)

    @property
    def text_embedders(self) -> list[nn.Module]:
        return [e for e, k in zip(self.embedders, self.input_keys) if k == "txt"]

    def forward(self, prompts: Sequence[str], original_size: Any = None, crop_coords_top_left: Any = None,
                target_size: Any = None, aesthetic_score: Any = None,
                zero_text: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: B strings; sizes (height, width) and crop (top, left): one tuple per prompt or one for all.

        Returns (crossattn [B, N, sum of text widths], vector [B, pooled + Fourier features]). ``zero_text``
        gives the unconditional features SDXL txt2img uses (``force_uc_zero_embeddings=["txt"]``): every text
        output zero, the size / crop features unchanged.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = len(prompts)
        given = {"original_size": original_size, "crop_coords_top_left": crop_coords_top_left,
                 "target_size": target_size, "aesthetic_score": aesthetic_score}
        inputs = {_CONDITION_ARGS[name]: v for name, v in given.items() if v is not None}
        crossattn: list[torch.Tensor] = []
        vector: list[torch.Tensor] = []
        for embedder, key in zip(self.embedders, self.input_keys):
            if key == "txt":
                outs = embedder(list(prompts))
            else:
                if key not in inputs:
                    arg = next((a for a, k in _CONDITION_ARGS.items() if k == key), key)
                    raise TextConfigError(f"the SDXL conditioner needs {arg!r}")
                outs = embedder(_condition_rows(inputs[key], batch, key))
            for out in outs if isinstance(outs, tuple) else (outs,):
                if key == "txt" and zero_text:
                    out = torch.zeros_like(out)
                (crossattn if out.dim() == 3 else vector).append(out)
        dtype = crossattn[0].dtype
        device = crossattn[0].device
        return (torch.cat(crossattn, dim=2),
                torch.cat([v.to(device=device, dtype=dtype) for v in vector], dim=1))


# --------------------------------------------------------------------------------------------------------------
# Building from a state dict


def cond_stage_prefix(family: str) -> str:
    """The checkpoint prefix of the text conditioning module."""
    return "conditioner." if family == "sdxl" else "cond_stage_model."


def _params_of(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """A YAML node's ``params`` (accepts either ``{target, params}`` or the params themselves)."""
    if not node:
        return {}
    if "params" in node or "target" in node:
        return dict(node.get("params") or {})
    return dict(node)


def _build_sd12(state_dict, family, heads, yaml_params) -> nn.Module:
    params = _params_of(yaml_params)
    cfg = text_config_from_weights(state_dict, "cond_stage_model.", heads)
    if family == "sd1":
        if cfg.kind != "clip":
            raise TextConfigError("an SD1 checkpoint needs cond_stage_model.transformer.text_model.* weights")
        return FrozenCLIPEmbedder(cfg, layer=params.get("layer", "last"), layer_idx=params.get("layer_idx"))
    if cfg.kind != "open_clip":
        raise TextConfigError("an SD2 checkpoint needs cond_stage_model.model.* (OpenCLIP) weights")
    return FrozenOpenCLIPEmbedder(cfg, layer=params.get("layer", "penultimate"))


def _sdxl_embedder(state_dict, index: int, heads, params: Mapping[str, Any]) -> nn.Module:
    cfg = text_config_from_weights(state_dict, f"conditioner.embedders.{index}.", heads)
    if cfg.kind == "clip":
        return FrozenCLIPEmbedder(cfg, layer=params.get("layer", "hidden"), layer_idx=params.get("layer_idx"))
    if params.get("legacy", False):
        raise TextConfigError("FrozenOpenCLIPEmbedder2 with legacy: True is not supported")
    return FrozenOpenCLIPEmbedder2(cfg, layer=params.get("layer", "penultimate"))


_TEXT_EMBEDDER = "text"  # without a YAML: CLIP-L or OpenCLIP, whichever the weights hold


def _build_sdxl(state_dict, heads, yaml_params) -> GeneralConditioner:
    models = _params_of(yaml_params).get("emb_models")
    if models is None:
        text_count = len({k.split(".")[2] for k in state_dict if k.startswith("conditioner.embedders.")})
        keys = SDXL_BASE_INPUTS if text_count == 2 else SDXL_REFINER_INPUTS
        models = [{"target": _TEXT_EMBEDDER if k == "txt" else "ConcatTimestepEmbedderND", "input_key": k}
                  for k in keys]
    embedders, input_keys = [], []
    for index, node in enumerate(models):
        target = str(node.get("target", "")).rsplit(".", 1)[-1]
        key = node.get("input_key")
        if key is None:
            raise TextConfigError(f"conditioner embedder {index} ({target}) has no input_key")
        params = _params_of(node.get("params"))
        if target == "ConcatTimestepEmbedderND":
            embedders.append(ConcatTimestepEmbedderND(int(params.get("outdim", 256))))
        elif target in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2", _TEXT_EMBEDDER):
            embedders.append(_sdxl_embedder(state_dict, index, heads, params))
        else:
            raise TextConfigError(f"unsupported SDXL conditioner embedder {target!r}")
        input_keys.append(key)
    return GeneralConditioner(embedders, input_keys)


def build_cond_stage(state_dict: Mapping[str, torch.Tensor], family: str, heads: int | None = None,
                     yaml_params: Mapping[str, Any] | None = None) -> nn.Module:
    """The text conditioning module for ``family`` ("sd1" | "sd2" | "sdxl"), shaped from the checkpoint's keys
    (full, prefixed state dict) but NOT loaded: load ``state_dict`` entries under ``cond_stage_prefix(family)``
    into it (dropping ``...embeddings.position_ids``).

    yaml_params: the YAML's ``cond_stage_config`` (sd1 / sd2) or ``conditioner_config`` (sdxl) node, or its
    ``params``; gives ``layer`` / ``layer_idx`` / ``emb_models``. Without it: SD1 "last", SD2 "penultimate",
    SDXL base = CLIP-L hidden_states[-2 of L+1] + bigG penultimate with pooled + original/crop/target sizes.
    """
    if family in ("sd1", "sd2"):
        return _build_sd12(state_dict, family, heads, yaml_params)
    if family == "sdxl":
        return _build_sdxl(state_dict, heads, yaml_params)
    raise TextConfigError(f"unknown model family {family!r}; expected sd1, sd2 or sdxl")


__all__ = [
    "CONTEXT_LENGTH", "ConcatTimestepEmbedderND", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder2", "GeneralConditioner", "TextConfig", "TextConfigError", "build_cond_stage",
    "cond_stage_prefix", "text_config_from_weights",
]
