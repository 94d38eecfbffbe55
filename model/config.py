"""What a checkpoint is: family, widths, heads, parameterization, schedule and text conditioning, read from the
weights' shapes and (optionally) the original YAML. The one place that knows the SD1 / SD2 / SDXL / inpainting
differences. The ``ModelConfig`` it returns is complete: ``build_model(config)`` needs nothing else.

Shapes decide everything the weights can tell. What they cannot (attention head counts, eps vs v, the scale
factor, the schedule when the file has no ``alphas_cumprod``, the text towers' output layers) comes from the
YAML when given, else from an explicit option, else from the released models' defaults, and ``ModelConfig``
records which (``*_source``: "yaml" | "option" | "assumed"; the schedule also "file").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch

from tritonsd.escape import escape
from tritonsd.formats.keys import (SD1_TEXT, SD2_TEXT, SDXL_CLIP, SDXL_EMBEDDERS, SDXL_OPEN_CLIP, UNET, VAE,
    NormalizedKeys, normalize_keys)
from tritonsd.model.text_config import UNKNOWN_HEADS, CondStageConfig, TextConfig, cond_stage_config

DEFAULT_SCALE_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
DEFAULT_SCHEDULE = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
YAML_SUFFIXES = (".yaml", ".yml")


class ModelConfigError(ValueError):
    """The weights (or the YAML given with them) describe a model we cannot build."""


class UnsupportedModelError(ModelConfigError):
    """A recognised layout that this runtime does not support yet."""


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]  # per level; 0 = no attention at that level
    transformer_depth_middle: int
    context_dim: int
    use_linear_in_transformer: bool
    time_embed_dim: int
    adm_in_channels: int | None = None  # SDXL's "vector" conditioning width (label_emb)
    num_heads: int | None = None  # fixed head count (SD1 style) ...
    num_head_channels: int | None = None  # ... or fixed head width (SD2 / SDXL style)

    def heads_at(self, channels: int) -> int:
        """Attention heads of a SpatialTransformer with ``channels`` channels."""
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ModelConfigError(f"{channels} channels do not split into heads of {self.num_head_channels}")
            return channels // self.num_head_channels
        if self.num_heads is None or channels % self.num_heads:
            raise ModelConfigError(f"{channels} channels do not split into {self.num_heads} heads")
        return self.num_heads

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be multiples of this (the up path has no size matching)."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    double_z: bool
    attn_levels: tuple[int, ...] = ()  # levels with attention besides the mid-block (none in the released VAEs)


@dataclass
class ModelConfig:
    family: str  # "sd1" | "sd2" | "sdxl"
    inpainting: bool
    parameterization: str  # "eps" | "v"
    parameterization_source: str  # "yaml" | "option" | "assumed"
    scale_factor: float
    alphas_cumprod: torch.Tensor  # float32 [timesteps]
    alphas_cumprod_source: str  # "file" | "derived"
    unet: UNetConfig
    vae: VAEConfig
    cond_stage: CondStageConfig  # the text towers (shapes, heads, layers) and SDXL's size embedders
    linear_start: float = DEFAULT_SCHEDULE["linear_start"]
    linear_end: float = DEFAULT_SCHEDULE["linear_end"]
    timesteps: int = DEFAULT_SCHEDULE["timesteps"]
    schedule_source: str = "assumed"  # linear_start / linear_end / timesteps: "yaml" | "assumed"
    scale_factor_source: str = "assumed"  # "yaml" | "assumed"
    heads_source: str = "assumed"  # the UNet's heads: "yaml" | "assumed"
    yaml_path: str | None = None

    @property
    def text(self) -> dict[str, TextConfig]:
        """The text towers' shapes and heads, keyed by their checkpoint prefix."""
        return {e.prefix: e.tower for e in self.cond_stage.text_encoders}


# ---------------------------------------------------------------------------------------------------------------


