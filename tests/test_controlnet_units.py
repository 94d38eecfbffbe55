"""ControlNet units through every door, without the network: the ControlNet folder as the extension lists it
(``name [hash]`` with webui's old model hash), the infotext written and read back as the extension does, the
command line's ``--control*`` flags, the server's ``alwayson_scripts.controlnet`` units and ``/controlnet/*``
answers, and the batch lines' ``controlnet`` field; errors are one line each."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import shutil

import numpy as np
import torch
import pytest
import webuiapi
from PIL import Image

from tritonsd.batch.jobs import Job, read_jobs
from tritonsd.control.models import find_model, list_models, model_hash, resolve_units
from tritonsd.sampler.control import ControlUnit, ControlUnitError
from tritonsd.sampler.infotext import generation_infotext
from tritonsd.sampler.infotext_parse import generation_settings
from tritonsd.sampler.settings import GenerationSettings, SettingsError, fields_from_infotext
from tritonsd.serve import controlnet as serve_cn
from tritonsd.serve.errors import ApiError
from tritonsd.serve.schema import TXT2IMG_FIELDS, Txt2ImgRequest, unsupported_fields
from tritonsd.testing.reference import load_reference
from tritonsd.tools.cli import main

CN = "controlnet-sd1-tiny"


def legacy_hash(path) -> str:
    """webui's ``sd_models.model_hash``, written out here: sha256 of 0x10000 bytes at 0x100000, 8 hex digits."""
    data = open(path, "rb").read()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.fixture(scope="module")
