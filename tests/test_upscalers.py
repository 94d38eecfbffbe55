"""Image upscalers (issue 24): webui v1.10.1's built-in "None" / "Lanczos" / "Nearest" resize rules, and an upscaler
model file through our reader and spandrel, tiled as webui tiles it. The model is a small random Real-ESRGAN
"Compact" net (2x) saved as a ``.pth`` the way Real-ESRGAN releases them (under ``params``); the expected images
come from Pillow and from running the torch module directly, never from ``tritonsd.upscalers``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd.formats.upscaler_file import UpscalerFileError
from tritonsd.upscalers import UnknownUpscalerError, Upscalers, UpscalerModelError, tiles
from tritonsd.upscalers.models import import_spandrel
from tritonsd.upscalers.resize import LANCZOS, NEAREST, resize_image

try:
    import_spandrel()
except UpscalerModelError as e:  # a skipped model test proves nothing: install the extra
    pytest.fail(f"{e} (CI installs it with --no-deps: see .ci/run)", pytrace=False)


def picture(w: int = 64, h: int = 64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 4 % 256, y * 4 % 256, (x * y) % 256], -1).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(0)
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2, act_type="prelu")
    d = tmp_path_factory.mktemp("upscalers")
    torch.save({"params": net.state_dict()}, d / "tiny-2x.pth")
    return d


@pytest.fixture(scope="module")
def net(model_dir):
    """The saved module itself, loaded back without tritonsd."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    module = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2, act_type="prelu")
    module.load_state_dict(torch.load(model_dir / "tiny-2x.pth", weights_only=True)["params"])
    return module.eval()


def apply(net, image: Image.Image) -> np.ndarray:
    """The module on an 8-bit RGB image, as webui feeds models: BGR in [0, 1], out clamped, x255, rounded."""
    bgr = np.asarray(image)[:, :, ::-1].astype(np.float64) / 255
    with torch.no_grad():
        out = net(torch.from_numpy(bgr.copy()).permute(2, 0, 1)[None].float())[0]
    return (255 * out.clamp(0, 1).permute(1, 2, 0).numpy()).round().astype(np.uint8)[:, :, ::-1]


# ---------------------------------------------------------------- built-in upscalers


def test_builtins_follow_webuis_resize_image():
    im = picture(64, 48)
    # "None": one Lanczos resize; "Lanczos" 2x: one resize to the scale, already the size asked
    assert resize_image(im, 100, 75, "None").tobytes() == im.resize((100, 75), LANCZOS).tobytes()
    assert resize_image(im, 128, 96, "Lanczos").tobytes() == im.resize((128, 96), LANCZOS).tobytes()
    assert resize_image(im, 128, 96, "Nearest").tobytes() == im.resize((128, 96), NEAREST).tobytes()
    # 1.5625x: the upscaler's int(64 * s) x int(48 * s), Lanczos to the multiple of 8 below, then to the size
    want = im.resize((100, 75), NEAREST).resize((96, 72), LANCZOS).resize((100, 75), LANCZOS)
    assert resize_image(im, 100, 75, "Nearest").tobytes() == want.tobytes()


def test_upscaler_names_and_unknown_ones(model_dir):
    ups = Upscalers(model_dir)
    assert ups.names() == ["None", "Lanczos", "Nearest", "tiny-2x"]
    with pytest.raises(UnknownUpscalerError, match="is not an upscaler: choose one of None, Lanczos"):
        ups.check("4x-UltraSharp")


# ---------------------------------------------------------------- a model file, tiled as webui


def test_model_file_loads_through_our_reader(model_dir):
    model = Upscalers(model_dir).model("tiny-2x")
    assert (model.architecture, model.scale, model.name) == ("RealESRGAN Compact", 2, "tiny-2x")


def test_where_tiles_do_not_matter_the_result_is_the_whole_images(model_dir, net):
    model = Upscalers(model_dir).model("tiny-2x")
    image = picture()
    whole = apply(net, image)
    like = next(net.parameters())
    assert np.array_equal(np.asarray(model(image, tile=0)), whole)  # no tiling
    assert np.array_equal(np.asarray(model(image, tile=64)), whole)  # one tile, the image itself
    # SwinIR / SCUNet's tiling shrinks a tile bigger than the image to the image
    assert np.array_equal(np.asarray(tiles.tensor_upscale(model.descriptor, image, 192, 8, 2, like)), whole)


def test_a_tile_bigger_than_the_image_is_padded_black_as_webui(model_dir, net):
    """webui's ``split_grid`` moves a tile larger than the image back to end at its edge, so it starts before the
    top-left corner; Pillow fills that part black. The result is the model on that black-padded tile."""
    image = picture()
    padded = Image.new("RGB", (192, 192))
    padded.paste(image, (128, 128))
    want = apply(net, padded)[256:, 256:]
    assert np.array_equal(np.asarray(Upscalers(model_dir).model("tiny-2x")(image)), want)  # ESRGAN_tile 192


@pytest.mark.parametrize("tile", [24, 32])
def test_where_tiles_matter_within_1e3_of_the_whole_image(model_dir, net, tile):
    image = picture()
    whole = apply(net, image).astype(np.float64) / 255
    out = np.asarray(Upscalers(model_dir).model("tiny-2x")(image, tile=tile, overlap=8)).astype(np.float64) / 255
    diff = np.abs(out - whole)
    assert diff.mean() <= 1e-3 and diff.max() <= 1 / 255 + 1e-9  # seams: a level at most


def test_resize_with_a_model_runs_it_until_the_size_is_covered(model_dir):
    """2x model, 64 -> 200: the model twice (256 covers 200), Lanczos to 200 (a multiple of 8), as webui."""
    image = picture()
    ups = Upscalers(model_dir)
    out = ups.resize(image, 200, 200, "tiny-2x")
    model = ups.model("tiny-2x")
    assert out.size == (200, 200)
    assert out.tobytes() == model(model(image)).resize((200, 200), LANCZOS).tobytes()


# ---------------------------------------------------------------- files that are not upscalers: one line


def test_files_that_are_not_upscalers_get_one_line(tmp_path):
    torch.save({"params": {"foo.weight": torch.zeros(3, 3)}}, tmp_path / "weights.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04not a pickle at all")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"params": Evil()}, tmp_path / "evil.pth")
    ups = Upscalers(tmp_path)
    for name, words in (("weights", "not an upscaler model spandrel knows"), ("garbage", "garbage.pth"),
                        ("evil", "refused to load")):
        with pytest.raises(UpscalerFileError) as e:  # UpscalerModelError is one too
            ups.model(name)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hires_with_a_model_upscaler(pipes, model_dir):
    pipe = pipes("sd1-tiny")
    pipe.upscalers = Upscalers(model_dir)
    try:
        s = pipe.settings(prompt="a", seed=3, width=64, height=64, steps=2, sampler="euler", enable_hr=True,
                          hr_upscaler="tiny-2x", hr_second_pass_steps=2)
        first = pipe.generate(s)
        assert first.shape == (1, 3, 128, 128) and torch.equal(first, pipe.generate(s))
        assert pipe.infotext(s).endswith("Hires steps: 2, Hires upscaler: tiny-2x")
    finally:
        pipe.upscalers = Upscalers(None)
