"""Loading as AUTOMATIC1111 users expect: the YAML beside the checkpoint, external VAE files (both key styles,
.safetensors and .pt), the file hashes of the infotext, and the built-in demo model."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint
from tritonsd.model.config import find_config
from tritonsd.formats.hashes import model_hash, sha256_file, vae_hash
from tritonsd.model.load import load_model
from tritonsd.model.text_config import TextConfigError
from tritonsd.formats.vae_file import VAEFileError, load_vae_weights

VAE_PREFIX = "first_stage_model."


def _vae_part(fixtures, name: str) -> dict[str, torch.Tensor]:
    """The checkpoint's VAE tensors under their bare names, as the released VAE files store them."""
    raw = read_checkpoint(fixtures / f"{name}.safetensors")
    return {k[len(VAE_PREFIX):]: v.contiguous() for k, v in raw.items() if k.startswith(VAE_PREFIX)}


def _beside(fixtures, tmp_path, name: str, suffix: str = ".safetensors", yaml_suffix: str | None = ".yaml"):
    """The fixture checkpoint linked into tmp_path, with its YAML copied beside it under ``yaml_suffix``."""
    path = tmp_path / f"{name}{suffix}"
    path.symlink_to(fixtures / f"{name}{suffix}")
    if yaml_suffix is not None:
        shutil.copy(fixtures / f"{name}.yaml", tmp_path / f"{name}{yaml_suffix}")
    return path


# ---------------------------------------------------------------------------------------------- the YAML beside


@pytest.mark.parametrize("yaml_suffix", [".yaml", ".yml"])
def test_find_config_is_the_sibling_with_the_same_stem(fixtures, tmp_path, yaml_suffix):
    path = _beside(fixtures, tmp_path, "sd2v-tiny", ".ckpt", yaml_suffix)
    assert find_config(path) == tmp_path / f"sd2v-tiny{yaml_suffix}"
    alone = _beside(fixtures, tmp_path, "sd1-tiny", yaml_suffix=None)
    assert find_config(alone) is None
    assert find_config("demo:sd1") is None and find_config(tmp_path / "absent.ckpt") is None


def test_load_model_picks_up_the_yaml_beside_the_checkpoint(fixtures, tmp_path):
    """sd2v-tiny is a v model: only its YAML says so."""
    path = _beside(fixtures, tmp_path, "sd2v-tiny", ".ckpt")
    model = load_model(path, text_heads=2)
    assert (model.config.parameterization, model.config.parameterization_source) == ("v", "yaml")
    assert model.source.config == tmp_path / "sd2v-tiny.yaml" and model.config.yaml_path == str(model.source.config)
    sd1 = _beside(fixtures, tmp_path, "sd1-tiny")
    assert load_model(sd1, text_heads=2).config.heads_source == "yaml"  # the YAML's num_heads 2
    without = load_model(sd1, config=False, text_heads=2)  # opted out: the released models' 8 heads
    assert (without.config.heads_source, without.config.unet.num_heads, without.source.config) == ("assumed", 8, None)