def cndir(fixtures, tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnet")
    (d / "sub").mkdir()
    (d / f"{CN}.safetensors").symlink_to(fixtures / f"{CN}.safetensors")
    (d / "sub" / "aaa-canny.pth").symlink_to(fixtures / f"{CN}.pth")
    (d / "None.pth").symlink_to(fixtures / f"{CN}.pth")  # the extension never lists a file named None
    (d / "notes.txt").write_text("not a model")
    return d


@pytest.fixture(scope="module")
def canny_png(fixtures, tmp_path_factory):
    ref, _ = load_reference(fixtures / f"{CN}.reference.safetensors")
    path = tmp_path_factory.mktemp("img") / "canny.png"
    Image.fromarray(ref["canny.image"].numpy()).save(path)
    return path


def b64png(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


# ---------------------------------------------------------------- the folder, as the extension lists it


def test_model_list_titles_and_order(fixtures, cndir):
    models = list_models(cndir)
    st, pth = legacy_hash(fixtures / f"{CN}.safetensors"), legacy_hash(fixtures / f"{CN}.pth")
    assert list(models) == [f"aaa-canny [{pth}]", f"{CN} [{st}]"], "sorted by file name, None.pth and .txt left out"
    assert model_hash(fixtures / f"{CN}.safetensors") == st and st != pth


def test_models_found_by_title_name_and_part(cndir):
    title = next(t for t in list_models(cndir) if t.startswith(CN))
    assert find_model(title, cndir).name == f"{CN}.safetensors"
    assert find_model(CN.upper(), cndir).name == f"{CN}.safetensors"
    assert find_model(f"{CN} [00000000]", cndir).name == f"{CN}.safetensors", "a stale hash: found by name"
    assert find_model("canny", cndir).name == "aaa-canny.pth", "the shortest name holding the text"
    with pytest.raises(ControlUnitError, match="unknown ControlNet model 'depth'"):
        find_model("depth", cndir)


def test_server_units_never_take_paths(fixtures, cndir):
    unit = ControlUnit(model=str(fixtures / f"{CN}.pth"))
    assert str(resolve_units([unit], cndir)[0].model).endswith(".pth")
    with pytest.raises(ControlUnitError, match="unknown ControlNet model"):
        resolve_units([unit], cndir, allow_paths=False)


# ---------------------------------------------------------------- the infotext


EXTENSION_TEXT = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: Crop and "
                  "Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.1, Guidance "
                  "End: 0.9, Pixel Perfect: True, Control Mode: My prompt is more important")


def test_infotext_writes_units_as_the_extension(fixtures, cndir):
    image = np.zeros((16, 16, 3), np.uint8)
    units = [ControlUnit(model=cndir / f"{CN}.safetensors", image=image, module="canny", weight=0.8,
                         guidance_start=0.25, control_mode=2, resize_mode=2),
             ControlUnit(model=cndir / "sub" / "aaa-canny.pth", image=image, pixel_perfect=True)]
    s = GenerationSettings(prompt="a cat", seed=3, steps=4, width=64, height=64, controls=units).check()
    text = generation_infotext(s, model="sd1-tiny", model_hash="abc")
    st, pth = legacy_hash(fixtures / f"{CN}.safetensors"), legacy_hash(fixtures / f"{CN}.pth")
    assert (f'ControlNet 0: "Module: canny, Model: {CN} [{st}], Weight: 0.8, Resize Mode: Resize and Fill, '
            'Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.25, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: ControlNet is more important", ControlNet 1: "Module: none, '
            f'Model: aaa-canny [{pth}], Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, '
            'Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True, '
            'Control Mode: Balanced"') in text
    fields, notes = fields_from_infotext(text)
    assert notes == [] and len(fields["controls"]) == 2
    back = resolve_units(fields["controls"], cndir)
    for got, want in zip(back, s.controls):
        assert got.image is None
        assert (got.module, got.weight, got.resize_mode, got.guidance_start, got.guidance_end, got.pixel_perfect,
                got.control_mode, got.threshold_a) == (want.module, want.weight, want.resize_mode,
                                                       want.guidance_start, want.guidance_end, want.pixel_perfect,
                                                       want.control_mode, want.threshold_a)
        assert got.model.resolve() == want.model.resolve()


def test_infotext_reads_the_extensions_text():
    text = f'a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512, ControlNet 0: "{EXTENSION_TEXT}"'
    parsed = generation_settings(text)
    assert parsed["controlnet"] == [{"module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
                                     "weight": 0.8, "resize_mode": "Crop and Resize", "processor_res": 512,
                                     "threshold_a": 100.0, "threshold_b": 200.0, "guidance_start": 0.1,
                                     "guidance_end": 0.9, "pixel_perfect": True,
                                     "control_mode": "My prompt is more important"}]
    assert "ControlNet 0" not in parsed["extra"]


def test_a_malformed_unit_is_a_note():
    parsed = generation_settings('a cat\nSteps: 20, Seed: 1, Size: 64x64, ControlNet 0: "Module canny"')
    assert "controlnet" not in parsed and any("ControlNet 0" in n for n in parsed["notes"])


def test_a_unit_without_an_image_needs_an_init_image():
    with pytest.raises(SettingsError, match="unit 0 has no image"):
        GenerationSettings(prompt="x", controls=[ControlUnit(model="m")]).check()


# ---------------------------------------------------------------- the command line


@pytest.fixture()
def generate(fixtures, tmp_path, capsys):
    def run(*flags) -> tuple[int, str]:
        rc = main(["generate", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                   "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path / "out"), "--quiet",
                   *flags])
        return rc, capsys.readouterr().err.strip()
    return run


def test_cli_bad_control_flags_are_one_line_exit_2(generate, fixtures, canny_png, tmp_path):
    cn = str(fixtures / f"{CN}.safetensors")
    (tmp_path / "not.png").write_text("text")
    cases = [
        (["--prompt", "x", "--control-weight", "0.5"], "--control-weight needs a --control MODEL before it"),
        (["--prompt", "x", "--control", cn, "--control-image", str(canny_png), "--control-module", "depth"],
         "unknown module 'depth'"),
        (["--prompt", "x", "--control", cn, "--control-image", str(canny_png), "--control-start", "0.8",
          "--control-end", "0.2"], "guidance_start <= guidance_end"),
        (["--prompt", "x", "--control", cn, "--control-image", str(tmp_path / "not.png")], "control image"),
        (["--prompt", "x", "--control", "nosuch", "--control-image", str(canny_png)],
         "unknown ControlNet model 'nosuch'"),
        (["--prompt", "x", "--control", cn], "unit 0 has no image"),
        (["--prompt", "x", "--control", cn, "--control-image", str(canny_png), "--control-mode", "loud"],
         "control_mode must be one of"),
        (["--prompt", "x", "--control", cn, "--control-image", str(canny_png), "--control-weight", "3"],
         "weight must be within 0..2"),
        (["--prompt", "x", "--control-image", str(canny_png)], "--control-image needs a --control MODEL"),
    ]
    for flags, message in cases:
        rc, err = generate(*flags)
        assert rc == 2 and message in err and "\n" not in err, (flags, err)
    assert not (tmp_path / "out").exists()


def test_cli_from_png_units_need_their_images(generate, cndir, canny_png, tmp_path):
    text = (f'a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, ControlNet 0: "Module: canny, Model: '
            f'{CN} [00000000], Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, '
            'Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"')
    rc, err = generate("--infotext", text, "--controlnet-dir", str(cndir))
    assert rc == 2 and "the PNG does not hold its control images" in err
    rc, err = generate("--infotext", text, "--control-image", str(canny_png))
    assert rc == 2 and "no --controlnet-dir was given" in err


# ---------------------------------------------------------------- the server's units


def request_units(units, cndir, key="ControlNet"):
    return serve_cn.units_from_request({key: {"args": units}}, cndir)


def test_webuiapi_units_as_sent(cndir, canny_png):
    image = Image.open(canny_png)
    sent = [webuiapi.ControlNetUnit(image=image, module="canny", model=CN, weight=0.7, guidance_start=0.1,
                                    guidance_end=0.6, control_mode=1, pixel_perfect=True,
                                    hr_option="Low res only").to_dict(),
            webuiapi.ControlNetUnit(module="invert (from white bg & black line)", model=CN.upper(),
                                    enabled=False).to_dict(),
            webuiapi.ControlNetUnit(module="none", model=CN, resize_mode="Just Resize", control_mode=2).to_dict()]
    units = request_units(json.loads(json.dumps(sent)), cndir)
    assert len(units) == 2, "the disabled unit is skipped"
    a, b = units
    assert (a.module, a.weight, a.guidance_start, a.guidance_end, a.control_mode, a.pixel_perfect, a.hr_option,
            a.resize_mode, a.processor_res, a.threshold_a, a.threshold_b) == (
        "canny", 0.7, 0.1, 0.6, "My prompt is more important", True, "Low res only", "Resize and Fill", 512, 64.0,
        64.0)
    assert np.array_equal(a.image, np.array(image)) and a.model.name == f"{CN}.safetensors"
    assert b.image is None and b.control_mode == "ControlNet is more important" and b.resize_mode == "Just Resize"
    assert request_units([{"model": CN}], cndir) == (), "no \"enabled\": the extension's default, off"
    assert request_units([{"enabled": True, "model": CN, "input_image": b64png(canny_png)}], cndir,
                         key="controlnet")[0].image is not None


@pytest.mark.parametrize("unit, message", [
    ({"module": "depth_midas"}, "unknown module 'depth_midas'"),
    ({"model": "nosuch"}, "unknown ControlNet model 'nosuch'"),
    ({"model": "None"}, "names no ControlNet model"),
    ({"image": "bm90IGFuIGltYWdl"}, "args[0].image"),
    ({"guidance_start": 0.9, "guidance_end": 0.1}, "guidance_start <= guidance_end"),
    ({"weight": "heavy"}, "weight must be a finite number"),
    ({"resize_mode": 9}, "resize_mode must be one of"),
    ({"advanced_weighting": [1.0] * 13}, "advanced_weighting"),
    ({"image": {"image": "", "mask": "abc"}}, "mask"),
])
def test_bad_server_units_are_422(cndir, unit, message):
    with pytest.raises(ApiError) as e:
        request_units([{"enabled": True, "model": CN, **unit}], cndir)
    assert e.value.status == 422 and message in e.value.detail and "args[0]" in e.value.detail


def test_controlnet_is_not_an_unsupported_script():
    req = Txt2ImgRequest(prompt="x", alwayson_scripts={"ControlNet": {"args": [{"enabled": True}]},
                                                       "ADetailer": {"args": [True]}})
    assert unsupported_fields(req, TXT2IMG_FIELDS) == ["alwayson_scripts.ADetailer"]


def test_detect_and_module_list(fixtures, canny_png):
    ref, _ = load_reference(fixtures / f"{CN}.reference.safetensors")
    out = serve_cn.detect({"controlnet_module": "canny", "controlnet_images": [b64png(canny_png)],
                           "controlnet_processor_res": 64})
    got = np.array(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))))
    assert out["info"] == "Success" and np.array_equal(got, ref["canny.detected_map"].numpy())
    for body, message in (({"controlnet_module": "depth", "controlnet_input_images": ["x"]}, "Module not available"),
                          ({"controlnet_module": "canny"}, "No image selected")):
        with pytest.raises(ApiError, match=message):
            serve_cn.detect(body)
    listed = serve_cn.module_list(alias_names=True)
    assert listed["module_list"] == ["none", "canny", "invert (from white bg & black line)"]
    assert listed["module_detail"]["canny"]["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1,
                                                            "max": 255, "step": 1}


