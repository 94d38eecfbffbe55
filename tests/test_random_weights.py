"""Random-weight models from the key manifests: the meta build has exactly the released layout, and the fill
gives finite, fan-in-scaled weights (checked at tiny scale: a manifest made from the sd1-tiny fixture)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tritonsd.formats.keys import normalize_keys
from tritonsd.bench.random_weights import (ManifestError, build_meta_model, build_random_model, load_manifest,
    meta_state_dict)

# extras a released file carries that the modules do not hold (manifests/README.md)
EXTRAS = ("model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_", "log_one_minus_",
          "posterior_", "position_ids")


@pytest.mark.parametrize("name,family,parameterization", [("sd15", "sd1", "eps"), ("sd21", "sd2", "v")])
def test_meta_build_has_the_released_layout(fixtures, name, family, parameterization):
    """The builder's own part (names, parameterization, the dropped schedule buffer); the layouts of every
    manifest against ``build_model`` are test_manifests.py's."""
    manifest = load_manifest(name)
    model = build_meta_model(name)
    assert model.config.family == family and model.config.parameterization == parameterization
    assert model.config.alphas_cumprod_source == "derived"
    assert all(p.is_meta for p in model.parameters())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v["shape"]) for k, v in manifest["tensors"].items()}
    extras = sorted(k for k in theirs.keys() - ours.keys())
    assert all(k.startswith(EXTRAS) or k.endswith(EXTRAS) for k in extras), extras[:5]
    assert {k: theirs[k] for k in ours} == ours


def test_unknown_manifest_is_refused(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest("sd99")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tensors": {"a": {"shape": 3, "dtype": "float32"}}}))
    with pytest.raises(ManifestError, match="bad.json"):
        load_manifest(bad)


def tiny_manifest(fixtures, tmp_path):
    """A key manifest in the released manifests' format, read from the sd1-tiny file's header."""
    dtypes = {"F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "BF16": "bfloat16"}
    tensors = {}
    with safe_open(str(fixtures / "sd1-tiny.safetensors"), "pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            tensors[key] = {"shape": list(s.get_shape()), "dtype": dtypes[s.get_dtype()]}
    path = tmp_path / "sd1-tiny.json"
    path.write_text(json.dumps({"model": "sd1-tiny", "tensors": tensors}))
    return path


def test_random_fill_at_tiny_scale(fixtures, tmp_path):
    path = tiny_manifest(fixtures, tmp_path)
    model = build_random_model(path, dtype=torch.float32, device="cpu", seed=3, text_heads=2)
    again = build_random_model(path, dtype=torch.float32, device="cpu", seed=3, text_heads=2)
    weights = meta_state_dict(load_manifest(path))
    assert set(model.state_dict()) == set(normalize_keys(weights).weights)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
    conv = model.model.diffusion_model.input_blocks[1][0].in_layers[2].weight  # [64? x C x 3 x 3]
    fan_in = conv[0].numel()
    assert abs(conv.std().item() * fan_in ** 0.5 - 1) < 0.1 and abs(conv.mean().item()) < 0.1 * fan_in ** -0.5
    norm = model.first_stage_model.decoder.conv_in.bias
    assert abs(norm.mean().item()) < 0.02
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = model.get_learned_conditioning(["a photo"])
        eps = model.apply_model(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), ctx)
        image = model.decode_first_stage(torch.randn(1, 4, 4, 4, generator=g))
    for t in (ctx, eps, image):
        assert torch.isfinite(t).all() and t.abs().max() > 0
    assert 0.1 < eps.std().item() < 10  # fan-in scaling keeps the output near unit scale
