"""One product on every path: ``tritonsd generate``, ``tritonsd parity`` and ``tritonsd bench e2e`` all run the
Pipeline's stages; the CLI's PNG and ``pipe(...)`` + ``pipe.save`` are byte-identical (txt2img, img2img,
inpainting; euler's default schedule the same from both); the README's Python example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tritonsd.pipeline import Pipeline
from tritonsd.tools import cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGES = ("encode", "prepare_latents", "denoise", "decode")


@pytest.fixture
def recorded(monkeypatch):
    """Every call of a Pipeline stage, in order (the stages themselves still run)."""
    calls: list[str] = []
    for name in STAGES:
        original = getattr(Pipeline, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Pipeline, name, wrapper)
    return calls


def test_generate_runs_the_pipeline_stages(recorded, fixtures, tmp_path):
    rc = cli.main(["generate", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                   "--prompt", "a red circle", "--steps", "2", "--width", "64", "--height", "64", "--seed", "1",
                   "--out", str(tmp_path), "--quiet"])
    assert rc == 0 and recorded == list(STAGES)


def test_parity_runs_the_pipeline_stages(recorded, fixtures, capsys):
    rc = cli.main(["parity", str(fixtures / "sd1-tiny.safetensors"), "--reference",
                   str(fixtures / "sd1-tiny.reference.safetensors"), "--only", "sample,euler_a_cfg7p5,ddim_cfg7p5"])
    assert rc == 0, capsys.readouterr().out[-2000:]
    # sample: encode; each sampler run: prepare_latents, denoise (and decode for its image)
    assert recorded.count("encode") == 1 and recorded.count("denoise") == 2 and recorded.count("prepare_latents") == 2
    assert "decode" in recorded


def test_bench_e2e_runs_the_pipeline_stages(recorded, fixtures, tmp_path):
    from test_bench_e2e import tiny_manifest

    from tritonsd.bench import e2e

    rc = e2e.main(["--device", "cpu", "--model", str(tiny_manifest(fixtures, tmp_path)), "--text-heads", "2",
                   "--size", "64", "--batch", "1", "--steps", "2", "--repeat", "1", "--dtype", "fp32",
                   "--impl", "tritonsd-eager", "--sampler", "euler", "--git-commit", "abc",
                   "--json", str(tmp_path / "e2e.json")])
    assert rc == 0
    per_image = list(STAGES)
    assert recorded[:8] == per_image * 2  # the first image and the timed one
    assert "encode" in recorded[8:]  # unet_forward_ms conditions through encode too


# ---------------------------------------------------------------- the same PNG from the CLI and from Python


PYTHON_SIDE = """
import sys
from PIL import Image
import tritonsd
checkpoint, out, prompt, seed, sampler, steps, size, init, mask = sys.argv[1:10]
pipe = tritonsd.load(checkpoint, text_heads=2)
kwargs = dict(seed=int(seed), sampler=sampler, steps=int(steps))
if size != "-":
    kwargs["width"] = kwargs["height"] = int(size)
if init != "-":
    kwargs["init_image"] = Image.open(init)
if mask != "-":
    kwargs["mask"] = Image.open(mask)
print(*pipe.save(pipe(prompt, **kwargs), out))
"""


def write_picture(path: Path, size: int, mask: bool = False) -> Path:
    y, x = np.mgrid[0:size, 0:size]
    if mask:
        Image.fromarray(((x > size // 3) & (y < 2 * size // 3)).astype(np.uint8) * 255, mode="L").save(path)
    else:
        rgb = np.stack([255 * x / size, 255 * y / size, 96 + 0 * x], axis=-1).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(path)
    return path


@pytest.mark.slow  # a `tritonsd generate` subprocess per mode
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_cli_png_equals_python_png(fixtures, tmp_path, mode):
    name = "sd1-inpaint-tiny" if mode == "inpaint" else "sd1-tiny"
    checkpoint = fixtures / f"{name}.safetensors"
    init = write_picture(tmp_path / "init.png", 64) if mode != "txt2img" else None
    mask = write_picture(tmp_path / "mask.png", 64, mask=True) if mode == "inpaint" else None
    sampler = "euler" if mode == "txt2img" else "euler_a"
    args = ["--checkpoint", str(checkpoint), "--text-heads", "2", "--prompt", "a (red:1.2) circle", "--seed", "5",
            "--sampler", sampler, "--steps", "3", "--out", str(tmp_path / "cli"), "--quiet"]
    if init is None:
        args += ["--width", "64"]
    else:
        args += ["--init-image", str(init)] + (["--mask", str(mask)] if mask else [])
    proc = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "generate", *args], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [cli_png] = [Path(p) for p in proc.stdout.split()]
    proc = subprocess.run([sys.executable, "-c", PYTHON_SIDE, str(checkpoint), str(tmp_path / "py"),
                           "a (red:1.2) circle", "5", sampler, "3", "64" if init is None else "-",
                           str(init or "-"), str(mask or "-")], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [py_png] = [Path(p) for p in proc.stdout.split()]
    assert cli_png.name == py_png.name == "00000-5.png"
    assert cli_png.read_bytes() == py_png.read_bytes()
    if mode == "txt2img":  # euler: its own schedule from both (A1111 v1.10 writes "Schedule type: Automatic")
        with Image.open(cli_png) as im:
            assert "Sampler: Euler, Schedule type: Automatic," in im.info["parameters"]


# ---------------------------------------------------------------- the README


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    return blocks[0]


@pytest.mark.slow  # the README's example in a subprocess
def test_readme_python_example_runs_as_written(fixtures, tmp_path):
    """In a checkout beside ``shared/fixtures``, as the README assumes."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(fixtures.parent)
    proc = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=checkout, capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((checkout / "out").glob("*.png"))
    assert pngs, proc.stdout
    with Image.open(pngs[0]) as im:
        assert "Model: sd1-tiny" in im.info["parameters"]