def detect_config(weights: NormalizedKeys | Mapping[str, torch.Tensor], yaml_path: str | Path | None = None, *,
                  parameterization: str | None = None, text_heads: int | None = None) -> ModelConfig:
    """Describe the model a checkpoint holds. ``weights``: ``normalize_keys``' result (a loader normalises once and
    passes it here and to the modules), or a raw state dict, normalised here. ``yaml_path``: the original
    inference YAML (see ``find_config``). ``parameterization`` ("eps" | "v") overrides the YAML; ``text_heads``
    sets every text tower's head count (not in the weights)."""
    if parameterization not in (None, "eps", "v"):
        raise ModelConfigError(f"parameterization must be 'eps' or 'v', not {parameterization!r}")
    if text_heads is not None and text_heads != UNKNOWN_HEADS and text_heads < 1:
        raise ModelConfigError(f"text_heads must be at least 1, got {text_heads}")
    norm = weights if isinstance(weights, NormalizedKeys) else normalize_keys(weights)
    shapes = norm.weights
    family = detect_family(shapes, other_keys=norm.ignored_keys)
    yaml_params = _load_yaml(yaml_path) if yaml_path is not None else None
    try:
        return _config(norm, family, yaml_params, yaml_path, parameterization, text_heads)
    except (TypeError, AttributeError, KeyError, IndexError, ArithmeticError, ValueError) as e:
        if yaml_params is None or isinstance(e, ModelConfigError) or type(e).__name__ == "TextConfigError":
            raise
        # a YAML value of a type or size the checks of _check_yaml_values do not cover: one line, not a traceback
        raise ModelConfigError(f"{escape(Path(yaml_path).name)}: a value the config cannot use "
                               f"({type(e).__name__}: {escape(' '.join(str(e).split()), 120)})") from None


def _config(norm: NormalizedKeys, family: str, yaml_params: dict | None, yaml_path, parameterization: str | None,
            text_heads: int | None) -> ModelConfig:
    shapes = norm.weights
    unet = unet_config_from_weights(shapes, family)
    unet, heads_source = _apply_heads(unet, family, yaml_params)
    vae = vae_config_from_weights(shapes)
    inpainting = _inpainting(unet)
    if yaml_params is not None:
        _check_yaml_agrees(yaml_params, unet, vae)

    param, param_source = _parameterization(family, yaml_params, parameterization)
    schedule, schedule_source = _schedule(yaml_params)
    if norm.alphas_cumprod is not None:
        alphas, alphas_source = norm.alphas_cumprod.to(torch.float32), "file"
    else:
        alphas, alphas_source = derive_alphas_cumprod(**schedule), "derived"
    scale, scale_source = DEFAULT_SCALE_FACTOR[family], "assumed"
    if yaml_params is not None and "scale_factor" in yaml_params:
        scale, scale_source = float(yaml_params["scale_factor"]), "yaml"
    cond_yaml = _cond_stage_yaml(yaml_params) if yaml_params is not None else None

    return ModelConfig(
        family=family, inpainting=inpainting, parameterization=param, parameterization_source=param_source,
        scale_factor=scale, alphas_cumprod=alphas, alphas_cumprod_source=alphas_source, unet=unet, vae=vae,
        cond_stage=cond_stage_config(shapes, family, cond_yaml, text_heads), schedule_source=schedule_source,
        scale_factor_source=scale_source, heads_source=heads_source,
        yaml_path=str(yaml_path) if yaml_path is not None else None, **schedule,
    )


def find_config(checkpoint: str | Path) -> Path | None:
    """The original inference YAML beside a checkpoint (same stem, ``.yaml`` or ``.yml``), as AUTOMATIC1111
    picks it up; None when there is none (or ``checkpoint`` is not a file path, e.g. ``demo:sd1``)."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    for suffix in YAML_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def detect_family(weights: dict[str, torch.Tensor], other_keys: Iterable[str] = ()) -> str:
    """"sd1" | "sd2" | "sdxl" from the key prefixes (after ``normalize_keys``; ``other_keys``: the keys it set
    aside, named in the error when there is no model); anything else is refused, naming the keys that decided
    it."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in weights)

    if not has(UNET + "input_blocks.0.0."):
        all_keys = set(weights) | set(other_keys)
        if any(k.startswith("encoder.") for k in all_keys) and any(k.startswith("decoder.") for k in all_keys):
            raise UnsupportedModelError("a standalone VAE file (encoder.*/decoder.* keys, no UNet); "
                                        "a full model checkpoint is needed")
        found = sorted({k.split(".")[0] for k in all_keys})[:6]
        raise UnsupportedModelError(f"unknown model family: no UNet ({UNET}input_blocks.0.0.weight missing); "
                                    f"top-level prefixes found: {', '.join(escape(f, 60) for f in found) or 'none'}")
    label_emb = has(UNET + "label_emb.")
    if has(SDXL_EMBEDDERS):
        clip_l, bigg = has(SDXL_CLIP + "transformer."), has(SDXL_OPEN_CLIP + "model.")
        if clip_l and bigg and label_emb:
            return "sdxl"
        if has(SDXL_CLIP + "model.") and label_emb:
            adm = _shape(weights, UNET + "label_emb.0.0.weight", MATRIX)[1]
            raise UnsupportedModelError(f"SDXL refiner is not supported yet: found {SDXL_CLIP}model.* "
                                        f"(OpenCLIP bigG only) and label_emb (adm_in_channels {adm})")
        embedders = sorted({".".join(k.split(".")[:4]) for k in weights if k.startswith(SDXL_EMBEDDERS)})
        raise UnsupportedModelError(f"this SGM layout is not supported yet: found "
                                    f"{', '.join(escape(e, 60) for e in embedders[:4])}"
                                    f"{' and label_emb' if label_emb else ', no label_emb'}")
    if label_emb:
        raise UnsupportedModelError("not supported yet: found a class-conditional UNet (label_emb) without an SDXL "
                                    "conditioner")
    if has(SD1_TEXT + "text_model."):
        return "sd1"
    if has(SD2_TEXT):
        return "sd2"
    found = sorted({".".join(k.split(".")[:2]) for k in weights if not k.startswith((UNET, VAE))})[:6]
    raise UnsupportedModelError(f"unknown model family: a UNet but no text encoder under {SD1_TEXT}text_model. "
                                f"(SD1), {SD2_TEXT} (SD2) or {SDXL_EMBEDDERS} (SDXL); other keys: "
                                f"{', '.join(escape(f, 60) for f in found) or 'none'}")


