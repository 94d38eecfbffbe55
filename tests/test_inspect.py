"""``tritonsd inspect``: the report against what the fixtures' READMEs say about each file."""

from __future__ import annotations

import json

import pytest
import torch

from tritonsd.tools.cli import main


def _inspect_json(capsys, *args) -> dict:
    assert main(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _alone(fixtures, tmp_path, name: str):
    """The fixture checkpoint linked into tmp_path without its YAML (so none is found beside it)."""
    path = tmp_path / name
    path.symlink_to(fixtures / name)
    return path


def test_sd1_report(fixtures, tmp_path, capsys):
    r = _inspect_json(capsys, _alone(fixtures, tmp_path, "sd1-tiny.safetensors"))
    assert (r["family"], r["inpainting"]) == ("sd1", False)
    assert (r["parameterization"], r["parameterization_source"]) == ("eps", "assumed")
    assert r["weight_dtypes"] == {"float32": 684 + 244 + 36}  # README: float32 weights; key counts per part
    assert r["keys_by_prefix"] == {"model.diffusion_model.": 684, "first_stage_model.": 244,
                                   "cond_stage_model.": 37, "(schedule buffers)": 12}
    # README: 3.22 M / 1.73 M / 1.61 M parameters
    assert {k: round(v / 1e6, 2) for k, v in r["parameters"].items()} == {"unet": 3.22, "vae": 1.73, "text": 1.61}
    assert {reason.split(" ")[0]: g["count"] for reason, g in r["ignored"].items()} == {"position_ids": 1,
                                                                                      "schedule": 12}


def test_sd2_parameterization_given_or_assumed(fixtures, tmp_path, capsys):
    ckpt = _alone(fixtures, tmp_path, "sd2v-tiny.ckpt")
    r = _inspect_json(capsys, ckpt)
    assert (r["family"], r["parameterization"], r["parameterization_source"]) == ("sd2", "eps", "assumed")
    assert r["weight_dtypes"] == {"float16": 684 + 244 + 42}
    r = _inspect_json(capsys, ckpt, "--config", fixtures / "sd2v-tiny.yaml", "--text-heads", "2")
    assert (r["parameterization"], r["parameterization_source"]) == ("v", "yaml")
    assert r["unet"]["num_head_channels"] == 16 and r["unet"]["heads_source"] == "yaml"
    r = _inspect_json(capsys, ckpt, "--parameterization", "v")
    assert (r["parameterization"], r["parameterization_source"]) == ("v", "option")


def test_inpainting_and_sdxl(fixtures, tmp_path, capsys):
    r = _inspect_json(capsys, _alone(fixtures, tmp_path, "sd1-inpaint-tiny.ckpt"))
    assert (r["family"], r["inpainting"], r["unet"]["in_channels"]) == ("sd1", True, 9)
    r = _inspect_json(capsys, _alone(fixtures, tmp_path, "sdxl-tiny.safetensors"))
    assert r["family"] == "sdxl" and r["scale_factor"] == 0.13025 and r["alphas_cumprod"] == "derived"
    assert r["keys_by_prefix"] == {"model.diffusion_model.": 1678, "first_stage_model.": 244,
                                   "conditioner.embedders.0.": 53, "conditioner.embedders.1.": 42}
    # README-sdxl: 7.65 M / 1.73 M / 1.62 M / 1.62 M
    assert [round(v / 1e6, 2) for v in r["parameters"].values()] == [7.65, 1.73, 1.62, 1.62]
    assert r["unet"]["transformer_depth"] == [0, 2, 10] and r["unet"]["transformer_depth_middle"] == 10


def test_text_report(fixtures, tmp_path, capsys):
    assert main(["inspect", str(_alone(fixtures, tmp_path, "sd2v-tiny.safetensors"))]) == 0
    out = capsys.readouterr().out
    assert "sd2" in out and "assumed" in out and "schedule buffers" in out and "float16" in out


def _settings(report: dict) -> dict[str, tuple]:
    return {s["setting"]: (s["value"], s["source"]) for s in report["settings"]}


def test_settings_not_in_the_weights_and_their_sources(fixtures, tmp_path, capsys):
    """The YAML beside the checkpoint is found; each setting says where it came from."""
    ckpt = tmp_path / "sd2v-tiny.ckpt"
    ckpt.symlink_to(fixtures / "sd2v-tiny.ckpt")
    (tmp_path / "sd2v-tiny.yaml").write_text((fixtures / "sd2v-tiny.yaml").read_text())
    r = _inspect_json(capsys, ckpt, "--text-heads", "2")
    assert r["config"] == {"path": str(tmp_path / "sd2v-tiny.yaml"), "source": "found beside the checkpoint"}
    assert _settings(r) == {
        "prediction": ("v", "yaml"), "scale_factor": (0.18215, "yaml"),
        "schedule": ("alphas_cumprod stored in the checkpoint", "file"),
        "unet heads": ("16-channel heads", "yaml"),
        "text heads cond_stage_model.": ("2", "option"), "text layer cond_stage_model.": ("penultimate", "yaml"),
        "vae": ("the checkpoint's (first_stage_model.*)", "file")}

    (tmp_path / "alone").mkdir()
    r = _inspect_json(capsys, _alone(fixtures, tmp_path / "alone", "sdxl-tiny.safetensors"))
    assert r["config"]["path"] is None
    assert _settings(r) == {
        "prediction": ("eps", "assumed"), "scale_factor": (0.13025, "assumed"),
        "schedule": ("linear betas 0.00085 -> 0.012, 1000 steps", "assumed"),
        "unet heads": ("64-channel heads", "assumed"),
        "text heads conditioner.embedders.0.": ("1", "assumed"),
        "text layer conditioner.embedders.0.": ("hidden (index 2)", "assumed"),
        "text heads conditioner.embedders.1.": ("1", "assumed"),
        "text layer conditioner.embedders.1.": ("penultimate", "assumed"),
        "vae": ("the checkpoint's (first_stage_model.*)", "file")}
    assert main(["inspect", str(ckpt), "--text-heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "settings not in the weights" in out and "found beside the checkpoint" in out


def test_yaml_contradicting_the_assumed_heads_is_reported_unknown(fixtures, capsys):
    """sd1-tiny.yaml's FrozenCLIPEmbedder is ViT-L (12 heads, 768 wide): the 32-wide tower's heads are unknown,
    which inspect reports in a row (exit 0) instead of refusing the file (issue 28, point 3)."""
    r = _inspect_json(capsys, fixtures / "sd1-tiny.safetensors")
    assert r["text"]["cond_stage_model."]["heads"] == "unknown"
    problem = r["text_heads_problem"]
    assert problem.startswith("cond_stage_model.: ") and "\n" not in problem
    assert "assumed 1 (width 32 / 64)" in problem and "openai/clip-vit-large-patch14 (12 heads at width 768)" in problem
    assert _settings(r)["text heads cond_stage_model."] == ("unknown", "unknown")


def test_demo_and_external_vae(fixtures, tmp_path, capsys):
    r = _inspect_json(capsys, "demo:sd1")
    assert r["family"] == "sd1" and r["file"].endswith("demo-sd1.json")
    assert {k: round(v / 1e6, 2) for k, v in r["parameters"].items()} == {"unet": 3.22, "vae": 1.73, "text": 1.61}
    assert {s["source"] for s in r["settings"]} == {"builtin", "file"}
    from safetensors.torch import load_file, save_file

    weights = load_file(str(fixtures / "sd1-tiny.safetensors"))
    vae = {k.removeprefix("first_stage_model."): v for k, v in weights.items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "tiny-vae.safetensors"))
    r = _inspect_json(capsys, "demo:sd1", "--vae", tmp_path / "tiny-vae.safetensors")
    assert _settings(r)["vae"] == ("tiny-vae.safetensors", "option")
    vae["encoder.conv_in.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(vae, str(tmp_path / "bad-vae.safetensors"))
    assert main(["inspect", "demo:sd1", "--vae", str(tmp_path / "bad-vae.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritonsd inspect: error: bad-vae.safetensors: the VAE does not fit") and "\n" not in err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 100])
def test_bad_file_is_a_one_line_error(tmp_path, capsys, content):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritonsd inspect: error: junk.ckpt:") and "\n" not in err


# manifest dtype name -> (safetensors dtype name, bytes per element)
_ST_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2), "int64": ("I64", 8),
              "int32": ("I32", 4)}


def write_sparse_safetensors(tensors: dict, path) -> int:
    """A valid .safetensors file with exactly these keys, shapes and dtypes whose data section is a hole
    (a sparse file: full size on paper, next to nothing on disk). Returns the apparent size."""
    header, offset = {}, 0
    for name, info in sorted(tensors.items()):
        st, itemsize = _ST_DTYPES[info["dtype"]]
        numel = 1
        for s in info["shape"]:
            numel *= s
        header[name] = {"dtype": st, "shape": info["shape"], "data_offsets": [offset, offset + numel * itemsize]}
        offset += numel * itemsize
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


@pytest.mark.parametrize("name,family,inpainting", [("sd15", "sd1", False), ("sd15-inpaint", "sd1", True),
                                                    ("sd21-v", "sd2", False), ("sdxl-base", "sdxl", False)])
def test_full_size_released_layout(fixtures, tmp_path, capsys, name, family, inpainting):
    """A full-size file with the released key layout (from manifests/, SDXL with its optional denoiser.sigmas):
    detected as its family, parameters per component as the manifest counts them."""
    manifest = json.loads((fixtures / "manifests" / f"{name}.json").read_text())
    tensors = {**manifest["tensors"], **manifest.get("optional_tensors", {})}
    path = tmp_path / f"{name}.safetensors"
    size = write_sparse_safetensors(tensors, path)
    r = _inspect_json(capsys, path)
    assert (r["family"], r["inpainting"], r["bytes"], r["keys"]) == (family, inpainting, size, len(tensors))
    counts = manifest["element_counts_by_prefix"]
    unet, vae = counts["model.diffusion_model."], counts["first_stage_model."]
    assert (r["parameters"]["unet"], r["parameters"]["vae"]) == (unet, vae)
    # the text towers: everything under their prefixes but position_ids (an int64 arange the loader ignores)
    position_ids = sum(1 for k in manifest["tensors"] if k.endswith("position_ids"))
    text = sum(v for k, v in counts.items() if k.startswith(("cond_stage_model.", "conditioner.")))
    assert sum(v for k, v in r["parameters"].items() if k.startswith("text")) == text - 77 * position_ids
    if family == "sdxl":
        assert r["parameters"]["text1"] == counts["conditioner.embedders.1."]
        assert r["unet"]["transformer_depth"] == [0, 2, 10] and r["unet"]["adm_in_channels"] == 2816