# ---------------------------------------------------------------- batch lines


def test_batch_controlnet_field(cndir, canny_png):
    base = canny_png.parent
    good = {"id": "a", "prompt": "x", "width": 128, "height": 64,
            "controlnet": [{"model": CN, "image": canny_png.name, "module": "canny", "weight": 0.5,
                            "control_mode": 2, "resize_mode": 1}]}
    bad = [({"model": "nosuch", "image": canny_png.name}, "unknown ControlNet model 'nosuch'"),
           ({"model": CN, "image": "missing.png"}, "controlnet[0].image not found: "),
           ({"model": CN, "image": canny_png.name, "module": "depth"}, "unknown module 'depth'"),
           ({"model": CN, "imag": canny_png.name}, "unknown field 'imag'"),
           ({"model": CN}, "has no image")]
    lines = [json.dumps(good), json.dumps({**good, "id": "b"})]
    lines += [json.dumps({"id": f"bad{i}", "prompt": "x", "controlnet": [u]}) for i, (u, _) in enumerate(bad)]
    jobs, rejected = read_jobs(lines, controlnet_dir=cndir, base=base)
    assert [j.id for j in jobs] == ["a", "b"] and jobs[0].group_key() == jobs[1].group_key()
    unit = jobs[0].settings.controls[0]
    assert (unit.module, unit.weight, unit.control_mode, unit.resize_mode) == (
        "canny", 0.5, "ControlNet is more important", "Crop and Resize")
    for r, (_, message) in zip(rejected, bad):
        assert message in r.error and "\n" not in r.error
    again = Job.from_dict(json.loads(json.dumps(jobs[0].to_dict()))).settings.check().controls[0]
    assert again == dataclasses.replace(unit, model=str(unit.model)), "the same unit, its image to the pixel"
    assert again != dataclasses.replace(unit, image=unit.image[::-1].copy())


