"""Text encoders and the SDXL conditioner against the references made by the original code (float32, weights
upcast from the checkpoints), plus shape reading, YAML options, meta-device construction and errors."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FP32_BOUND
from tritonsd.model.clip import FrozenCLIPEmbedder
from tritonsd.model.conditioner import GeneralConditioner, build_cond_stage
from tritonsd.formats.keys import cond_stage_prefix
from tritonsd.model.open_clip import FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from tritonsd.model.text_config import TextConfigError, cond_stage_config, text_config_from_weights
from tritonsd.model.layers import timestep_embedding
from tritonsd.testing.reference import relative_error

FAMILY = {"sd1-tiny": "sd1", "sd1-inpaint-tiny": "sd1", "sd2v-tiny": "sd2", "sdxl-tiny": "sdxl"}


@functools.lru_cache(maxsize=None)
def _read(path) -> dict[str, torch.Tensor]:
    if path.suffix == ".ckpt":
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return load_file(str(path))


def _weights(fixtures, name: str, suffix: str = ".safetensors") -> dict[str, torch.Tensor]:
    """The checkpoint's flat state dict (a fresh dict over cached tensors; tests never modify tensors)."""
    return dict(_read(fixtures / f"{name}{suffix}"))


def _module_weights(state_dict, prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, unprefixed, float32, without the ``position_ids`` buffer the loader drops."""
    return {k[len(prefix):]: v.float() for k, v in state_dict.items()
            if k.startswith(prefix) and not k.endswith("embeddings.position_ids")}


def _heads(meta) -> int:
    """The tiny towers' head count, from the reference JSON's ``text_encoder_config`` (one tower or several)."""
    cfg = meta["text_encoder_config"]
    towers = [c for c in cfg.values() if isinstance(c, dict)] or [cfg]
    heads = {c.get("num_attention_heads", c.get("heads")) for c in towers}
    assert len(heads) == 1 and None not in heads
    return heads.pop()


def _yaml_cond_node(fixtures, name: str) -> dict:
    params = yaml.safe_load((fixtures / f"{name}.yaml").read_text())["model"]["params"]
    return params.get("cond_stage_config") or params["conditioner_config"]


_CACHE: dict[tuple, torch.nn.Module] = {}


def _loaded(fixtures, reference, name: str, suffix: str = ".safetensors", use_yaml: bool = False):
    key = (name, suffix, use_yaml)
    if key not in _CACHE:
        family = FAMILY[name]
        sd = _weights(fixtures, name, suffix)
        node = _yaml_cond_node(fixtures, name) if use_yaml else None
        module = build_cond_stage(cond_stage_config(sd, family, node, heads=_heads(reference(name)[1])))
        module.load_state_dict(_module_weights(sd, cond_stage_prefix(family)), strict=True)
        _CACHE[key] = module.eval()
    return _CACHE[key]


def _check(actual, ref, bound=FP32_BOUND):
    assert actual.shape == ref.shape
    err = relative_error(actual, ref)
    assert err <= bound, f"relative error {err:.3g} > {bound}"


# ---------------------------------------------------------------------------------------------- SD1 / SD2

@pytest.mark.parametrize("name,suffix,use_yaml", [
    ("sd1-tiny", ".safetensors", False), ("sd1-tiny", ".ckpt", True),
    ("sd2v-tiny", ".safetensors", True), ("sd2v-tiny", ".ckpt", False),
    ("sd1-inpaint-tiny", ".safetensors", False),
])
def test_sd_text_context(fixtures, reference, name, suffix, use_yaml):
    tensors, meta = reference(name)
    module = _loaded(fixtures, reference, name, suffix, use_yaml)
    expected_type = FrozenCLIPEmbedder if FAMILY[name] == "sd1" else FrozenOpenCLIPEmbedder
    assert type(module) is expected_type
    with torch.no_grad():
        assert torch.equal(module.tokenize(meta["prompts"]), tensors["tokens.input_ids"])
        _check(module(meta["prompts"]), tensors["text.context"])


@pytest.mark.parametrize("name,cond,uncond,prompt_key", [
    ("sd1-tiny", "sample.cond", "sample.uncond", "sample_prompt"),
    ("sd2v-tiny", "sample.cond", "sample.uncond", "sample_prompt"),
    ("sd1-inpaint-tiny", "inpaint.cond", "inpaint.uncond", "inpaint_prompt"),
])
def test_sd_sampling_conditioning(fixtures, reference, name, cond, uncond, prompt_key):
    tensors, meta = reference(name)
    module = _loaded(fixtures, reference, name)
    with torch.no_grad():
        _check(module(2 * [meta[prompt_key]]), tensors[cond])
        _check(module(2 * [""]), tensors[uncond])


def test_token_ids_input_matches_prompt_input(fixtures, reference):
    tensors, meta = reference("sd1-tiny")
    module = _loaded(fixtures, reference, "sd1-tiny")
    with torch.no_grad():
        _check(module.encode_tokens(tensors["tokens.input_ids"]), tensors["text.context"])


# ---------------------------------------------------------------------------------------------- SDXL

def _size_inputs(tensors):
    return dict(original_size=tensors["text.original_size_as_tuple"],
                crop_coords_top_left=tensors["text.crop_coords_top_left"],
                target_size=tensors["text.target_size_as_tuple"])


@pytest.mark.parametrize("use_yaml", [False, True])
def test_sdxl_conditioner(fixtures, reference, use_yaml):
    tensors, meta = reference("sdxl-tiny")
    cond = _loaded(fixtures, reference, "sdxl-tiny", use_yaml=use_yaml)
    assert isinstance(cond, GeneralConditioner)
    clip, bigg = cond.embedders[0], cond.embedders[1]
    assert isinstance(clip, FrozenCLIPEmbedder) and clip.layer == "hidden"
    assert clip.layer_idx == meta["text_encoder_config"]["clip_l_layer_idx"]
    assert isinstance(bigg, FrozenOpenCLIPEmbedder2) and bigg.layer == meta["text_encoder_config"]["open_clip_layer"]
    prompts = meta["prompts"]
    with torch.no_grad():
        assert torch.equal(clip.tokenize(prompts), tensors["tokens.clip_l"])
        assert torch.equal(bigg.tokenize(prompts), tensors["tokens.open_clip"])
        _check(clip(prompts), tensors["text.clip_l_hidden"])
        penultimate, pooled = bigg(prompts)
        _check(penultimate, tensors["text.open_clip_penultimate"])
        _check(pooled, tensors["text.open_clip_pooled"])
        for i, key in enumerate(("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")):
            _check(cond.embedders[2 + i](tensors[f"text.{key}"]), tensors[f"text.emb_{key}"])
        crossattn, vector = cond(prompts, **_size_inputs(tensors))
        _check(crossattn, tensors["text.crossattn"])
        _check(vector, tensors["text.vector"])


def test_sdxl_sampling_conditioning_and_zeroed_text(fixtures, reference):
    tensors, meta = reference("sdxl-tiny")
    cond = _loaded(fixtures, reference, "sdxl-tiny")
    sizes = dict(original_size=tuple(meta["sample_original_size"]),
                 crop_coords_top_left=tuple(meta["sample_crop_coords_top_left"]),
                 target_size=tuple(meta["sample_target_size"]))
    with torch.no_grad():
        c_cross, c_vec = cond(2 * [meta["sample_prompt"]], **sizes)  # one (h, w) tuple for every row
        uc_cross, uc_vec = cond(2 * [meta["sample_negative_prompt"]], zero_text=True, **sizes)
    _check(c_cross, tensors["sample.crossattn"])
    _check(c_vec, tensors["sample.vector"])
    assert torch.equal(uc_cross, tensors["sample.uc_crossattn"])  # all zeros
    _check(uc_vec, tensors["sample.uc_vector"])
    pooled = cond.embedders[1].pooled_dim
    assert torch.equal(uc_vec[:, :pooled], torch.zeros_like(uc_vec[:, :pooled]))
    assert torch.equal(uc_vec[:, pooled:], c_vec[:, pooled:])


def test_size_embedding_matches_the_formula():
    # an independent float64 evaluation of [cos(v f), sin(v f)], f = 10000^(-i/128)
    values = torch.tensor([0, 1, 64, 1024, 2048])
    i = torch.arange(128, dtype=torch.float64)
    args = values[:, None].double() * torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * i / 128)
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    emb = timestep_embedding(values, 256)
    assert emb.dtype == torch.float32
    # float32 frequencies times values up to 2048: arguments carry ~2048 * 6e-8 rounding
    assert (emb.double() - expected).abs().max().item() < 5e-4
    assert timestep_embedding(values, 7).shape == (5, 7)


# ---------------------------------------------------------------------------------------------- shapes, build

def test_text_config_from_weights_reads_every_shape(fixtures, reference):
    sd1 = _weights(fixtures, "sd1-tiny")
    ref = reference("sd1-tiny")[1]["text_encoder_config"]
    cfg = text_config_from_weights(sd1, "cond_stage_model.", heads=2)
    assert (cfg.kind, cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.vocab_size, cfg.positions) == (
        "clip", ref["hidden_size"], ref["num_hidden_layers"], ref["num_attention_heads"],
        ref["intermediate_size"], ref["vocab_size"], ref["max_position_embeddings"])
    assert cfg.projection_dim is None
    sd2 = _weights(fixtures, "sd2v-tiny")
    ref = reference("sd2v-tiny")[1]["text_encoder_config"]
    cfg = text_config_from_weights(sd2, "cond_stage_model.", heads=2)
    assert (cfg.kind, cfg.width, cfg.layers, cfg.mlp_width, cfg.vocab_size, cfg.positions) == (
        "open_clip", ref["width"], ref["layers"], 4 * ref["width"], ref["vocab_size"], ref["context_length"])
    xl = reference("sdxl-tiny")[1]["text_encoder_config"]["open_clip (model config 'ViT-bigG-14-tiny')"]
    cfg = text_config_from_weights(_weights(fixtures, "sdxl-tiny"), "conditioner.embedders.1.")
    assert (cfg.layers, cfg.projection_dim) == (xl["layers"], xl["embed_dim"])
    assert cfg.heads == max(1, cfg.width // 64)  # default: head width 64, as the real models


def test_meta_device_build_then_assign(fixtures, reference):
    """The loader may build on the meta device (no random init of large towers) and assign the weights."""
    tensors, meta = reference("sdxl-tiny")
    sd = _weights(fixtures, "sdxl-tiny")
    with torch.device("meta"):
        cond = build_cond_stage(cond_stage_config(sd, "sdxl", heads=2))
    cond.load_state_dict(_module_weights(sd, "conditioner."), strict=True, assign=True)
    with torch.no_grad():
        crossattn, vector = cond(meta["prompts"], **_size_inputs(tensors))
    _check(crossattn, tensors["text.crossattn"])
    _check(vector, tensors["text.vector"])


def test_clip_layer_options(fixtures):
    sd = _weights(fixtures, "sd1-tiny")
    cfg = text_config_from_weights(sd, "cond_stage_model.", heads=2)
    assert FrozenCLIPEmbedder(cfg, "hidden").layer_idx == cfg.layers - 1  # default: penultimate
    assert FrozenCLIPEmbedder(cfg, "hidden", layer_idx=-1).layer_idx == cfg.layers
    with pytest.raises(TextConfigError, match="layer_idx"):
        FrozenCLIPEmbedder(cfg, "hidden", layer_idx=cfg.layers + 1)
    with pytest.raises(TextConfigError, match="layer"):
        FrozenCLIPEmbedder(cfg, "pooled")


def test_errors_are_clear(fixtures):
    sd1 = _weights(fixtures, "sd1-tiny")
    with pytest.raises(TextConfigError, match="no text encoder weights"):
        text_config_from_weights(sd1, "conditioner.embedders.0.")
    with pytest.raises(TextConfigError, match="heads"):
        text_config_from_weights(sd1, "cond_stage_model.", heads=3)
    with pytest.raises(TextConfigError, match="family"):
        cond_stage_config(sd1, "sd3")
    with pytest.raises(TextConfigError, match="needs FrozenOpenCLIPEmbedder, but the weights hold a CLIP tower"):
        cond_stage_config(sd1, "sd2")
    broken = {k: v for k, v in sd1.items() if "mlp.fc1.weight" not in k}
    with pytest.raises(TextConfigError, match="fc1"):
        text_config_from_weights(broken, "cond_stage_model.")
    assert issubclass(TextConfigError, ValueError)


def test_sdxl_size_inputs_are_checked(fixtures, reference):
    cond = _loaded(fixtures, reference, "sdxl-tiny")
    with torch.no_grad(), pytest.raises(TextConfigError, match="target_size"):
        cond(["a", "b"], original_size=(64, 64), crop_coords_top_left=(0, 0))
    with torch.no_grad(), pytest.raises(TextConfigError, match="one tuple per prompt"):
        cond(["a", "b"], original_size=[(64, 64)] * 3, crop_coords_top_left=(0, 0), target_size=(64, 64))


# ---------------------------------------------------------------------------------------------- Triton path

@pytest.mark.parametrize("name", ["sd1-tiny", "sd2v-tiny"])
def test_text_context_through_triton_kernels(fixtures, reference, name):
    """The same towers with attention (causal) and LayerNorm on the Triton kernels (interpreter on CPU)."""
    from tritonsd.kernels import dispatch

    tensors, meta = reference(name)
    module = _loaded(fixtures, reference, name)
    with dispatch.force("triton"), torch.no_grad():
        _check(module(meta["prompts"][:2]), tensors["text.context"][:2])
