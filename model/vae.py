"""The KL autoencoder (``AutoencoderKL``: ``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``).

Attribute paths are the checkpoint keys below ``first_stage_model.``. GroupNorm -> SiLU is one fused call, and
each block's residual add is fused into its last convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tritonsd.kernels import dispatch
from tritonsd.model.config import VAEConfig
from tritonsd.model.layers import Conv2d, GroupNorm, Upsample


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return self.conv2(self.norm2(h, silu=True), residual=skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, C channels wide, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, c, h * w).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]

        out = dispatch.attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)), heads=1)
        out = out.transpose(1, 2).reshape(b, c, h, w)  # [B, H*W, C] -> [B, C, H, W]
        return self.proj_out(out, residual=x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (the original's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution of the encoder (``down.i``) or decoder (``up.i``): ResnetBlocks, each followed by attention
    where the config asks for it. The owner attaches ``downsample`` / ``upsample`` to every level but the last
    one it runs."""

    def __init__(self, channels: list[tuple[int, int]], attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in channels)
        self.attn = nn.ModuleList(AttnBlock(o) for _, o in channels) if attention else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, width in enumerate(widths):
            channels = [(ch if j == 0 else width, width) for j in range(cfg.num_res_blocks)]
            ch = width
            level = Level(channels, i in cfg.attn_levels)
            if i != len(widths) - 1:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = MidBlock(ch)
        self.norm_out = _norm(ch)
        self.conv_out = Conv2d(ch, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            channels = [(ch if j == 0 else widths[i], widths[i]) for j in range(cfg.num_res_blocks + 1)]
            ch = widths[i]
            level = Level(channels, i in cfg.attn_levels)
            if i != 0:
                level.upsample = Upsample(ch)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[i] is level i; it runs from the last level to the first
        self.norm_out = _norm(ch)
        self.conv_out = Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h, silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, 3, H, W] in [-1, 1], H and W multiples of 8 -> posterior (mean, logvar), each
        [B, embed_dim, H/8, W/8]; logvar clamped to [-30, 20] as the original's DiagonalGaussianDistribution."""
        factor = 2 ** (len(self.cfg.ch_mult) - 1)
        if image.ndim != 4 or image.shape[2] % factor or image.shape[3] % factor:
            raise ValueError(f"VAE input must be [B, C, H, W] with H and W multiples of {factor}, "
                             f"got {list(image.shape)}")
        moments = self.quant_conv(self.encoder(image.to(self.dtype)))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] (unscaled latents) -> image [B, 3, 8h, 8w], not clamped."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))
