"""The ControlNet (lllyasviel's ``cldm.ControlNet``; sd-webui-controlnet's ``scripts/cldm.py``): a copy of the
UNet's encoder and middle block, ``input_hint_block`` (the control map at pixel resolution down to the latent's)
and one 1x1 "zero conv" per skip connection plus ``middle_block_out``.

Attribute paths are the file's keys without ``control_model.`` (``formats/controlnet_file.py``); the blocks are
``model/unet.py``'s, so every layer runs through ``kernels.dispatch`` like the UNet's. ``forward`` returns the
unscaled residuals, one per input block (SD1 / SD2: 12, SDXL: 9) and the middle block's last: what
``UNetModel.forward(control=...)`` adds (after scaling, ``control/apply.py``).

Widths come from the ControlNet's weights and must equal the checkpoint's UNet; what the weights cannot say (the
attention heads) is the base UNet's (the released ControlNets are copies of their base model's encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tritonsd.escape import escape
from tritonsd.formats.checkpoint import CheckpointError
from tritonsd.formats.controlnet_file import ControlNetFile, ControlNetFileError, read_controlnet
from tritonsd.formats.keys import UNET
from tritonsd.model.config import ModelConfigError, UNetConfig, unet_config_from_weights
from tritonsd.model.layers import Conv2d, timestep_embedding
from tritonsd.model.load import no_parameter_init
from tritonsd.model.sd import load_weights_
from tritonsd.model import hoist
from tritonsd.model.unet import UNetShapeError, encoder_blocks, middle_block, time_layers

HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # of its eight convs (indices 0, 2, ..., 14)


class ControlNetError(ControlNetFileError):
    """A ControlNet that does not fit the checkpoint (another family or width), or inputs it cannot take."""


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the encoder's widths (read from the ControlNet's weights), heads from the base UNet
    hint_widths: tuple[int, ...]  # input_hint_block's conv widths, from the control map's channels to the UNet's

    @property
    def hint_channels(self) -> int:
        return self.hint_widths[0]

    @property
    def residuals(self) -> int:
        """Residuals a forward gives: one per input block, plus the middle block's."""
        cfg = self.unet
        return 1 + len(cfg.channel_mult) * (cfg.num_res_blocks + 1)


def family_of(cfg: UNetConfig) -> str:
    """A short description of the model a UNet (or ControlNet) config belongs to, for messages."""
    if cfg.adm_in_channels is not None:
        return f"SDXL (context {cfg.context_dim}, vector {cfg.adm_in_channels})"
    name = {768: "SD 1.x", 1024: "SD 2.x"}.get(cfg.context_dim, "SD")
    return f"{name} (context {cfg.context_dim}, model channels {cfg.model_channels})"


def controlnet_config(file: ControlNetFile, base: UNetConfig) -> ControlNetConfig:
    """The ControlNet's widths from its weights, checked against the base UNet's (``ControlNetError`` naming the
    first difference); heads from ``base``."""
    shapes = {UNET + k: v for k, v in file.weights.items()}
    first = file.weights["input_blocks.0.0.weight"]
    if first.dim() != 4:
        raise ControlNetError(f"{escape(file.path.name)}: input_blocks.0.0.weight has shape {list(first.shape)}, "
                              "not a conv weight")
    # the config reader walks a whole UNet; a ControlNet has no output layer: its in_channels stand in for it
    in_channels = first.shape[1]
    shapes[UNET + "out.2.weight"] = torch.empty((in_channels, 1, 3, 3), device="meta")
    try:
        own = unet_config_from_weights(shapes, "sdxl" if file.sdxl else "sd1")
    except ModelConfigError as e:
        raise ControlNetError(f"{escape(file.path.name)}: not a ControlNet this runtime can build ({e})") from None
    own = replace(own, num_heads=base.num_heads, num_head_channels=base.num_head_channels)
    _check_fits(file, own, base)
    return ControlNetConfig(unet=own, hint_widths=_hint_widths(file, own.model_channels))


