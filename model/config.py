"""What a checkpoint is: family, widths, heads, parameterization and schedule, read from the weights' shapes and
(optionally) the original YAML. The one place that knows the SD1 / SD2 / SDXL / inpainting differences.

Shapes decide everything the weights can tell. What they cannot (attention head counts, eps vs v, the schedule
when the file has no ``alphas_cumprod``) comes from the YAML when given, else from an explicit option, else from
the released models' defaults, and ``ModelConfig`` records which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch

from .checkpoint import normalize_keys

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
# the text module's prefix(es) as ``text.text_config_from_weights`` takes them
TEXT_PREFIXES = {"sd1": ("cond_stage_model.",), "sd2": ("cond_stage_model.",),
                 "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1.")}

DEFAULT_SCALE_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
DEFAULT_SCHEDULE = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}


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
    text: dict[str, Any] = field(default_factory=dict)  # checkpoint prefix -> the text tower's config
    linear_start: float = DEFAULT_SCHEDULE["linear_start"]
    linear_end: float = DEFAULT_SCHEDULE["linear_end"]
    timesteps: int = DEFAULT_SCHEDULE["timesteps"]
    heads_source: str = "assumed"  # "yaml" | "assumed"
    text_heads: int | None = None  # as given (None: each tower's width // 64)
    cond_stage_yaml: dict | None = None  # the YAML's cond_stage_config / conditioner_config node
    yaml_path: str | None = None


# ---------------------------------------------------------------------------------------------------------------


def detect_config(state_dict: dict[str, torch.Tensor], yaml_path: str | Path | None = None,
                  parameterization: str | None = None, text_heads: int | None = None) -> ModelConfig:
    """Describe the model a checkpoint holds. ``state_dict`` is ``read_checkpoint``'s dict (raw keys are fine: they
    are normalised here). ``parameterization`` ("eps" | "v") overrides the YAML; ``text_heads`` sets the text
    towers' head count (not in the weights; default width // 64)."""
    if parameterization not in (None, "eps", "v"):
        raise ModelConfigError(f"parameterization must be 'eps' or 'v', not {parameterization!r}")
    norm = normalize_keys(state_dict)
    weights = norm.weights
    family = detect_family(weights, other_keys=[k for keys in norm.ignored.values() for k in keys])
    yaml_params = _load_yaml(yaml_path) if yaml_path is not None else None

    unet = unet_config_from_weights(weights, family)
    unet, heads_source = _apply_heads(unet, family, yaml_params)
    vae = vae_config_from_weights(weights)
    inpainting = _inpainting(unet)
    if yaml_params is not None:
        _check_yaml_agrees(yaml_params, unet, vae)

    param, param_source = _parameterization(family, yaml_params, parameterization)
    schedule = _schedule(yaml_params)
    if norm.alphas_cumprod is not None:
        alphas, alphas_source = norm.alphas_cumprod.to(torch.float32), "file"
    else:
        alphas, alphas_source = derive_alphas_cumprod(**schedule), "derived"

    scale = DEFAULT_SCALE_FACTOR[family]
    if yaml_params is not None and "scale_factor" in yaml_params:
        scale = float(yaml_params["scale_factor"])

    return ModelConfig(
        family=family, inpainting=inpainting, parameterization=param, parameterization_source=param_source,
        scale_factor=scale, alphas_cumprod=alphas, alphas_cumprod_source=alphas_source, unet=unet, vae=vae,
        text=text_configs(weights, family, text_heads), heads_source=heads_source, text_heads=text_heads,
        cond_stage_yaml=_cond_stage_yaml(yaml_params) if yaml_params is not None else None,
        yaml_path=str(yaml_path) if yaml_path is not None else None, **schedule,
    )


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
                                    f"top-level prefixes found: {', '.join(found) or 'none'}")
    label_emb = has(UNET + "label_emb.")
    if has("conditioner."):
        clip_l, bigg = has(SDXL_TEXT[0]), has(SDXL_TEXT[1])
        if clip_l and bigg and label_emb:
            return "sdxl"
        if has("conditioner.embedders.0.model.") and label_emb:
            adm = weights[UNET + "label_emb.0.0.weight"].shape[1]
            raise UnsupportedModelError(f"SDXL refiner is not supported yet: found conditioner.embedders.0.model.* "
                                        f"(OpenCLIP bigG only) and label_emb (adm_in_channels {adm})")
        embedders = sorted({".".join(k.split(".")[:4]) for k in weights if k.startswith("conditioner.")})
        raise UnsupportedModelError(f"this SGM layout is not supported yet: found {', '.join(embedders[:4])}"
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
                                f"(SD1), {SD2_TEXT} (SD2) or conditioner.embedders (SDXL); other keys: "
                                f"{', '.join(found) or 'none'}")


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


