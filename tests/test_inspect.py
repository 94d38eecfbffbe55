"""``tritonsd inspect``: the report against what the fixtures' READMEs say about each file."""

from __future__ import annotations

import json

import pytest

from tritonsd.tools.cli import main


def _inspect_json(capsys, *args) -> dict:
    assert main(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sd1_report(fixtures, capsys):
    r = _inspect_json(capsys, fixtures / "sd1-tiny.safetensors")
    assert (r["family"], r["inpainting"]) == ("sd1", False)
    assert (r["parameterization"], r["parameterization_source"]) == ("eps", "assumed")
    assert r["weight_dtypes"] == {"float32": 684 + 244 + 36}  # README: float32 weights; key counts per part
    assert r["keys_by_prefix"] == {"model.diffusion_model.": 684, "first_stage_model.": 244,
                                   "cond_stage_model.": 37, "(schedule buffers)": 12}
    # README: 3.22 M / 1.73 M / 1.61 M parameters
    assert {k: round(v / 1e6, 2) for k, v in r["parameters"].items()} == {"unet": 3.22, "vae": 1.73, "text": 1.61}
    assert {reason.split(" ")[0]: g["count"] for reason, g in r["ignored"].items()} == {"position_ids": 1,
                                                                                      "schedule": 12}


def test_sd2_parameterization_given_or_assumed(fixtures, capsys):
    ckpt = fixtures / "sd2v-tiny.ckpt"
    r = _inspect_json(capsys, ckpt)
    assert (r["family"], r["parameterization"], r["parameterization_source"]) == ("sd2", "eps", "assumed")
    assert r["weight_dtypes"] == {"float16": 684 + 244 + 42}
    r = _inspect_json(capsys, ckpt, "--config", fixtures / "sd2v-tiny.yaml")
    assert (r["parameterization"], r["parameterization_source"]) == ("v", "yaml")
    assert r["unet"]["num_head_channels"] == 16 and r["unet"]["heads_source"] == "yaml"
    r = _inspect_json(capsys, ckpt, "--parameterization", "v")
    assert (r["parameterization"], r["parameterization_source"]) == ("v", "option")


def test_inpainting_and_sdxl(fixtures, capsys):
    r = _inspect_json(capsys, fixtures / "sd1-inpaint-tiny.ckpt")
    assert (r["family"], r["inpainting"], r["unet"]["in_channels"]) == ("sd1", True, 9)
    r = _inspect_json(capsys, fixtures / "sdxl-tiny.safetensors")
    assert r["family"] == "sdxl" and r["scale_factor"] == 0.13025 and r["alphas_cumprod"] == "derived"
    assert r["keys_by_prefix"] == {"model.diffusion_model.": 1678, "first_stage_model.": 244,
                                   "conditioner.embedders.0.": 53, "conditioner.embedders.1.": 42}
    # README-sdxl: 7.65 M / 1.73 M / 1.62 M / 1.62 M
    assert [round(v / 1e6, 2) for v in r["parameters"].values()] == [7.65, 1.73, 1.62, 1.62]
    assert r["unet"]["transformer_depth"] == [0, 2, 10] and r["unet"]["transformer_depth_middle"] == 10


def test_text_report(fixtures, capsys):
    assert main(["inspect", str(fixtures / "sd2v-tiny.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "sd2" in out and "assumed" in out and "schedule buffers" in out and "float16" in out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 100])
def test_bad_file_is_a_one_line_error(tmp_path, capsys, content):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritonsd inspect: error: junk.ckpt:") and "\n" not in err
