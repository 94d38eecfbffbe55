"""Inpainting as AUTOMATIC1111 v1.10 does it, one implementation for every door (issue 28 point 4).

Expected values are computed here from A1111's formulas (``modules/processing.py`` ``init`` / ``sample`` /
``apply_overlay``, ``modules/masking.py``, ``modules/sd_samplers_cfg_denoiser.py``), not by the code under test:
the OpenCV Gaussian of the mask blur (kernel 2*int(2.5*sigma+0.5)+1, reflect-101 borders, x then y, 8-bit after
each), ``get_crop_region_v2`` / ``expand_crop_region``, the overlay's alpha, ``masking.fill`` (transcribed), the
latent mask (Pillow's default resize, /255, rounded) and the blend ``x * nmask + init_latent * mask``. Then the
CLI, Python and the server get the same request and must give the same bytes, the original kept outside the mask.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from tritonsd.sampler import registry
from tritonsd.sampler.settings import GenerationSettings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
SEED, STEPS = 5, 3


def picture(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(3)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8))


def box_mask(size=(64, 64), box=(20, 24, 36, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# ---------------------------------------------------------------- A1111's formulas, written out here


def opencv_blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """cv2.GaussianBlur along one axis of an 8-bit image, pixel by pixel: taps exp(-d^2 / 2 sigma^2) over
    2*int(2.5 sigma + 0.5) + 1 positions, normalised; BORDER_REFLECT_101; rounded back to 8 bits."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    r = k // 2
    taps = [math.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-r, r + 1)]
    total = sum(taps)
    n = a.shape[axis]
    out = np.zeros(a.shape, dtype=np.float64)
    for i in range(n):
        acc = 0.0
        for j, t in zip(range(i - r, i + r + 1), taps):
            jj = -j if j < 0 else (2 * (n - 1) - j if j >= n else j)  # reflect-101
            acc = acc + t * (a[jj] if axis == 0 else a[:, jj])
        if axis == 0:
            out[i] = acc / total
        else:
            out[:, i] = acc / total
    return np.clip(np.rint(out), 0, 255)


def a1111_blur(mask: Image.Image, bx: int, by: int) -> np.ndarray:
    a = np.asarray(mask, dtype=np.float64)
    if bx > 0:
        a = opencv_blur_axis(a, bx, axis=1)
    if by > 0:
        a = opencv_blur_axis(a, by, axis=0)
    return a.astype(np.uint8)


def get_crop_region_v2(mask: np.ndarray, pad: int):
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def expand_crop_region(crop_region, processing_width, processing_height, image_width, image_height):
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        desired_height_diff = int((x2 - x1) / ratio_processing - (y2 - y1))
        y1 -= desired_height_diff // 2
        y2 += desired_height_diff - desired_height_diff // 2
        if y2 >= image_height:
            diff = y2 - image_height
            y2 -= diff
            y1 -= diff
        if y1 < 0:
            y2 -= y1
            y1 -= y1
        if y2 >= image_height:
            y2 = image_height
    else:
        desired_width_diff = int((y2 - y1) * ratio_processing - (x2 - x1))
        x1 -= desired_width_diff // 2
        x2 += desired_width_diff - desired_width_diff // 2
        if x2 >= image_width:
            diff = x2 - image_width
            x2 -= diff
            x1 -= diff
        if x1 < 0:
            x2 -= x1
            x1 -= x1
        if x2 >= image_width:
            x2 = image_width
    return x1, y1, x2, y2


def masking_fill(image, mask):
    """``masking.fill`` as A1111 v1.10 writes it."""
    image_mod = Image.new('RGBA', (image.width, image.height))
    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert('L')))
    image_masked = image_masked.convert('RGBa')
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert('RGBA')
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def prepared(**kw) -> GenerationSettings:
    fields = dict(prompt="a duck", init_image=picture(), mask=box_mask(), seed=SEED, steps=STEPS)
    return GenerationSettings(**{**fields, **kw}).check()


# ---------------------------------------------------------------- pixels


