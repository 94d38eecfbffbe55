"""TAESD's decoder (madebyollin's tiny autoencoder; AUTOMATIC1111's "TAESD" live preview): a latent [B, C, H, W]
(the sampler's own, scaled) to an image [B, 3, 8H, 8W] in about [0, 1].

The module is named after the keys of ``taesd_decoder.pth`` / ``.safetensors`` (an ``nn.Sequential``: ``1.*`` the
first conv, ``3.conv.0.*`` the first block's first conv, ``7.weight`` the first conv after an upsample, ...), so
the file loads strictly as it is. Previews only: plain torch layers, off the sampling loop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tritonsd.escape import escape, quote
from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint

WIDTH = 64  # every hidden layer's channels
PREFIXES = ("decoder.", "taesd_decoder.")  # a decoder saved inside a larger state dict


class TAESDFileError(CheckpointError):
    """A file that is not a TAESD decoder."""


class Clamp(nn.Module):
    """``tanh(x / 3) * 3``: the latent softly bounded to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Block(nn.Module):
    """Three 3x3 convs with a residual; ``relu(conv(x) + x)``."""

    def __init__(self, n: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.skip = nn.Identity()  # the file's blocks keep their width: no 1x1 skip weights
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDDecoder(nn.Sequential):
    def __init__(self, latent_channels: int = 4):
        n = WIDTH

        def up():  # x2 nearest, then a conv without bias
            return [nn.Upsample(scale_factor=2), conv(n, n, bias=False)]

        super().__init__(Clamp(), conv(latent_channels, n), nn.ReLU(),
                         Block(), Block(), Block(), *up(),
                         Block(), Block(), Block(), *up(),
                         Block(), Block(), Block(), *up(),
                         Block(), conv(n, 3))
        self.latent_channels = latent_channels


def load_taesd_decoder(path: str | Path) -> TAESDDecoder:
    """The decoder of a ``taesd_decoder`` / ``taesdxl_decoder`` file (.safetensors or .pth), float32 on the CPU,
    in eval mode; TAESDFileError (one line) when the keys or shapes are not a TAESD decoder's."""
    path = Path(path)
    raw = read_checkpoint(path)
    weights = {}
    for key, value in raw.items():
        bare = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        weights[bare] = value
    first = weights.get("1.weight")
    if first is None or first.ndim != 4 or tuple(first.shape[0:1]) != (WIDTH,):
        raise TAESDFileError(f"{escape(path.name)}: not a TAESD decoder (no [64, C, 3, 3] first conv '1.weight' among "
                             f"{len(weights)} tensors)")
    decoder = TAESDDecoder(int(first.shape[1]))
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k].shape)
    if missing or extra or wrong:
        what = (f"{len(missing)} missing (first {quote(missing[0])})" if missing else
                f"{len(extra)} unexpected (first {quote(extra[0])})" if extra else
                f"{quote(wrong[0])} has another shape")
        raise TAESDFileError(f"{escape(path.name)}: not a TAESD decoder's keys: {what}")
    decoder.load_state_dict({k: v.float() for k, v in weights.items()})
    return decoder.eval()
