"""Which checkpoint weight a kohya LoRA module name refers to, resolved as webui v1.10.1's ``networks.py`` does.

webui names every module of the loaded model by its path with dots as underscores, relative to the text tower
(``transformer_text_model_encoder_layers_0_mlp_fc1``; SDXL: ``0_transformer_...`` / ``1_model_transformer_...``)
or to ``model`` (``diffusion_model_input_blocks_1_1_proj_in``). A LoRA module name is converted
(``convert_diffusers_name_to_compvis``: SD1 / SD2 U-Net in diffusers names, OpenCLIP towers in CLIP names) and
looked up there, with three fallbacks: ``..._[qkv]_proj`` of an OpenCLIP ``MultiheadAttention`` (its rows of
``in_proj_weight``), ``lora_unet_*`` already in original names (SDXL) and ``lora_te1_text_model_*``.

Our parameter names ARE the normalised checkpoint keys, so the same names are built from them here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

# our key prefix -> webui's name prefix (dots become underscores after it)
_TOWER_PREFIXES = (
    ("model.diffusion_model.", "diffusion_model."),
    ("cond_stage_model.", ""),
    ("conditioner.embedders.", ""),  # conditioner.embedders.0.transformer... -> 0_transformer_...
)
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
QKV_ROWS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

_RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


@dataclass(frozen=True)
class Target:
    """A weight a LoRA module changes: ``param`` (our key); ``rows`` = (index, parts) when the module is one of
    q / k / v of an OpenCLIP ``in_proj_weight`` (rows index*n/parts .. (index+1)*n/parts); ``webui_key`` is
    webui's module key (it decides te vs U-Net multiplier: ``'transformer' in key[:20]``)."""

    param: str
    webui_key: str
    rows: tuple[int, int] | None = None

    @property
    def is_text(self) -> bool:
        return "transformer" in self.webui_key[:20]


def webui_layer_name(param: str) -> str | None:
    """webui's module name for the module holding ``param`` (``...weight`` / ``...in_proj_weight``), or None
    for weights webui's LoRA never touches (VAE, biases, buffers)."""
    if param.endswith(".in_proj_weight"):
        module = param[: -len(".in_proj_weight")]
    elif param.endswith(".weight"):
        module = param[: -len(".weight")]
    else:
        return None
    for ours, webui in _TOWER_PREFIXES:
        if module.startswith(ours):
            return (webui + module[len(ours):]).replace(".", "_")
    return None


class LayerIndex:
    """webui module name -> our weight key, for one model's weights."""

    def __init__(self, param_names: Iterable[str]):
        self.layers: dict[str, str] = {}
        for name in param_names:
            layer = webui_layer_name(name)
            if layer is not None:
                self.layers[layer] = name
        # webui: ``is_sd2 = 'model_transformer_resblocks' in network_layer_mapping`` (an SD2 OpenCLIP tower)
        self.is_sd2 = any(name.startswith("cond_stage_model.model.transformer.resblocks.") for name in param_names)

    @classmethod
    def of(cls, shapes: Mapping[str, object]) -> "LayerIndex":
        return cls(list(shapes))

    def resolve(self, module: str) -> Target | None:
        """The weight a LoRA module name refers to, or None when it matches nothing."""
        key = convert_diffusers_name_to_compvis(module, self.is_sd2)
        if key in self.layers:
            return Target(self.layers[key], key)
        m = _RE_X_PROJ.match(key)
        if m:
            param = self.layers.get(m.group(1))
            if param is not None and param.endswith(".in_proj_weight"):
                return Target(param, key, (QKV_ROWS[m.group(2)], 3))
        if "lora_unet" in module:
            key = module.replace("lora_unet", "diffusion_model")
            return Target(self.layers[key], key) if key in self.layers else None
        if "lora_te1_text_model" in module:
            for replacement in ("0_transformer_text_model", "transformer_text_model"):
                key = module.replace("lora_te1_text_model", replacement)
                if key in self.layers:
                    return Target(self.layers[key], key)
        return None


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """webui's conversion of kohya's diffusers-style names to its own module names (unchanged when no rule fits)."""
    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + block * 3 + index}_{1 if kind == 'attentions' else 0}_" \
               f"{_suffix(kind, rest)}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, index, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{_suffix(kind, rest)}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{block * 3 + index}_{1 if kind == 'attentions' else 0}_" \
               f"{_suffix(kind, rest)}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        block = int(m[1])
        return f"diffusion_model_output_blocks_{2 + block * 3}_{2 if block > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            return f"model_transformer_resblocks_{m[1]}_{_openclip_suffix(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip_suffix(m[2])}"
    return key


def _suffix(kind: str, rest: str) -> str:
    return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


def _openclip_suffix(rest: str) -> str:
    """CLIP layer part -> OpenCLIP's (webui replaces within the rest of the name, first match of three)."""
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def lora_family_hint(module_names: Iterable[str]) -> str | None:
    """"sdxl" when the file has SDXL's two text towers (``lora_te1_`` / ``lora_te2_``), "sd1/sd2" when it has
    the single ``lora_te_`` tower, None when it has no text-encoder modules (U-Net-only files)."""
    names = list(module_names)
    if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        return "sdxl"
    if any(n.startswith("lora_te_") for n in names):
        return "sd1/sd2"
    return None


def model_family(param_names: Iterable[str]) -> str:
    """sd1 / sd2 / sdxl from the text towers' key prefixes (for files read without a config)."""
    names = list(param_names)
    if any(n.startswith("conditioner.embedders.") for n in names):
        return "sdxl"
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return "sd2"
    return "sd1"
