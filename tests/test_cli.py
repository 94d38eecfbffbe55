"""The ``tritonsd`` command line as a user runs it: subprocesses of ``python -m tritonsd.tools.cli``.

Every run is started at once when the module's first test asks for one (they are independent), a few at a time,
so the file costs about as much wall time as its longest runs; tiny fixture models at 64-128 px, 3-4 steps.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from a1111 import parse_infotext

pytestmark = pytest.mark.slow  # every test is a `tritonsd` subprocess

CLI = [sys.executable, "-m", "tritonsd.tools.cli"]
# Tiny tensors: one thread per process is as fast and lets the runs overlap without oversubscribing the cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HAS_CUDA = torch.cuda.is_available()


def sha256_10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def tiny_args(fixtures: Path, name: str = "sd1-tiny") -> list[str]:
    return ["--checkpoint", str(fixtures / f"{name}.safetensors"), "--config", str(fixtures / f"{name}.yaml"),
            "--text-heads", "2"]


LONG_PROMPT = " ".join(["cat"] * 75) + " dog horse"  # "cat", "dog", "horse": one CLIP token each


# ------------------------------------------------------------------------------------------------ inputs


def write_gradient(path: Path, width: int, height: int) -> Path:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(path)
    return path


def write_mask(path: Path, width: int, height: int) -> Path:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    Image.fromarray(mask, mode="L").save(path)
    return path


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (an 8-bit grey image) with no pixel data behind it: what a
    decompression bomb looks like before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def write_nan_checkpoint(fixtures: Path, path: Path) -> Path:
    """sd1-tiny with a NaN bias in the VAE decoder's last convolution: every decoded pixel is NaN."""
    weights = load_file(fixtures / "sd1-tiny.safetensors")
    weights["first_stage_model.decoder.conv_out.bias"] = torch.full_like(
        weights["first_stage_model.decoder.conv_out.bias"], float("nan"))
    save_file(weights, path)
    return path


# ------------------------------------------------------------------------------------------------ the runs


