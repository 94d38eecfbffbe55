"""ControlNet through the real doors: ``tritonsd serve`` on a free loopback port (``tests/_serve_server.py``) driven by
the real ``webuiapi`` client with its ``ControlNetUnit``, the command line, ``pipe(...)`` and a batch line.

The first group checks the doors themselves (routes, units accepted, infotext, 422s). The second runs the
ControlNet network (``tritonsd.model.controlnet``): the same settings give byte-identical PNGs through every door, a unit changes the pixels and a zero weight does not."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import webuiapi
from PIL import Image

from _serve_server import Server
from tritonsd.sampler.control import ControlUnit
from tritonsd.testing.reference import load_reference
from tritonsd.tools.cli import main

pytestmark = pytest.mark.slow

CN = "controlnet-sd1-tiny"
SIZE = dict(width=128, height=64, steps=3, seed=7, cfg_scale=6.0)


@pytest.fixture(scope="module", autouse=True)
def webuiapi_defaults_emptied():
    """webuiapi's txt2img / img2img put the units into their default ``alwayson_scripts={}``, a dict every later
    call shares (in the test modules after this one too, whose servers know no ControlNet): emptied afterwards."""
    yield
    for method in (webuiapi.WebUIApi.txt2img, webuiapi.WebUIApi.img2img):
        for default in method.__defaults__ or ():
            if isinstance(default, dict):
                default.clear()


@pytest.fixture(scope="module")
def cndir(fixtures, tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnet")
    (d / f"{CN}.safetensors").symlink_to(fixtures / f"{CN}.safetensors")
    return d


@pytest.fixture(scope="module")
def canny_image(fixtures) -> Image.Image:
    ref, _ = load_reference(fixtures / f"{CN}.reference.safetensors")
    return Image.fromarray(ref["canny.image"].numpy())


@pytest.fixture(scope="module")
def server(fixtures, cndir, tmp_path_factory):
    s = Server(["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                "--controlnet-dir", str(cndir)], tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


def title(api) -> str:
    (name,) = api.controlnet_model_list()
    return name


# ---------------------------------------------------------------- the doors


def test_routes_answer_as_the_extension(api, fixtures, canny_image):
    assert api.controlnet_version() == 3
    assert title(api).startswith(f"{CN} [") and len(title(api)) == len(CN) + 11
    assert api.controlnet_module_list() == ["none", "canny", "invert"]
    ref, _ = load_reference(fixtures / f"{CN}.reference.safetensors")
    detected = api.controlnet_detect([canny_image], module="canny", processor_res=64, threshold_a=100,
                                     threshold_b=200)
    assert np.array_equal(np.array(detected.image), ref["canny.detected_map"].numpy())


def test_units_from_webuiapi_reach_the_infotext(api, canny_image):
    unit = webuiapi.ControlNetUnit(image=canny_image, module="canny", model=CN, weight=0.8, processor_res=64,
                                   threshold_a=100, threshold_b=200, control_mode=1, guidance_end=0.5)
    r = api.txt2img(prompt="a red circle", controlnet_units=[unit], **SIZE)
    assert r.info["ignored_fields"] == []
    assert (f'ControlNet 0: "Module: canny, Model: {title(api)}, Weight: 0.8, Resize Mode: Resize and Fill, '
            'Processor Res: 64, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 0.5, '
            'Pixel Perfect: False, Control Mode: My prompt is more important"') in r.info["infotexts"][0]


def test_img2img_unit_without_image_and_hires(api, canny_image):
    r = api.img2img(images=[canny_image], prompt="x", controlnet_units=[
        webuiapi.ControlNetUnit(module="invert", model=title(api))], **SIZE)
    assert 'ControlNet 0: "Module: invert' in r.info["infotexts"][0]
    r = api.txt2img(prompt="x", enable_hr=True, hr_scale=1.5, denoising_strength=0.5, controlnet_units=[
        webuiapi.ControlNetUnit(image=canny_image, module="canny", model=CN, hr_option="High res only")],
        width=64, height=64, steps=2, seed=1)
    assert r.image.size == (96, 96) and "ControlNet 0" in r.info["infotexts"][0]


def test_scripts_list_controlnet_and_maps_can_be_left_out(api, canny_image):
    assert api.session.get(f"{api.baseurl}/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    unit = webuiapi.ControlNetUnit(image=canny_image, module="canny", model=CN, processor_res=64)
    sent = unit.to_dict()
    assert len(api.txt2img(prompt="x", controlnet_units=[unit], batch_size=2, **SIZE).images) == 3
    payload = dict(prompt="x", **SIZE)
    for scripts, extra in (({"ControlNet": {"args": [{**sent, "save_detected_map": False}]}}, {}),
                           ({"ControlNet": {"args": [sent]}},
                            {"override_settings": {"control_net_no_detectmap": True}})):
        r = api.session.post(f"{api.baseurl}/txt2img", json={**payload, "alwayson_scripts": scripts, **extra})
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    assert api.get_options()["control_net_no_detectmap"] is False
    api.set_options({"control_net_no_detectmap": True})
    try:
        assert len(api.txt2img(prompt="x", controlnet_units=[unit], **SIZE).images) == 1
    finally:
        api.set_options({"control_net_no_detectmap": False})


def test_img2img_unit_without_image_takes_the_init_image_as_sent(api):
    """The extension preprocesses webui's init image before img2img's resize, with img2img's resize mode: a
    256x256 original of 2x2 blocks at 128x64, "Crop and Resize" (1): scaled by 0.5 to cover (area resize: each
    block's value), the middle 64 rows kept -> rows 32..95 of the blocks."""
    small = np.random.RandomState(4).randint(0, 256, size=(128, 128, 3)).astype(np.uint8)
    original = Image.fromarray(np.repeat(np.repeat(small, 2, axis=0), 2, axis=1))
    fields = dict(prompt="x", width=128, height=64, resize_mode=1, denoising_strength=0.6, steps=3, seed=7)
    implicit = api.img2img(images=[original], controlnet_units=[
        webuiapi.ControlNetUnit(module="none", model=title(api))], **fields)
    explicit = api.img2img(images=[original], controlnet_units=[
        webuiapi.ControlNetUnit(image=Image.fromarray(small[32:96]), module="none", model=title(api))], **fields)
    assert np.array_equal(np.array(implicit.images[1]), small[32:96])
    assert np.array_equal(np.array(implicit.image), np.array(explicit.image))
    plain = api.img2img(images=[original], alwayson_scripts={}, **fields)  # webuiapi's default dict keeps units
    assert len(plain.images) == 1 and not np.array_equal(np.array(plain.image), np.array(implicit.image))


def test_bad_units_are_422_through_webuiapi(api, canny_image):
    for unit, message in ((webuiapi.ControlNetUnit(image=canny_image, module="depth", model=CN), "unknown module"),
                          (webuiapi.ControlNetUnit(image=canny_image, model="nosuch"), "unknown ControlNet model"),
                          (webuiapi.ControlNetUnit(image=canny_image, model=CN, guidance_start=0.9,
                                                   guidance_end=0.2), "guidance_start <= guidance_end"),
                          (webuiapi.ControlNetUnit(model=CN), "no image")):
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="x", controlnet_units=[unit], **SIZE)
        status, text = e.value.args
        assert status == 422 and message in json.loads(text)["detail"], text