@pytest.mark.parametrize("blur", [(4, 4), (3, 0), (0, 2), (2, 5)])
def test_mask_blur_is_a1111s_opencv_gaussian_on_both_axes(blur):
    s = prepared(mask_blur=blur, inpainting_fill=1)
    want = a1111_blur(box_mask(), *blur)
    assert np.array_equal(np.asarray(s.inpaint.latent_mask), want)
    # the 9-channel model's mask: torch.round(mask / 255)
    assert torch.equal(s.mask[0, 0], torch.from_numpy((want >= 128).astype(np.float32)))


@pytest.mark.parametrize("size,pad,box", [((32, 32), 4, (20, 24, 36, 40)), ((48, 32), 0, (2, 50, 12, 62)),
                                          ((32, 48), 8, (40, 3, 60, 10))])
def test_only_masked_crops_a1111s_region(size, pad, box):
    s = prepared(mask=box_mask(box=box), inpaint_full_res=True, inpaint_full_res_padding=pad, width=size[0],
                 height=size[1], mask_blur=4)
    blurred = a1111_blur(box_mask(box=box), 4, 4)
    x1, y1, x2, y2 = expand_crop_region(get_crop_region_v2(blurred, pad), size[0], size[1], 64, 64)
    assert s.inpaint.paste_to == (x1, y1, x2 - x1, y2 - y1)
    assert (s.width, s.height) == size and s.init_image.shape[-2:] == (size[1], size[0])
    assert s.inpaint.extra == {"Mask blur": 4, "Inpaint area": "Only masked", "Masked area padding": pad}


