"""detect_config: family, shapes, heads, eps/v and schedule from the weights and the YAML, checked against the
fixtures' READMEs and the original schedule formula; clear errors for what is not supported."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml

from tritonsd.formats.checkpoint import read_checkpoint
from tritonsd.model.config import ModelConfigError, UnsupportedModelError, derive_alphas_cumprod, detect_config
from tritonsd.model.text_config import TextConfigError


@pytest.fixture(scope="module")
def raw(fixtures):
    cache = {}

    def get(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = read_checkpoint(fixtures / name)
        return cache[name]

    return get


def _original_alphas_cumprod(start: float, end: float, n: int) -> np.ndarray:
    """As the original's register_schedule / LegacyDDPMDiscretization: numpy float64."""
    betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas, axis=0)


# README tables: (file, family, inpainting, parameterization from the YAML, UNet linear proj, context_dim)
FIXTURES = [
    ("sd1-tiny.safetensors", "sd1", False, "eps", False, 32),
    ("sd2v-tiny.safetensors", "sd2", False, "v", True, 32),
    ("sd1-inpaint-tiny.ckpt", "sd1", True, "eps", False, 32),
    ("sdxl-tiny.safetensors", "sdxl", False, "eps", True, 64),
]


@pytest.mark.parametrize("name, family, inpainting, param, linear, context_dim", FIXTURES)
def test_fixture_configs(fixtures, raw, name, family, inpainting, param, linear, context_dim):
    stem = name.split(".")[0]
    cfg = detect_config(raw(name), fixtures / f"{stem}.yaml", text_heads=2)
    assert (cfg.family, cfg.inpainting) == (family, inpainting)
    assert (cfg.parameterization, cfg.parameterization_source) == (param, "yaml")
    u = cfg.unet
    assert u.model_channels == 32 and u.time_embed_dim == 128 and u.num_res_blocks == 2
    assert u.in_channels == (9 if inpainting else 4) and u.out_channels == 4
    assert u.use_linear_in_transformer == linear and u.context_dim == context_dim
    if family == "sdxl":
        assert u.channel_mult == (1, 2, 2) and u.transformer_depth == (0, 2, 10)
        assert u.transformer_depth_middle == 10 and u.adm_in_channels == 1568
        assert u.num_head_channels == 16 and u.heads_at(64) == 4
        assert cfg.scale_factor == 0.13025
    else:
        assert u.channel_mult == (1, 2, 2, 2) and u.transformer_depth == (1, 1, 1, 0)
        assert u.transformer_depth_middle == 1 and u.adm_in_channels is None
        assert cfg.scale_factor == 0.18215
        if family == "sd1":
            assert (u.num_heads, u.heads_at(32), u.heads_at(64)) == (2, 2, 2)
        else:
            assert (u.num_head_channels, u.heads_at(32), u.heads_at(64)) == (16, 2, 4)
    v = cfg.vae
    assert (v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.embed_dim, v.double_z, v.attn_levels) == \
        (32, (1, 2, 2, 2), 2, 4, 4, True, ())
    assert all(t.width == 32 and t.heads == 2 for t in cfg.text.values())
    assert [t.layers for t in cfg.text.values()] == {"sd1": [2], "sd2": [3], "sdxl": [3, 3]}[family]


def test_without_yaml_the_released_defaults_are_assumed(raw):
    sd1 = detect_config(raw("sd1-tiny.safetensors"))
    assert (sd1.parameterization, sd1.parameterization_source) == ("eps", "assumed")
    assert (sd1.unet.num_heads, sd1.heads_source) == (8, "assumed")
    sd2 = detect_config(raw("sd2v-tiny.safetensors"))
    assert (sd2.parameterization, sd2.parameterization_source) == ("eps", "assumed")
    assert sd2.unet.num_head_channels == 64
    xl = detect_config(raw("sdxl-tiny.safetensors"))
    assert xl.unet.num_head_channels == 64 and xl.scale_factor == 0.13025


def test_parameterization_option(fixtures, raw):
    cfg = detect_config(raw("sd2v-tiny.safetensors"), parameterization="v")
    assert (cfg.parameterization, cfg.parameterization_source) == ("v", "option")
    cfg = detect_config(raw("sd2v-tiny.safetensors"), fixtures / "sd2v-tiny.yaml", parameterization="eps",
                        text_heads=2)
    assert (cfg.parameterization, cfg.parameterization_source) == ("eps", "option")
    with pytest.raises(ModelConfigError, match="parameterization"):
        detect_config(raw("sd2v-tiny.safetensors"), parameterization="x0")


