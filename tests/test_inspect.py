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