def test_keys_are_normalised_once_per_load(fixtures, monkeypatch):
    import tritonsd.model.config as config_module
    import tritonsd.formats.keys as keys_module
    import tritonsd.model.load as load_module

    calls = []

    def counting(state_dict):
        calls.append(len(state_dict))
        return keys_module.normalize_keys(state_dict)

    for module in (load_module, config_module):
        monkeypatch.setattr(module, "normalize_keys", counting)
    model = load_model(fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", text_heads=2)
    assert calls == [684 + 244 + 37 + 12]  # one pass over the README's key count
    assert model.source.model_name == "sd1-tiny"
    assert model.source.model_hash() == hashlib.sha256((fixtures / "sd1-tiny.safetensors").read_bytes()).hexdigest()[:10]


def test_assumed_heads_that_the_yaml_contradicts_are_an_error(fixtures, tmp_path):
    """The YAML's FrozenOpenCLIPEmbedder defaults to ViT-H-14 (16 heads at width 1024); the tiny tower is 32 wide,
    so width // 64 = 1 head would be a silent guess: refused, naming both values."""
    path = _beside(fixtures, tmp_path, "sd2v-tiny", ".ckpt")
    with pytest.raises(TextConfigError) as e:
        load_model(path)
    message = str(e.value)
    assert message.startswith("sd2v-tiny.ckpt: cond_stage_model.: ") and "\n" not in message
    assert "assumed 1 (width 32 / 64)" in message and "ViT-H-14 (16 heads at width 1024)" in message


# ---------------------------------------------------------------------------------------------- external VAE


def _write_vae(tensors: dict[str, torch.Tensor], path, prefixed: bool, extras: bool) -> None:
    keyed = {(VAE_PREFIX + k if prefixed else k): v for k, v in tensors.items()}
    if extras:  # what the released .pt VAEs carry besides the weights
        keyed |= {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4),
                  "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    if path.suffix == ".safetensors":
        save_file(keyed, str(path))
    else:
        torch.save({"state_dict": keyed}, path)


@pytest.mark.parametrize("suffix, prefixed", [(".safetensors", False), (".safetensors", True), (".pt", False),
                                              (".pt", True)])
def test_external_vae_replaces_the_checkpoints(fixtures, tmp_path, suffix, prefixed):
    """sd1-tiny's UNet and text with sd2v-tiny's VAE (drawn independently, same shapes): the loaded VAE is the
    file's, everything else the checkpoint's."""
    vae = _vae_part(fixtures, "sd2v-tiny")
    path = tmp_path / f"other-vae{suffix}"
    _write_vae(vae, path, prefixed, extras=suffix == ".pt")
    assert load_vae_weights(path).keys() == vae.keys()

    own = load_model(fixtures / "sd1-tiny.safetensors", config=False, text_heads=2)
    model = load_model(fixtures / "sd1-tiny.safetensors", config=False, text_heads=2, vae=path)
    loaded = model.first_stage_model.state_dict()
    assert loaded.keys() == vae.keys()
    assert all(torch.equal(loaded[k], vae[k].float()) for k in vae)
    own_vae = own.first_stage_model.state_dict()
    assert not torch.equal(loaded["decoder.conv_out.weight"], own_vae["decoder.conv_out.weight"])
    unet, own_unet = model.model.state_dict(), own.model.state_dict()
    assert all(torch.equal(unet[k], own_unet[k]) for k in own_unet)

    assert model.source.vae == path and model.source.vae_name == f"other-vae{suffix}"
    assert model.source.vae_hash() == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert own.source.vae is None and own.source.vae_name is None and own.source.vae_hash() is None


def test_vae_that_does_not_fit_is_one_line(fixtures, tmp_path):
    vae = _vae_part(fixtures, "sd1-tiny")
    wrong = tmp_path / "wide-vae.safetensors"
    save_file({**vae, "decoder.conv_out.weight": torch.zeros(3, 64, 3, 3)}, str(wrong))
    with pytest.raises(VAEFileError) as e:
        load_model(fixtures / "sd1-tiny.safetensors", config=False, text_heads=2, vae=wrong)
    assert str(e.value) == ("wide-vae.safetensors: the VAE does not fit this model's: 1 with another shape (e.g. "
                            "decoder.conv_out.weight: file [3, 64, 3, 3], model [3, 32, 3, 3])")
    short = tmp_path / "short-vae.safetensors"
    save_file({k: v for k, v in vae.items() if not k.startswith("quant_conv.")}, str(short))
    with pytest.raises(VAEFileError, match="^short-vae.safetensors: .*2 missing \\(e.g. quant_conv.bias"):
        load_model(fixtures / "sd1-tiny.safetensors", config=False, text_heads=2, vae=short)


def test_files_that_are_not_vaes(fixtures, tmp_path):
    with pytest.raises(VAEFileError, match=r"^sd1-tiny.safetensors: a full model checkpoint \(model.diffusion_model"):
        load_vae_weights(fixtures / "sd1-tiny.safetensors")
    diffusers = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, str(diffusers))
    with pytest.raises(VAEFileError, match="diffusers-layout VAE"):
        load_vae_weights(diffusers)
    missing = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(fixtures / "sd1-tiny.safetensors", vae=missing)
    assert issubclass(VAEFileError, ValueError)