def _inpainting(unet: UNetConfig) -> bool:
    if unet.in_channels == 4:
        return False
    if unet.in_channels == 9:
        return True
    if unet.in_channels == 8:
        raise UnsupportedModelError("instruct-pix2pix (UNet in_channels 8) is not supported yet")
    raise UnsupportedModelError(f"UNet with in_channels {unet.in_channels} is not supported yet (4: txt2img, "
                                f"9: inpainting)")


# ---------------------------------------------------------------------------------------------------------------
# UNet and VAE shapes


CONV, MATRIX = (4,), (2,)  # the ranks a convolution's and a linear layer's weight have


def _shape(weights: dict[str, torch.Tensor], key: str, ranks: tuple[int, ...]) -> torch.Size:
    """The shape of ``weights[key]``, which must have one of ``ranks`` dimensions, none of them empty: a scalar
    where a matrix belongs, zero channels or a wrong rank is one line naming the key and its shape."""
    try:
        shape = weights[key].shape
    except KeyError:
        raise ModelConfigError(f"missing tensor {key}") from None
    if len(shape) not in ranks or 0 in shape:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ModelConfigError(f"{key} has shape {list(shape)}; a {want} tensor with no empty dimension was "
                               "expected")
    return shape


def _indices(weights: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted integer children of ``prefix`` ("a.b." -> the N of every "a.b.N.*" key)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in weights if (m := pat.match(k))})