# ---------------------------------------------------------------- one product (needs the network)


@pytest.fixture(scope="module")
def pipe(fixtures):
    import tritonsd

    return tritonsd.load(fixtures / "sd1-tiny.safetensors", text_heads=2)


def pngs_of(images, out) -> list[bytes]:
    from tritonsd.pipeline import Pipeline

    return [p.read_bytes() for p in Pipeline.save(images, out)]


def test_one_product_cli_pipe_webuiapi_batch(api, pipe, fixtures, cndir, canny_image, tmp_path):
    image_path = tmp_path / "canny.png"
    canny_image.save(image_path)
    unit = dict(module="canny", weight=0.7, guidance_start=0.1, guidance_end=0.9, processor_res=64,
                threshold_a=100, threshold_b=200, resize_mode="Crop and Resize")
    want = pngs_of(pipe("a red circle", "blurry", sampler="euler_a",
                        controls=[ControlUnit(model=cndir / f"{CN}.safetensors", image=canny_image, **unit)],
                        **SIZE), tmp_path / "pipe")

    rc = main(["generate", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
               "--prompt", "a red circle", "--negative-prompt", "blurry", "--sampler", "euler_a", "--steps", "3",
               "--seed", "7", "--cfg", "6", "--width", "128", "--height", "64", "--quiet",
               "--out", str(tmp_path / "cli"), "--controlnet-dir", str(cndir), "--control", CN,
               "--control-image", str(image_path), "--control-module", "canny", "--control-weight", "0.7",
               "--control-start", "0.1", "--control-end", "0.9", "--control-res", "64",
               "--control-threshold-a", "100", "--control-threshold-b", "200", "--control-resize", "crop-and-resize"])
    assert rc == 0
    assert [p.read_bytes() for p in sorted((tmp_path / "cli").glob("*.png"))] == want

    r = api.txt2img(prompt="a red circle", negative_prompt="blurry", sampler_name="Euler a", controlnet_units=[
        webuiapi.ControlNetUnit(image=canny_image, model=CN, **unit)], **SIZE)
    images = [base64.b64decode(b) for b in r.json["images"]]
    assert images[:1] == want and len(images) == 2, "the generated image, then the unit's detected map"
    ref, _ = load_reference(fixtures / f"{CN}.reference.safetensors")
    assert np.array_equal(np.array(r.images[1]), ref["canny.detected_map"].numpy())

    from tritonsd.batch import run_batch

    line = {"id": "one", "prompt": "a red circle", "negative_prompt": "blurry", "sampler_name": "Euler a",
            "steps": 3, "seed": 7, "cfg_scale": 6.0, "width": 128, "height": 64,
            "controlnet": [{"model": CN, "image": str(image_path), **unit}]}
    report = run_batch([json.dumps(line)], tmp_path / "batch", pipe=pipe, controlnet_dir=cndir)
    assert not report.errors and (tmp_path / "batch" / "one.png").read_bytes() == want[0]


