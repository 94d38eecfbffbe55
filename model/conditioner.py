"""SDXL's text and size conditioning (``conditioner.``): sgm's ``GeneralConditioner`` over the two text
towers and the parameter-free Fourier embedders of the size / crop tuples; and ``build_cond_stage``, which builds
any family's text conditioning module from its ``CondStageConfig`` alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from tritonsd.model.clip import FrozenCLIPEmbedder
from tritonsd.model.layers import timestep_embedding
from tritonsd.model.open_clip import FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from tritonsd.model.text_config import CondStageConfig, SizeEmbedderConfig, TextConfigError, TextEncoderConfig


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


def _text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    if cfg.target == "FrozenCLIPEmbedder":
        return FrozenCLIPEmbedder(cfg.tower, layer=cfg.layer, layer_idx=cfg.layer_idx)
    if cfg.target == "FrozenOpenCLIPEmbedder":
        return FrozenOpenCLIPEmbedder(cfg.tower, layer=cfg.layer)
    if cfg.target == "FrozenOpenCLIPEmbedder2":
        return FrozenOpenCLIPEmbedder2(cfg.tower, layer=cfg.layer)
    raise TextConfigError(f"unsupported text encoder {cfg.target!r}")


def build_cond_stage(cfg: CondStageConfig) -> nn.Module:
    """The text conditioning module ``cfg`` describes, NOT loaded (build under ``torch.device("meta")`` to
    allocate nothing): SD1 / SD2 the text encoder itself, SDXL a ``GeneralConditioner``. Load the checkpoint's
    entries under ``cfg.prefix`` into it."""
    if cfg.family != "sdxl":
        return _text_encoder(cfg.embedders[0])
    embedders = [ConcatTimestepEmbedderND(e.outdim) if isinstance(e, SizeEmbedderConfig) else _text_encoder(e)
                 for e in cfg.embedders]
    return GeneralConditioner(embedders, cfg.input_keys)
