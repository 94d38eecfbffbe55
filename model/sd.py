"""The whole model: UNet, VAE and text conditioning, named as the checkpoint's top-level prefixes, and
``load_model`` which reads a checkpoint, detects its config and loads it strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .checkpoint import CheckpointError, normalize_keys, read_checkpoint
from .config import ModelConfig, ModelConfigError, detect_config
from .device import resolve_device
from .text import TextConfigError, build_cond_stage, cond_stage_prefix
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the checkpoint's ``model.diffusion_model.*``)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE) and ``cond_stage_model`` (SD1 / SD2) or
    ``conditioner`` (SDXL); build with ``build_model`` or ``load_model``."""

    def __init__(self, config: ModelConfig, cond_stage: nn.Module):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        setattr(self, cond_stage_prefix(config.family).rstrip("."), cond_stage)

    @property
    def text_module(self) -> nn.Module:
        return getattr(self, cond_stage_prefix(self.config.family).rstrip("."))

    def get_learned_conditioning(self, prompts: Sequence[str], **sdxl_conditions):
        """SD1 / SD2: context [B, 77, C]. SDXL: (crossattn [B, 77, C], vector [B, adm]); ``sdxl_conditions`` are
        ``GeneralConditioner``'s (original_size, crop_coords_top_left, target_size, zero_text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.config.family == "sdxl":
            return self.conditioner(list(prompts), **sdxl_conditions)
        if sdxl_conditions:
            raise ValueError(f"size conditioning is SDXL-only; this is an {self.config.family} model")
        return self.cond_stage_model(list(prompts))

    def apply_model(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                    y: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output (eps or v, see ``config.parameterization``). For inpainting models ``x`` is
        already ``cat([latents, mask, masked-image latents], 1)``."""
        return self.model.diffusion_model(x, t, context, y)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> image in about [-1, 1] (divides by ``scale_factor`` first; no clamp)."""
        return self.first_stage_model.decode(z / self.config.scale_factor)

    def encode_first_stage(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> posterior (mean, logvar), unscaled (multiply a sample by ``scale_factor``)."""
        return self.first_stage_model.encode(image)


def build_model(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> StableDiffusion:
    """The modules for ``config``, not loaded (``state_dict``: normalised keys; only the text towers' shapes are
    read from it). Build under ``torch.device("meta")`` to allocate nothing."""
    cond_stage = build_cond_stage(state_dict, config.family, config.text_heads, config.cond_stage_yaml)
    return StableDiffusion(config, cond_stage)


def load_model(path: str | Path, config: str | Path | ModelConfig | None = None,
               parameterization: str | None = None, text_heads: int | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> StableDiffusion:
    """Read a checkpoint, detect its config (``config``: the original YAML's path, or a ``ModelConfig``), build
    the modules on the meta device and load the weights strictly, cast to ``dtype`` on ``device``
    (``DeviceError`` at once when the device is not available)."""
    device = resolve_device(device)
    path = Path(path)
    raw = read_checkpoint(path)
    try:
        if isinstance(config, ModelConfig):
            cfg = config
        else:
            cfg = detect_config(raw, config, parameterization=parameterization, text_heads=text_heads)
        weights = normalize_keys(raw).weights
        del raw
        with torch.device("meta"):
            model = build_model(cfg, weights)
    except (ModelConfigError, TextConfigError) as e:
        raise type(e)(f"{path.name}: {e}") from None
    weights = {k: _cast(v, dtype, device) for k, v in weights.items()}
    _check_keys(path, model, weights)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _cast(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _check_keys(path: Path, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Strict loading with a one-line account of what does not fit."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with another shape (e.g. {k}: file {list(weights[k].shape)}, "
                        f"model {list(expected[k])})")
    if problems:
        raise CheckpointError(f"{path.name}: the weights do not fit the detected model: {'; '.join(problems)}")
