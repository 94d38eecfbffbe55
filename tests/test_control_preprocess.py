"""ControlNet control maps (``control/preprocess.py``) and unit checking (``sampler/control.py``) against the
fixtures' canny maps and against expectations computed here from the extension's formulas (pixel perfect, the
three resize modes, the module sliders' fallbacks), with OpenCV called directly where a resize is expected."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd.control.preprocess import detect, fit, pixel_perfect_resolution, preprocess
from tritonsd.sampler.control import ControlUnit, ControlUnitError, check_units, sorted_modules
from tritonsd.testing.reference import load_reference


@pytest.fixture(scope="module")
def cref(fixtures):
    ref, _meta = load_reference(fixtures / "controlnet-sd1-tiny.reference.safetensors")
    return ref


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Many colours (the resize is then area / cubic, never nearest or binary)."""
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)


# ---------------------------------------------------------------- the fixtures' canny maps, bit for bit


def test_canny_equals_the_fixture_bit_for_bit(cref):
    image = cref["canny.image"].numpy()
    unit = ControlUnit(model="m", image=image, module="canny", processor_res=64)
    hint = detect(unit, 128, 64)
    assert torch.equal(hint, cref["canny.control"])
    detected = preprocess("canny", image, 64, 100, 200)
    assert np.array_equal(detected, cref["canny.detected_map"].numpy())
    assert np.array_equal(detected[:, :, 0], cref["canny.edges"].numpy())


def test_canny_of_a_gray_image_equals_the_fixture(cref):
    edges = preprocess("canny", cref["canny.gray_image"].numpy(), 64, 100, 200)
    assert np.array_equal(edges[:, :, 0], cref["canny.gray_edges"].numpy())


def test_canny_defaults_are_the_extensions(cref):
    """-1 thresholds are 100 / 200 and -1 resolution is 512: the same map as given explicitly."""
    image = cref["canny.image"].numpy()
    default = detect(ControlUnit(model="m", image=image, module="canny"), 128, 64)
    explicit = detect(ControlUnit(model="m", image=image, module="canny", processor_res=512, threshold_a=100,
                                  threshold_b=200), 128, 64)
    other = detect(ControlUnit(model="m", image=image, module="canny", processor_res=512, threshold_a=20,
                               threshold_b=60), 128, 64)
    assert torch.equal(default, explicit) and not torch.equal(default, other)


def test_canny_resizes_with_pad_before_edges():
    """resize_image_with_pad: short side to the resolution (area when shrinking), edge-padded to multiples of 64,
    Canny, the pad cut off."""
    image = smooth_image(100, 150, seed=3)
    # k = 50 / 100: 50 x 75, padded to 64 x 128
    small = cv2.resize(image, (75, 50), interpolation=cv2.INTER_AREA)
    padded = np.pad(small, [[0, 14], [0, 53], [0, 0]], mode="edge")
    expected = cv2.Canny(padded, 80, 160)[:50, :75]
    got = preprocess("canny", image, 50, 80, 160)
    assert got.shape == (50, 75, 3) and np.array_equal(got[:, :, 1], expected)


def test_invert():
    image = smooth_image(8, 8)
    assert np.array_equal(preprocess("invert", image, 0.5, 0.5, 0.5), 255 - image)


# ---------------------------------------------------------------- pixel perfect


@pytest.mark.parametrize("raw_hw, target_hw, mode, expected", [
    ((200, 300), (512, 512), "Crop and Resize", 512),  # max(2.56, 1.7067) * 200
    ((200, 300), (512, 512), "Resize and Fill", 341),  # min(...) * 200 = 341.33
    ((200, 300), (512, 512), "Just Resize", 512),  # like crop: the larger factor
    ((1, 2), (100, 5), "Resize and Fill", 2),  # min(100, 2.5) * 1 = 2.5: rounded half to even
    ((64, 128), (64, 128), "Crop and Resize", 64),
])
def test_pixel_perfect_resolution(raw_hw, target_hw, mode, expected):
    image = np.zeros((*raw_hw, 3), np.uint8)
    assert pixel_perfect_resolution(image, target_hw[0], target_hw[1], mode) == expected