def test_hires_fix_with_a_unit_webuiapi_equals_the_cli(api, fixtures, cndir, canny_image, tmp_path):
    image_path = tmp_path / "canny.png"
    canny_image.save(image_path)
    r = api.txt2img(prompt="a red circle", sampler_name="Euler a", enable_hr=True, hr_scale=1.5,
                    hr_upscaler="Latent", denoising_strength=0.55, controlnet_units=[
                        webuiapi.ControlNetUnit(image=canny_image, module="canny", model=CN, processor_res=64,
                                                threshold_a=100, threshold_b=200, resize_mode="Crop and Resize",
                                                hr_option="Low res only"),
                        webuiapi.ControlNetUnit(image=canny_image, module="invert", model=CN, weight=0.6,
                                                resize_mode="Just Resize", hr_option="High res only")],
                    **{**SIZE, "width": 64, "height": 64})
    rc = main(["generate", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
               "--prompt", "a red circle", "--sampler", "euler_a", "--steps", "3", "--seed", "7", "--cfg", "6",
               "--width", "64", "--height", "64", "--hires", "--hires-scale", "1.5", "--strength", "0.55",
               "--quiet", "--out", str(tmp_path / "cli"), "--controlnet-dir", str(cndir),
               "--control", CN, "--control-image", str(image_path), "--control-module", "canny",
               "--control-res", "64", "--control-resize", "crop-and-resize", "--control-hr-option", "low",
               "--control", CN, "--control-image", str(image_path), "--control-module", "invert",
               "--control-weight", "0.6", "--control-resize", "just-resize", "--control-hr-option", "high"])
    assert rc == 0
    (png,) = sorted((tmp_path / "cli").glob("*.png"))
    images = [base64.b64decode(b) for b in r.json["images"]]
    served, saved = Image.open(io.BytesIO(images[0])), Image.open(png)
    assert served.info["parameters"] == saved.info["parameters"]
    assert np.array_equal(np.array(served), np.array(saved))
    assert images[0] == png.read_bytes() and r.image.size == (96, 96)
    assert [Image.open(io.BytesIO(b)).size for b in images[1:]] == [(96, 96), (64, 64)] * 2, \
        "per unit: the hires pass's map, then the first pass's"


def test_pipe_finds_units_by_title_in_its_controlnet_dir(api, pipe, fixtures, cndir, canny_image):
    """``tritonsd.load(..., controlnet_dir=...)``: a unit names its model as the server lists it."""
    import tritonsd
    from tritonsd.sampler.settings import SettingsError

    named = tritonsd.load(fixtures / "sd1-tiny.safetensors", text_heads=2, controlnet_dir=cndir)
    unit = dict(image=canny_image, module="canny", processor_res=64)
    (a,) = named("a red circle", sampler="euler_a", controls=[ControlUnit(model=title(api), **unit)], **SIZE)
    (b,) = pipe("a red circle", sampler="euler_a", controls=[ControlUnit(model=cndir / f"{CN}.safetensors", **unit)],
                **SIZE)
    assert np.array_equal(np.array(a), np.array(b)) and a.info["parameters"] == b.info["parameters"]
    with pytest.raises(SettingsError, match="unknown ControlNet model 'nosuch'"):
        named.settings(prompt="x", controls=[ControlUnit(model="nosuch", image=canny_image)])


def test_a_unit_controls_and_weight_zero_does_not(pipe, cndir, canny_image):
    def pixels(*units):
        (image,) = pipe("a red circle", sampler="euler_a", controls=list(units), **SIZE)
        return np.array(image)

    plain = pixels()
    unit = ControlUnit(model=cndir / f"{CN}.safetensors", image=canny_image, module="canny", processor_res=64)
    assert not np.array_equal(pixels(unit), plain)
    assert np.array_equal(pixels(dataclasses.replace(unit, weight=0.0)), plain)


def test_from_png_with_its_control_image_gives_the_same_png(pipe, fixtures, cndir, canny_image, tmp_path):
    image_path = tmp_path / "canny.png"
    canny_image.save(image_path)
    (first,) = pngs_of(pipe("a red circle", sampler="euler_a", controls=[ControlUnit(
        model=cndir / f"{CN}.safetensors", image=canny_image, module="canny", processor_res=64, weight=0.9,
        control_mode="prompt")], **SIZE), tmp_path / "first")
    (tmp_path / "first.png").write_bytes(first)
    rc = main(["generate", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", "--quiet",
               "--from-png", str(tmp_path / "first.png"), "--control-image", str(image_path),
               "--controlnet-dir", str(cndir), "--out", str(tmp_path / "again")])
    assert rc == 0 and [p.read_bytes() for p in (tmp_path / "again").glob("*.png")] == [first]
