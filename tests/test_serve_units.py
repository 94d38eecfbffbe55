"""The server's parts without a server: base64 / image decoding under limits, A1111's img2img geometry and mask
blur, which request fields count as ignored, the memory check and the command line's usage errors."""

from __future__ import annotations

import base64
import io
import math

import pytest
from PIL import Image

try:
    import fastapi  # noqa: F401
except ModuleNotFoundError:  # the server's parts need the serve extra (in the test extra)
    pytest.fail("fastapi is not installed: pip install -e '.[test]'", pytrace=False)

from tritonsd.sampler import inpaint  # noqa: E402
from tritonsd.serve import images, limits  # noqa: E402
from tritonsd.serve.errors import ApiError, TooLarge  # noqa: E402
from tritonsd.serve.schema import Txt2ImgRequest, TXT2IMG_FIELDS, ignored_fields, unsupported_fields  # noqa: E402
from tritonsd.tools.cli import main  # noqa: E402


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_base64_forms_decode_to_the_same_bytes():
    data = png(Image.new("RGB", (8, 8), (1, 2, 3)))
    raw = base64.b64encode(data).decode()
    forms = [raw, "data:image/png;base64," + raw, raw.rstrip("="), base64.urlsafe_b64encode(data).decode(),
             "\n".join(raw[i:i + 76] for i in range(0, len(raw), 76))]
    assert all(images.b64_bytes("x", f) == data for f in forms)


@pytest.mark.parametrize("text", ["", "!!!", "data:image/png,abc", "YQ=x", 5, None, "a"])
def test_bad_base64_is_a_422(text):
    with pytest.raises(ApiError) as e:
        images.decode_image("init_images[0]", text)
    assert e.value.status == 422 and "init_images[0]" in e.value.detail


def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    data = png(Image.new("L", (300, 300)))
    with pytest.raises(TooLarge) as e:
        images.decode_image("mask", base64.b64encode(data).decode(), max_pixels=300 * 299)
    assert e.value.status == 413 and "300x300" in e.value.detail


def test_png_bytes_carry_the_infotext():
    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = "a cat\nSteps: 3"
    with Image.open(io.BytesIO(images.png_bytes(image))) as back:
        assert back.info["parameters"] == "a cat\nSteps: 3"


def test_expand_crop_region_to_the_output_aspect():
    # a 20x10 box in a 64x64 image for a square output grows to 20x20, centred vertically
    assert inpaint.expand_crop_region((10, 20, 30, 30), 64, 64, 64, 64) == (10, 15, 30, 35)
    # at the bottom edge it is pushed back inside
    assert inpaint.expand_crop_region((10, 58, 30, 64), 64, 64, 64, 64) == (10, 44, 30, 64)
    # a tall box for a wide output grows sideways
    assert inpaint.expand_crop_region((30, 0, 34, 16), 128, 64, 64, 64) == (16, 0, 48, 16)  # 16 high x 2 = 32 wide


def test_crop_region_pads_and_clips():
    mask = Image.new("L", (64, 64))
    mask.paste(255, (5, 40, 20, 50))
    assert inpaint.crop_region(mask, 8) == (0, 32, 28, 58)
    assert inpaint.crop_region(Image.new("L", (8, 8)), 4) is None


def test_mask_blur_is_opencvs_gaussian():
    """One white pixel blurred along x with sigma 1: OpenCV's kernel is 2*int(2.5+0.5)+1 = 7 taps of
    exp(-d^2 / 2), normalised."""
    mask = Image.new("L", (15, 3))
    mask.putpixel((7, 1), 255)
    row = list(inpaint.blur_mask(mask, 1, 0).tobytes())[15:30]
    taps = [math.exp(-d * d / 2) for d in range(-3, 4)]
    want = [round(255 * t / sum(taps)) for t in taps]
    assert row[4:11] == want and sum(row[:4]) == 0 and sum(row[11:]) == 0


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_resize_modes_give_the_requested_size(mode):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    out = inpaint.resize_image(mode, image, 32, 32)
    assert out.size == (32, 32)
    if mode == 2:  # resize and fill: no black bands left
        assert out.getpixel((16, 0)) != (0, 0, 0)
    if mode == 0:
        assert out.getpixel((16, 0)) == (200, 10, 10)


def test_paste_back_keeps_pixels_outside_the_mask():
    init = Image.new("RGB", (32, 32), (10, 20, 30))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (12, 12, 20, 20))
    prepared = inpaint.prepare(init, mask, 32, 32, blur_x=0, blur_y=0, full_res=False)
    result = Image.new("RGB", (32, 32), (250, 250, 250))
    out = inpaint.paste_back(result, prepared)
    assert out.getpixel((2, 2)) == (10, 20, 30) and out.getpixel((16, 16)) == (250, 250, 250)


def test_unsupported_fields_are_the_ones_that_would_change_a1111s_result():
    neutral = Txt2ImgRequest(restore_faces=False, s_noise=1.0, styles=[], alwayson_scripts={}, tiling=None,
                             hr_scale=4, s_tmax=0, seed_resize_from_h=0, comments={"a": 1}, script_args=[1])
    assert unsupported_fields(neutral, TXT2IMG_FIELDS) == [] and ignored_fields(neutral, TXT2IMG_FIELDS) == []
    req = Txt2ImgRequest(restore_faces=True, styles=["x"], s_churn=0.5, my_own_field=3, script_name="xyz",
                         alwayson_scripts={"ADetailer": {"args": [True]}, "empty": {}})
    assert unsupported_fields(req, TXT2IMG_FIELDS) == ["alwayson_scripts.ADetailer", "restore_faces", "s_churn",
                                                       "script_name", "styles"]
    assert ignored_fields(req, TXT2IMG_FIELDS) == ["my_own_field"]  # unknown keys: A1111 drops them too


def test_memory_check_refuses_what_cannot_fit():
    with pytest.raises(TooLarge):
        limits.check_memory(64, 8192, 8192, "cpu", 4)
    with pytest.raises(TooLarge):
        limits.check_memory(1, 16384, 64, "cpu", 4)
    limits.check_memory(1, 64, 64, "cpu", 4)


@pytest.mark.parametrize("argv, message", [
    (["--api-auth", "nopassword"], "--api-auth takes USER:PASS"),
    (["--models-dir", "/nonexistent/models"], "is not a directory"),
    (["--port", "70000"], "--port must be"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(["serve", "--checkpoint", "demo:sd1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritonsd serve: error:") and message in err and "Traceback" not in err


def test_open_host_without_auth_warns_and_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["serve", "--checkpoint", str(missing), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without --api-auth" in err
    assert err.strip().splitlines()[-1].startswith("tritonsd serve: error:") and "Traceback" not in err
