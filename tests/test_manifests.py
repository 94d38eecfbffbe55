"""Full-size structure: the released checkpoints' key manifests (keys, shapes, dtypes of sd15, sd15-inpaint,
sd21-v, sdxl-base) detect as the right family and build modules whose state dict is exactly the manifest's, minus
the keys the loader sets aside; parameter counts match the manifests' READMEs; forwards run at full width."""

from __future__ import annotations

import json
import pytest
import torch

from tritonsd.model.config import detect_config
from tritonsd.formats.keys import normalize_keys
from tritonsd.model.sd import build_model

# manifests/README.md and README-sdxl.md (parameters, i.e. elements, per component)
VAE_PARAMS = 83_653_863
RELEASED = {
    "sd15": dict(family="sd1", inpainting=False, unet=859_520_964, text=123_060_480, context=768, linear=False,
                 mult=(1, 2, 4, 4), depth=(1, 1, 1, 0), middle=1),
    "sd15-inpaint": dict(family="sd1", inpainting=True, unet=859_535_364, text=123_060_480, context=768,
                         linear=False, mult=(1, 2, 4, 4), depth=(1, 1, 1, 0), middle=1),
    "sd21-v": dict(family="sd2", inpainting=False, unet=865_910_724, text=354_032_641, context=1024, linear=True,
                   mult=(1, 2, 4, 4), depth=(1, 1, 1, 0), middle=1),
    # sdxl: the manifest's element counts (its README: 2,567 M UNet); CLIP-L without its 77 position_ids
    "sdxl-base": dict(family="sdxl", inpainting=False, unet=2_567_463_684, text=123_060_557 - 77 + 694_659_841,
                      context=2048, linear=True, mult=(1, 2, 4), depth=(0, 2, 10), middle=10),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def _manifest(fixtures, name: str) -> dict:
    return json.loads((fixtures / "manifests" / f"{name}.json").read_text())


def _meta_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v["shape"], dtype=DTYPES[v["dtype"]], device="meta")
            for k, v in manifest["tensors"].items()}


def _component(key: str) -> str:
    if key.startswith("model.diffusion_model."):
        return "unet"
    return "vae" if key.startswith("first_stage_model.") else "text"


@pytest.mark.parametrize("name", list(RELEASED))
def test_manifest_structure(fixtures, name):
    manifest = _manifest(fixtures, name)
    want = RELEASED[name]
    sd = _meta_state_dict(manifest)
    assert len(sd) == manifest["key_count"]
    norm = normalize_keys(sd)
    cfg = detect_config(norm)
    assert (cfg.family, cfg.inpainting) == (want["family"], want["inpainting"])
    u = cfg.unet
    assert (u.model_channels, u.channel_mult, u.num_res_blocks, u.transformer_depth, u.transformer_depth_middle) \
        == (320, want["mult"], 2, want["depth"], want["middle"])
    assert (u.context_dim, u.use_linear_in_transformer) == (want["context"], want["linear"])
    assert u.adm_in_channels == (2816 if name == "sdxl-base" else None)
    # heads as the released configs: SD1 8 heads (40 channels at 320); SD2 / SDXL 64-channel heads
    assert u.heads_at(320) == (8 if cfg.family == "sd1" else 5) and u.heads_at(1280) == (8 if cfg.family == "sd1" else 20)
    assert cfg.parameterization_source == "assumed"  # eps vs v is not in the keys (sd21-v is v)
    assert [t.heads for t in cfg.text.values()] == {"sd1": [12], "sd2": [16], "sdxl": [12, 20]}[cfg.family]

    with torch.device("meta"):
        model = build_model(cfg)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignored = {k for keys in norm.ignored.values() for k in keys}
    expected = {k: tuple(v["shape"]) for k, v in manifest["tensors"].items() if k not in ignored}
    assert built == expected
    # what was set aside: position_ids (SD1 / CLIP-L), the 12 schedule buffers and model_ema.* (SD1 / SD2)
    assert len(ignored) == {"sd15": 15, "sd15-inpaint": 15, "sd21-v": 14, "sdxl-base": 1}[name]

    counts = {"unet": 0, "vae": 0, "text": 0}
    for k, p in model.named_parameters():
        counts[_component(k)] += p.numel()
    assert counts == {"unet": want["unet"], "vae": VAE_PARAMS, "text": want["text"]}


def _random_weights(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with sane activations, cheap enough for CI: every matrix is a window (at a random offset)
    of one N(0, 1 / fan_in) pool per fan-in, so a billion parameters cost ~150 M random draws and no copies;
    norm weights 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    slack = 1 << 20

    def fan_in(name: str, p: torch.Tensor) -> int:
        return p.shape[-1] if ("embedding" in name or p.ndim < 2) else p[0].numel()

    matrices = {n: p for n, p in model.named_parameters() if p.ndim >= 2 or "positional_embedding" in n}
    sizes: dict[int, int] = {}
    for n, p in matrices.items():
        sizes[fan_in(n, p)] = max(sizes.get(fan_in(n, p), 0), p.numel())
    pools = {f: torch.randn(size + slack, generator=g) * f ** -0.5 for f, size in sizes.items()}
    weights = {}
    for n, p in model.named_parameters():
        if n in matrices:
            start = int(torch.randint(0, slack, (), generator=g))
            weights[n] = pools[fan_in(n, p)][start:start + p.numel()].view(p.shape)
        elif n.endswith("bias") or n.endswith("logit_scale"):
            weights[n] = torch.zeros(p.shape)
        else:
            weights[n] = torch.ones(p.shape)
    return weights


@pytest.mark.slow  # a full-width SD 1.5 UNet forward on the CPU
def test_sd15_forward_at_full_width(fixtures):
    """UNet, VAE and text tower of SD 1.5's full size, random weights, 8x8 latents on the CPU."""
    sd = _meta_state_dict(_manifest(fixtures, "sd15"))
    cfg = detect_config(sd)
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(_random_weights(model), strict=True, assign=True)
    with torch.no_grad():
        context = model.get_learned_conditioning(["a photograph of an astronaut riding a horse"])
        assert context.shape == (1, 77, 768) and torch.isfinite(context).all()
        eps = model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context)
        assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()
        image = model.decode_first_stage(torch.randn(1, 4, 8, 8))
        assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


@pytest.mark.parametrize("name", ["sd21-v", "sdxl-base"])
def test_full_size_forward_shapes_on_meta(fixtures, name):
    """The full-size UNets (SD2's linear projections and 1024-wide context; SDXL's per-level depths, 2048-wide
    context and vector conditioning) run end to end on the meta device."""
    sd = _meta_state_dict(_manifest(fixtures, name))
    cfg = detect_config(sd)
    with torch.device("meta"):
        model = build_model(cfg)
        x = torch.empty(2, 4, 8, 16)
        context = torch.empty(2, 77, cfg.unet.context_dim)
        y = torch.empty(2, cfg.unet.adm_in_channels) if cfg.unet.adm_in_channels else None
        assert model.apply_model(x, torch.empty(2), context, y).shape == (2, 4, 8, 16)
        assert model.first_stage_model.decode(x).shape == (2, 3, 64, 128)
        mean, logvar = model.first_stage_model.encode(torch.empty(2, 3, 64, 128))
        assert mean.shape == logvar.shape == (2, 4, 8, 16)