def test_cli_batch_flag_is_wired(cndir):
    import argparse

    from tritonsd.tools import batch as tool

    p = argparse.ArgumentParser()
    tool.add_parser(p.add_subparsers())
    args = p.parse_args(["batch", "jobs.jsonl", "--checkpoint", "m.safetensors", "--out", "o",
                         "--controlnet-dir", str(cndir)])
    assert args.controlnet_dir == cndir


def test_pipe_from_infotext_rebuilds_the_units(fixtures, cndir, canny_png):
    import tritonsd

    pipe = tritonsd.load(fixtures / "sd1-tiny.safetensors", text_heads=2)
    text = (f'a cat\nSteps: 2, Sampler: Euler, Seed: 5, Size: 128x64, ControlNet 0: "Module: canny, Model: {CN} '
            '[00000000], Weight: 0.6, Resize Mode: Just Resize, Processor Res: 64, Threshold A: 100, Threshold B: '
            '200, Guidance Start: 0.0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced"')
    with pytest.raises(SettingsError, match="give one per unit"):
        pipe.from_infotext(text, controlnet_dir=cndir)
    with pytest.raises(SettingsError, match="unknown ControlNet model"):
        pipe.from_infotext(text, control_images=[Image.open(canny_png)])
    s = pipe.from_infotext(text, controlnet_dir=cndir, control_images=[Image.open(canny_png)])
    (unit,) = s.controls
    assert unit.model.name == f"{CN}.safetensors" and (unit.weight, unit.guidance_end, unit.resize_mode) == (
        0.6, 0.8, "Just Resize")
    assert np.array_equal(unit.image, np.array(Image.open(canny_png)))
    assert pipe.from_infotext(text, controls=()).controls == (), "fields given override the infotext's units"


