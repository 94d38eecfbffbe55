"""``tritonsd merge``: the merged file keeps the original layout (keys, shapes, dtypes, loadable by plain
safetensors and by us), its merged weights are webui's, it is written atomically, and bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tritonsd.formats.checkpoint import read_checkpoint
from tritonsd.model.load import load_model
from tritonsd.testing.reference import relative_error

pytestmark = pytest.mark.slow  # every test is a `tritonsd merge` subprocess

CLI = [sys.executable, "-m", "tritonsd.tools.cli", "merge"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def layout(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def assert_no_leftovers(folder: Path, keep: set[str]):
    assert {p.name for p in folder.iterdir()} == keep, "no temporary file left behind"


def test_merge_keeps_the_layout_and_matches_webui(fixtures, reference, tmp_path):
    out = tmp_path / "merged.safetensors"
    r = merge(fixtures / "sd1-tiny.safetensors", "--lora", f"{fixtures / 'lora-sd1-tiny.safetensors'}:0.7",
              "--out", out)
    assert r.returncode == 0, r.stderr
    assert "61 of" in r.stdout and r.stderr == ""
    assert layout(out) == layout(fixtures / "sd1-tiny.safetensors")
    merged, original = load_file(str(out)), load_file(str(fixtures / "sd1-tiny.safetensors"))
    ref, _ = reference("lora-sd1-tiny")
    for name, tensor in ref.items():
        key = name[len("merged."):]
        assert relative_error(merged[key], tensor) <= 1e-5, key
    unchanged = [k for k in original if f"merged.{k}" not in ref]
    assert all(torch.equal(merged[k], original[k]) for k in unchanged), "every other tensor is copied bit for bit"
    with safe_open(str(out), "pt") as f:
        assert "lora-sd1-tiny" in f.metadata()["tritonsd.merged_loras"]
    load_model(out, fixtures / "sd1-tiny.yaml", text_heads=2)  # loads with us too
    assert_no_leftovers(tmp_path, {"merged.safetensors"})


def test_merge_from_a_pickle_keeps_its_keys(fixtures, tmp_path):
    out = tmp_path / "from_ckpt.safetensors"
    r = merge(fixtures / "sd1-tiny.ckpt", "--lora", f"{fixtures / 'lora-sd1-tiny.safetensors'}:0.5:1",
              "--out", out)
    assert r.returncode == 0, r.stderr
    raw = read_checkpoint(fixtures / "sd1-tiny.ckpt")
    assert layout(out) == {k: (tuple(v.shape), _st_dtype(v.dtype)) for k, v in raw.items()}


def _st_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.bfloat16: "BF16"}[dtype]


def test_merge_sdxl_matches_webui(fixtures, reference, tmp_path):
    out = tmp_path / "xl.safetensors"
    r = merge(fixtures / "sdxl-tiny.safetensors", "--lora", f"{fixtures / 'lora-sdxl-tiny.safetensors'}:0.7",
              "--out", out)
    assert r.returncode == 0, r.stderr
    assert layout(out) == layout(fixtures / "sdxl-tiny.safetensors")
    merged = load_file(str(out))
    ref, _ = reference("lora-sdxl-tiny")
    # the file stores float16: webui's float32 merge rounded once to the nearest float16 (ties either way)
    for name, tensor in ref.items():
        stored = merged[name[len("merged."):]]
        assert stored.dtype == torch.float16
        gap = (stored.double() - tensor.double()).abs()
        half_ulp = 0.5 * _fp16_spacing(tensor.half())
        assert (gap <= half_ulp * (1 + 1e-6) + 1e-6 * tensor.abs().max().item()).all(), name


def _fp16_spacing(t: torch.Tensor) -> torch.Tensor:
    """Distance from each float16 value to the next one away from zero."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


@pytest.mark.parametrize("case", ["other_family", "truncated", "missing_lora"])
def test_merge_errors_are_one_line_and_write_nothing(fixtures, tmp_path, case):
    lora = {"other_family": fixtures / "lora-sdxl-tiny.safetensors", "missing_lora": tmp_path / "none.safetensors",
            "truncated": tmp_path / "cut.safetensors"}[case]
    if case == "truncated":
        lora.write_bytes((fixtures / "lora-sd1-tiny.safetensors").read_bytes()[:5000])
    out = tmp_path / "merged.safetensors"
    r = merge(fixtures / "sd1-tiny.safetensors", "--lora", f"{lora}:0.7", "--out", out)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritonsd merge: error: "), r.stderr
    assert not out.exists()
    assert_no_leftovers(tmp_path, {"cut.safetensors"} if case == "truncated" else set())


def test_merge_bad_usage(fixtures, tmp_path):
    lora = f"{fixtures / 'lora-sd1-tiny.safetensors'}:0.7"
    r = merge(fixtures / "sd1-tiny.safetensors", "--lora", lora, "--out", tmp_path / "m.ckpt")
    assert r.returncode == 2 and "must be a .safetensors file" in r.stderr
    r = merge(fixtures / "sd1-tiny.safetensors", "--out", tmp_path / "m.safetensors")
    assert r.returncode == 2
    r = merge(fixtures / "sd1-tiny.safetensors", "--lora", lora, "--out", tmp_path / "no" / "m.safetensors")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_merge_warns_about_unmatched_modules(fixtures, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(str(fixtures / "lora-sd1-tiny.safetensors"))
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    partly = tmp_path / "partly.safetensors"
    save_file(tensors, str(partly))
    r = merge(fixtures / "sd1-tiny.safetensors", "--lora", partly, "--out", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr
    assert "warning: LoRA partly: 1 of 62 modules match no weight" in r.stderr