def test_pixel_perfect_sets_the_processor_resolution(cref):
    """Pixel perfect on a 64 x 128 image for a 64 x 128 target is resolution 64: the fixture's map, whatever
    processor_res says."""
    image = cref["canny.image"].numpy()
    hint = detect(ControlUnit(model="m", image=image, module="canny", processor_res=900, pixel_perfect=True), 128, 64)
    assert torch.equal(hint, cref["canny.control"])


# ---------------------------------------------------------------- resize modes


def test_crop_and_resize_covers_and_crops_the_middle():
    image = smooth_image(64, 128)
    # k = max(32/64, 32/128) = 0.5: 32 x 64, crop columns 16..48
    expected = cv2.resize(image, (64, 32), interpolation=cv2.INTER_AREA)[:, 16:48]
    assert np.array_equal(fit(image, "Crop and Resize", 32, 32), expected)


def test_resize_and_fill_fits_and_fills_with_the_median_border():
    image = smooth_image(64, 128, seed=1)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    color = np.median(border, axis=0).astype(np.uint8)
    expected = np.tile(color[None, None], [64, 64, 1])
    expected[16:48, :] = cv2.resize(image, (64, 32), interpolation=cv2.INTER_AREA)  # k = min(1, 0.5)
    assert np.array_equal(fit(image, "Resize and Fill", 64, 64), expected)