def test_server_infotext_units_without_units_sent_are_named():
    from tritonsd.serve.schema import infotext_unsupported

    text = f'a cat\nSteps: 20, Seed: 1, Size: 64x64, ControlNet 0: "{EXTENSION_TEXT}"'
    assert infotext_unsupported(Txt2ImgRequest(prompt="", infotext=text)) == ["infotext.ControlNet 0"]
    sent = Txt2ImgRequest(prompt="", infotext=text, alwayson_scripts={"controlnet": {"args": [{"enabled": True}]}})
    assert infotext_unsupported(sent) == []


@pytest.mark.parametrize("option, first, second", [("Both", True, True), ("Low res only", True, False),
                                                   ("High res only", False, True)])
def test_hr_option_picks_the_passes_a_unit_acts_in(option, first, second):
    """The extension's HiResFixOption with hires fix on; without hires fix every unit acts in its one pass."""
    from tritonsd.sampler.control import acts_in_pass

    unit = ControlUnit("m.safetensors", hr_option=option)
    assert acts_in_pass(unit, True, False) is first
    assert acts_in_pass(unit, True, True) is second
    assert acts_in_pass(unit, False, False) is True


# ---------------------------------------------------------------- detected maps in the response (issue 23)


def _b64_array(text: str) -> tuple[np.ndarray, dict]:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    return np.array(image), dict(image.info)


def test_detected_maps_follow_the_extensions_postprocess(fixtures):
    """Each enabled unit's map, unless ``save_detected_map`` is false or the option ``control_net_no_detectmap``
    is set; with hires fix the second pass's map first. Expected maps: the fixture's canny map (the original
    code's), and for module none the extension's ``high_quality_resize`` rule written out (>= 200 colours,
    enlarged: OpenCV's cubic resize)."""
    import cv2

    ref, _ = load_reference(fixtures / f"{CN}.reference.safetensors")
    canny = {"enabled": True, "model": "m", "module": "canny", "processor_res": 64,
             "image": ref["canny.image"].numpy()}
    photo = np.random.RandomState(3).randint(0, 256, size=(32, 64, 3)).astype(np.uint8)
    args = [canny, {"enabled": True, "model": "m", "image": photo, "save_detected_map": False},
            {"enabled": False, "model": "m", "image": photo}, "not a unit"]
    saved = serve_cn.saved_maps({"ControlNet": {"args": args}}, False)
    assert saved == (True, False)
    assert serve_cn.saved_maps({"controlnet": {"args": args}}, True) == (False, False)
    units = [ControlUnit(**{k: v for k, v in a.items() if k not in ("enabled", "save_detected_map")})
             for a in args[:2]]
    s = GenerationSettings(prompt="x", width=128, height=64, controls=units).check()
    (shown,) = serve_cn.detected_maps(s, saved)
    pixels, info = _b64_array(shown)
    assert np.array_equal(pixels, ref["canny.detected_map"].numpy()) and info == {}, "webui's PNG of a map: no text"

    hires = GenerationSettings(prompt="x", width=64, height=32, enable_hr=True, hr_scale=2.0,
                               controls=[ControlUnit(model="m", image=photo)]).check()
    second, first = (_b64_array(x)[0] for x in serve_cn.detected_maps(hires, (True,)))
    assert np.array_equal(first, photo)
    assert np.array_equal(second, cv2.resize(photo, (128, 64), interpolation=cv2.INTER_CUBIC))


