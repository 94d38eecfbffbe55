"""Hires fix's "Hires checkpoint" (webui v1.10.1 ``hr_checkpoint_name``): the second pass on another checkpoint.

webui's rule (``processing.py`` ``StableDiffusionProcessingTxt2Img``): the first pass and its decode (for an
image upscaler) on the first model; then ``reload_model_weights(info=hr_checkpoint_info)``, and everything after
on the other model: the image upscaler's VAE encode, the hires conditioning (computed anew on it), the second
pass's UNet and the final decode. The infotext gets ``Hires checkpoint: <name_for_extra> [<sha256[:10]>]`` (its
``short_title``) right after ``Denoising strength``'s place among the hires keys, and reading it back looks the
name up as ``get_closet_checkpoint_match`` does. The expected images here are composed from the two pipelines'
public stages (each stage has its own parity tests), the names and hashes from hashlib and the file names.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import tritonsd
from tritonsd.formats.checkpoint_names import CheckpointNotFound, find_checkpoint
from tritonsd.sampler.settings import SettingsError
from tritonsd.sampler.infotext import to_pil
from tritonsd.sampler.upscale import crop_latent, upscale_latent
from tritonsd.sampler.vae_io import encode_image

CHECKPOINT = "sd1-tiny.safetensors"
RUN = dict(prompt="a red circle", negative_prompt="blurry", seed=5, sampler="euler", steps=2, cfg_scale=7.0,
           width=64, height=64, enable_hr=True, strength=0.6, hr_second_pass_steps=2)


def sha10(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.fixture(scope="module")
def models(fixtures, tmp_path_factory):
    """A models folder: ``base`` (the fixture), ``twin`` (a byte copy of it under another name) and
    ``sub/other`` (the fixture with its UNet output conv, its VAE decoder's last conv and a text layer changed)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copy(fixtures / CHECKPOINT, root / "base.safetensors")
    shutil.copy(fixtures / CHECKPOINT, root / "twin.safetensors")
    weights = load_file(str(fixtures / CHECKPOINT))
    g = torch.Generator().manual_seed(3)
    changed = 0
    for key, t in weights.items():
        if key.startswith(("model.diffusion_model.out.", "first_stage_model.decoder.conv_out.",
                           "first_stage_model.encoder.conv_in.")) or ".final_layer_norm." in key:
            weights[key] = t + 0.2 * torch.randn(t.shape, generator=g).to(t.dtype) * t.abs().mean()
            changed += 1
    assert changed >= 5
    (root / "sub").mkdir()
    save_file(weights, str(root / "sub" / "other.safetensors"))
    return root


@pytest.fixture(scope="module")
def base(models):
    return tritonsd.load(models / "base.safetensors", text_heads=2)


@pytest.fixture(scope="module")
def other(models):
    return tritonsd.load(models / "sub" / "other.safetensors", text_heads=2)


def test_names_resolve_as_webui_looks_them_up(models):
    other = (models / "sub" / "other.safetensors").resolve()
    h = sha10(other)
    for name in ("sub/other.safetensors", "sub/other", "other", "sub_other", f"other [{h}]",
                 f"sub/other.safetensors [{h}]", "oth", h, str(other), "other [0000000000]"):
        assert find_checkpoint(name, models) == other, name  # the last: webui's checksum-stripped pass
    assert find_checkpoint("twin", models) == (models / "twin.safetensors").resolve()
    for name in ("nothing-like-it", "", "   "):
        with pytest.raises(CheckpointNotFound):
            find_checkpoint(name, models)


def test_the_second_pass_runs_on_the_other_checkpoint(base, other):
    """Latent upscale: base's first pass, interpolated; other's noise schedule, conditioning, UNet and decode."""
    s = base.settings(**RUN, hr_checkpoint_name="other")
    got = base.generate(s)

    x1 = base.denoise(base.prepare_latents(s), base.encode(s), s)
    up = upscale_latent(x1, s.hires_target(), "Latent")
    noise = base.hires_noise(s)
    hr = s.hires_pass()
    x2 = other.denoise(other.prepare_hires_latents(up, s, noise), other.encode(hr, hires_of=s), hr)
    expected = other.decode(x2).cpu()
    assert torch.equal(got, expected)

    same = base.generate(base.settings(**RUN))
    assert (got - same).abs().max() > 1e-2  # the other checkpoint changes the image (the check could fail)


def test_an_image_upscaler_decodes_on_the_first_and_encodes_on_the_other(base, other):
    s = base.settings(**RUN, hr_upscaler="Nearest", hr_checkpoint_name="sub/other.safetensors")
    got = base.generate(s)
    x1 = base.denoise(base.prepare_latents(s), base.encode(s), s)
    target = s.hires_target()
    # webui's sample_hr_pass: 8-bit images of the first model's decode, resized, encoded by the other model
    images = [base.upscalers.resize(to_pil(im), target.upscale_to_x, target.upscale_to_y, "Nearest")
              for im in base.decode(x1).cpu()]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                          for im in images])  # [B, 3, H, W] in [0, 1]
    shape = (4, target.upscale_to_y // 8, target.upscale_to_x // 8)
    encoded = {m: crop_latent(encode_image(m.model, pixels * 2 - 1, base.hires_noise(s).vae(shape)), target)
               for m in (base, other)}
    assert (encoded[base] - encoded[other]).abs().max() > 1e-3  # the encoder's weights matter here
    up, noise = encoded[other], base.hires_noise(s)
    noise.vae(shape)  # the stream as the run leaves it: its VAE draw taken
    hr = s.hires_pass()
    x2 = other.denoise(other.prepare_hires_latents(up, s, noise), other.encode(hr, hires_of=s), hr)
    assert torch.equal(got, other.decode(x2).cpu())


def test_a_copy_of_the_same_weights_gives_the_same_image(base, models):
    """``twin`` is the same file under another name: the same pixels as "Use same checkpoint"; the infotext names
    it, and "Use same checkpoint" (webui's default) writes nothing."""
    same = base(**RUN)[0]
    twin = base(**RUN, hr_checkpoint_name="twin")[0]
    assert same.tobytes() == twin.tobytes()
    h = sha10(models / "twin.safetensors")
    info = twin.info["parameters"]
    assert f"Denoising strength: 0.6, RNG: NV, Hires checkpoint: twin [{h}], Hires upscale: 2, Hires steps: 2, " \
        in info  # webui's order: RNG among create_infotext's own keys, then the hires keys as init sets them
    assert "Hires checkpoint" not in same.info["parameters"]
    assert "Hires checkpoint" not in base(**RUN, hr_checkpoint_name="Use same checkpoint")[0].info["parameters"]
    assert "Hires checkpoint" not in base(**RUN, hr_checkpoint_name="base")[0].info["parameters"]  # itself


def test_the_infotext_reads_back_to_the_same_image(base, models):
    first = base(**RUN, hr_checkpoint_name="other")[0]
    text = first.info["parameters"]
    assert f"Hires checkpoint: other [{sha10(models / 'sub' / 'other.safetensors')}]" in text
    s = base.from_infotext(text)
    assert s.hr_checkpoint_name == f"other [{sha10(models / 'sub' / 'other.safetensors')}]"
    again = base.to_pil(base.generate(s), s)[0]
    assert again.tobytes() == first.tobytes() and again.info["parameters"] == text


def test_an_unknown_checkpoint_is_one_line(base):
    with pytest.raises(SettingsError, match="hr_checkpoint_name.*checkpoint 'nowhere' not found") as e:
        base.settings(**RUN, hr_checkpoint_name="nowhere")
    assert "\n" not in str(e.value)


@pytest.mark.slow  # a CLI subprocess and a server start-up
def test_every_door_gives_the_same_bytes(models, tmp_path):
    """``--hires-checkpoint`` (CLI), ``hr_checkpoint_name`` (``pipe(...)``, the server driven by ``webuiapi``, a
    batch line): the same PNG, whose infotext names the checkpoint as webui does."""
    import base64
    import json
    import os
    import subprocess
    import sys

    import webuiapi
    from _serve_server import Server

    from tritonsd.tools.cli import main as cli_main

    model = ["--checkpoint", str(models / "base.safetensors"), "--text-heads", "2"]
    proc = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "generate", *model, "--prompt", RUN["prompt"],
                           "--negative-prompt", RUN["negative_prompt"], "--seed", str(RUN["seed"]), "--sampler",
                           "euler", "--steps", "2", "--cfg", "7", "--width", "64", "--height", "64",
                           "--denoising-strength", "0.6", "--hires-steps", "2", "--hr-checkpoint", "other", "--out",
                           str(tmp_path / "cli"), "--quiet"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    cli = Path(proc.stdout.split()[0]).read_bytes()

    pipe = tritonsd.load(models / "base.safetensors", text_heads=2)
    [python] = [p.read_bytes() for p in pipe.save(pipe(**RUN, hr_checkpoint_name="other"), tmp_path / "py")]

    job = {"id": "hr", "prompt": RUN["prompt"], "negative_prompt": RUN["negative_prompt"], "seed": RUN["seed"],
           "sampler_name": "Euler", "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "enable_hr": True,
           "denoising_strength": 0.6, "hr_second_pass_steps": 2, "hr_checkpoint_name": "other"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    assert cli_main(["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "batch"), *model,
                     "--models-dir", str(models)]) == 0
    batch = (tmp_path / "batch" / "hr.png").read_bytes()

    s = Server([*model, "--models-dir", str(models)], tmp_path / "server.log")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port)
        r = api.txt2img(prompt=RUN["prompt"], negative_prompt=RUN["negative_prompt"], seed=RUN["seed"],
                        sampler_name="Euler", steps=2, cfg_scale=7, width=64, height=64, enable_hr=True,
                        denoising_strength=0.6, hr_scale=2, hr_second_pass_steps=2, hr_checkpoint_name="other")
        assert r.info["ignored_fields"] == []
        server = base64.b64decode(r.json["images"][0])
        missing = api.session.post(f"{s.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                       "steps": 1, "enable_hr": True,
                                                                       "hr_checkpoint_name": "nowhere"}, timeout=60)
        assert missing.status_code == 404 and "nowhere" in missing.json()["detail"]
    finally:
        s.stop()
    assert cli == python == batch == server
    assert f"Hires checkpoint: other [{sha10(models / 'sub' / 'other.safetensors')}]" in \
        Image.open(tmp_path / "batch" / "hr.png").info["parameters"]
