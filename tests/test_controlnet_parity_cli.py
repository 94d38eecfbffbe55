"""``tritonsd parity`` on the ControlNet references, as a user runs it (a subprocess): the webui reference passes
whole, the original code's ``direct`` / ``demo`` groups pass, a corrupted tensor fails with exit 1 and is named,
and the ControlNet file is found beside the reference (a copy elsewhere without it fails in one line)."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from test_parity_cli import copy_reference, parity, rows_of

pytestmark = pytest.mark.slow  # subprocess runs of the whole command

GROUPS = "direct,demo,demo_guess"  # the canny group's rows come with control/preprocess's canny


def test_webui_reference_passes(fixtures, tmp_path):
    out = tmp_path / "rows.json"
    done = parity(fixtures / "sd1-tiny.safetensors", "--reference",
                  fixtures / "webui-controlnet-sd1-tiny.reference.safetensors", "--json", out)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = rows_of(out)
    assert rows["webui.eps.controlnet_more_important"]["pass"] and rows["webui.guidance.schedule"]["pass"]


def test_original_code_groups_pass(fixtures, tmp_path):
    out = tmp_path / "rows.json"
    done = parity(fixtures / "sd1-tiny.ckpt", "--reference", fixtures / "controlnet-sd1-tiny.reference.safetensors",
                  "--only", "direct", "--json", out)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = rows_of(out)
    assert rows["direct.eps.guess0p8"]["pass"] and rows["controlnet_file.safetensors"]["pass"]
    done = parity(fixtures / "sd1-tiny.ckpt", "--reference", fixtures / "controlnet-sd1-tiny.reference.safetensors",
                  "--only", GROUPS, "--json", out)
    rows = rows_of(out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows["demo.image"]["pass"] and rows["demo_guess.latents"]["pass"] and rows["demo.detected_map"]["pass"]


def test_a_corrupted_tensor_fails_and_the_file_must_be_beside(fixtures, tmp_path):
    name = "webui-controlnet-sd1-tiny"
    tensors = load_file(str(fixtures / f"{name}.reference.safetensors"))
    tensors["webui.eps.balanced"] = tensors["webui.eps.balanced"] * 1.01
    ref = copy_reference(fixtures, name, tmp_path, tensors)
    shutil.copy(fixtures / "sd1-tiny.reference.json", tmp_path)  # the text towers' heads, for the base model
    done = parity(fixtures / "sd1-tiny.safetensors", "--reference", ref)
    assert "controlnet-sd1-tiny.safetensors" in done.stdout and done.returncode == 1
    shutil.copy(fixtures / "controlnet-sd1-tiny.safetensors", tmp_path)
    done = parity(fixtures / "sd1-tiny.safetensors", "--reference", ref)
    assert done.returncode == 1
    assert "FAILED: webui.eps.balanced" in done.stdout and "webui.eps.prompt_more_important" not in \
        done.stdout.split("FAILED:")[1]