def test_a_unit_without_image_preprocesses_the_init_image_as_sent():
    """img2img: the extension takes webui's ``p.init_images[0]`` (before img2img's resize) with img2img's resize
    mode. A 256x256 original made of 2x2 blocks, at 128x64 with "Crop and Resize": scaled by 0.5 to cover
    (area resize of 2x2 blocks: each block's value), then the middle 64 rows -> rows 32..95 of the blocks."""
    from tritonsd.control.preprocess import detect

    small = np.random.RandomState(4).randint(0, 256, size=(128, 128, 3)).astype(np.uint8)
    original = Image.fromarray(np.repeat(np.repeat(small, 2, axis=0), 2, axis=1))  # 256x256
    resized = original.resize((128, 64))  # what img2img's resize would give (any other image would do)
    s = GenerationSettings(prompt="x", init_image=resized, control_init_image=original, resize_mode=1,
                           controls=[ControlUnit(model="m")]).check()
    assert (s.width, s.height) == (128, 64) and s.control_init_image.shape == (256, 256, 3)
    want = torch.from_numpy(small[32:96]).permute(2, 0, 1)[None].float() / 255.0
    init = s.init_image if s.control_init_image is None else s.control_init_image
    assert torch.equal(detect(s.controls[0], 128, 64, init, init_resize_mode=s.resize_mode), want)
    (shown,) = serve_cn.detected_maps(s, (True,))
    assert np.array_equal(_b64_array(shown)[0], small[32:96])
    assert GenerationSettings(prompt="x", init_image=resized, control_init_image=original).check() \
        .control_init_image is None, "kept only while a unit needs it"


def test_only_masked_inpainting_cuts_every_units_image_to_the_masked_region():
    """The extension's ``try_crop_image_with_a1111_mask`` (``inpaint_crop_input_image`` defaults to true): a
    128x128 init image, the mask the square [32, 96) (no blur, no padding), 64x64: the crop region is that square
    (its aspect is the generation's: not expanded) and the "Resize and Fill" to 64x64 keeps it as it is; so each
    map (module none) is the square of its image, the init image's as sent (not inpainting's filled one)."""
    from tritonsd.control.preprocess import detect, sources

    rng = np.random.RandomState(6)
    init, own = (rng.randint(0, 256, size=(128, 128, 3)).astype(np.uint8) for _ in range(2))
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    s = GenerationSettings(prompt="x", init_image=Image.fromarray(init), mask=Image.fromarray(mask), mask_blur=0,
                           inpaint_full_res=True, inpaint_full_res_padding=0, inpainting_fill=0, width=64, height=64,
                           controls=[ControlUnit(model="m"), ControlUnit(model="m", image=own)]).check()
    assert s.inpaint.paste_to == (32, 32, 64, 64)
    for unit, picture in zip(s.controls, (init, own)):
        want = torch.from_numpy(picture[32:96, 32:96].copy()).permute(2, 0, 1)[None].float() / 255.0
        assert torch.equal(detect(unit, 64, 64, **sources(s)), want)
    maps = [_b64_array(x)[0] for x in serve_cn.detected_maps(s, (True, True))]
    assert np.array_equal(maps[0], init[32:96, 32:96]) and np.array_equal(maps[1], own[32:96, 32:96])
