"""Full-size models with random weights, laid out exactly as a released checkpoint (for benchmarks).

A key manifest (``fixtures/manifests/NAME.json``: every tensor's name, shape and dtype, no values) gives meta
tensors; ``detect_config`` reads the shapes from them as from a real file, the modules are built on the meta
device, moved with ``to_empty`` and filled in place: matrices and convolutions with normal(0, 1/sqrt(fan_in))
(activations keep unit scale through the depth, so half precision stays finite), norm weights near 1, biases
near 0. Speed does not depend on the values; these only keep them finite and away from zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tritonsd.model.config import detect_config
from tritonsd.model.demo import random_parameter
from tritonsd.formats.keys import normalize_keys
from tritonsd.model.sd import StableDiffusion, build_model
from tritonsd.testing.reference import fixtures_dir

# short names -> manifest file and parameterization (the keys cannot tell v from eps)
MANIFESTS = {
    "sd15": ("sd15.json", None),
    "sd15-inpaint": ("sd15-inpaint.json", None),
    "sd21": ("sd21-v.json", "v"),
    "sd21-v": ("sd21-v.json", "v"),
    "sdxl": ("sdxl-base.json", None),
}


class ManifestError(ValueError):
    """A manifest that is missing or not a key manifest."""


def manifest_path(name: str | Path) -> Path:
    """A short name (``sd15``, ``sd21``, ``sdxl``, ...) in the fixtures' ``manifests/``, or a path to a JSON."""
    if str(name) in MANIFESTS:
        path = fixtures_dir() / "manifests" / MANIFESTS[str(name)][0]
    else:
        path = Path(name)
    if not path.is_file():
        raise ManifestError(f"key manifest not found: {path} (names: {', '.join(MANIFESTS)})")
    return path


def load_manifest(name: str | Path) -> dict:
    path = manifest_path(name)
    try:
        manifest = json.loads(path.read_text())
        tensors = manifest["tensors"]
        for key, spec in tensors.items():
            if not isinstance(spec.get("shape"), list) or not hasattr(torch, str(spec.get("dtype"))):
                raise ManifestError(f"{path.name}: entry {key!r} has no valid shape / dtype")
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ManifestError(f"{path.name}: not a key manifest ({e})") from None
    return manifest


def meta_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    """Meta tensors of the manifest's shapes and dtypes, minus ``alphas_cumprod`` (its values are not stored:
    the schedule is then derived from the config's defaults, as for files without the buffer)."""
    return {key: torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device="meta")
            for key, spec in manifest["tensors"].items() if key != "alphas_cumprod"}


def build_meta_model(name: str | Path, parameterization: str | None = None,
                     text_heads: int | None = None) -> StableDiffusion:
    """The model for a manifest on the meta device (no memory); ``parameterization`` defaults to the name's."""
    if parameterization is None and str(name) in MANIFESTS:
        parameterization = MANIFESTS[str(name)][1]
    weights = meta_state_dict(load_manifest(name))
    config = detect_config(normalize_keys(weights), parameterization=parameterization, text_heads=text_heads)
    with torch.device("meta"):
        model = build_model(config)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place with the demo model's rule (``model.demo.random_parameter``), drawn on
    the parameters' device from a generator seeded with ``seed``, one parameter at a time (float32, then
    cast: the peak is one parameter's float32 copy)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        g = generators.get(p.device)
        if g is None:
            g = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        p.copy_(random_parameter(name, tuple(p.shape), g))
    return model


def build_random_model(name: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                       seed: int = 0, parameterization: str | None = None,
                       text_heads: int | None = None) -> StableDiffusion:
    """A full-size model for manifest ``name`` with random weights in ``dtype`` on ``device``."""
    model = build_meta_model(name, parameterization, text_heads).to(dtype=dtype)
    model.to_empty(device=device)
    return fill_random_(model, seed).requires_grad_(False)
