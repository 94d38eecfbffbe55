"""The checkpoint key layout, spelled once: the module prefixes of the released single-file checkpoints, the
extras a loader sets aside, and ``normalize_keys``, which maps a raw state dict to the names our modules use.

Every other module (config detection, the model, the text towers, inspect, external VAE files) imports its
prefixes from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# ---------------------------------------------------------------------------------------------------------------
# Module prefixes

UNET = "model.diffusion_model."
VAE = "first_stage_model."
COND_STAGE = "cond_stage_model."  # SD 1.x / 2.x text conditioning
CONDITIONER = "conditioner."  # SDXL's GeneralConditioner
SDXL_EMBEDDERS = CONDITIONER + "embedders."

# below a tower's prefix: transformers' CLIPTextModel or open_clip's text tower
CLIP_ROOT = "transformer.text_model."
OPEN_CLIP_ROOT = "model."

SD1_TEXT = COND_STAGE + "transformer."  # CLIP ViT-L
SD2_TEXT = COND_STAGE + OPEN_CLIP_ROOT  # OpenCLIP ViT-H
SDXL_CLIP = SDXL_EMBEDDERS + "0."  # CLIP ViT-L
SDXL_OPEN_CLIP = SDXL_EMBEDDERS + "1."  # OpenCLIP ViT-bigG

# the text towers' prefixes per family (each is a tower's root: ``<prefix>transformer.`` or ``<prefix>model.``)
TEXT_PREFIXES = {"sd1": (COND_STAGE,), "sd2": (COND_STAGE,), "sdxl": (SDXL_CLIP, SDXL_OPEN_CLIP)}

MODULE_PREFIXES = (UNET, VAE, COND_STAGE, CONDITIONER)

# the parts of a VAE (``AutoencoderKL``) below its prefix; standalone VAE files store them bare
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def cond_stage_prefix(family: str) -> str:
    """The checkpoint prefix of the text conditioning module of ``family``."""
    return CONDITIONER if family == "sdxl" else COND_STAGE


# ---------------------------------------------------------------------------------------------------------------
# What a loader sets aside

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
EMA = "model_ema."  # EMA bookkeeping (model_ema.decay / num_updates) of the lightning checkpoints
POSITION_IDS = ".position_ids"  # transformers' CLIP buffer, always arange(77)
DENOISER_SIGMAS = "denoiser.sigmas"  # SDXL's DiscreteDenoiser buffer, derived from alphas_cumprod
LOGVAR = "logvar"  # training only

# older SD1 files store transformers' CLIPTextModel without its ``text_model.`` level
_CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_CLIP_PREFIXES = (SD1_TEXT, SDXL_CLIP + "transformer.")


@dataclass
class NormalizedKeys:
    """A checkpoint split into what the modules load, the schedule it carries and what was set aside."""

    weights: dict[str, torch.Tensor]
    alphas_cumprod: torch.Tensor | None = None
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    renamed: int = 0  # keys mapped from an older layout

    @property
    def ignored_keys(self) -> list[str]:
        return [k for keys in self.ignored.values() for k in keys]


def normalize_keys(state_dict: Mapping[str, torch.Tensor]) -> NormalizedKeys:
    """Drop the extras the modules do not hold (position_ids, EMA bookkeeping, schedule buffers, denoiser sigmas,
    logvar, anything outside the model's modules) and map older layouts to the names our modules use."""
    out = NormalizedKeys(weights={})
    # SD 2.x in SGM naming (SD2.1-turbo style) has a single OpenCLIP embedder and no label_emb (the SDXL refiner
    # has both, and stays under its own names so detection can refuse it)
    sd2_in_sgm_naming = not any(k.startswith((SDXL_OPEN_CLIP, UNET + "label_emb.")) for k in state_dict)
    for key, value in state_dict.items():
        reason = _ignore_reason(key)
        if reason is not None:
            out.ignored.setdefault(reason, []).append(key)
            if key == "alphas_cumprod":
                out.alphas_cumprod = value
            continue
        new = _renamed(key, sd2_in_sgm_naming)
        out.renamed += new != key
        out.weights[new] = value
    return out


def _ignore_reason(key: str) -> str | None:
    if key.endswith(POSITION_IDS):
        return "position_ids (always arange(77))"
    if key.startswith(EMA):
        return "model_ema.* (EMA bookkeeping)"
    if key in SCHEDULE_BUFFERS:
        return "schedule buffers (rebuilt from the config; alphas_cumprod kept)"
    if key == DENOISER_SIGMAS:
        return "denoiser.sigmas (derived from alphas_cumprod)"
    if key == LOGVAR:
        return "logvar (training only)"
    if not key.startswith(MODULE_PREFIXES):
        return "outside the model's modules"
    return None


def _renamed(key: str, sd2_in_sgm_naming: bool) -> str:
    for prefix in _CLIP_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith(_CLIP_TEXT_MODEL_PARTS):
                return f"{prefix}text_model.{rest}"
            return key
    sgm_sd2 = SDXL_CLIP + OPEN_CLIP_ROOT
    if sd2_in_sgm_naming and key.startswith(sgm_sd2):
        return SD2_TEXT + key[len(sgm_sd2):]
    return key