def test_fill_is_masking_fill_of_the_processed_mask():
    s = prepared(inpainting_fill=0)
    want = masking_fill(picture(), Image.fromarray(a1111_blur(box_mask(), 4, 4)))
    got = ((s.init_image[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(got, np.asarray(want))
    assert s.inpaint.extra["Masked content"] == "fill"


def test_paste_back_is_apply_overlay():
    """Whole picture: the overlay's alpha is 255 - clip(2 * blurred mask): where it is 255 the original comes
    back exactly, where it is 0 the generated pixel does; between, their alpha blend."""
    from tritonsd.sampler.inpaint import paste_back

    s = prepared(mask_blur=2)
    result = Image.new("RGB", (64, 64), (250, 0, 250))
    out = np.asarray(paste_back(result, s.inpaint), dtype=np.int32)
    alpha = 255 - np.clip(a1111_blur(box_mask(), 2, 2).astype(np.int32) * 2, 0, 255)  # [H, W]
    src, gen = np.asarray(picture(), dtype=np.int32), np.asarray(result, dtype=np.int32)
    assert np.array_equal(out[alpha == 255], src[alpha == 255])
    assert np.array_equal(out[alpha == 0], gen[alpha == 0])
    mid = (alpha > 0) & (alpha < 255)
    blend = (src * alpha[..., None] + gen * (255 - alpha[..., None])) / 255
    assert mid.any() and np.abs(out[mid] - blend[mid]).max() <= 2  # Pillow's 8-bit premultiplied arithmetic


def test_invert_inpaints_what_is_not_masked():
    s = prepared(inpainting_mask_invert=True, mask_blur=0)
    assert np.array_equal(np.asarray(s.inpaint.latent_mask), 255 - np.asarray(box_mask()))
    assert s.inpaint.extra == {"Mask mode": "Inpaint not masked"}


# ---------------------------------------------------------------- latents


def a1111_latmask(mask: Image.Image, h: int, w: int) -> torch.Tensor:
    latmask = np.moveaxis(np.array(mask.convert('RGB').resize((w, h)), dtype=np.float32), 2, 0) / 255
    return torch.from_numpy(np.around(latmask[0]))


@pytest.mark.parametrize("fill", [1, 2, 3])
def test_latent_masking_every_step(pipes, fill):
    pipe = pipes("sd1-tiny")
    s = pipe.settings(prepared(inpainting_fill=fill, sampler="euler", cfg_scale=7.0))
    latents = pipe.prepare_latents(s)
    nmask = a1111_latmask(s.inpaint.latent_mask, 8, 8)
    assert torch.equal(latents.blend.nmask, nmask.expand(4, -1, -1))
    assert torch.equal(latents.blend.mask, 1 - nmask.expand(4, -1, -1))
    keep, repaint = nmask == 0, nmask == 1
    z0 = latents.blend.init_latent
    if fill == 3:  # latent nothing: z0 * mask
        assert torch.all(z0[0][:, repaint] == 0)
    seen = []
    out = pipe.denoise(latents, pipe.encode(s), s, callback=lambda d: seen.append(d["denoised"].clone()))
    assert len(seen) == latents.steps
    for denoised in seen:  # CFGDenoiser's apply_blend: the kept latents are z0's at every step
        assert torch.equal(denoised[0][:, keep], z0[0][:, keep])
    assert torch.equal(out[0][:, keep], z0[0][:, keep])
    assert not torch.equal(out[0][:, repaint], z0[0][:, repaint])


@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_latent_masking_of_the_model_input_for_timestep_samplers(pipes, sampler):
    """DDIM / PLMS (webui's ``CFGDenoiserTimesteps``: ``mask_before_denoising``): every UNet call sees the kept
    latents as the init latent itself (un-noised), the sampler's own latent elsewhere; after the loop the kept
    latents are the init latent's (``sample``'s final blend)."""
    pipe = pipes("sd1-tiny")
    s = pipe.settings(prepared(sampler=sampler, cfg_scale=7.0, strength=0.8, steps=4))
    latents = pipe.prepare_latents(s)
    keep = latents.blend.mask[0] == 1
    repaint = ~keep
    z0 = latents.blend.init_latent
    inputs, inner = [], pipe.unet
    pipe.unet = lambda x, *a, **k: (inputs.append(x.clone()), inner(x, *a, **k))[1]
    try:
        out = pipe.denoise(latents, pipe.encode(s), s)
    finally:
        pipe.unet = inner
    assert len(inputs) >= latents.steps
    for x in inputs:  # [rows, C, h, w]: cond and uncond rows of image 0
        for row in x:
            assert torch.equal(row[:, keep], z0[0][:, keep])
    assert not torch.equal(inputs[0][0][:, repaint], z0[0][:, repaint])  # the noised latent where it repaints
    assert torch.equal(out[0][:, keep], z0[0][:, keep])


def test_blended_timestep_denoiser_leaves_the_samplers_latent_alone():
    """The wrapper blends the model's input only, and returns the eps with no pred_x0 (the sampler derives it
    from its own latent, as webui's timesteps samplers do)."""
    from tritonsd.sampler.inpaint import BlendedTimestepDenoiser, LatentBlend

    mask = torch.zeros(4, 2, 2)
    mask[:, 0] = 1
    blend = LatentBlend(torch.full((1, 4, 2, 2), 5.0), mask, 1 - mask)
    seen = []

    def model(x, t, **kw):
        seen.append(x.clone())
        return x * 2, x * 3

    x = torch.ones(1, 4, 2, 2)
    e_t, pred_x0 = BlendedTimestepDenoiser(model, blend)(x, torch.tensor([10]))
    want = torch.ones(1, 4, 2, 2)
    want[:, :, 0] = 5.0
    assert torch.equal(seen[0], want) and torch.equal(e_t, want * 2) and pred_x0 is None
    assert torch.equal(x, torch.ones(1, 4, 2, 2))


def test_latent_noise_is_the_seeds_unit_noise(pipes):
    from tritonsd.sampler.noise import ImageNoise

    pipe = pipes("sd1-tiny")
    s = pipe.settings(prepared(inpainting_fill=2, sampler="euler"))
    latents = pipe.prepare_latents(s)
    nmask = latents.blend.nmask
    noise = ImageNoise((4, 8, 8), SEED, 1, "nv", None, 0.0, "cpu").start((4, 8, 8))
    assert torch.equal((latents.blend.init_latent * nmask)[0][nmask == 1], (noise * nmask)[0][nmask == 1])


# ---------------------------------------------------------------- infotext


def test_infotext_writes_a1111s_img2img_keys(pipes):
    pipe = pipes("sd1-tiny")
    s = pipe.settings(prepared(inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=8,
                               inpainting_mask_invert=True, strength=0.5, width=32, height=32, sampler="euler"))
    line = pipe.infotext(s).splitlines()[-1]
    # create_infotext: Denoising strength and RNG (nv: webui's "NV") in their own places, then init's keys in the
    # order init adds them
    assert ("Denoising strength: 0.5, RNG: NV, Mask mode: Inpaint not masked, Mask blur: 4, Inpaint area: Only masked, "
            "Masked area padding: 8, Masked content: fill") in line
    assert "Size: 32x32" in line
    uneven = pipe.settings(prepared(mask_blur=(2, 3), sampler="euler"))
    assert "Mask blur" not in pipe.infotext(uneven)  # A1111's mask_blur property is None when x != y


# ---------------------------------------------------------------- every door: the same bytes


REQUEST = dict(prompt="a yellow duck", seed=SEED, steps=STEPS, cfg=7, strength=0.75, blur=4)


def python_door(fixtures, tmp_path):
    import tritonsd

    pipe = tritonsd.load(fixtures / "sd1-tiny.safetensors", text_heads=2)
    images = pipe(REQUEST["prompt"], image=picture(), mask_image=box_mask(), seed=SEED, steps=STEPS, cfg_scale=7,
                  sampler="Euler", strength=0.75, mask_blur=4, inpaint_full_res=False, inpainting_fill=1)
    return pipe.save(images, tmp_path / "py")[0]


def cli_door(fixtures, tmp_path, init, mask):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "generate", "--checkpoint",
                           str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", "--device", "cpu",
                           "--prompt", REQUEST["prompt"], "--seed", str(SEED), "--steps", str(STEPS), "--cfg", "7",
                           "--sampler", "Euler", "--init-image", str(init), "--mask", str(mask), "--strength",
                           "0.75", "--mask-blur", "4", "--inpaint-area", "whole", "--masked-content", "original",
                           "--out", str(tmp_path / "cli"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def server_door(fixtures, tmp_path):
    from _serve_server import Server

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    server = Server(["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                     "--device", "cpu"], tmp_path / "server.log")
    try:
        body = dict(prompt=REQUEST["prompt"], seed=SEED, steps=STEPS, cfg_scale=7, sampler_name="Euler",
                    denoising_strength=0.75, init_images=[b64(picture())], mask=b64(box_mask()), mask_blur=4,
                    inpaint_full_res=False, inpainting_fill=1, inpainting_mask_invert=0, width=64, height=64)
        req = urllib.request.Request(server.url + "/sdapi/v1/img2img", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            answer = json.load(r)
    finally:
        server.stop()
    return Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))


@pytest.mark.slow
def test_cli_python_and_server_inpaint_alike(fixtures, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture().save(init)
    box_mask().save(mask)
    images = {"python": Image.open(python_door(fixtures, tmp_path)), "cli": Image.open(cli_door(fixtures, tmp_path,
                                                                                              init, mask)),
              "server": server_door(fixtures, tmp_path)}
    pixels = {door: np.asarray(im.convert("RGB")) for door, im in images.items()}
    assert np.array_equal(pixels["python"], pixels["cli"]) and np.array_equal(pixels["python"], pixels["server"])
    texts = {door: im.info["parameters"] for door, im in images.items()}
    assert texts["python"] == texts["cli"] == texts["server"], texts
    assert "Denoising strength: 0.75" in texts["python"] and "Mask blur: 4" in texts["python"]
    # outside the blurred mask's reach (2 * blur) the original comes back: mean change well under 1/255
    far = np.ones((64, 64), bool)
    far[24 - 10:40 + 10, 20 - 10:36 + 10] = False
    change = np.abs(pixels["python"].astype(np.int32) - np.asarray(picture(), dtype=np.int32))[far]
    assert change.mean() < 0.5, change.mean()
    inside = np.abs(pixels["python"].astype(np.int32) - np.asarray(picture(), dtype=np.int32))[26:38, 22:34]
    assert inside.mean() > 1, "the masked area was not repainted"


# ---------------------------------------------------------------- the infotext reproduces the run (issue 28)

REPRODUCE = dict(strength=0.45, mask_blur=6, inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_fill=2,
                 inpainting_mask_invert=True)  # every inpainting key away from its default


def test_the_infotext_reproduces_an_inpainting_with_the_same_images(pipes):
    """``from_infotext`` of an inpainting's PNG plus the same init image and mask: the same settings and bytes;
    without the keys read back (the defaults) the image differs."""
    pipe = pipes("sd1-tiny")
    [first] = pipe("a yellow duck", image=picture(), mask_image=box_mask(), seed=SEED, steps=STEPS, sampler="Euler",
                   **REPRODUCE)
    text = first.info["parameters"]
    assert ("Denoising strength: 0.45, RNG: NV, Mask mode: Inpaint not masked, Mask blur: 6, Inpaint area: Only "
            "masked, Masked area padding: 8, Masked content: latent noise") in text
    s = pipe.from_infotext(text, init_image=picture(), mask=box_mask())
    assert {k: getattr(s, k) for k in REPRODUCE} == REPRODUCE
    [again] = pipe.to_pil(pipe.generate(s), s)
    assert again.tobytes() == first.tobytes() and again.info["parameters"] == text
    [plain] = pipe("a yellow duck", image=picture(), mask_image=box_mask(), seed=SEED, steps=STEPS, sampler="Euler")
    assert plain.tobytes() != first.tobytes()


@pytest.mark.slow
def test_cli_from_png_reproduces_an_inpainting(fixtures, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture().save(init)
    box_mask().save(mask)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    model = ["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", "--device", "cpu"]

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "generate", *model, *args, "--init-image",
                               str(init), "--mask", str(mask), "--quiet"],
                              capture_output=True, text=True, env=env, timeout=600, cwd=str(ROOT))
        assert proc.returncode == 0, proc.stderr
        return Path(proc.stdout.strip().splitlines()[-1])

    first = cli("--prompt", "a yellow duck", "--seed", str(SEED), "--steps", str(STEPS), "--sampler", "Euler",
                "--strength", "0.45", "--mask-blur", "6", "--inpaint-area", "masked", "--inpaint-padding", "8",
                "--masked-content", "latent-noise", "--invert-mask", "--out", str(tmp_path / "a"))
    again = cli("--from-png", str(first), "--out", str(tmp_path / "b"))
    assert again.read_bytes() == first.read_bytes()


# ---------------------------------------------------------------- 9-channel models: Conditional mask weight


def test_conditional_mask_weight_is_webuis_lerp(pipes):
    """``inpainting_image_conditioning``: ``lerp(image, image * (1 - mask), weight)`` of the rounded mask, then
    encoded: at weight w the masked area keeps 1 - w of the image; at 1 it is blanked (runwayml's rule)."""
    from tritonsd.sampler.vae_io import inpaint_conditioning

    model = pipes("sd1-inpaint-tiny").model
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 4:16] = 0.8  # rounds to 1
    noise = torch.randn(1, 4, 4, 4, generator=g)
    binary = (mask > 0.5).float()
    for weight in (1.0, 0.3, 0.0):
        c = inpaint_conditioning(model, image, mask, noise, weight)
        want = image * (1 - weight * binary)  # webui's lerp written out
        assert torch.allclose(c.masked_image, want, rtol=0, atol=1e-6), weight
    assert torch.equal(inpaint_conditioning(model, image, mask, noise, 0.0).masked_image, image)


def test_conditional_mask_weight_in_the_infotext_and_back(pipes):
    """webui writes ``Conditional mask weight`` (its float option) for every generation of a 9-channel model and
    none for a 4-channel one; read back, it gives the same image; below 1 the image changes."""
    inpaint, plain = pipes("sd1-inpaint-tiny"), pipes("sd1-tiny")
    run = dict(image=picture((32, 32)), mask_image=box_mask((32, 32), (8, 8, 20, 24)), seed=SEED, steps=STEPS,
               sampler="Euler")
    [full] = inpaint("a duck", **run)
    [half] = inpaint("a duck", **run, inpainting_mask_weight=0.5)
    assert "Conditional mask weight: 1.0," in full.info["parameters"]
    assert "Denoising strength: 0.75, Conditional mask weight: 0.5, RNG: NV," in half.info["parameters"]
    assert half.tobytes() != full.tobytes()
    s = inpaint.from_infotext(half.info["parameters"], init_image=picture((32, 32)),
                              mask=box_mask((32, 32), (8, 8, 20, 24)))
    assert s.inpainting_mask_weight == 0.5
    [again] = inpaint.to_pil(inpaint.generate(s), s)
    assert again.tobytes() == half.tobytes()
    [txt2img] = inpaint("a duck", seed=SEED, steps=STEPS, sampler="Euler", width=32, height=32)
    assert "Conditional mask weight: 1.0," in txt2img.info["parameters"]  # txt2img_image_conditioning sets it too
    assert "Conditional mask weight" not in plain("a duck", **run)[0].info["parameters"]


# ---------------------------------------------------------------- resize_mode 3: "Just resize (latent upscale)"


def test_latent_resize_encodes_at_the_images_size_and_resizes_the_latent(pipes):
    """webui's img2img ``init`` with ``resize_mode == 3``: the image is not resized; its latent is, by
    ``interpolate(init_latent, (h // 8, w // 8), mode="bilinear")``; then img2img as usual."""
    import torch.nn.functional as F

    from tritonsd.sampler.noise import ImageNoise
    from tritonsd.sampler.vae_io import encode_image
    from tritonsd.sampler.wiring import img2img_start, make_schedule

    pipe = pipes("sd1-tiny")
    s = pipe.settings(prompt="a duck", init_image=picture((32, 24)), resize_mode=3, width=64, height=48, seed=SEED,
                      steps=STEPS, sampler="euler", strength=0.6)
    assert (s.width, s.height, tuple(s.init_image.shape[-2:])) == (64, 48, (24, 32))
    latents = pipe.prepare_latents(s)
    noise = ImageNoise((4, 6, 8), SEED, 1, s.rng, None, 0.0, "cpu")
    x_T = noise.start((4, 6, 8))
    z = encode_image(pipe.model, s.init_image, noise.vae((4, 3, 4)))  # at the image's own size
    z = F.interpolate(z, size=(6, 8), mode="bilinear")
    schedule = make_schedule(pipe.config, registry.get("euler"), STEPS, s.karras, s.eta)
    x, _ = img2img_start(schedule, z, x_T, 0.6)
    assert torch.equal(latents.x, x)
    [image] = pipe.to_pil(pipe.generate(s), s)
    assert image.size == (64, 48)


@pytest.mark.parametrize("fields, words", [
    (dict(init_image=picture((36, 36))), "init_image is 36x36; its sides must be multiples of 8"),  # encoded so
    (dict(init_image=picture((32, 32)), mask=box_mask((32, 32), (4, 4, 12, 12))), "3 (latent upscale) with a mask"),
])
def test_latent_resize_refusals_are_one_line(pipes, fields, words):
    with pytest.raises(SettingsError, match=re.escape(words)) as e:
        pipes("sd1-tiny").settings(prompt="a", resize_mode=3, width=64, height=64, seed=1, steps=2, **fields)
    assert "\n" not in str(e.value)
    with pytest.raises(SettingsError, match="9-channel model"):
        pipes("sd1-inpaint-tiny").settings(prompt="a", resize_mode=3, width=64, height=64, seed=1, steps=2,
                                           init_image=picture((32, 32)))