def test_just_resize_stretches():
    image = smooth_image(64, 128, seed=2)
    assert np.array_equal(fit(image, "Just Resize", 24, 40), cv2.resize(image, (40, 24), interpolation=cv2.INTER_AREA))
    big = cv2.resize(image, (256, 160), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(fit(image, "Just Resize", 160, 256), big)


def test_few_colour_maps_resize_by_nearest():
    """A segmentation-like map (3..199 colours) keeps its colours: nearest neighbour."""
    rng = np.random.RandomState(4)
    palette = rng.randint(0, 256, size=(5, 3)).astype(np.uint8)
    image = palette[rng.randint(0, 5, size=(16, 24))]
    got = fit(image, "Just Resize", 40, 56)
    assert np.array_equal(got, cv2.resize(image, (56, 40), interpolation=cv2.INTER_NEAREST))


def test_one_pixel_edges_stay_one_pixel_when_enlarged():
    """A one-pixel binary line enlarged 2x is re-binarised and thinned: still one pixel wide, values 0 / 255."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[10, 4:28] = 255
    got = fit(image, "Just Resize", 64, 64)
    assert set(np.unique(got)) <= {0, 255}
    lit = got[:, 12:52, 0] > 0
    assert (lit.sum(axis=0) == 1).all(), "each column crosses the line once"
    assert abs(int(np.argmax(lit[:, 20])) - 20) <= 1


def test_detect_unit_tensor_at_size_passes_through():
    t = torch.rand(1, 3, 16, 24)
    assert detect(ControlUnit(model="m", image=t), 24, 16) is not None
    assert torch.equal(detect(ControlUnit(model="m", image=t), 24, 16), t)


def test_detect_uses_the_init_image_when_the_unit_has_none():
    image = smooth_image(16, 24)
    init = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    hint = detect(ControlUnit(model="m", module="invert"), 24, 16, init_image=init)
    assert torch.equal(hint, torch.from_numpy(255 - image).permute(2, 0, 1)[None].float() / 255.0)
    with pytest.raises(ControlUnitError, match="no image"):
        detect(ControlUnit(model="m"), 24, 16)


def test_the_init_image_takes_img2img_resize_mode():
    """The extension uses A1111's img2img resize mode for the init image (3, latent upscale, is Just Resize)."""
    image = smooth_image(64, 128, seed=5)
    unit = ControlUnit(model="m", resize_mode="Crop and Resize")
    for mode, name in ((0, "Just Resize"), (2, "Resize and Fill"), (3, "Just Resize"), (None, "Crop and Resize")):
        got = detect(unit, 32, 32, init_image=image, init_resize_mode=mode)
        want = torch.from_numpy(fit(image, name, 32, 32)).permute(2, 0, 1)[None].float() / 255.0
        assert torch.equal(got, want), mode


# ---------------------------------------------------------------- the unit's spellings


def unit(**fields):
    return check_units([ControlUnit(**{"model": "m", **fields})])[0]


@pytest.mark.parametrize("given, expected", [
    (0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"), (3, "Just Resize"),
    ("Inner Fit (Scale to Fit)", "Crop and Resize"), ("Envelope (Outer Fit)", "Resize and Fill"),
    ("Resize and Fill", "Resize and Fill"),
])
def test_resize_mode_spellings(given, expected):
    assert unit(resize_mode=given).resize_mode == expected


@pytest.mark.parametrize("given, expected", [
    (0, "Balanced"), (1, "My prompt is more important"), (2, "ControlNet is more important"),
    ("prompt", "My prompt is more important"), ("ControlNet is more important", "ControlNet is more important"),
])
def test_control_mode_spellings(given, expected):
    assert unit(control_mode=given).control_mode == expected


def test_module_by_label_and_slider_fallbacks():
    u = unit(module="invert (from white bg & black line)")
    assert u.module == "invert"
    # webuiapi's defaults (512, 64, 64) for canny: in range, kept; -1 and out of range: the defaults
    assert (unit(module="canny", processor_res=512, threshold_a=64, threshold_b=64).threshold_a) == 64
    c = unit(module="canny", processor_res=5000, threshold_a=-1, threshold_b=300)
    assert (c.processor_res, c.threshold_a, c.threshold_b) == (512, 100, 200)
    n = unit(module="none", threshold_a=64)
    assert n.threshold_a == 0.5  # the hidden slider of "none" is 0..1, default 0.5
    assert check_units([c]) == (c,), "checking a checked unit changes nothing"


def test_module_list_order():
    assert [m.name for m in sorted_modules()] == ["none", "canny", "invert"]


@pytest.mark.parametrize("fields, message", [
    ({"module": "depth_midas"}, "unknown module 'depth_midas'"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start <= guidance_end"),
    ({"weight": 2.5}, "weight must be within 0..2"),
    ({"resize_mode": 7}, "resize_mode must be one of"),
    ({"control_mode": "loud"}, "control_mode must be one of"),
    ({"hr_option": "Sometimes"}, "hr_option must be one of"),
    ({"model": "None"}, "names no ControlNet model"),
    ({"image": "bm90IGFuIGltYWdl"}, "image is not an image"),
    ({"image": np.zeros((4, 4, 3), np.float32)}, "must be uint8"),
    ({"image": torch.full((1, 3, 4, 4), 2.0)}, "0..1"),
])
def test_bad_units_are_one_line(fields, message):
    with pytest.raises(ControlUnitError, match=message) as e:
        unit(**fields)
    assert "\n" not in str(e.value) and str(e.value).startswith("unit 0: ")


def test_base64_and_pil_images_decode_alike():
    image = smooth_image(12, 20)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    for value in (text, "data:image/png;base64," + text, Image.fromarray(image), image):
        assert np.array_equal(unit(image=value).image, image)
    rgba = np.dstack([image, np.full((12, 20), 0, np.uint8)])
    assert (unit(image=rgba).image == 255).all(), "alpha 0 is white, as the extension's HWC3"


def test_the_original_demos_detected_map(cref):
    """``testing/controlnet_canny.demo_detected_map`` (gradio_canny.py's process) gives both demo runs' maps."""
    from tritonsd.testing.controlnet_canny import demo_detected_map, original_resize_image

    image = cref["canny.image"].numpy()
    for run in ("demo", "demo_guess"):
        got = demo_detected_map(image, 64, 64, 100, 200)
        assert np.array_equal(got, cref[f"{run}.detected_map"].numpy()), run
    # resize_image: short side 100 -> 64 (k = 0.64), 150 * 0.64 = 96 -> 128 (96 / 64 = 1.5 rounds to 2)
    assert original_resize_image(smooth_image(100, 150), 64).shape == (64, 128, 3)


def test_parity_canny_group_needs_no_checkpoint(fixtures, capsys):
    from tritonsd.tools.cli import main

    rc = main(["parity", "--reference", str(fixtures / "controlnet-sd1-tiny.reference.safetensors"), "--only", "canny"])
    out = capsys.readouterr().out
    assert rc == 0 and "canny.gray_edges" in out and "0 failed" in out


def test_a_batch_of_maps_passes_through_at_size():
    maps = torch.rand(2, 3, 16, 24)
    assert torch.equal(detect(ControlUnit(model="m", image=maps), 24, 16), maps)
    with pytest.raises(ControlUnitError, match="batch of 2 control maps"):
        detect(ControlUnit(model="m", image=maps), 32, 16)
