"""The representative shapes: the released SD 1.5, SD 2.1 and SDXL layouts at their native sizes, and the text
towers. One table for everything that needs real shapes without a checkpoint: the variants a model needs
(:mod:`.variants`, warm-up, the GPU plan's counts), ``tritonsd check-compile`` and the kernel benchmarks
(``bench/bench_<op>.py``).

Each entry holds what ``variants.model_launches`` reads of a ``ModelConfig`` (``unet``, ``vae``, ``text``,
``size``); the UNet levels, the levels with attention and the VAE decoder's levels are derived from it. (The key
manifests under the fixtures' ``manifests/`` are test data for the checkpoint readers, not used here.)
"""

from __future__ import annotations

from dataclasses import dataclass

from tritonsd.model.config import UNetConfig, VAEConfig

BATCH = 2  # cond + uncond: classifier-free guidance runs the UNet on both at once
TEXT_TOKENS = 77  # the text encoders' context length
LATENT_FACTOR = 8  # image pixels per latent pixel, per side


class UnknownModelError(ValueError):
    """A name that is not one of the released models in :data:`MODELS`."""


@dataclass(frozen=True)
class TextTower:
    name: str
    width: int
    heads: int


@dataclass(frozen=True)
class ModelShapes:
    """A released model's layout: what ``variants.model_launches`` reads, and its native image size."""

    name: str  # "sd15", "sd21", "sdxl"
    size: tuple[int, int]  # native image size in pixels, (height, width)
    unet: UNetConfig
    vae: VAEConfig
    towers: tuple[TextTower, ...]

    @property
    def text(self) -> dict[str, TextTower]:
        return {t.name: t for t in self.towers}

    @property
    def label(self) -> str:
        """The benchmarks' name for the model at its size: ``sd15-512``."""
        return f"{self.name}-{self.size[0]}"

    @property
    def latent(self) -> int:
        """The latent side at the native size (square)."""
        return self.size[0] // LATENT_FACTOR

    def levels(self) -> list[tuple[int, int]]:
        """The UNet's levels as (channels, latent side), outermost first."""
        c0 = self.unet.model_channels
        return [(c0 * m, self.latent >> i) for i, m in enumerate(self.unet.channel_mult)]

    def attention_levels(self) -> list[tuple[int, int]]:
        """The levels that hold transformer blocks (attention, layer norm, GEGLU): those with a nonzero
        ``transformer_depth``, and the innermost one, where the middle block's transformer runs."""
        levels = self.levels()
        out = [lv for lv, depth in zip(levels, self.unet.transformer_depth) if depth > 0]
        if self.unet.transformer_depth_middle > 0 and levels[-1] not in out:
            out.append(levels[-1])
        return out

    def heads(self, channels: int) -> int:
        return self.unet.heads_at(channels)


# The VAE all three share (kl-f8): 4 latent channels, 128 base channels.
VAE = VAEConfig(in_channels=3, out_ch=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                double_z=True)
# Its decoder's GroupNorm inputs as (channels, side over the latent side): 512 at the latent size, then after each
# upsampling the first block still reads the wider channels (512 at x4, 256 at x8) before narrowing.
VAE_DECODER_LEVELS = [(512, 1), (512, 2), (512, 4), (256, 8), (128, 8)]

_UNET_COMMON = dict(in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, time_embed_dim=1280)
CLIP_L = TextTower("clip-l", 768, 12)

MODELS: dict[str, ModelShapes] = {
    "sd15": ModelShapes("sd15", (512, 512), UNetConfig(
        **_UNET_COMMON, channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
        context_dim=768, use_linear_in_transformer=False, num_heads=8), VAE, (CLIP_L,)),
    # SD 2.1: the 768 v-model
    "sd21": ModelShapes("sd21", (768, 768), UNetConfig(
        **_UNET_COMMON, channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1,
        context_dim=1024, use_linear_in_transformer=True, num_head_channels=64), VAE,
        (TextTower("openclip-h", 1024, 16),)),
    # SDXL: base
    "sdxl": ModelShapes("sdxl", (1024, 1024), UNetConfig(
        **_UNET_COMMON, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
        context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816, num_head_channels=64), VAE,
        (CLIP_L, TextTower("openclip-g", 1280, 20))),
}
RELEASED = tuple(MODELS)


def released(name: str) -> ModelShapes:
    """``sd15``, ``sd21`` or ``sdxl`` as released."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown released model {name!r} (expected {', '.join(RELEASED)})") from None


def text_towers() -> list[TextTower]:
    """Every distinct text tower of the released models, first seen first."""
    out: list[TextTower] = []
    for m in MODELS.values():
        out += [t for t in m.towers if t not in out]
    return out