def _hint_widths(file: ControlNetFile, model_channels: int) -> tuple[int, ...]:
    """The widths of ``input_hint_block``'s eight convs (16, 16, 32, 32, 96, 96, 256 inside, in the released
    files), read from their weights."""
    widths = []
    for i in range(len(HINT_STRIDES)):
        w = file.weights.get(f"input_hint_block.{2 * i}.weight")
        if w is None or w.dim() != 4 or (widths and w.shape[1] != widths[-1]):
            got = "missing" if w is None else f"shape {list(w.shape)}"
            raise ControlNetError(f"{escape(file.path.name)}: input_hint_block.{2 * i}.weight is {got}; not the "
                                  "original's hint encoder")
        if not widths:
            widths.append(int(w.shape[1]))
        widths.append(int(w.shape[0]))
    if widths[-1] != model_channels:
        raise ControlNetError(f"{escape(file.path.name)}: input_hint_block ends in {widths[-1]} channels, the "
                              f"encoder has {model_channels}")
    return tuple(widths)


def _check_fits(file: ControlNetFile, own: UNetConfig, base: UNetConfig) -> None:
    """The residuals must fit the UNet's skips (widths, levels, blocks per level), and the ControlNet must read
    the same conditioning (context width, SDXL's vector). Its own transformer depths may be fewer than the
    UNet's (the SDXL "mid" ControlNets)."""
    fields = ("context_dim", "adm_in_channels", "model_channels", "channel_mult", "num_res_blocks")
    differ = [f for f in fields if getattr(own, f) != getattr(base, f)]
    if own.in_channels not in (base.in_channels, 4):
        differ.append("in_channels")
    if differ:
        f = differ[0]
        raise ControlNetError(f"ControlNet {escape(file.path.name)} is for {family_of(own)}, the checkpoint is "
                              f"{family_of(base)}: {f} {getattr(own, f)} vs {getattr(base, f)}")


class ControlNet(nn.Module):
    """``cldm.ControlNet``; build with ``load_controlnet`` (or from a ``ControlNetConfig``, not loaded)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        time_embed, label_emb = time_layers(cfg)
        self.time_embed = time_embed
        if label_emb is not None:
            self.label_emb = label_emb
        self.input_blocks, channels = encoder_blocks(cfg)
        self.zero_convs = nn.ModuleList([_zero_conv(c) for c in channels])  # one per input block
        widths = config.hint_widths
        hint: list[nn.Module] = []
        for i, stride in enumerate(HINT_STRIDES):
            hint += [Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1), nn.SiLU()]
        self.input_hint_block = nn.Sequential(*hint[:-1])  # no SiLU after the last conv
        ch = channels[-1]
        self.middle_block = middle_block(cfg, ch)
        self.middle_block_out = _zero_conv(ch)
        self.source: Path | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def hint_features(self, hint: torch.Tensor) -> torch.Tensor:
        """``input_hint_block(hint)``: [N, hint_channels, H, W] (pixels) -> [N, model_channels, H/8, W/8]; it
        depends on the hint alone, so a run computes it once and passes it to every step (``guided_hint``)."""
        if hint.dim() != 4 or hint.shape[1] != self.config.hint_channels:
            raise ControlNetError(f"the control map must be [N, {self.config.hint_channels}, H, W], got "
                                  f"{list(hint.shape)}")
        h = hint.to(self.dtype)
        for layer in self.input_hint_block:
            h = F.silu(h) if isinstance(layer, nn.SiLU) else layer(h)
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                hint: torch.Tensor | None = None, y: torch.Tensor | None = None, t_emb: torch.Tensor | None = None,
                guided_hint: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The unscaled residuals for x [B, C, h, w] (an inpainting UNet's 9 channels: the first 4, as the
        extension does), timesteps, context [B, N, C] (and SDXL's y), from the control map ``hint`` [1 or B, C,
        8h, 8w] or its precomputed ``guided_hint`` (``hint_features``)."""
        cfg = self.config.unet
        if x.dim() == 4 and x.shape[1] != cfg.in_channels and x.shape[1] == 9 and cfg.in_channels == 4:
            x = x[:, :4]
        if guided_hint is None:
            if hint is None:
                raise ControlNetError("the ControlNet needs a control map (hint) or its features (guided_hint)")
            guided_hint = self.hint_features(hint)
        dtype = self.dtype
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        if t_emb is None:
            t_emb = timestep_embedding(t, cfg.model_channels)
        emb = self.time_embed(t_emb.to(dtype).contiguous())
        if cfg.adm_in_channels is not None:
            if y is None:
                raise UNetShapeError(f"this ControlNet needs a [B, {cfg.adm_in_channels}] vector y")
            emb = emb + self.label_emb(y.to(dtype))
        emb_silu = F.silu(emb)
        # the UNet's cast of the same context (model/hoist.py): its cross-attention keys are then made once a run
        context = hoist.once(("context", dtype), (context,), lambda: context.to(dtype))
        h = self.input_blocks[0](x.to(dtype), emb_silu, context)
        if guided_hint.shape[-2:] != h.shape[-2:]:
            raise ControlNetError(f"the control map gives features of {guided_hint.shape[-1]}x{guided_hint.shape[-2]}"
                                  f", the latent is {h.shape[-1]}x{h.shape[-2]}: the map must be 8x the latent's size")
        h = h + guided_hint
        outs = [self.zero_convs[0][0](h)]
        for block, zero in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb_silu, context)
            outs.append(zero[0](h))
        h = self.middle_block(h, emb_silu, context)
        outs.append(self.middle_block_out[0](h))
        return outs


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(Conv2d(channels, channels, 1))


