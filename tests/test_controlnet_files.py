"""ControlNet files in the forms people download (``formats/controlnet_file.py``), written as tiny synthetic files:
v1.0 whole checkpoints, repacks without the prefix, "difference" files, diffusers keys (single file and folder),
SD 2.x (linear projections) and SDXL (original layout and diffusers, checked against diffusers' own
``ControlNetModel`` on a small random model); bad files give one ``ValueError`` line."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tritonsd.formats.controlnet_file import ControlNetFileError, read_controlnet
from tritonsd.model.controlnet import ControlNetError, load_controlnet
from tritonsd.sampler.control import ControlUnit
from tritonsd.testing.reference import relative_error

FILE = "controlnet-sd1-tiny.pth"


@pytest.fixture(scope="module")
def released(fixtures):
    """The fixture's weights under the original's names (no prefix), float32."""
    return {k: v.float() for k, v in read_controlnet(fixtures / FILE).weights.items()}


def _inputs(h=8, w=16, batch=2, context=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([500.0] * batch),
            torch.randn(batch, 77, context, generator=g), torch.rand(1, 3, 8 * h, 8 * w, generator=g))


def _residuals(net, seed=0, context=32, y=None):
    x, t, c, hint = _inputs(context=context, seed=seed)
    with torch.no_grad():
        return net(x, t, c, hint=hint, y=y)


def _same(a, b, bound=0.0):
    return all(relative_error(x, y) <= bound for x, y in zip(a, b)) and len(a) == len(b)


def test_v1_0_whole_checkpoint_no_prefix_and_v1_1_give_one_network(models, fixtures, released, tmp_path):
    unet = models("sd1-tiny").model.diffusion_model
    expected = _residuals(load_controlnet(fixtures / FILE, unet))
    whole = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    whole.update({"first_stage_model.decoder.conv_out.bias": torch.zeros(3)})
    whole.update({f"control_model.{k}": v for k, v in released.items()})
    torch.save({"state_dict": whole, "global_step": 10}, tmp_path / "control_sd15_canny.pth")
    save_file(dict(released), str(tmp_path / "repack.safetensors"))
    for name, layout in (("control_sd15_canny.pth", "v1.0 checkpoint"), ("repack.safetensors", "no prefix")):
        file = read_controlnet(tmp_path / name)
        assert file.layout == layout and set(file.weights) == set(released)
        assert _same(_residuals(load_controlnet(tmp_path / name, unet)), expected)


def test_difference_file_adds_the_base_unet_back(models, fixtures, released, tmp_path):
    unet = models("sd1-tiny").model.diffusion_model
    base = unet.state_dict()
    diff = {k: (v.double() - base[k].double()).float() if k in base else v for k, v in released.items()}
    assert sum(k in base for k in released) > 100  # the encoder's weights are differences
    save_file({**{f"control_model.{k}": v for k, v in diff.items()}, "difference": torch.zeros(1)},
              str(tmp_path / "diff.safetensors"))
    file = read_controlnet(tmp_path / "diff.safetensors")
    assert file.difference and "difference" not in file.weights
    got = _residuals(load_controlnet(tmp_path / "diff.safetensors", unet))
    assert _same(got, _residuals(load_controlnet(fixtures / FILE, unet)), 1e-5)


# the extension's controlnet_diffusers.py table, written out for the tiny widths (levels 0-3, 2 ResBlocks each)
def _to_diffusers(weights: dict) -> dict:
    table = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("middle_block_out.0.", "controlnet_mid_block."),
             ("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(4):
        for j in range(2):
            table += [(f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."),
                      (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")]
        table.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    names = ["conv_in"] + [f"blocks.{i}" for i in range(6)] + ["conv_out"]
    table += [(f"input_hint_block.{2 * i}.", f"controlnet_cond_embedding.{n}.") for i, n in enumerate(names)]
    table += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(12)]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    out = {}
    for key, value in weights.items():
        new = key
        for sd, hf in table:
            if key.startswith(sd):
                new = hf + key[len(sd):]
                break
        if "resnets" in new:
            for sd, hf in resnet:
                new = new.replace(f".{sd}.", f".{hf}.")
        out[new] = value
    return out


def test_diffusers_keys_single_file_and_folder(models, fixtures, released, tmp_path):
    unet = models("sd1-tiny").model.diffusion_model
    diffusers = _to_diffusers(released)
    assert "controlnet_cond_embedding.conv_in.weight" in diffusers and len(diffusers) == len(released)
    save_file(diffusers, str(tmp_path / "cn.safetensors"))
    folder = tmp_path / "controlnet-canny-tiny"
    folder.mkdir()
    save_file(diffusers, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    expected = _residuals(load_controlnet(fixtures / FILE, unet))
    for source in (tmp_path / "cn.safetensors", folder):
        file = read_controlnet(source)
        assert file.layout == "diffusers"
        assert file.weights.keys() == released.keys()
        assert all(torch.equal(file.weights[k], released[k]) for k in released)
        assert _same(_residuals(load_controlnet(source, unet)), expected)


def test_sd2_controlnet_with_linear_projections(models, fixtures, released, tmp_path):
    """An SD 2.x ControlNet made of sd2v-tiny's own encoder (linear proj_in / proj_out), identity zero convs and a
    hint encoder whose last conv is zero: its residuals are then the UNet's skips and middle output, which the
    UNet itself computes (forward hooks)."""
    unet = models("sd2v-tiny").model.diffusion_model
    encoder = ("time_embed.", "input_blocks.", "middle_block.")
    own = {k: v for k, v in unet.state_dict().items() if k.startswith(encoder)}
    assert own["input_blocks.1.1.proj_in.weight"].dim() == 2
    weights = dict(own)
    for k, v in released.items():
        if k.startswith("input_hint_block."):
            weights[k] = torch.zeros_like(v) if k.startswith("input_hint_block.14.") else v
        elif k.startswith(("zero_convs.", "middle_block_out.")):
            c = v.shape[0]
            weights[k] = torch.eye(c).reshape(c, c, 1, 1) if k.endswith("weight") else torch.zeros(c)
    save_file({f"control_model.{k}": v.contiguous() for k, v in weights.items()}, str(tmp_path / "sd21.safetensors"))
    net = load_controlnet(tmp_path / "sd21.safetensors", unet)
    assert net.config.unet.use_linear_in_transformer
    captured = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o)) for b in unet.input_blocks]
    hooks.append(unet.middle_block.register_forward_hook(lambda m, i, o: captured.append(o)))
    x, t, c, hint = _inputs()
    with torch.no_grad():
        got = net(x, t, c, hint=hint)
        unet(x, t, c)
    for h in hooks:
        h.remove()
    assert len(got) == len(captured) == 13
    assert all(relative_error(a, b) <= 1e-6 for a, b in zip(got, captured))


def _diffusers_sdxl_controlnet(cfg, seed=0, depths=None):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    levels = len(cfg.channel_mult)
    model = ControlNetModel(
        in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=tuple(max(d, 1) for d in (depths or cfg.transformer_depth)),
        attention_head_dim=tuple(cfg.model_channels * m // cfg.num_head_channels for m in cfg.channel_mult),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=cfg.adm_in_channels,
        conditioning_embedding_out_channels=(16, 32, 96, 256))
    with torch.no_grad():  # diffusers zero-initialises the zero convs: random values make the check mean something
        for name, p in model.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
                p.normal_(0, 0.2 if name.endswith("weight") else 0.02)
    assert levels == len(model.down_blocks)
    return model.eval()


@pytest.mark.parametrize("depths", [None, (0, 1, 1)])  # sdxl-tiny's own depths, and a "mid" ControlNet's fewer
def test_sdxl_controlnet_against_diffusers(models, tmp_path, depths):
    """SDXL (whose original code has no ControlNet): diffusers' ControlNetModel at sdxl-tiny's widths is the
    reference, saved as a diffusers single file and converted to the original layout (``label_emb.0.0.bias``)."""
    pytest.importorskip("diffusers")
    unet = models("sdxl-tiny").model.diffusion_model
    cfg = unet.cfg
    ref = _diffusers_sdxl_controlnet(cfg, depths=depths)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "xl-diffusers.safetensors"))
    converted = read_controlnet(tmp_path / "xl-diffusers.safetensors")
    assert converted.sdxl and converted.layout == "diffusers"
    save_file({k: v.contiguous() for k, v in converted.weights.items()}, str(tmp_path / "xl-original.safetensors"))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 120.0])
    context, hint = torch.randn(2, 77, cfg.context_dim, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    text_embeds = torch.randn(2, cfg.adm_in_channels - 6 * 256, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    with torch.no_grad():
        down, mid = ref(x, t, context, hint, conditioning_scale=1.0, return_dict=False,
                        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        y = torch.cat([text_embeds, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=-1)
        for source in ("xl-diffusers.safetensors", "xl-original.safetensors"):
            net = load_controlnet(tmp_path / source, unet)
            got = net(x, t, context, hint=hint, y=y)
            assert len(got) == len(down) + 1 == 10
            for a, b in zip(got, [*down, mid]):
                assert relative_error(a, b) <= 1e-4


# ---------------------------------------------------------------- bad files: one line


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and isinstance(exc, ValueError)
    return text


def test_bad_files_get_one_line(models, fixtures, released, tmp_path):
    unet = models("sd1-tiny").model.diffusion_model
    data = (fixtures / "controlnet-sd1-tiny.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.pth").write_bytes((fixtures / FILE).read_bytes()[:100_000])
    with open(tmp_path / "payload.pth", "wb") as f:
        pickle.dump({"control_model.input_hint_block.0.weight": _Payload()}, f, protocol=2)
    torch.save({"control_model.input_hint_block.0.weight": _Payload()}, tmp_path / "payload-zip.pth")
    for name in ("cut.safetensors", "cut.pth", "payload.pth", "payload-zip.pth"):
        with pytest.raises(ControlNetFileError) as e:
            load_controlnet(tmp_path / name, unet)
        assert name in _one_line(e.value)
        if name == "payload-zip.pth":
            assert "refused" in str(e.value) and "system" in str(e.value)
    with pytest.raises(ControlNetFileError) as e:
        read_controlnet(fixtures / "sd1-tiny.safetensors")
    assert "not a ControlNet" in _one_line(e.value)
    save_file({"lora_controlnet": torch.zeros(1), **released}, str(tmp_path / "control-lora.safetensors"))
    with pytest.raises(ControlNetFileError) as e:
        read_controlnet(tmp_path / "control-lora.safetensors")
    assert "ControlNet-LoRA" in _one_line(e.value)
    with pytest.raises(ControlNetError) as e:  # SD1 ControlNet, SDXL checkpoint
        load_controlnet(fixtures / FILE, models("sdxl-tiny").model.diffusion_model)
    assert "is for SD" in _one_line(e.value) and "the checkpoint is SDXL" in str(e.value)
    flat = {**released, "input_blocks.0.0.weight": torch.zeros(32)}
    save_file(flat, str(tmp_path / "flat.safetensors"))
    with pytest.raises(ControlNetError) as e:
        load_controlnet(tmp_path / "flat.safetensors", unet)
    assert "not a conv weight" in _one_line(e.value)
    wide = {k: v for k, v in released.items()}
    wide["input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(64, 48)
    wide["middle_block.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(64, 48)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ControlNetError) as e:
        load_controlnet(tmp_path / "wide.safetensors", unet)
    assert "context_dim 48 vs 32" in _one_line(e.value)


def test_sdxl_controlnet_in_the_pipeline(pipes, tmp_path):
    """An SDXL ControlNet (diffusers single file) through ``pipe(...)``: the vector conditioning reaches it, and
    it changes the image."""
    pytest.importorskip("diffusers")
    pipe = pipes("sdxl-tiny")
    ref = _diffusers_sdxl_controlnet(pipe.model.model.diffusion_model.cfg, seed=2)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "xl.safetensors"))
    fields = dict(prompt="a cat", seed=4, steps=2, width=64, height=64, sampler="euler")
    plain = pipe.generate(pipe.settings(**fields))
    unit = ControlUnit(tmp_path / "xl.safetensors", image=torch.rand(1, 3, 64, 64, generator=torch.Generator()
                                                                     .manual_seed(3)), control_mode="prompt")
    controlled = pipe.generate(pipe.settings(controls=(unit,), **fields))
    assert torch.isfinite(controlled).all() and (controlled - plain).abs().max() > 1e-3


def test_difference_file_is_relative_to_the_checkpoint_not_to_a_lora(models, fixtures, released, tmp_path):
    from tritonsd.pipeline import Pipeline

    model = models("sd1-tiny")
    unet = model.model.diffusion_model
    base = {k: v.clone() for k, v in unet.state_dict().items()}  # copies: the LoRA below writes in place
    diff = {k: (v.double() - base[k].double()).float() if k in base else v for k, v in released.items()}
    save_file({**{f"control_model.{k}": v for k, v in diff.items()}, "difference": torch.zeros(1)},
              str(tmp_path / "diff.safetensors"))
    expected = _residuals(load_controlnet(tmp_path / "diff.safetensors", unet))
    pipe = Pipeline(model)
    pipe.set_loras([(fixtures / "lora-sd1-tiny.safetensors", 1.0)])
    try:
        assert any(not torch.equal(unet.state_dict()[k], base[k]) for k in diff if k in base)  # the LoRA acts
        assert _same(_residuals(pipe.controlnet(tmp_path / "diff.safetensors")), expected)
    finally:
        pipe.set_loras([])


def test_unknown_keys_are_named_escaped(models, released, tmp_path):
    bad = {**released, "input_blocks.1.0.\x1b[31mevil.weight": torch.zeros(1)}
    save_file(bad, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ControlNetError) as e:
        load_controlnet(tmp_path / "extra.safetensors", models("sd1-tiny").model.diffusion_model)
    assert "\x1b" not in _one_line(e.value) and "unexpected" in str(e.value)


def test_mangled_files_load_or_give_one_escaped_line(models, fixtures, tmp_path):
    """Truncations and flipped bytes of both released forms (header and data alike): each either loads or is
    refused with one printable line of a ValueError subclass, never a traceback of another type."""
    import random

    unet = models("sd1-tiny").model.diffusion_model
    rng = random.Random(23)
    outcomes = set()
    for source in ("controlnet-sd1-tiny.safetensors", FILE):
        data = (fixtures / source).read_bytes()
        for case in range(12):
            mangled = bytearray(data)
            if case % 3 == 0:
                mangled = mangled[: rng.randrange(1, len(data))]
            else:
                region = 4096 if case % 3 == 1 else len(data)  # the header / the first members, or anywhere
                for _ in range(rng.randint(1, 8)):
                    mangled[rng.randrange(0, min(region, len(data)))] ^= 1 << rng.randrange(8)
            path = tmp_path / f"{case}{source}"
            path.write_bytes(bytes(mangled))
            try:
                load_controlnet(path, unet)
                outcomes.add("loaded")
            except ValueError as e:
                assert type(e) is not ValueError
                text = str(e)
                assert text and "\n" not in text and all(c == " " or c.isprintable() for c in text), text[:200]
                outcomes.add("refused")
    assert "refused" in outcomes
