"""The one table of representative shapes (compile/shapes.py): its layouts are the released checkpoints' (as the
key manifests detect), and the levels derived from it are the real models' (values from the models' configs)."""

from __future__ import annotations

import json

import pytest
import torch

from tritonsd.compile import shapes
from tritonsd.formats.keys import normalize_keys
from tritonsd.model.config import detect_config

MANIFESTS = {"sd15": "sd15", "sd21": "sd21-v", "sdxl": "sdxl-base"}


@pytest.mark.parametrize("name", shapes.RELEASED)
def test_table_is_the_released_layout(fixtures, name):
    manifest = json.loads((fixtures / "manifests" / f"{MANIFESTS[name]}.json").read_text())
    state = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["tensors"].items()}
    detected = detect_config(normalize_keys(state))
    model = shapes.released(name)
    assert model.unet == detected.unet and model.vae == detected.vae
    assert [(t.width, t.heads) for t in model.towers] == [(t.width, t.heads) for t in detected.text.values()]


def test_derived_levels():
    sd15, sd21, sdxl = (shapes.released(n) for n in ("sd15", "sd21", "sdxl"))
    assert sd15.levels() == [(320, 64), (640, 32), (1280, 16), (1280, 8)]
    assert sd15.attention_levels() == sd15.levels()  # the innermost level: the middle block's transformer
    assert sd21.levels() == [(320, 96), (640, 48), (1280, 24), (1280, 12)]
    assert sdxl.levels() == [(320, 128), (640, 64), (1280, 32)]
    assert sdxl.attention_levels() == [(640, 64), (1280, 32)]  # no transformer at the outermost level
    assert [sd15.heads(c) for c in (320, 640, 1280)] == [8, 8, 8]
    assert [sd21.heads(c) for c in (320, 640, 1280)] == [5, 10, 20]
    assert (sd15.label, sd21.label, sdxl.label) == ("sd15-512", "sd21-768", "sdxl-1024")
    assert [t.name for t in shapes.text_towers()] == ["clip-l", "openclip-h", "openclip-g"]


def test_unknown_model_is_a_value_error():
    with pytest.raises(ValueError, match="unknown released model 'sd3'"):
        shapes.released("sd3")
