"""What the text conditioning is: each tower's shapes (from the weights), its attention heads and output layer
(from the YAML, an option, or the released models' defaults, recorded with where each came from), and for SDXL
the conditioner's embedders in order. ``cond_stage_config`` builds it; the modules are built from it alone.

Heads are not in the weights. The YAML names each tower (``version`` of a ``FrozenCLIPEmbedder``, ``arch`` of
an OpenCLIP embedder, or the class's default when absent); a name we know gives the head count. When the YAML
names a tower whose width is not the weights', the width // 64 we would assume is contradicted: that is an
error naming both values, never a silent default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Union

import torch

from tritonsd.formats.keys import CLIP_ROOT, OPEN_CLIP_ROOT, SDXL_EMBEDDERS, TEXT_PREFIXES, cond_stage_prefix

LAYER_NORM_EPS = 1e-5
HEAD_WIDTH = 64  # every released text tower's head width: the assumed head count is width // 64


class TextConfigError(ValueError):
    """The text-encoder weights are missing, inconsistent, or asked for an unsupported layout."""


@dataclass(frozen=True)
class TextConfig:
    """Shapes of one text tower, read from its weights, and its head count (not in the weights)."""

    kind: str  # "clip" (transformers CLIPTextModel keys) or "open_clip"
    width: int
    layers: int
    heads: int
    mlp_width: int
    vocab_size: int
    positions: int
    projection_dim: int | None = None  # open_clip's text_projection output width
    eps: float = LAYER_NORM_EPS


@dataclass(frozen=True)
class TextEncoderConfig:
    """One text encoder as the model uses it: the original class it stands for, its tower, the output layer."""

    prefix: str  # checkpoint prefix, e.g. "cond_stage_model." or "conditioner.embedders.0."
    target: str  # "FrozenCLIPEmbedder" | "FrozenOpenCLIPEmbedder" (SD2) | "FrozenOpenCLIPEmbedder2" (SDXL)
    tower: TextConfig
    layer: str  # CLIP: "last" | "hidden"; OpenCLIP: "last" | "penultimate"
    layer_idx: int | None = None  # CLIP "hidden": index into the layers + 1 hidden states
    heads_source: str = "assumed"  # "yaml" | "option" | "assumed"
    layer_source: str = "assumed"  # "yaml" | "assumed"
    arch: str | None = None  # the tower the YAML names (version / arch), when it names one


@dataclass(frozen=True)
class SizeEmbedderConfig:
    """SDXL's parameter-free ``ConcatTimestepEmbedderND`` (Fourier features of a size or crop tuple)."""

    outdim: int = 256
    target: str = "ConcatTimestepEmbedderND"


EmbedderConfig = Union[TextEncoderConfig, SizeEmbedderConfig]


@dataclass(frozen=True)
class CondStageConfig:
    """The whole text conditioning. SD1 / SD2: one text encoder (``input_keys`` ("txt",)). SDXL: the
    ``GeneralConditioner``'s embedders in order, each with the input it reads ("txt" or a size key)."""

    family: str
    embedders: tuple[EmbedderConfig, ...]
    input_keys: tuple[str, ...]
    source: str = "assumed"  # "yaml": the YAML's cond_stage_config / conditioner_config; "assumed": released

    @property
    def prefix(self) -> str:
        return cond_stage_prefix(self.family)

    @property
    def text_encoders(self) -> list[TextEncoderConfig]:
        return [e for e in self.embedders if isinstance(e, TextEncoderConfig)]


# --------------------------------------------------------------------------------------------------------------
# Shapes from weights


def _shape(weights: Mapping[str, torch.Tensor], key: str) -> tuple[int, int]:
    """A 2-D weight's shape (every text-tower weight read for the config is a matrix); a scalar, a wrong rank
    or an empty dimension is one line naming the key and its shape."""
    if key not in weights:
        raise TextConfigError(f"text encoder weight {key!r} is missing from the checkpoint")
    shape = tuple(weights[key].shape)
    if len(shape) != 2 or 0 in shape:
        raise TextConfigError(f"text encoder weight {key} has shape {list(shape)}; a 2-D tensor with no empty "
                              "dimension was expected")
    return shape


def _count_blocks(weights: Mapping[str, torch.Tensor], block_prefix: str) -> int:
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in weights if (m := pattern.match(k))}
    if not indices or indices != set(range(len(indices))):
        raise TextConfigError(f"text encoder blocks under {block_prefix!r} are missing or not numbered 0..N-1 "
                              f"(found {sorted(indices)})")
    return len(indices)