def plan_runs(fixtures: Path, tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (arguments, output directory). Output directories are created by the runs (or not at all)."""
    init = write_gradient(tmp / "init-128x64.png", 128, 64)
    init64 = write_gradient(tmp / "init-64.png", 64, 64)
    mask = write_mask(tmp / "mask-64.png", 64, 64)
    mask_small = write_mask(tmp / "mask-32.png", 32, 32)
    not_image = tmp / "not-an-image.png"
    not_image.write_text("this is not a PNG")
    junk = tmp / "junk.safetensors"
    junk.write_bytes(b"\x00" * 1000)
    a_file = tmp / "a-file"
    a_file.write_text("")
    bomb = write_png_header(tmp / "bomb.png", 30000, 30000)
    cmyk = tmp / "cmyk.jpg"
    Image.open(write_gradient(tmp / "rgb-64.png", 64, 64)).convert("CMYK").save(cmyk)
    palette = tmp / "palette.png"
    Image.open(write_gradient(tmp / "rgb2-64.png", 64, 64)).convert("P").save(palette, transparency=0)
    mask16 = tmp / "mask16.png"
    Image.fromarray(np.asarray(Image.open(write_mask(tmp / "m8.png", 64, 64))).astype(np.uint16) * 257).save(mask16)
    preexisting = tmp / "out-again"
    preexisting.mkdir()
    (preexisting / "00041-123.png").write_bytes(b"not ours")

    sd1 = tiny_args(fixtures)
    small = ["--width", "64", "--height", "64", "--steps", "3"]
    base = [*sd1, "--prompt", "a red circle", *small]
    runs = {
        "txt2img": [*sd1, "--prompt", "a red circle above a blue square", "--negative-prompt", "blurry",
                    "--cfg", "5.5", "--seed", "7", "--batch", "2", *small],
        "again": [*sd1, "--prompt", "a red circle above a blue square", "--negative-prompt", "blurry",
                  "--cfg", "5.5", "--seed", "7", "--batch", "2", *small],
        "img2img": [*sd1, "--prompt", LONG_PROMPT, "--init-image", str(init), "--strength", "0.6",
                    "--sampler", "ddim", "--steps", "4", "--seed", "3"],
        "inpaint": [*tiny_args(fixtures, "sd1-inpaint-tiny"), "--prompt", "", "--init-image", str(init64),
                    "--mask", str(mask), "--steps", "3", "--sampler", "euler_a"],
        "nan": ["--checkpoint", str(write_nan_checkpoint(fixtures, tmp / "nan.safetensors")),
                "--config", str(fixtures / "sd1-tiny.yaml"), "--text-heads", "2", "--prompt", "x", *small],
        "missing_checkpoint": ["--checkpoint", str(tmp / "nope.safetensors"), "--prompt", "x", *small],
        "junk_checkpoint": ["--checkpoint", str(junk), "--prompt", "x", *small],
        "width_not_8": [*sd1, "--prompt", "x", "--width", "100", "--height", "64"],
        "steps_0": [*sd1, "--prompt", "x", "--steps", "0"],
        "odd_size": [*sd1, "--prompt", "x", "--width", "72", "--height", "56", "--steps", "2", "--seed", "5"],
        # a mask on a 4-channel model inpaints as A1111 does, --strength included (test_inpaint_a1111.py)
        "mask_blur_without_mask": [*base, "--init-image", str(init64), "--mask-blur", "4"],
        "mask_blur_range": [*base, "--init-image", str(init64), "--mask", str(mask), "--mask-blur", "100"],
        "strength_range": [*base, "--init-image", str(init64), "--strength", "1.5"],
        "mask_without_init": [*base, "--mask", str(mask)],
        "init_not_image": [*base, "--init-image", str(not_image)],
        "init_missing": [*base, "--init-image", str(tmp / "nope.png")],
        "init_size_mismatch": [*sd1, "--prompt", "x", "--init-image", str(init), "--width", "64"],
        "mask_size_mismatch": [*tiny_args(fixtures, "sd1-inpaint-tiny"), "--prompt", "x",
                               "--init-image", str(init64), "--mask", str(mask_small)],
        # A junk checkpoint proves these are checked before the model is read.
        "cuda_missing": ["--checkpoint", str(junk), "--prompt", "x", *small, "--device", "cuda"],
        "fp16_on_cpu": ["--checkpoint", str(junk), "--prompt", "x", *small, "--device", "cpu", "--dtype", "fp16"],
        "out_is_file": ["--checkpoint", str(junk), "--prompt", "x", *small, "--out", str(a_file)],
        "out_under_file": ["--checkpoint", str(junk), "--prompt", "x", *small, "--out", str(a_file / "sub")],
        "no_prompt": [*sd1, *small],
        "cfg_nan": ["--checkpoint", str(junk), "--prompt", "x", *small, "--cfg", "nan"],
        "huge_size": ["--checkpoint", str(junk), "--prompt", "x", "--width", "8192", "--height", "8192"],
        "init_dev_null": ["--checkpoint", str(junk), "--prompt", "x", "--init-image", "/dev/null"],
        "init_bomb": ["--checkpoint", str(junk), "--prompt", "x", "--init-image", str(bomb)],
        "cmyk_palette_16bit": [*tiny_args(fixtures, "sd1-inpaint-tiny"), "--prompt", "x", "--init-image", str(cmyk),
                               "--mask", str(mask16), "--steps", "2"],
        "palette": [*base, "--init-image", str(palette), "--strength", "0.5"],
        # checked before the model is read (the junk checkpoint would fail otherwise)
        "prompt_too_long": ["--checkpoint", str(junk), "--prompt", "cat " * 1001, *small],
        "prompt_nul": ["--checkpoint", str(junk), "--prompt", "a\x01b\u2028", "--negative-prompt", "x" * 20000, *small],
        "rng_gpu_on_cpu": ["--checkpoint", str(junk), "--prompt", "x", *small, "--rng", "gpu", "--device", "cpu"],
        "bad_infotext_sampler": ["--checkpoint", str(junk), "--infotext", "a cat\nSteps: 3, Sampler: Heun++ 9M, Seed: 1"],
        "infotext": [*sd1, "--infotext", "a (red:1.2) circle, [cat|dog]\nNegative prompt: blurry\nSteps: 3, Sampler: "
                     "Euler a, CFG scale: 6, Seed: 12, Size: 64x72, Clip skip: 2, RNG: CPU, Frobnicate: 7, "
                     "Variation seed strength: lots"],
        "override_infotext": [*sd1, "--infotext", "a circle\nSteps: 3, Sampler: Euler, Seed: 12, Size: 64x64",
                              "--seed", "13", "--steps", "2"],
    }
    planned = {}
    for name, args in runs.items():
        out = {"again": preexisting, "out_is_file": a_file, "out_under_file": a_file / "sub"}.get(name, tmp / name)
        planned[name] = (["generate", *args] if "--out" in args else ["generate", *args, "--out", str(out)], out)
    return planned


class Runs:
    """Starts every planned run at once (a few at a time); ``result(name)`` waits for that one."""

    def __init__(self, planned: dict[str, tuple[list[str], Path]]):
        self.planned = planned
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self.futures = {name: self.pool.submit(tritonsd, *args) for name, (args, _) in planned.items()}

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        return self.futures[name].result(), self.planned[name][1]


def tritonsd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def runs(fixtures, tmp_path_factory):
    r = Runs(plan_runs(fixtures, tmp_path_factory.mktemp("cli")))
    yield r
    r.pool.shutdown(wait=True)


def output_pngs(proc: subprocess.CompletedProcess) -> list[Path]:
    """The paths the run printed on stdout, one line each; every one exists."""
    paths = [Path(line) for line in proc.stdout.splitlines()]
    assert paths and all(p.is_file() for p in paths), proc.stdout
    return paths


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "\r" not in proc.stderr, "a progress bar was drawn although stderr is not a terminal"


def assert_failed_cleanly(proc: subprocess.CompletedProcess, out: Path, code: int, *words: str) -> str:
    """Exit ``code``, exactly one stderr line naming the problem, nothing on stdout, no file in ``out``."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tritonsd generate: error: "), lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    assert proc.stdout == ""
    if out.is_dir():
        assert list(out.iterdir()) == [], f"files left in {out}"
    return lines[0]