def test_alphas_cumprod_from_the_file_and_derived(raw):
    cfg = detect_config(raw("sd1-tiny.safetensors"))
    assert cfg.alphas_cumprod_source == "file" and cfg.alphas_cumprod.dtype == torch.float32
    assert torch.equal(cfg.alphas_cumprod, raw("sd1-tiny.safetensors")["alphas_cumprod"])
    derived = derive_alphas_cumprod(0.00085, 0.012, 1000)
    expected = torch.from_numpy(_original_alphas_cumprod(0.00085, 0.012, 1000)).float()
    assert torch.equal(derived, expected)
    assert torch.equal(derived, raw("sd1-tiny.safetensors")["alphas_cumprod"])  # the original's buffer


def test_sdxl_schedule_is_derived_and_matches_its_sigmas(fixtures, raw, reference):
    cfg = detect_config(raw("sdxl-tiny.safetensors"), fixtures / "sdxl-tiny.yaml", text_heads=2)
    assert cfg.alphas_cumprod_source == "derived"
    ref, _ = reference("sdxl-tiny")
    ac = cfg.alphas_cumprod.double()[ref["sample.timesteps"]]
    sigmas = ((1 - ac) / ac) ** 0.5
    torch.testing.assert_close(sigmas.float(), ref["sample.sigmas"][:-1], rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------------
# A YAML that disagrees with the weights


@pytest.mark.parametrize("path, value, expect", [
    (("unet_config", "params", "model_channels"), 64, "model_channels: YAML says 64, the weights say 32"),
    (("unet_config", "params", "in_channels"), 9, "in_channels: YAML says 9, the weights say 4"),
    (("unet_config", "params", "context_dim"), 768, "context_dim: YAML says 768, the weights say 32"),
    (("unet_config", "params", "channel_mult"), [1, 2, 4, 4], "channel_mult: YAML says (1, 2, 4, 4)"),
    (("unet_config", "params", "use_linear_in_transformer"), True, "use_linear_in_transformer: YAML says True"),
    (("unet_config", "params", "attention_resolutions"), [4, 2], "attention levels"),
    (("first_stage_config", "params", "ddconfig", "ch"), 128, "ch: YAML says 128, the weights say 32"),
])
def test_yaml_that_disagrees_is_refused(fixtures, raw, tmp_path, path, value, expect):
    doc = yaml.safe_load((fixtures / "sd1-tiny.yaml").read_text())
    node = doc["model"]["params"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelConfigError) as e:
        detect_config(raw("sd1-tiny.safetensors"), bad)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_yaml_that_is_not_a_config(raw, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("just: [a, list\n")
    with pytest.raises(ModelConfigError, match="not valid YAML"):
        detect_config(raw("sd1-tiny.safetensors"), bad)
    bad.write_text("foo: 1\n")
    with pytest.raises(ModelConfigError, match="no model.params"):
        detect_config(raw("sd1-tiny.safetensors"), bad)


# --------------------------------------------------------------------------------------------------------------
# Layouts that are refused with a reason


def test_sd2_in_sgm_naming_is_detected_as_sd2(raw):
    sgm = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
           for k, v in raw("sd2v-tiny.safetensors").items()}
    assert detect_config(sgm).family == "sd2"


def test_sdxl_refiner_is_not_supported_yet(raw):
    xl = raw("sdxl-tiny.safetensors")
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in xl.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(UnsupportedModelError, match="SDXL refiner is not supported yet.*adm_in_channels 1568"):
        detect_config(refiner)


def test_instruct_pix2pix_is_not_supported_yet(raw):
    sd = dict(raw("sd1-tiny.safetensors"))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(32, 8, 3, 3)
    with pytest.raises(UnsupportedModelError, match="instruct-pix2pix"):
        detect_config(sd)


def test_unknown_families_name_the_deciding_keys(raw):
    sd1 = raw("sd1-tiny.safetensors")
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in sd1.items() if k.startswith("first_stage_model.")}
    with pytest.raises(UnsupportedModelError, match="standalone VAE"):
        detect_config(vae_only)
    with pytest.raises(UnsupportedModelError, match="no UNet.*prefixes found: lora_te, lora_unet"):
        detect_config({"lora_unet.down.weight": torch.zeros(2), "lora_te.up.weight": torch.zeros(2)})
    no_text = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(UnsupportedModelError, match="no text encoder"):
        detect_config(no_text)


# --------------------------------------------------------------------------------------------------------------
# Text towers: heads from the YAML's named tower, an option, or assumed; never a contradicted guess


def _released_meta(fixtures, name: str) -> dict[str, torch.Tensor]:
    """The full-size released layout (manifests/) as meta tensors."""
    import json

    manifest = json.loads((fixtures / "manifests" / f"{name}.json").read_text())
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta")
            for k, v in manifest["tensors"].items()}


def _yaml(tmp_path, cond_stage: str) -> str:
    path = tmp_path / "v2.yaml"
    path.write_text("model:\n  params:\n    parameterization: v\n    cond_stage_config:\n" + cond_stage)
    return path


