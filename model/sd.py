"""The whole model: UNet, VAE and text conditioning, named as the checkpoint's top-level prefixes; ``build_model``
builds it from a ``ModelConfig`` alone, ``load_weights_`` fills a meta-built model strictly (``model/load.py``
reads the files)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from tritonsd.formats.checkpoint import CheckpointError
from tritonsd.formats.keys import VAE
from tritonsd.formats.source import LoadedFrom
from tritonsd.model.conditioner import build_cond_stage
from tritonsd.model.config import ModelConfig
from tritonsd.model.layers import Conv2d
from tritonsd.model.unet import CrossAttention, StepEmbedder, StepEmbedding, UNetModel
from tritonsd.model.vae import AutoencoderKL
from tritonsd.formats.vae_file import check_vae_fits


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the checkpoint's ``model.diffusion_model.*``)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    """``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE) and ``cond_stage_model`` (SD1 / SD2) or
    ``conditioner`` (SDXL); build with ``build_model`` or ``load_model``. ``source`` says where the weights came
    from (``load_model`` sets it; None for a model built but not loaded)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.source: LoadedFrom | None = None
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        setattr(self, config.cond_stage.prefix.rstrip("."), build_cond_stage(config.cond_stage))

    @property
    def text_module(self) -> nn.Module:
        return getattr(self, self.config.cond_stage.prefix.rstrip("."))

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
                    y: torch.Tensor | None = None, t_emb: torch.Tensor | None = None,
                    step_emb: StepEmbedding | None = None, control: list[torch.Tensor] | None = None,
                    only_mid_control: bool = False) -> torch.Tensor:
        """The UNet's raw output (eps or v, see ``config.parameterization``). For inpainting models ``x`` is
        already ``cat([latents, mask, masked-image latents], 1)``; ``t_emb``: the precomputed sinusoid of ``t``,
        ``step_emb``: its time MLP and projections; ``control``: scaled ControlNet residuals
        (``UNetModel.forward``)."""
        extra = {} if step_emb is None else {"step_emb": step_emb}
        if control is not None:
            extra.update(control=control, only_mid_control=only_mid_control)
        return self.model.diffusion_model(x, t, context, y, t_emb=t_emb, **extra)

    def step_embedder(self) -> StepEmbedder | None:
        """What the sampler's per-step tables embed each step with before the loop (for SDXL the time MLP only:
        its embedding adds the conditioning's); None for a UNet whose ``forward`` was swapped for one that takes
        no ``step_emb`` (a stand-in)."""
        unet = self.model.diffusion_model
        return StepEmbedder(unet) if "step_emb" in inspect.signature(unet.forward).parameters else None

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> image in about [-1, 1] (divides by ``scale_factor`` first; no clamp)."""
        return self.first_stage_model.decode(z / self.config.scale_factor)

    def encode_first_stage(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> posterior (mean, logvar), unscaled (multiply a sample by ``scale_factor``)."""
        return self.first_stage_model.encode(image)


def build_model(config: ModelConfig) -> StableDiffusion:
    """The modules ``config`` describes, not loaded. Build under ``torch.device("meta")`` to allocate nothing."""
    return StableDiffusion(config)


def replace_vae(model: StableDiffusion, weights: Mapping[str, torch.Tensor], vae_path: str | Path,
                vae_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with the VAE part replaced by an external VAE file's (bare keys), checked against the model."""
    expected = {k: v.shape for k, v in model.first_stage_model.state_dict().items()}
    check_vae_fits(vae_path, vae_weights, expected)
    kept = {k: v for k, v in weights.items() if not k.startswith(VAE)}
    return {**kept, **{VAE + k: v for k, v in vae_weights.items()}}


def load_weights_(model: StableDiffusion, path: Path, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                  device: torch.device, kernel_layout: bool = True) -> None:
    """Assign ``weights`` (normalised keys) to a meta-built model, strictly, cast to ``dtype`` on ``device``.

    ``kernel_layout``: each conv weight is laid out as the conv kernel reads it (``model/layers.py``
    ``Conv2d``), and self-attention's q / k / v weights share one storage (``model/unet.py`` ``CrossAttention``),
    where that is cheap: on a CUDA device after the copy (in the file's layout) to it; on the CPU
    in the one copy that also casts. False keeps the file's layout: for a model only the torch reference will
    run (the CPU without forced Triton), whose weights then stay mapped from the file, uncopied, unless a cast
    copies them (issue 28: re-laying SD 1.5's 2.5 GB of conv weights on the CPU took 3-9 s of a load)."""
    _check_keys(path, model, weights)
    for m in model.modules():
        if isinstance(m, (Conv2d, CrossAttention)):
            m.kernel_layout = kernel_layout
    params = dict(model.named_parameters()) if kernel_layout else {}
    model.load_state_dict({k: _placed(v, params.get(k), dtype, device) for k, v in weights.items()},
                          strict=True, assign=True)
    model.eval().requires_grad_(False)


def _placed(t: torch.Tensor, param: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` cast (floating point only) to ``dtype`` on ``device``, with ``param``'s strides when it has others
    than ``t``'s dense layout (None: ``t``'s layout is kept)."""
    if param is None or param.is_contiguous() or t.stride() == param.stride():
        return _cast(t, dtype, device)
    if device.type == "cuda":  # copied as the file holds it, re-laid on the device
        return _laid_out_like(_cast(t, dtype, device), param)
    target = dtype if t.is_floating_point() else t.dtype
    return torch.empty_strided(t.shape, param.stride(), dtype=target, device=device).copy_(t)  # cast and re-lay


def _laid_out_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` with ``param``'s strides (a copy on ``t``'s device), or ``t`` itself when they already agree."""
    if t.stride() == param.stride():
        return t
    return torch.empty_strided(t.shape, param.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _cast(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """To ``device`` and (floating point only) ``dtype``; the strides are kept (``Tensor.to`` preserves the
    layout of a dense tensor)."""
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _check_keys(path: Path, model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Strict loading with a one-line account of what does not fit."""
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}  # no detached copies
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