def assumed_heads(width: int) -> int:
    return max(1, width // HEAD_WIDTH)


def text_config_from_weights(weights: Mapping[str, torch.Tensor], prefix: str,
                             heads: int | None = None) -> TextConfig:
    """Read one text tower's shapes from the keys under ``prefix`` (e.g. ``"cond_stage_model."``); ``heads``
    defaults to width // 64.

    The kind is "clip" when ``<prefix>transformer.text_model.`` keys exist, "open_clip" for ``<prefix>model.``.
    """
    if any(k.startswith(prefix + CLIP_ROOT) for k in weights):
        root = prefix + CLIP_ROOT
        vocab, width = _shape(weights, root + "embeddings.token_embedding.weight")
        positions, _ = _shape(weights, root + "embeddings.position_embedding.weight")
        layers = _count_blocks(weights, root + "encoder.layers.")
        mlp_width, _ = _shape(weights, root + "encoder.layers.0.mlp.fc1.weight")
        kind, projection = "clip", None
    elif any(k.startswith(prefix + OPEN_CLIP_ROOT) for k in weights):
        root = prefix + OPEN_CLIP_ROOT
        vocab, width = _shape(weights, root + "token_embedding.weight")
        positions, _ = _shape(weights, root + "positional_embedding")
        layers = _count_blocks(weights, root + "transformer.resblocks.")
        mlp_width, _ = _shape(weights, root + "transformer.resblocks.0.mlp.c_fc.weight")
        _, projection = _shape(weights, root + "text_projection")
        kind = "open_clip"
    else:
        raise TextConfigError(f"no text encoder weights under {prefix!r} (expected {prefix}{CLIP_ROOT}* or "
                              f"{prefix}{OPEN_CLIP_ROOT}*)")
    if heads is None:
        heads = assumed_heads(width)
    if heads < 1 or width % heads:
        raise TextConfigError(f"text encoder width {width} is not divisible into {heads} attention heads")
    if positions < 2:
        raise TextConfigError(f"text encoder has {positions} positions; at least 2 are needed")
    return TextConfig(kind=kind, width=width, layers=layers, heads=heads, mlp_width=mlp_width,
                      vocab_size=vocab, positions=positions, projection_dim=projection)


# --------------------------------------------------------------------------------------------------------------
# What the YAML says about the towers

# text towers a YAML can name (a FrozenCLIPEmbedder's ``version``, an OpenCLIP embedder's ``arch``):
# (width, heads) of their text transformer
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14": (768, 12),
    "openai/clip-vit-base-patch32": (512, 8),
    "ViT-L-14": (768, 12),
    "ViT-H-14": (1024, 16),
    "ViT-bigG-14": (1280, 20),
    "ViT-B-32": (512, 8),
    "ViT-B-16": (512, 8),
}
# the original classes: weight kind, the parameter naming the tower and its default, the default layer
_TARGETS = {
    "FrozenCLIPEmbedder": ("clip", "version", "openai/clip-vit-large-patch14", "last"),
    "FrozenOpenCLIPEmbedder": ("open_clip", "arch", "ViT-H-14", "last"),
    "FrozenOpenCLIPEmbedder2": ("open_clip", "arch", "ViT-H-14", "last"),
}
# without a YAML: the released configs (v1-inference, v2-inference(-v), sd_xl_base)
_RELEASED = {
    "sd1": [("FrozenCLIPEmbedder", "txt", {"layer": "last"})],
    "sd2": [("FrozenOpenCLIPEmbedder", "txt", {"layer": "penultimate"})],
    "sdxl": [("FrozenCLIPEmbedder", "txt", {"layer": "hidden"}),
             ("FrozenOpenCLIPEmbedder2", "txt", {"layer": "penultimate", "legacy": False}),
             ("ConcatTimestepEmbedderND", "original_size_as_tuple", {"outdim": 256}),
             ("ConcatTimestepEmbedderND", "crop_coords_top_left", {"outdim": 256}),
             ("ConcatTimestepEmbedderND", "target_size_as_tuple", {"outdim": 256})],
}