def test_text_heads_from_the_tower_the_yaml_names(fixtures, tmp_path):
    sd21 = _released_meta(fixtures, "sd21-v")
    node = ("      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
            "      params: {arch: ViT-H-14, layer: penultimate}\n")
    cfg = detect_config(sd21, _yaml(tmp_path, node))
    (encoder,) = cfg.cond_stage.text_encoders
    assert (encoder.tower.width, encoder.tower.heads) == (1024, 16)
    assert (encoder.heads_source, encoder.arch) == ("yaml", "ViT-H-14")
    assert (encoder.layer, encoder.layer_source) == ("penultimate", "yaml")
    # the class's default layer when the YAML leaves it out (open_clip embedders default to "last")
    cfg = detect_config(sd21, _yaml(tmp_path, "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"))
    assert cfg.cond_stage.text_encoders[0].layer == "last" and cfg.text["cond_stage_model."].heads == 16
    with pytest.raises(TextConfigError, match="text_heads 8 contradicts the YAML's FrozenOpenCLIPEmbedder "
                                              "\\(ViT-H-14: 16 heads\\)"):
        detect_config(sd21, _yaml(tmp_path, node), text_heads=8)
    # an arch we do not know says nothing: assumed, as without a YAML
    cfg = detect_config(sd21, _yaml(tmp_path, node.replace("ViT-H-14", "ViT-H-14-custom")))
    assert (cfg.text["cond_stage_model."].heads, cfg.cond_stage.text_encoders[0].heads_source) == (16, "assumed")


def test_yaml_naming_another_tower_kind_is_refused(fixtures, tmp_path):
    sd21 = _released_meta(fixtures, "sd21-v")
    with pytest.raises(TextConfigError, match="YAML names FrozenCLIPEmbedder, but the weights hold an OpenCLIP tower"):
        detect_config(sd21, _yaml(tmp_path, "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"))


def test_sources_of_what_the_weights_do_not_hold(fixtures, raw):
    cfg = detect_config(raw("sd1-tiny.safetensors"), fixtures / "sd1-tiny.yaml", text_heads=2)
    assert (cfg.scale_factor_source, cfg.schedule_source, cfg.alphas_cumprod_source) == ("yaml", "yaml", "file")
    assert (cfg.cond_stage.source, cfg.cond_stage.text_encoders[0].heads_source) == ("yaml", "option")
    cfg = detect_config(raw("sd1-tiny.safetensors"))
    assert (cfg.scale_factor_source, cfg.schedule_source, cfg.cond_stage.source) == ("assumed",) * 3


def test_detect_config_takes_normalised_keys_once(raw):
    """The loader normalises once and hands the result over; a raw dict gives the same config."""
    from tritonsd.formats.keys import normalize_keys

    norm = normalize_keys(raw("sdxl-tiny.safetensors"))
    a, b = detect_config(norm, text_heads=2), detect_config(raw("sdxl-tiny.safetensors"), text_heads=2)
    assert a.cond_stage == b.cond_stage and a.unet == b.unet and a.vae == b.vae
    assert [type(e).__name__ for e in a.cond_stage.embedders] == ["TextEncoderConfig"] * 2 + ["SizeEmbedderConfig"] * 3
    assert a.cond_stage.input_keys == ("txt", "txt", "original_size_as_tuple", "crop_coords_top_left",
                                       "target_size_as_tuple")


@pytest.mark.parametrize("name", ["sd1-tiny", "sdxl-tiny"])
def test_unusable_shapes_are_one_line_naming_the_key(fixtures, name):
    """Every weight replaced by a scalar, an empty matrix or a vector: detection either still works (a tensor it
    does not read) or refuses in one line that names the key and its shape; never an IndexError, a ValueError
    from unpacking or a ZeroDivisionError."""
    from tritonsd.formats.checkpoint import read_checkpoint
    from tritonsd.model.text_config import TextConfigError

    weights = read_checkpoint(fixtures / f"{name}.safetensors")
    read = re.compile(r"(conv_in|conv_out|post_quant_conv|out\.2|time_embed\.0|label_emb\.0\.0|emb_layers\.1|"
                      r"out_layers\.3|conv2|to_k|proj_in|token_embedding|position_embedding|fc1|c_fc)\.weight$|"
                      r"(positional_embedding|text_projection)$")
    refused = 0
    for key in [k for k in weights if read.search(k)]:
        for bad in (torch.tensor(1.0), torch.zeros(0, 3), torch.zeros(3)):
            try:
                detect_config({**weights, key: bad}, text_heads=2)
            except (ModelConfigError, TextConfigError) as e:
                message = str(e)
                assert "\n" not in message and key in message and str(list(bad.shape)) in message, message
                refused += 1
    assert refused >= 30  # the tensors the detection reads: every one is checked
