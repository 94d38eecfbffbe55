"""The ways a LoRA is named: ``<lora:...>`` prompt tags as webui parses them, names found in a LoRA folder,
``--lora FILE:W`` arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonsd.lora.apply import LoraSpec, LoraWarning, find_lora, parse_lora_arg, parse_lora_tags
from tritonsd.formats.lora_file import LoraError


@pytest.mark.parametrize("prompt, text, loras", [
    ("a photo of a cat <lora:lora-sd1-tiny:0.7>", "a photo of a cat ", [("lora-sd1-tiny", 0.7, 0.7)]),
    ("<lora:a>x", "x", [("a", 1.0, 1.0)]),
    ("x <lora:a:0.5:1.5> y <lyco:b:-1>", "x  y ", [("a", 0.5, 1.5), ("b", -1.0, -1.0)]),
    ("<lora:a:te=0.25:unet=2>", "", [("a", 0.25, 2.0)]),
    ("<lora:a:0.5:unet=0>", "", [("a", 0.5, 0.0)]),
    ("no tags (here:1.2) <notatag>", "no tags (here:1.2) <notatag>", []),
])
def test_parse_lora_tags(prompt, text, loras):
    assert parse_lora_tags(prompt) == (text, loras)


def test_other_extra_networks_are_removed_with_a_warning():
    with pytest.warns(LoraWarning, match="hypernet"):
        assert parse_lora_tags("a <hypernet:h:1> b <lora:x:2>") == ("a  b ", [("x", 2.0, 2.0)])


@pytest.mark.parametrize("prompt, needle", [("<lora:x:strong>", "not a number"), ("<lora:x:nan>", "finite"),
                                            ("<lora:te=1>", "no LoRA name")])
def test_bad_tags(prompt, needle):
    with pytest.raises(LoraError, match=needle):
        parse_lora_tags(prompt)


def test_find_lora(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "style.safetensors").write_bytes(b"x")
    (tmp_path / "other.pt").write_bytes(b"x")
    assert find_lora("style", tmp_path) == tmp_path / "sub" / "style.safetensors"
    with pytest.raises(LoraError, match=r"unknown LoRA <lora:other>"):
        find_lora("other", tmp_path)
    with pytest.raises(LoraError, match="unknown LoRA <lora:ev\\\\x1bil>"):  # control characters escaped
        find_lora("ev\x1bil", tmp_path)
    (tmp_path / "style.safetensors").write_bytes(b"x")
    with pytest.raises(LoraError, match="ambiguous: 2 files"):
        find_lora("style", tmp_path)
    with pytest.raises(LoraError, match="does not exist"):
        find_lora("style", tmp_path / "nope")


@pytest.mark.parametrize("arg, spec", [
    ("a.safetensors", LoraSpec(Path("a.safetensors"), 1.0, 1.0)),
    ("a.safetensors:0.7", LoraSpec(Path("a.safetensors"), 0.7, 0.7)),
    ("dir/a.safetensors:0.5:-1", LoraSpec(Path("dir/a.safetensors"), 0.5, -1.0)),
    ("c:/x:y.safetensors:0.5", LoraSpec(Path("c:/x:y.safetensors"), 0.5, 0.5)),
])
def test_parse_lora_arg(arg, spec):
    assert parse_lora_arg(arg) == spec


@pytest.mark.parametrize("arg", [":0.5", "a.safetensors:inf"])
def test_bad_lora_arg(arg):
    with pytest.raises(LoraError):
        parse_lora_arg(arg)