def _shape(weights: dict[str, torch.Tensor], key: str) -> torch.Size:
    try:
        return weights[key].shape
    except KeyError:
        raise ModelConfigError(f"missing tensor {key}") from None


def _indices(weights: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted integer children of ``prefix`` ("a.b." -> the N of every "a.b.N.*" key)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in weights if (m := pat.match(k))})


def unet_config_from_weights(weights: dict[str, torch.Tensor], family: str) -> UNetConfig:
    """UNet widths and layout from the shapes under ``model.diffusion_model.``; heads are left to ``_apply_heads``."""
    p = UNET
    model_channels, in_channels = _shape(weights, p + "input_blocks.0.0.weight")[:2]
    out_channels = _shape(weights, p + "out.2.weight")[0]
    time_embed_dim = _shape(weights, p + "time_embed.0.weight")[0]
    adm = _shape(weights, p + "label_emb.0.0.weight")[1] if p + "label_emb.0.0.weight" in weights else None

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
        out_ch = _shape(weights, p + f"input_blocks.{blocks[0]}.0.out_layers.3.weight")[0]
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
    emb_out = _shape(weights, p + "input_blocks.1.0.emb_layers.1.weight")[0]
    if emb_out != _shape(weights, p + "input_blocks.1.0.out_layers.3.weight")[0]:
        raise UnsupportedModelError("not supported yet: a UNet with use_scale_shift_norm")
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), num_res_blocks=counts.pop(), transformer_depth=tuple(depth),
        transformer_depth_middle=middle_depth,
        context_dim=_shape(weights, t + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_in_transformer=len(_shape(weights, t + "proj_in.weight")) == 2,
        time_embed_dim=time_embed_dim, adm_in_channels=adm,
    )


def vae_config_from_weights(weights: dict[str, torch.Tensor]) -> VAEConfig:
    p = VAE
    ch, in_channels = _shape(weights, p + "encoder.conv_in.weight")[:2]
    levels = _indices(weights, p + "encoder.down.")
    if not levels:
        raise ModelConfigError(f"no VAE encoder levels under {p}encoder.down.")
    ch_mult = tuple(_shape(weights, p + f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels)
    z_channels = _shape(weights, p + "decoder.conv_in.weight")[1]
    return VAEConfig(
        in_channels=in_channels, out_ch=_shape(weights, p + "decoder.conv_out.weight")[0], ch=ch, ch_mult=ch_mult,
        num_res_blocks=len(_indices(weights, p + "encoder.down.0.block.")), z_channels=z_channels,
        embed_dim=_shape(weights, p + "post_quant_conv.weight")[1],
        double_z=_shape(weights, p + "encoder.conv_out.weight")[0] == 2 * z_channels,
        attn_levels=tuple(i for i in levels if p + f"encoder.down.{i}.attn.0.q.weight" in weights),
    )


def text_configs(weights: dict[str, torch.Tensor], family: str, heads: int | None) -> dict[str, Any]:
    """The text towers' configs, keyed by their checkpoint prefix (the text module reads the shapes)."""
    from .text import text_config_from_weights

    return {prefix: text_config_from_weights(weights, prefix, heads=heads) for prefix in TEXT_PREFIXES[family]}


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


def _schedule(yaml_params: dict | None) -> dict:
    schedule = dict(DEFAULT_SCHEDULE)
    if yaml_params is None:
        return schedule
    sources = [yaml_params]
    disc = _node(yaml_params, "denoiser_config", "params", "discretization_config", "params")
    sources.append({"timesteps": disc.get("num_timesteps"), **disc})
    for src in sources:
        for key in schedule:
            if src.get(key) is not None:
                schedule[key] = type(schedule[key])(src[key])
    return schedule


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
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ModelConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ModelConfigError(f"{path.name}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    params = doc.get("model", {}).get("params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise ModelConfigError(f"{path.name}: not a Stable Diffusion config (no model.params)")
    return params


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