# ---------------------------------------------------------------- loading


def load_controlnet(source, base_unet, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, pristine: dict | None = None) -> ControlNet:
    """A loaded ``ControlNet`` for ``base_unet`` (the checkpoint's ``UNetModel``: its widths must match, its
    heads are used, and a "difference" file adds its weights back), cast to ``dtype`` on ``device`` (default: the
    UNet's). ``source``: a path (file or diffusers folder), a ``ControlNetFile``, or a ``ControlNet`` (returned,
    after the same fit check). ``pristine``: the UNet's own weights where a LoRA changed them in place (by the
    UNet's key), which a "difference" file is relative to."""
    base: UNetConfig = base_unet.cfg
    param = next(base_unet.parameters())
    dtype = param.dtype if dtype is None else dtype
    device = param.device if device is None else torch.device(device)
    if isinstance(source, ControlNet):
        cfg = source.config.unet
        probe = ControlNetFile(source.source or Path("ControlNet"), {})
        _check_fits(probe, cfg, base)
        return source
    file = source if isinstance(source, ControlNetFile) else read_controlnet(source)
    config = controlnet_config(file, base)
    weights = file.weights
    if file.difference:
        weights = add_base_weights(weights, base_unet, pristine)
    with torch.device("meta"), no_parameter_init():
        net = ControlNet(config)
    try:
        load_weights_(net, file.path, weights, dtype, device)
    except CheckpointError as e:  # key names come from the file: escaped
        raise ControlNetError(f"ControlNet {escape(str(e), None)}") from None
    net.source = file.path
    return net


def add_base_weights(weights: dict[str, torch.Tensor], base_unet,
                     pristine: dict | None = None) -> dict[str, torch.Tensor]:
    """A "difference" ControlNet's weights plus the base UNet's where the UNet has the same key, as
    sd-webui-controlnet's ``build_model_by_guess`` does (``p + unet_state_dict[key]``, torch's type promotion);
    ``pristine`` replaces weights a LoRA changed in place."""
    base = {**base_unet.state_dict(), **(pristine or {})}
    out = {}
    for key, value in weights.items():
        other = base.get(key)
        if other is not None and other.shape == value.shape:
            value = value + other.detach().to("cpu")
        out[key] = value
    return out