def _params_of(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """A YAML node's ``params`` (accepts either ``{target, params}`` or the params themselves)."""
    if not node:
        return {}
    if "params" in node or "target" in node:
        return dict(node.get("params") or {})
    return dict(node)


def _target_name(node: Mapping[str, Any]) -> str:
    return str(node.get("target", "")).rsplit(".", 1)[-1]


def _yaml_embedders(family: str, node: Mapping[str, Any]) -> list[tuple[str, str, dict]]:
    """(target class, input key, params) per embedder, from the cond_stage_config / conditioner_config node."""
    if family != "sdxl":
        target = _target_name(node)
        return [(target, "txt", _params_of(node))]
    models = _params_of(node).get("emb_models")
    if not isinstance(models, list):
        raise TextConfigError("the YAML's conditioner_config has no emb_models list")
    out = []
    for index, model in enumerate(models):
        if not isinstance(model, dict) or model.get("input_key") is None:
            raise TextConfigError(f"conditioner embedder {index} has no input_key")
        out.append((_target_name(model), str(model["input_key"]), _params_of(model.get("params"))))
    return out


UNKNOWN_HEADS = "unknown"  # as ``heads``: where nothing says the count, report "unknown" instead of refusing
# (``tritonsd inspect``: the command meant to explain a file must not stop at what it cannot know)


def _resolve_heads(prefix: str, target: str, width: int, arch: str | None,
                   option: int | str | None) -> tuple[int, str]:
    stated = KNOWN_TOWERS.get(arch) if arch is not None else None
    if option == UNKNOWN_HEADS:
        if stated is not None and stated[0] == width:
            return stated[1], "yaml"
        return assumed_heads(width), ("unknown" if stated is not None else "assumed")
    if option is not None:
        if stated is not None and stated[0] == width and stated[1] != option:
            raise TextConfigError(f"{prefix}: text_heads {option} contradicts the YAML's {target} ({arch}: "
                                  f"{stated[1]} heads)")
        return option, "option"
    if stated is None:
        return assumed_heads(width), "assumed"
    yaml_width, yaml_heads = stated
    if yaml_width != width:
        raise TextConfigError(f"{prefix}: text heads are not in the weights: assumed {assumed_heads(width)} (width "
                              f"{width} / {HEAD_WIDTH}), but the YAML's {target} is {arch} ({yaml_heads} heads at "
                              f"width {yaml_width}); give the head count (text_heads / --text-heads)")
    return yaml_heads, "yaml"


def _text_encoder(weights, prefix: str, target: str, params: dict, heads: int | None,
                  from_yaml: bool) -> TextEncoderConfig:
    kind, arch_param, default_arch, default_layer = _TARGETS[target]
    shapes = text_config_from_weights(weights, prefix, heads=1)  # heads resolved below
    if shapes.kind != kind:
        raise TextConfigError(f"{prefix}: the {'YAML names' if from_yaml else 'family needs'} {target}, but the "
                              f"weights hold a{'n OpenCLIP' if shapes.kind == 'open_clip' else ' CLIP'} tower")
    arch = params.get(arch_param, default_arch) if from_yaml else None
    arch = str(arch) if arch is not None else None
    count, heads_source = _resolve_heads(prefix, target, shapes.width, arch, heads)
    if shapes.width % count:
        raise TextConfigError(f"{prefix}: text encoder width {shapes.width} is not divisible into {count} "
                              f"attention heads")
    if target == "FrozenOpenCLIPEmbedder2" and params.get("legacy", True):
        raise TextConfigError(f"{prefix}: FrozenOpenCLIPEmbedder2 with legacy: True is not supported")
    layer = str(params.get("layer", default_layer))
    layer_idx = params.get("layer_idx")
    if layer == "hidden" and layer_idx is None:
        if from_yaml:
            raise TextConfigError(f"{prefix}: {target} with layer: hidden needs a layer_idx")
        layer_idx = shapes.layers - 1  # the released SDXL config: the penultimate layer (11 of 12)
    return TextEncoderConfig(
        prefix=prefix, target=target, tower=replace(shapes, heads=count), layer=layer,
        layer_idx=None if layer_idx is None else int(layer_idx), heads_source=heads_source,
        layer_source="yaml" if from_yaml else "assumed", arch=arch)


def cond_stage_config(weights: Mapping[str, torch.Tensor], family: str, yaml_node: Mapping[str, Any] | None = None,
                      heads: int | None = None) -> CondStageConfig:
    """The text conditioning of a checkpoint of ``family`` ("sd1" | "sd2" | "sdxl"): tower shapes from the
    (normalised) ``weights``; classes, layers and input keys from ``yaml_node`` (the YAML's cond_stage_config /
    conditioner_config) or the released configs; ``heads`` (every tower's head count) as the option gives it."""
    if family not in TEXT_PREFIXES:
        raise TextConfigError(f"unknown model family {family!r}; expected sd1, sd2 or sdxl")
    from_yaml = bool(yaml_node)
    specs = _yaml_embedders(family, yaml_node) if from_yaml else _RELEASED[family]
    embedders: list[EmbedderConfig] = []
    for index, (target, input_key, params) in enumerate(specs):
        if target == "ConcatTimestepEmbedderND":
            embedders.append(SizeEmbedderConfig(outdim=int(params.get("outdim", 256))))
        elif target in _TARGETS:
            prefix = f"{SDXL_EMBEDDERS}{index}." if family == "sdxl" else cond_stage_prefix(family)
            embedders.append(_text_encoder(weights, prefix, target, params, heads, from_yaml))
        else:
            raise TextConfigError(f"unsupported text conditioning embedder {target!r}")
    if family != "sdxl" and embedders[0].target == "FrozenOpenCLIPEmbedder2":
        raise TextConfigError(f"{family} needs FrozenCLIPEmbedder or FrozenOpenCLIPEmbedder, not "
                              f"FrozenOpenCLIPEmbedder2")
    return CondStageConfig(family=family, embedders=tuple(embedders), input_keys=tuple(s[1] for s in specs),
                           source="yaml" if from_yaml else "assumed")


def check_tokens(tokens: torch.Tensor, positions: int) -> None:
    if tokens.dim() != 2 or tokens.shape[1] > positions:
        raise TextConfigError(f"token ids must be [B, N<={positions}], got {tuple(tokens.shape)}")