# ------------------------------------------------------------------------------------------------ tests


def test_help():
    for args in (["--help"], ["generate", "--help"]):
        proc = tritonsd(*args)
        assert proc.returncode == 0, proc.stderr
        assert "usage: tritonsd" in proc.stdout
    assert "--init-image" in proc.stdout and "--negative-prompt" in proc.stdout


def test_txt2img_writes_pngs_with_infotext(runs, fixtures):
    proc, out = runs.result("txt2img")
    assert_ok(proc)
    paths = output_pngs(proc)
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"]
    assert sorted(out.iterdir()) == paths, "temporary files left behind"
    assert "seed 7" in proc.stderr.splitlines()
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
            info = parse_infotext(im.info["parameters"])
        assert info == {"Prompt": "a red circle above a blue square", "Negative prompt": "blurry", "Steps": "3",
                        "Sampler": "DPM++ 2M", "CFG scale": "5.5", "Seed": str(7 + i), "Size": "64x64",
                        "Model hash": sha256_10(fixtures / "sd1-tiny.safetensors"), "Model": "sd1-tiny",
                        "Schedule type": "Karras", "RNG": "NV"}  # the default source, webui's "NV"
    assert paths[0].read_bytes() != paths[1].read_bytes()


def test_same_seed_gives_identical_png_and_never_overwrites(runs):
    first, _ = runs.result("txt2img")
    proc, out = runs.result("again")
    assert_ok(proc)
    paths = output_pngs(proc)
    assert [p.name for p in paths] == ["00042-7.png", "00043-8.png"]  # after the file already there
    assert (out / "00041-123.png").read_bytes() == b"not ours"
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in output_pngs(first)]


def test_img2img_takes_size_from_init_image_and_keeps_a_long_prompt(runs):
    proc, out = runs.result("img2img")
    assert_ok(proc)
    [path] = output_pngs(proc)
    with Image.open(path) as im:
        assert im.size == (128, 64)
        info = parse_infotext(im.info["parameters"])
    assert (info["Size"], info["Sampler"], info["Steps"], info["Seed"]) == ("128x64", "DDIM", "4", "3")
    assert info["Denoising strength"] == "0.6"
    assert info["Prompt"] == LONG_PROMPT  # the infotext keeps the prompt as given
    assert "warning" not in proc.stderr  # 77 tokens: two chunks, nothing dropped (AUTOMATIC1111's long prompts)


def test_any_multiple_of_8(runs):
    proc, out = runs.result("odd_size")
    assert_ok(proc)
    [path] = output_pngs(proc)
    with Image.open(path) as im:
        assert im.size == (72, 56)


def test_inpainting_with_mask_and_empty_prompt_random_seed(runs):
    proc, out = runs.result("inpaint")
    assert_ok(proc)
    [path] = output_pngs(proc)
    [seed] = [int(m.group(1)) for line in proc.stderr.splitlines() if (m := re.fullmatch(r"seed (\d+)", line))]
    assert path.name == f"00000-{seed}.png"
    with Image.open(path) as im:
        assert im.size == (64, 64)
        info = parse_infotext(im.info["parameters"])
    assert (info["Prompt"], info["Seed"], info["Model"]) == ("", str(seed), "sd1-inpaint-tiny")
    assert info["Sampler"] == "Euler a"  # Karras sigmas are the default for dpmpp_2m only
    assert (info["Denoising strength"], info["Mask blur"]) == ("0.75", "4")  # as A1111 writes every inpainting


