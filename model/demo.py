"""The built-in demo model, ``"demo:sd1"``: a tiny SD 1.x-structured model with random weights, built the same
on every machine from a config shipped in the package (``data/demo-sd1.json``): no download, no weight file.
Its images are noise; it exists so that the runtime runs end to end anywhere, in seconds, on the CPU.

Weights are drawn in sorted-name order from a CPU ``torch.Generator`` seeded with the JSON's ``seed``, in
float32 (then cast): matrices, convolutions and embeddings ~ N(0, 1/fan_in), so activations keep about unit
scale; 1-D weights (norms) ~ 1 + N(0, 0.02²), biases ~ N(0, 0.02²). For the infotext it is ``Model: demo-sd1``
with the hash of its JSON file, as a checkpoint's is the hash of its file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tritonsd.model.config import UNetConfig, VAEConfig, ModelConfig, ModelConfigError, derive_alphas_cumprod
from tritonsd.formats.keys import COND_STAGE
from tritonsd.model.sd import StableDiffusion, build_model, load_weights_, replace_vae
from tritonsd.formats.source import LoadedFrom
from tritonsd.model.text_config import CondStageConfig, TextConfig, TextEncoderConfig
from tritonsd.formats.vae_file import load_vae_weights

DEMO_SCHEME = "demo:"
DEMO_MODELS = {"sd1": "demo-sd1.json"}
DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = "builtin"  # the source of every setting of a demo model


class DemoModelError(ModelConfigError):
    """An unknown built-in model name, or a damaged built-in config."""


def is_demo(name: object) -> bool:
    """Whether a checkpoint argument names a built-in model (``demo:NAME``) rather than a file."""
    return isinstance(name, (str, Path)) and str(name).startswith(DEMO_SCHEME)


def demo_config_path(name: str) -> Path:
    """The JSON a built-in model is built from (``demo:sd1`` -> ``model/data/demo-sd1.json``)."""
    key = str(name).removeprefix(DEMO_SCHEME)
    if key not in DEMO_MODELS:
        raise DemoModelError(f"unknown built-in model {str(name)!r}; available: "
                             f"{', '.join(DEMO_SCHEME + k for k in DEMO_MODELS)}")
    return DATA_DIR / DEMO_MODELS[key]


def demo_spec(name: str) -> dict:
    return json.loads(demo_config_path(name).read_text())


def demo_config(name: str) -> ModelConfig:
    """The complete ``ModelConfig`` of a built-in model, every setting sourced "builtin"."""
    spec = demo_spec(name)
    try:
        unet = UNetConfig(**{**spec["unet"], "channel_mult": tuple(spec["unet"]["channel_mult"]),
                             "transformer_depth": tuple(spec["unet"]["transformer_depth"])})
        vae = VAEConfig(**{**spec["vae"], "ch_mult": tuple(spec["vae"]["ch_mult"])})
        text = dict(spec["text"])
        encoder = TextEncoderConfig(prefix=COND_STAGE, target=text.pop("target"), layer=text.pop("layer"),
                                    tower=TextConfig(**text), heads_source=BUILTIN, layer_source=BUILTIN)
        schedule = spec["schedule"]
    except (KeyError, TypeError) as e:
        raise DemoModelError(f"{demo_config_path(name).name}: damaged built-in config ({e})") from None
    return ModelConfig(
        family=spec["family"], inpainting=unet.in_channels == 9, parameterization=spec["parameterization"],
        parameterization_source=BUILTIN, scale_factor=float(spec["scale_factor"]),
        alphas_cumprod=derive_alphas_cumprod(**schedule), alphas_cumprod_source="derived", unet=unet, vae=vae,
        cond_stage=CondStageConfig(family=spec["family"], embedders=(encoder,), input_keys=("txt",), source=BUILTIN),
        schedule_source=BUILTIN, scale_factor_source=BUILTIN, heads_source=BUILTIN, **schedule)


def random_parameter(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 values for one parameter, drawn from ``generator`` on its device: matrices, convolutions and
    embeddings ~ N(0, 1/fan_in), 1-D weights (norms) ~ 1 + N(0, 0.02²), biases ~ N(0, 0.02²), scalars 1.
    The one rule for random weights (the demo model's, and the benchmarks' full-size models')."""
    device = generator.device
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=generator, device=device) * fan_in ** -0.5
    if len(shape) == 1:
        base = 1.0 if name.endswith("weight") else 0.0
        return base + 0.02 * torch.randn(shape, generator=generator, device=device)
    return torch.ones(shape, device=device)


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """float32 CPU values for every parameter of ``model`` (which may live on the meta device), drawn in
    sorted-name order from one CPU generator: the same values on every machine."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {name: random_parameter(name, tuple(p.shape), g) for name, p in sorted(model.named_parameters())}


def build_demo_model(name: str = "demo:sd1", *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", vae: str | Path | None = None) -> StableDiffusion:
    """The built-in model ``name`` in ``dtype`` on ``device`` (``vae``: an external VAE file that fits it)."""
    path = demo_config_path(name)
    config = demo_config(name)
    with torch.device("meta"):
        model = build_model(config)
    weights = random_weights(model, int(demo_spec(name)["seed"]))
    if vae is not None:
        weights = replace_vae(model, weights, vae, load_vae_weights(vae))
    load_weights_(model, path, weights, dtype, torch.device(device))
    model.source = LoadedFrom(checkpoint=path, vae=Path(vae) if vae is not None else None)
    return model