# ---------------------------------------------------------------------------------------------- hashes


def test_hashes_are_sha256_prefixes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(bytes(range(256)) * 5000)  # more than one 1 MiB block
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f) == digest
    assert model_hash(f) == vae_hash(f) == digest[:10]


# ---------------------------------------------------------------------------------------------- demo model


def test_demo_model_is_deterministic_and_named_for_the_infotext():
    a = load_model("demo:sd1")
    b = load_model("demo:sd1")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.family == "sd1" and a.config.parameterization == "eps"
    assert sum(p.numel() for p in a.parameters()) > 6_000_000  # about the sd1-tiny fixture's size
    assert all(torch.isfinite(t).all() for t in sa.values())
    assert a.source.model_name == "demo-sd1"
    assert a.source.model_hash() == hashlib.sha256(a.source.checkpoint.read_bytes()).hexdigest()[:10]
    half = load_model("demo:sd1", dtype=torch.float16)  # float32 values drawn first, then cast
    assert all(torch.equal(half.state_dict()[k], v.half()) for k, v in sa.items())


def test_demo_model_generates(tmp_path):
    import tritonsd

    pipe = tritonsd.load("demo:sd1")
    assert (pipe.name, pipe.device.type) == ("demo-sd1", "cpu")
    settings = pipe.settings(prompt="a red circle", sampler="euler", steps=3, width=64, height=64, seed=1)
    images = pipe.generate(settings)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_unknown_builtin_model_is_one_line():
    with pytest.raises(ValueError, match="^unknown built-in model 'demo:sd9'; available: demo:sd1$"):
        load_model("demo:sd9")


# ---------------------------------------------------------------------------------------------- a CPU load


_CPU_LOAD = r"""
import sys
from tritonsd.model.layers import stacked_rows
from tritonsd.kernels.conv_layout import has_kernel_layout
import tritonsd
pipe = tritonsd.load(sys.argv[1], device="cpu", text_heads=2)
attn = [m for m in pipe.model.modules() if type(m).__name__ == "CrossAttention" and m.fused_qkv]
convs = [m.weight for m in pipe.model.modules() if type(m).__name__ == "Conv2d" and m.weight.shape[-1] > 1]
print("triton" in sys.modules, len(attn), sum(stacked_rows([a.to_q.weight, a.to_k.weight, a.to_v.weight])
      is not None for a in attn), sum(has_kernel_layout(w) for w in convs))
"""


def test_a_cpu_load_for_the_torch_reference_imports_no_triton_and_copies_no_weight(fixtures):
    """Only the torch reference runs on the CPU: the load imports no kernel module (triton: 0.1 s of every start)
    and keeps the file's tensors as they are: conv weights in the file's layout, q / k / v apart (stacking them,
    for the fused GEMM, copies every self-attention weight)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CPU_LOAD, str(fixtures / "sd1-tiny.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    imported, attention, stacked, laid_out = out.stdout.split()
    assert imported == "False" and int(attention) > 0 and stacked == "0" and laid_out == "0"


def test_a_load_for_the_triton_kernels_stacks_qkv_and_lays_out_the_conv_weights(fixtures):
    from tritonsd.kernels.conv_layout import has_kernel_layout
    from tritonsd.model.layers import stacked_rows
    from tritonsd.model.unet import CrossAttention

    model = load_model(fixtures / "sd1-tiny.safetensors", text_heads=2, kernel_layout=True)
    attn = [m for m in model.modules() if isinstance(m, CrossAttention) and m.fused_qkv]
    assert attn and all(stacked_rows([a.to_q.weight, a.to_k.weight, a.to_v.weight]) is not None for a in attn)
    convs = [m.weight for m in model.modules() if type(m).__name__ == "Conv2d"]
    assert all(has_kernel_layout(w) for w in convs)