@pytest.mark.parametrize("name, code, words", [
    ("missing_checkpoint", 1, ("not found", "nope.safetensors")),
    ("junk_checkpoint", 1, ("junk.safetensors",)),
    ("width_not_8", 2, ("--width", "multiple of 8", "100")),
    ("steps_0", 2, ("--steps",)),
    ("mask_blur_without_mask", 2, ("--mask-blur", "need --mask")),
    ("mask_blur_range", 2, ("--mask-blur", "between 0 and 64")),
    ("strength_range", 2, ("--strength",)),
    ("mask_without_init", 2, ("--mask", "--init-image")),
    ("init_not_image", 1, ("init image", "not-an-image.png")),
    ("init_missing", 1, ("init image", "not found")),
    ("init_size_mismatch", 2, ("--width 64", "128x64")),
    ("mask_size_mismatch", 2, ("--mask", "32x32", "64x64")),
    ("out_is_file", 1, ("a-file", "not a directory")),
    ("out_under_file", 1, ("a-file", "not a directory")),
    ("nan", 1, ("nan",)),
])
def test_bad_input_fails_with_one_line(runs, name, code, words):
    proc, out = runs.result(name)
    assert_failed_cleanly(proc, out, code, *words)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name, code, words", [
    ("cuda_missing", 1, ("cuda", "not available")),
    ("fp16_on_cpu", 2, ("fp16", "cpu")),
])
def test_device_refusals_come_before_loading(runs, name, code, words):
    proc, out = runs.result(name)
    assert_failed_cleanly(proc, out, code, *words)


def test_missing_prompt_is_a_usage_error(runs):
    proc, _ = runs.result("no_prompt")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--prompt" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("name, code, words", [
    ("prompt_too_long", 2, ("--prompt", "1001 tokens", "limit is 1000")),
    ("rng_gpu_on_cpu", 2, ("--rng", "nv")),
    ("bad_infotext_sampler", 2, ("--sampler", "Heun++ 9M")),
])
def test_prompt_and_infotext_refused_before_loading(runs, name, code, words):
    proc, out = runs.result(name)
    line = assert_failed_cleanly(proc, out, code, *words)
    assert len(line) < 300  # a count and a short excerpt, never the prompt itself


def test_control_characters_and_huge_negative_prompt(runs):
    proc, out = runs.result("prompt_nul")
    line = assert_failed_cleanly(proc, out, 2, "--negative-prompt", "20,000 characters")
    assert len(line) < 300


def test_infotext_in_with_unknown_and_malformed_fields(runs):
    """A1111's parameters text: its settings are used, an unknown key is ignored, a malformed value is one
    warning line and left out."""
    proc, _ = runs.result("infotext")
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "Variation seed strength" in warnings[0]
    [path] = output_pngs(proc)
    with Image.open(path) as im:
        info = parse_infotext(im.info["parameters"])
        assert im.size == (64, 72)
    assert (info["Prompt"], info["Negative prompt"], info["Steps"], info["Sampler"], info["CFG scale"]) == \
        ("a (red:1.2) circle, [cat|dog]", "blurry", "3", "Euler a", "6")
    assert (info["Clip skip"], info["RNG"], info["Seed"]) == ("2", "CPU", "12")
    assert "Frobnicate" not in info


def test_flags_override_the_infotext(runs):
    proc, _ = runs.result("override_infotext")
    assert_ok(proc)
    [path] = output_pngs(proc)
    assert path.name.endswith("-13.png")
    with Image.open(path) as im:
        info = parse_infotext(im.info["parameters"])
    assert (info["Seed"], info["Steps"], info["Sampler"]) == ("13", "2", "Euler")


def test_png_round_trip_gives_the_same_png(runs, fixtures, tmp_path):
    """--from-png of a generated image (same checkpoint) writes the same bytes."""
    first, _ = runs.result("infotext")
    [source] = output_pngs(first)
    proc = tritonsd("generate", *tiny_args(fixtures), "--from-png", str(source), "--out", str(tmp_path / "again"))
    assert_ok(proc)
    [again] = output_pngs(proc)
    assert again.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("name, code, words", [
    ("cfg_nan", 2, ("--cfg", "finite")),
    ("huge_size", 2, ("8192x8192", "GiB")),  # at once, before the (junk) checkpoint is read
    ("init_dev_null", 1, ("init image", "not a regular file")),
    ("init_bomb", 1, ("bomb.png", "pixels")),
])
def test_inputs_refused_before_loading(runs, name, code, words):
    proc, out = runs.result(name)
    assert_failed_cleanly(proc, out, code, *words)


@pytest.mark.parametrize("name", ["cmyk_palette_16bit", "palette"])
def test_cmyk_palette_and_16_bit_images_are_converted_quietly(runs, name):
    proc, _ = runs.result(name)
    assert_ok(proc)
    assert proc.stderr.splitlines() == [line for line in proc.stderr.splitlines() if line.startswith("seed ")]
    [path] = output_pngs(proc)
    with Image.open(path) as im:
        assert im.size == (64, 64)