def unet_config_from_weights(weights: dict[str, torch.Tensor], family: str) -> UNetConfig:
    """UNet widths and layout from the shapes under ``model.diffusion_model.``; heads are left to ``_apply_heads``."""
    p = UNET
    model_channels, in_channels = _shape(weights, p + "input_blocks.0.0.weight", CONV)[:2]
    out_channels = _shape(weights, p + "out.2.weight", CONV)[0]
    time_embed_dim = _shape(weights, p + "time_embed.0.weight", MATRIX)[0]
    adm = _shape(weights, p + "label_emb.0.0.weight", MATRIX)[1] if p + "label_emb.0.0.weight" in weights else None

    # walk the input blocks: ResBlocks (optionally + SpatialTransformer) per level, a Downsample between levels
    levels: list[list[int]] = [[]]  # per level: input-block indices of its ResBlocks
    for n in _indices(weights, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{n}.0.op.weight" in weights:
            levels.append([])
        else:
            levels[-1].append(n)
    counts = {len(blocks) for blocks in levels}
    if len(counts) != 1 or 0 in counts:
        raise ModelConfigError(f"UNet levels have different ResBlock counts ({[len(b) for b in levels]})")
    channel_mult, depth = [], []
    for blocks in levels:
        out_ch = _shape(weights, p + f"input_blocks.{blocks[0]}.0.out_layers.3.weight", CONV)[0]
        if out_ch % model_channels:
            raise ModelConfigError(f"UNet level width {out_ch} is not a multiple of model_channels {model_channels}")
        channel_mult.append(out_ch // model_channels)
        depths = {len(_indices(weights, p + f"input_blocks.{n}.1.transformer_blocks.")) for n in blocks}
        if len(depths) != 1:
            raise ModelConfigError(f"UNet level {len(depth)} mixes transformer depths {sorted(depths)}")
        depth.append(depths.pop())
    middle_depth = len(_indices(weights, p + "middle_block.1.transformer_blocks."))
    if middle_depth == 0:
        raise UnsupportedModelError("not supported yet: a UNet middle block without a SpatialTransformer")

    t = p + "middle_block.1."
    emb_out = _shape(weights, p + "input_blocks.1.0.emb_layers.1.weight", MATRIX)[0]
    if emb_out != _shape(weights, p + "input_blocks.1.0.out_layers.3.weight", CONV)[0]:
        raise UnsupportedModelError("not supported yet: a UNet with use_scale_shift_norm")
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=counts.pop(), transformer_depth=tuple(depth),
        transformer_depth_middle=middle_depth,
        context_dim=_shape(weights, t + "transformer_blocks.0.attn2.to_k.weight", MATRIX)[1],
        use_linear_in_transformer=len(_shape(weights, t + "proj_in.weight", MATRIX + CONV)) == 2,
        time_embed_dim=time_embed_dim, adm_in_channels=adm,
    )


def vae_config_from_weights(weights: dict[str, torch.Tensor]) -> VAEConfig:
    p = VAE
    ch, in_channels = _shape(weights, p + "encoder.conv_in.weight", CONV)[:2]
    levels = _indices(weights, p + "encoder.down.")
    if not levels:
        raise ModelConfigError(f"no VAE encoder levels under {p}encoder.down.")
    widths = [_shape(weights, p + f"encoder.down.{i}.block.0.conv2.weight", CONV)[0] for i in levels]
    if any(w % ch for w in widths):
        raise ModelConfigError(f"VAE level widths {widths} are not multiples of its base width {ch}")
    ch_mult = tuple(w // ch for w in widths)
    z_channels = _shape(weights, p + "decoder.conv_in.weight", CONV)[1]
    return VAEConfig(
        in_channels=in_channels, out_ch=_shape(weights, p + "decoder.conv_out.weight", CONV)[0], ch=ch, ch_mult=ch_mult,
        num_res_blocks=len(_indices(weights, p + "encoder.down.0.block.")), z_channels=z_channels,
        embed_dim=_shape(weights, p + "post_quant_conv.weight", CONV)[1],
        double_z=_shape(weights, p + "encoder.conv_out.weight", CONV)[0] == 2 * z_channels,
        attn_levels=tuple(i for i in levels if p + f"encoder.down.{i}.attn.0.q.weight" in weights),
    )


# ---------------------------------------------------------------------------------------------------------------
# What the weights cannot say: heads, eps vs v, schedule


def _apply_heads(unet: UNetConfig, family: str, yaml_params: dict | None) -> tuple[UNetConfig, str]:
    """Heads are not in the weights: the YAML decides when given, else the released models' values (SD1: 8
    heads; SD2 / SDXL: 64-channel heads)."""
    unet_yaml = _unet_yaml(yaml_params) if yaml_params is not None else {}
    nhc = unet_yaml.get("num_head_channels", -1)
    nh = unet_yaml.get("num_heads", -1)
    if nhc not in (None, -1):
        return replace(unet, num_head_channels=int(nhc), num_heads=None), "yaml"
    if nh not in (None, -1):
        return replace(unet, num_heads=int(nh), num_head_channels=None), "yaml"
    if family == "sd1":
        return replace(unet, num_heads=8, num_head_channels=None), "assumed"
    return replace(unet, num_head_channels=64, num_heads=None), "assumed"


def _parameterization(family: str, yaml_params: dict | None, option: str | None) -> tuple[str, str]:
    if option is not None:
        return option, "option"
    if yaml_params is not None:
        if family == "sdxl":
            scaling = str(_node(yaml_params, "denoiser_config", "params", "scaling_config").get("target", ""))
            if scaling:
                return ("v" if scaling.endswith("VScaling") else "eps"), "yaml"
        else:
            value = str(yaml_params.get("parameterization") or "eps")
            if value not in ("eps", "v"):
                raise UnsupportedModelError(f"parameterization {value!r} (from the YAML) is not supported; "
                                            f"expected eps or v")
            return value, "yaml"
    return "eps", "assumed"


def _node(params: dict, *path: str) -> dict:
    """params[path[0]][path[1]]..., {} where a level is missing or null."""
    for key in path:
        params = params.get(key) or {} if isinstance(params, dict) else {}
    return params if isinstance(params, dict) else {}


def _schedule(yaml_params: dict | None) -> tuple[dict, str]:
    """linear_start / linear_end / timesteps: the YAML's (LDM top level, or SGM's discretization_config) where
    it gives any, else the released models'."""
    schedule, source = dict(DEFAULT_SCHEDULE), "assumed"
    if yaml_params is None:
        return schedule, source
    disc = _node(yaml_params, "denoiser_config", "params", "discretization_config", "params")
    for src in (yaml_params, {"timesteps": disc.get("num_timesteps"), **disc}):
        for key in schedule:
            if src.get(key) is not None:
                schedule[key] = type(schedule[key])(src[key])
                source = "yaml"
    return schedule, source


def derive_alphas_cumprod(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """The original's "linear" schedule: betas = linspace(sqrt(start), sqrt(end), n, float64) ** 2, then
    cumprod(1 - betas), held as float32."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# YAML


def _load_yaml(path: str | Path) -> dict:
    """The original config's ``model.params`` (parsed with ``yaml.safe_load``)."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES or not path.is_file():
            raise ModelConfigError(f"{escape(path.name)}: not a config (not a regular file of at most "
                                   f"{MAX_YAML_BYTES:,} bytes)")
        doc = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise ModelConfigError(f"{escape(path)}: cannot read the config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ModelConfigError(f"{escape(path.name)}: not valid YAML ({escape(' '.join(str(e).split()), 160)})") \
            from None
    except RecursionError:
        raise ModelConfigError(f"{escape(path.name)}: not a config (nested too deeply)") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise ModelConfigError(f"{escape(path.name)}: not a Stable Diffusion config (no model.params)")
    _check_yaml_values(path, params)
    return params


MAX_YAML_BYTES = 1 << 20  # the released configs are 2-4 KB
MAX_TIMESTEPS = 10_000  # the released models train on 1,000; the schedule is allocated from this number
MAX_WIDTH = 1 << 16  # channels, widths, heads: far above any released model, far below an allocation's worth
# YAML keys the config reads -> (smallest, largest, integer?) ; -1 is also allowed for the head settings
_SCHEDULE_VALUES = {"timesteps": (1, MAX_TIMESTEPS, True), "num_timesteps": (1, MAX_TIMESTEPS, True),
                    "linear_start": (0.0, 1.0, False), "linear_end": (0.0, 1.0, False)}
_UNET_VALUES = {**{k: (0, MAX_WIDTH, True) for k in ("in_channels", "out_channels", "model_channels", "num_res_blocks",
                                                     "context_dim", "adm_in_channels", "transformer_depth_middle")},
                "num_heads": (1, MAX_WIDTH, True), "num_head_channels": (1, MAX_WIDTH, True)}
_VAE_VALUES = {k: (0, MAX_WIDTH, True) for k in ("embed_dim", "z_channels", "in_channels", "out_ch", "ch",
                                                  "num_res_blocks")}
_LISTS = ("channel_mult", "attention_resolutions", "ch_mult")


def _check_yaml_values(path: Path, params: dict) -> None:
    """Every YAML value the config reads has the type and range it needs, before any is used: one line naming
    the key otherwise (``timesteps: 1.0e11`` would allocate 800 GB; ``timesteps: 0`` or a list where a number
    belongs would end in a traceback)."""
    disc = "denoiser_config.params.discretization_config.params"
    checks = [(params, "", _SCHEDULE_VALUES), (_node(params, *disc.split(".")), disc + ".", _SCHEDULE_VALUES)]
    for name in ("unet_config", "network_config"):
        checks.append((_node(params, name, "params"), f"{name}.params.", _UNET_VALUES))
    vae = _node(params, "first_stage_config", "params")
    checks += [(vae, "first_stage_config.params.", _VAE_VALUES),
               (_node(vae, "ddconfig"), "first_stage_config.params.ddconfig.", _VAE_VALUES)]
    for node, where, table in checks:
        for key, (low, high, integer) in table.items():
            if node.get(key) is not None:
                _yaml_number(path, where + key, node[key], low, high, integer, allow_minus_one="head" in key)
        for key in _LISTS:
            if node.get(key) is not None:
                _yaml_int_list(path, where + key, node[key])
        depth = node.get("transformer_depth")
        if depth is not None and not isinstance(depth, list):
            _yaml_number(path, where + "transformer_depth", depth, 0, MAX_WIDTH, True)
        elif depth is not None:
            _yaml_int_list(path, where + "transformer_depth", depth, low=0)
    for key in ("linear_start", "linear_end"):
        if params.get(key) is not None and not 0 < float(params[key]) < 1:
            raise ModelConfigError(f"{escape(path.name)}: {key} must be between 0 and 1 (exclusive), got "
                                   f"{params[key]!r}")
    if params.get("scale_factor") is not None:
        _yaml_number(path, "scale_factor", params["scale_factor"], 1e-6, 100.0, False)
    if params.get("parameterization") is not None and not isinstance(params["parameterization"], str):
        raise ModelConfigError(f"{escape(path.name)}: parameterization must be text (eps or v)")


def _yaml_number(path: Path, key: str, value, low, high, integer: bool, allow_minus_one: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and integer and value != int(value):
        ok = False
    if ok and allow_minus_one and value == -1:
        return
    if not ok or not low <= value <= high:
        raise ModelConfigError(f"{escape(path.name)}: {key} must be {kind} from {low:g} to {high:g}, got "
                               f"{escape(repr(value), 60)}")


def _yaml_int_list(path: Path, key: str, value, low: int = 1) -> None:
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= 64 or not all(
            not isinstance(v, bool) and isinstance(v, int) and low <= v <= MAX_WIDTH for v in value):
        raise ModelConfigError(f"{escape(path.name)}: {key} must be a list of at most 64 integers from {low} to "
                               f"{MAX_WIDTH}, got {escape(repr(value), 60)}")


def _unet_yaml(params: dict) -> dict:
    return _node(params, "unet_config", "params") or _node(params, "network_config", "params")


def _cond_stage_yaml(params: dict) -> dict | None:
    return params.get("cond_stage_config") or params.get("conditioner_config")


def _vae_yaml(params: dict) -> dict:
    return _node(params, "first_stage_config", "params")


def _check_yaml_agrees(params: dict, unet: UNetConfig, vae: VAEConfig) -> None:
    """Every structural value the YAML states must be what the weights say."""
    u = _unet_yaml(params)
    mismatches = []

    def check(where: str, key: str, from_yaml, from_weights) -> None:
        if from_yaml is not None and from_yaml != from_weights:
            mismatches.append(f"{where} {key}: YAML says {from_yaml}, the weights say {from_weights}")

    for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim",
                "adm_in_channels"):
        check("unet_config", key, u.get(key), getattr(unet, key))
    if u.get("channel_mult") is not None:
        check("unet_config", "channel_mult", tuple(u["channel_mult"]), unet.channel_mult)
    if u.get("use_linear_in_transformer") is not None:
        check("unet_config", "use_linear_in_transformer", bool(u["use_linear_in_transformer"]),
              unet.use_linear_in_transformer)
    if u.get("attention_resolutions") is not None:
        levels = tuple(i for i in range(len(unet.channel_mult)) if 2 ** i in set(u["attention_resolutions"]))
        check("unet_config", "attention levels", levels, tuple(i for i, d in enumerate(unet.transformer_depth) if d))
    depth = u.get("transformer_depth")
    if depth is not None:
        per_level = [depth] * len(unet.channel_mult) if isinstance(depth, int) else list(depth)
        said = tuple(d if w else 0 for d, w in zip(per_level, unet.transformer_depth))
        check("unet_config", "transformer_depth (levels with attention)", said, unet.transformer_depth)
        middle = u.get("transformer_depth_middle", per_level[-1])
        check("unet_config", "transformer_depth of the middle block", middle, unet.transformer_depth_middle)

    vy = _vae_yaml(params)
    dd = _node(vy, "ddconfig")
    check("first_stage_config", "embed_dim", vy.get("embed_dim"), vae.embed_dim)
    for key in ("z_channels", "in_channels", "out_ch", "ch", "num_res_blocks", "double_z"):
        check("first_stage_config.ddconfig", key, dd.get(key), getattr(vae, key))
    if dd.get("ch_mult") is not None:
        check("first_stage_config.ddconfig", "ch_mult", tuple(dd["ch_mult"]), vae.ch_mult)
    if mismatches:
        raise ModelConfigError("the YAML disagrees with the weights: " + "; ".join(mismatches))
