"""UNet and VAE parity with the original code's outputs (the fixtures' references), from .safetensors and .ckpt,
float32 with the weights upcast; plus the UNet's input checks and the loader's handling of other layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import FP32_BOUND
from tritonsd.formats.checkpoint import read_checkpoint
from tritonsd.model.config import UnsupportedModelError
from tritonsd.model.load import load_model
from tritonsd.model.unet import UNetShapeError
from tritonsd.testing.reference import relative_error

FILES = [
    ("sd1-tiny", ".safetensors"), ("sd1-tiny", ".ckpt"),
    ("sd2v-tiny", ".safetensors"), ("sd2v-tiny", ".ckpt"),
    ("sd1-inpaint-tiny", ".safetensors"), ("sd1-inpaint-tiny", ".ckpt"),
    ("sdxl-tiny", ".safetensors"),
]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def model(fixtures):
    cache = {}

    def get(name: str, suffix: str):
        if (name, suffix) not in cache:
            # heads from the YAML (the UNet) and the fixtures' text_encoder_config (2 heads)
            cache[name, suffix] = load_model(fixtures / f"{name}{suffix}", fixtures / f"{name}.yaml", text_heads=2)
        return cache[name, suffix]

    return get


def _check(label: str, actual: torch.Tensor, ref: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    err = relative_error(actual, ref)
    MEASURED[label] = err
    print(f"{label}: relative error {err:.2e}")
    assert err <= FP32_BOUND, f"{label}: {err:.3e}"


@pytest.mark.parametrize("name, suffix", FILES)
def test_unet_parity(model, reference, name, suffix):
    m = model(name, suffix)
    assert m.model.diffusion_model.time_embed[0].weight.dtype == torch.float32  # float16 files upcast
    ref, _ = reference(name)
    with torch.no_grad():
        for i in (0, 1):
            out = m.apply_model(ref["unet.x"], ref[f"unet.t{i}"], ref["unet.context"], ref.get("unet.y"))
            _check(f"{name}{suffix} unet.out{i}", out, ref[f"unet.out{i}"])


@pytest.mark.parametrize("name, suffix", FILES)
def test_vae_parity(model, reference, name, suffix):
    m = model(name, suffix)
    ref, _ = reference(name)
    with torch.no_grad():
        _check(f"{name}{suffix} vae.decoded", m.first_stage_model.decode(ref["vae.z"]), ref["vae.decoded"])
        mean, logvar = m.encode_first_stage(ref["vae.image"])
    _check(f"{name}{suffix} vae.posterior_mean", mean, ref["vae.posterior_mean"])
    _check(f"{name}{suffix} vae.posterior_logvar", logvar, ref["vae.posterior_logvar"])


def test_decode_first_stage_divides_by_the_scale_factor(model, reference):
    m = model("sd2v-tiny", ".safetensors")
    ref, _ = reference("sd2v-tiny")
    with torch.no_grad():
        out = m.decode_first_stage(ref["vae.z"][:1] * 0.18215)
    _check("sd2v decode_first_stage", out, ref["vae.decoded"][:1])


def test_fractional_timesteps(model, reference):
    """k-diffusion passes interpolated t: the embedding takes floats, and integral floats equal the ints."""
    m = model("sd1-tiny", ".safetensors")
    ref, _ = reference("sd1-tiny")
    x, ctx = ref["unet.x"], ref["unet.context"]
    with torch.no_grad():
        as_float = m.apply_model(x, ref["unet.t1"].double(), ctx)
        frac = m.apply_model(x, torch.tensor([500.25, 250.75]), ctx)
    assert torch.equal(as_float, m.apply_model(x, ref["unet.t1"], ctx))
    assert not torch.equal(frac, as_float) and relative_error(frac, as_float) < 0.1


def test_latent_sides(model, reference):
    """Any latent size runs (A1111's nearest resize where the up path and a skip differ; see test_odd_sizes)."""
    sd1, xl = model("sd1-tiny", ".safetensors"), model("sdxl-tiny", ".safetensors")
    ctx1 = reference("sd1-tiny")[0]["unet.context"][:1]
    xl_ref = reference("sdxl-tiny")[0]
    ctx2, y = xl_ref["unet.context"][:1], xl_ref["unet.y"][:1]
    with torch.no_grad():
        assert sd1.apply_model(torch.randn(1, 4, 8, 24), 10, ctx1).shape == (1, 4, 8, 24)
        assert xl.apply_model(torch.randn(1, 4, 12, 20), 10, ctx2, y).shape == (1, 4, 12, 20)
        assert sd1.apply_model(torch.randn(1, 4, 12, 20), 10, ctx1).shape == (1, 4, 12, 20)
        assert xl.apply_model(torch.randn(1, 4, 10, 10), 10, ctx2, y).shape == (1, 4, 10, 10)
        with pytest.raises(UNetShapeError, match="needs a \\[B, 1568\\] vector y"):
            xl.apply_model(torch.randn(1, 4, 8, 8), 10, ctx2)
        with pytest.raises(UNetShapeError, match="3 timesteps for a batch of 1"):
            sd1.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1, 2, 3]), ctx1)
        with pytest.raises(UNetShapeError, match="context must be"):
            sd1.apply_model(torch.randn(1, 4, 8, 8), 10, ctx2)


def test_older_layouts_load_to_the_same_model(fixtures, tmp_path, reference):
    """SD1 without the text_model. level, SD2 in SGM naming, with model_ema / denoiser / logvar extras."""
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3, dtype=torch.int32),
              "logvar": torch.zeros(1000)}
    for name, old, new in [("sd1-tiny", "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."),
                           ("sd2v-tiny", "cond_stage_model.model.", "conditioner.embedders.0.model.")]:
        raw = read_checkpoint(fixtures / f"{name}.safetensors")
        path = tmp_path / f"{name}-old.safetensors"
        save_file({**{k.replace(old, new): v.contiguous() for k, v in raw.items()}, **extras}, str(path))
        m = load_model(path, fixtures / f"{name}.yaml", text_heads=2)
        ref, _ = reference(name)
        with torch.no_grad():
            out = m.apply_model(ref["unet.x"], ref["unet.t0"], ref["unet.context"])
            _check(f"{name} older layout unet.out0", out, ref["unet.out0"])
            if name == "sd1-tiny":  # the text tower's weights really were mapped
                ctx = m.get_learned_conditioning(["", "a photograph of an astronaut riding a horse"])
                _check(f"{name} older layout text.context", ctx, ref["text.context"][:2])


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(path))
    with pytest.raises(UnsupportedModelError, match="^lora.safetensors: unknown model family"):
        load_model(path)
