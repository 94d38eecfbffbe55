"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium) against the real
``tritonsd serve`` on loopback with the fixtures' sd1-tiny (64x64, a few steps; one server for the module).

What the page makes through its own controls (typing, clicking, choosing files, painting the mask with pointer
events) is compared byte for byte with the same request sent by ``webuiapi``, so the expected bytes come from the
server's API, never from the page. Each test keeps a screenshot: under pytest's tmp dir, and copied to
``$TRITONSD_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from _serve_server import ROOT, Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # headless Chromium against a server started for the module

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
SMALL = dict(width=64, height=64, steps=3)
LORA = "lora-sd1-tiny"
VAE = "shifted-vae.safetensors"  # /sdapi/v1/sd-vae names a VAE by its file name
EMBEDDING = "tiny-style"  # the fixtures' webui-written SD1 embedding
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _first(paths) -> str | None:
    return next((p for p in paths if Path(p).is_file()), shutil.which(Path(paths[0]).name))


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ModuleNotFoundError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    chromium, driver_path = _first(CHROMIUM), _first(CHROMEDRIVER)
    if chromium is None or driver_path is None:
        pytest.fail("Chromium and chromedriver are needed: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(fixtures, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-page")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    for suffix in (".safetensors", ".yaml"):
        (models / f"sd1-inpaint-tiny{suffix}").symlink_to(fixtures / f"sd1-inpaint-tiny{suffix}")
    (loras / f"{LORA}.safetensors").symlink_to(fixtures / f"{LORA}.safetensors")
    vaes = root / "vae"
    vaes.mkdir()
    write_shifted_vae(fixtures / "sd1-tiny.safetensors", vaes / VAE)
    s = Server(["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                "--models-dir", str(models), "--lora-dir", str(loras), "--vae-dir", str(vaes),
                "--embeddings-dir", str(fixtures / "embeddings")], root / "server.log")
    yield s
    s.stop()


def write_shifted_vae(checkpoint: Path, out: Path) -> None:
    """The checkpoint's own VAE as an external file (bare keys), its output bias shifted: another VAE whose images
    differ visibly."""
    from safetensors.torch import load_file, save_file

    prefix = "first_stage_model."
    vae = {k[len(prefix):]: v.contiguous() for k, v in load_file(checkpoint).items() if k.startswith(prefix)}
    vae["decoder.conv_out.bias"] = vae["decoder.conv_out.bias"] + 0.25
    save_file(vae, out)


@pytest.fixture(scope="module")
def api(server):
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


@pytest.fixture()
def page(browser, server):
    """The page freshly loaded (results of earlier tests cleared), its choices read from the server."""
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(server.url + "/")
    wait(browser).until(lambda d: len(Select(d.find_element("id", "sampler_name")).options) >= 5
                        and len(Select(d.find_element("id", "lora-picker")).options) >= 2)
    return browser


def wait(driver, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05)


def screenshot(driver, name: str, tmp_path: Path) -> None:
    shot = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(shot))
    artifacts = os.environ.get("TRITONSD_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    print(f"screenshot: {shot}")


def _set(driver, field_id: str, value) -> None:
    element = driver.find_element("id", field_id)
    element.clear()
    element.send_keys(str(value))


def _choose(driver, field_id: str, text: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", field_id)).select_by_visible_text(text)


def fill_form(driver, prompt: str, negative: str = "", **fields) -> None:
    _set(driver, "prompt", prompt)
    _set(driver, "negative_prompt", negative)
    for name, value in fields.items():
        if name in ("sampler_name", "scheduler", "resize_mode", "inpainting_fill", "inpaint_full_res",
                    "inpainting_mask_invert"):
            _choose(driver, name, value)
        else:
            _set(driver, name, value)


def results_count(driver) -> int:
    return driver.execute_script("return window.tritonsd.gallery.items.length")


def generate(driver, how: str = "click") -> str:
    """Generate through the page and return the newest result's PNG (base64), as the server sent it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    before = results_count(driver)
    if how == "click":
        driver.find_element("id", "generate").click()
    else:
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    wait(driver).until(lambda d: results_count(d) > before or d.find_element("id", "error").text)
    assert driver.find_element("id", "error").text == ""
    wait(driver).until(lambda d: d.find_element("id", "generate").is_enabled())
    return driver.execute_script("return window.tritonsd.gallery.items[0].b64")


def drop_file(driver, zone_id: str, path: Path, mime: str = "image/png") -> None:
    """A file dropped on an element, as the browser delivers a drag from the desktop: a ``drop`` event whose
    DataTransfer holds the file (selenium cannot drag from outside the page)."""
    driver.execute_script("""
        const [id, b64, name, type] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], name, { type }));
        const zone = document.getElementById(id);
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: data, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
    """, zone_id, base64.b64encode(path.read_bytes()).decode(), path.name, mime)


def api_png(result) -> bytes:
    return base64.b64decode(result.json["images"][0])


def test_txt2img_through_the_page_equals_webuiapi(page, api, tmp_path):
    fill_form(page, "a red circle above a blue square", "blurry", seed=1234, cfg_scale=6.5, batch_size=1,
              sampler_name="DPM++ 2M", scheduler="Karras", clip_skip=2, **SMALL)
    got = base64.b64decode(generate(page, how="ctrl+enter"))
    want = api_png(api.txt2img(prompt="a red circle above a blue square", negative_prompt="blurry", seed=1234,
                               cfg_scale=6.5, sampler_name="DPM++ 2M", scheduler="Karras",
                               override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL))
    assert got == want and got.startswith(PNG_MAGIC)

    # the full-size view, and its download: the very bytes the server sent, named as Pipeline.save names files
    page.find_elements("css selector", "#gallery .result img")[0].click()
    wait(page, 10).until(lambda d: d.find_element("id", "viewer").get_attribute("open") is not None)
    name = page.find_element("id", "viewer-download").get_attribute("download")
    assert name.endswith("-1234.png") and len(name) == len("00000-1234.png")
    downloaded = page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(document.getElementById('viewer-download').href).then(r => r.arrayBuffer())
          .then(b => done(btoa(String.fromCharCode(...new Uint8Array(b)))));""")
    assert base64.b64decode(downloaded) == want
    assert page.execute_script("return document.getElementById('viewer-img').naturalWidth") == 64
    screenshot(page, "page-full-size", tmp_path)
    page.find_element("id", "viewer-close").click()

    # a reload keeps the results; "Use seed" and the random-seed button
    page.refresh()
    wait(page, 30).until(lambda d: len(d.find_elements("css selector", "#gallery .result img")) == 1)
    _set(page, "seed", 5)
    page.find_element("css selector", "#gallery .result button[title^='put this seed']").click()
    assert page.find_element("id", "seed").get_attribute("value") == "1234"
    page.find_element("id", "random-seed").click()
    assert page.find_element("id", "seed").get_attribute("value") == "-1"
    page.execute_cdp_cmd("Browser.grantPermissions", {"origin": page.execute_script("return location.origin"),
                                                      "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    page.find_element("css selector", "#gallery .result button[title^='copy the seed']").click()
    wait(page, 10).until(lambda d: d.find_element("css selector", "#gallery .result button[title^='copy the seed']")
                         .text in ("Copied", "Copy failed"))
    assert page.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, (e) => done(String(e)))") == "1234"
    screenshot(page, "page-txt2img", tmp_path)


def _write_png(path: Path, size=(64, 64)) -> Path:
    """An init image with structure (a gradient and a square), so img2img has something to keep."""
    im = Image.new("RGB", size)
    px = im.load()
    for y in range(size[1]):
        for x in range(size[0]):
            px[x, y] = (x * 4 % 256, y * 4 % 256, 128 if 16 <= x < 48 and 16 <= y < 48 else 30)
    im.save(path)
    return path


def test_img2img_and_inpainting_through_the_page_equal_webuiapi(page, api, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    init_path = _write_png(tmp_path / "init.png")
    init = Image.open(init_path)
    page.find_element("id", "tab-img2img").click()
    drop_file(page, "drop-zone", init_path)
    wait(page, 30).until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 64)
    fill_form(page, "a castle", "", seed=77, cfg_scale=7, batch_size=1, sampler_name="Euler a",
              scheduler="Automatic", clip_skip=1, i2i_denoising_strength=0.6, resize_mode="Crop and resize",
              **SMALL)
    got = base64.b64decode(generate(page))
    want = api_png(api.img2img(images=[init], prompt="a castle", seed=77, denoising_strength=0.6, resize_mode=1,
                               sampler_name="Euler a", scheduler="Automatic", **SMALL))
    assert got == want

    # paint a stroke across the middle of the image with the pointer: the mask the page sends is white there
    canvas = page.find_element("id", "mask-canvas")
    page.execute_script(  # a range input: set as a person drags it
        "const b = document.getElementById('brush-size'); b.value = 40; b.dispatchEvent(new Event('input'))")
    rect = page.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", canvas)
    w, h = rect
    (ActionChains(page).move_to_element_with_offset(canvas, int(-w * 0.3), 0).click_and_hold()
     .move_by_offset(int(w * 0.3), 0).move_by_offset(int(w * 0.3), 0).release().perform())
    assert page.find_element("id", "use_mask").is_selected()
    mask_url = page.execute_script("return window.tritonsd.mask.toDataURL()")
    mask = Image.open(io.BytesIO(base64.b64decode(mask_url.split(",", 1)[1]))).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((32, 4)) == 0 and mask.getpixel((2, 60)) == 0
    fill_form(page, "a castle", "", mask_blur=2, inpainting_fill="original", inpaint_full_res="Whole picture",
              inpaint_full_res_padding=0, inpainting_mask_invert="Inpaint masked")
    page.execute_script("arguments[0].scrollIntoView()", canvas)
    screenshot(page, "page-inpaint-mask", tmp_path)
    got = base64.b64decode(generate(page))
    want = api_png(api.img2img(images=[init], mask_image=mask, prompt="a castle", seed=77, denoising_strength=0.6,
                               resize_mode=1, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
                               inpaint_full_res_padding=0, inpainting_mask_invert=0, sampler_name="Euler a",
                               scheduler="Automatic", **SMALL))
    assert got == want
    assert got != base64.b64decode(page.execute_script("return window.tritonsd.gallery.items[1].b64"))

    # invert and clear act on the painted mask
    page.find_element("id", "mask-invert").click()
    inverted = page.execute_script("return window.tritonsd.mask.toDataURL()")
    inv = Image.open(io.BytesIO(base64.b64decode(inverted.split(",", 1)[1]))).convert("L")
    assert inv.getpixel((32, 32)) == 0 and inv.getpixel((32, 4)) == 255
    page.find_element("id", "mask-clear").click()
    assert page.execute_script("return window.tritonsd.mask.isEmpty()")

    # an uploaded mask is the mask sent
    uploaded = Image.new("L", (64, 64))
    uploaded.paste(255, (8, 40, 30, 60))
    uploaded.save(tmp_path / "mask.png")
    page.find_element("id", "mask-file").send_keys(str(tmp_path / "mask.png"))
    wait(page, 30).until(lambda d: not d.execute_script("return window.tritonsd.mask.isEmpty()"))
    sent = page.execute_script("return window.tritonsd.mask.toDataURL()")
    assert Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1]))).convert("L").tobytes() == uploaded.tobytes()
    screenshot(page, "page-img2img", tmp_path)


def tritonsd_generate(fixtures, out: Path, *flags: str) -> Path:
    """A PNG made by ``tritonsd generate`` (the command line, in a subprocess) with the fixtures' sd1-tiny."""
    subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "generate", "--checkpoint",
                    str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", *flags, "--out", str(out), "--quiet"],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=str(ROOT), timeout=300)
    (png,) = out.glob("*.png")
    return png


def test_png_info_fills_the_form_so_generate_reproduces_the_png(page, fixtures, tmp_path):
    png = tritonsd_generate(fixtures, tmp_path / "out", "--prompt", "a (tiny:1.2) house", "--negative-prompt", "fog",
                            "--steps", "4", "--width", "64", "--height", "48", "--seed", "4242", "--sampler", "euler",
                            "--cfg", "5.5", "--clip-skip", "2")
    page.find_element("id", "tab-pnginfo").click()
    drop_file(page, "png-drop", png)
    wait(page, 30).until(lambda d: "Seed: 4242" in d.find_element("id", "png-text").text)
    screenshot(page, "page-png-info", tmp_path)
    page.find_element("id", "png-to-txt2img").click()
    assert page.find_element("id", "prompt").get_attribute("value") == "a (tiny:1.2) house"
    assert page.find_element("id", "height").get_attribute("value") == "48"
    got = base64.b64decode(generate(page))
    assert got == png.read_bytes()

    # sent to img2img: the PNG becomes the init image, its settings the form's
    page.find_element("id", "tab-pnginfo").click()
    page.find_element("id", "png-to-img2img").click()
    wait(page, 30).until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 64)
    assert page.find_element("id", "tab-img2img").get_attribute("aria-selected") == "true"
    assert page.find_element("id", "seed").get_attribute("value") == "4242"
    assert page.find_element("id", "height").get_attribute("value") == "48"
    assert page.execute_script("return window.tritonsd.request().init_images[0]") == \
        "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()

    # a hires-fix PNG: the hires fields come back too
    png = tritonsd_generate(fixtures, tmp_path / "hires", "--prompt", "a hut", "--steps", "3", "--width", "64",
                            "--height", "64", "--seed", "5", "--hires", "--hires-scale", "1.5", "--hires-steps", "2",
                            "--denoising-strength", "0.6")
    page.find_element("id", "tab-pnginfo").click()
    drop_file(page, "png-drop", png)
    wait(page, 30).until(lambda d: "Hires upscale: 1.5" in d.find_element("id", "png-text").text)
    page.find_element("id", "png-to-txt2img").click()
    assert page.find_element("id", "enable_hr").is_selected()
    assert base64.b64decode(generate(page)) == png.read_bytes()

    # the PNGs above say "RNG: NV" (tritonsd's default noise) and the server's randn_source is A1111's default,
    # GPU: as A1111's paste of a setting that differs, it goes with the request as an override, shown under the form
    assert page.execute_script("return window.tritonsd.request().override_settings") == {"randn_source": "NV"}
    assert "RNG: NV" in page.find_element("id", "overrides").text
    # a CPU-noise PNG: its RNG goes with the request as override_settings (the server's randn_source stays GPU),
    # shown under the form and cleared by its button
    png = tritonsd_generate(fixtures, tmp_path / "cpu", "--prompt", "a barn", "--steps", "3", "--width", "64",
                            "--height", "64", "--seed", "6", "--rng", "cpu")
    page.find_element("id", "tab-pnginfo").click()
    drop_file(page, "png-drop", png)
    wait(page, 30).until(lambda d: "RNG: CPU" in d.find_element("id", "png-text").text)
    page.find_element("id", "png-to-txt2img").click()
    assert page.execute_script("return window.tritonsd.request().override_settings") == {"randn_source": "CPU"}
    assert "RNG: CPU" in page.find_element("id", "overrides").text
    assert base64.b64decode(generate(page)) == png.read_bytes()
    page.find_element("id", "overrides-clear").click()
    assert page.execute_script("return window.tritonsd.request().override_settings") is None
    assert not page.find_element("id", "overrides").is_displayed()

    # the Model hash of another listed checkpoint: that checkpoint as an override (an unknown hash: none)
    inpaint = next(o.get_attribute("value") for o in page.find_elements("css selector", "#sd_model_checkpoint option")
                   if o.get_attribute("value").startswith("sd1-inpaint-tiny"))
    for model_hash, want in ((inpaint.rsplit("[", 1)[1].rstrip("]"), {"sd_model_checkpoint": inpaint}),
                             ("0123456789", {})):
        page.execute_script("window.tritonsd.page.png.parameters['Model hash'] = arguments[0]", model_hash)
        page.find_element("id", "tab-pnginfo").click()
        page.find_element("id", "png-to-txt2img").click()
        assert page.execute_script("return window.tritonsd.request().override_settings") == \
            {"randn_source": "CPU", **want}  # the CPU PNG's RNG still


def _previews_while_running(page, server, seen: list[str], currents: list[bytes], until: int) -> None:
    import requests

    deadline = time.monotonic() + 120
    while len(set(seen)) < until and time.monotonic() < deadline:
        src = page.execute_script("return document.getElementById('live').hidden ? '' : "
                                  "document.getElementById('live-preview').src")
        if src and src not in seen:
            seen.append(src)
        p = requests.get(server.url + "/sdapi/v1/progress", timeout=10).json()
        if p["current_image"]:
            currents.append(base64.b64decode(p["current_image"]))
        time.sleep(0.05)


def test_live_previews_then_escape_interrupts(page, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    fill_form(page, "a slow one", seed=5, batch_size=1, width=64, height=64, steps=1000, sampler_name="Euler",
              scheduler="Automatic", preview_every=10)
    page.find_element("id", "generate").click()
    wait(page).until(lambda d: "/1000" in d.find_element("id", "progress-text").text)
    seen, currents = [], []
    _previews_while_running(page, server, seen, currents, until=2)
    assert len(set(seen)) >= 2, "the page showed fewer than two different previews"
    assert currents and all(c.startswith(PNG_MAGIC) for c in currents)
    assert Image.open(io.BytesIO(currents[-1])).size == (8, 8)  # the latent's size: 64 px / 8
    screenshot(page, "page-live-preview", tmp_path)
    ActionChains(page).send_keys(Keys.ESCAPE).perform()
    wait(page).until(lambda d: results_count(d) == 1)
    wait(page).until(lambda d: d.find_element("id", "generate").is_enabled())
    assert page.find_element("id", "live").get_attribute("hidden") is not None
    assert "Steps: 1000" in page.find_element("css selector", "#gallery .result pre").text


def test_narrow_window_has_no_horizontal_overflow(page, api, tmp_path):
    generate_small = dict(seed=3, batch_size=2, sampler_name="Euler", scheduler="Automatic", **SMALL)
    fill_form(page, "a very long prompt " * 12, **generate_small)
    generate(page)
    texts = [e.text for e in page.find_elements("css selector", "#gallery .result pre")]
    assert "Seed: 4" in texts[0] and "Seed: 3" in texts[1]  # newest first
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 360, "height": 780, "deviceScaleFactor": 1, "mobile": True})
    try:
        page.refresh()
        wait(page, 30).until(lambda d: len(d.find_elements("css selector", "#gallery .result img")) == 2)
        widths = "return [document.documentElement.scrollWidth, window.innerWidth]"
        for tab in ("tab-txt2img", "tab-img2img", "tab-pnginfo", "tab-txt2img"):
            page.find_element("id", tab).click()
            scroll, inner = page.execute_script(widths)
            assert inner == 360 and scroll == inner, f"{tab}: the document is {scroll} px wide in a 360 px window"
        page.find_element("id", "tab-img2img").click()  # a wide image and its mask canvas fit too
        drop_file(page, "drop-zone", _write_png(tmp_path / "wide.png", size=(640, 200)))
        wait(page, 30).until(lambda d: d.execute_script("return document.getElementById('mask-canvas').width") == 640)
        scroll, inner = page.execute_script(widths)
        assert scroll == inner, f"img2img with a 640 px image: the document is {scroll} px wide"
        screenshot(page, "page-360px-img2img", tmp_path)
        page.find_element("id", "tab-txt2img").click()
        screenshot(page, "page-360px", tmp_path)
        unlabelled = page.execute_script("""
            return [...document.querySelectorAll('input, select, textarea, canvas, progress')]
              .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map((e) => e.id)""")
        assert unlabelled == [], f"controls without a label for screen readers: {unlabelled}"
        page.find_elements("css selector", "#gallery .result img")[0].click()
        scroll, inner = page.execute_script(widths)
        assert scroll == inner
        screenshot(page, "page-360px-full-size", tmp_path)
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_oversize_request_shows_the_servers_message_in_words(page, server, tmp_path):
    import requests

    fill_form(page, "too big", seed=1, width=4096, height=4096, batch_size=8, steps=3)
    page.find_element("id", "generate").click()
    wait(page, 60).until(lambda d: d.find_element("id", "error").text)
    text = page.find_element("id", "error").text
    body = requests.post(server.url + "/sdapi/v1/txt2img", json=page.execute_script(
        "return window.tritonsd.page.lastRequest"), timeout=60).json()
    assert body["detail"] and body["detail"] in text
    assert not text[:3].isdigit()  # words first, not a raw status line
    screenshot(page, "page-error", tmp_path)


def test_pickers_change_the_image_as_webuiapi_does(page, api, server, tmp_path):
    settings = dict(seed=9, cfg_scale=7, batch_size=1, sampler_name="Euler", scheduler="Automatic", clip_skip=1,
                    **SMALL)
    fill_form(page, "a tree", **settings)
    plain = base64.b64decode(generate(page))
    _choose(page, "lora-picker", LORA)
    assert page.find_element("id", "prompt").get_attribute("value") == f"a tree <lora:{LORA}:1>"
    with_lora = base64.b64decode(generate(page))
    want = api_png(api.txt2img(prompt=f"a tree <lora:{LORA}:1>", seed=9, sampler_name="Euler",
                               scheduler="Automatic", **SMALL))
    assert with_lora == want and with_lora != plain

    _set(page, "prompt", "a tree")
    _choose(page, "embedding-picker", EMBEDDING)
    assert page.find_element("id", "prompt").get_attribute("value") == f"a tree {EMBEDDING}"
    with_embedding = base64.b64decode(generate(page))
    want = api_png(api.txt2img(prompt=f"a tree {EMBEDDING}", seed=9, sampler_name="Euler", scheduler="Automatic",
                               **SMALL))
    assert with_embedding == want and with_embedding != plain

    _set(page, "prompt", "a tree")
    try:
        _choose(page, "sd_vae", VAE)
        wait(page).until(lambda d: d.find_element("id", "model-status").text == f"Loaded VAE {VAE}")
        with_vae = base64.b64decode(generate(page))
        want = api_png(api.txt2img(prompt="a tree", seed=9, sampler_name="Euler", scheduler="Automatic",
                                   override_settings={"sd_vae": VAE}, **SMALL))
        assert with_vae == want and with_vae != plain
    finally:
        if page.execute_script("return document.getElementById('sd_vae').value") != "Automatic":
            _choose(page, "sd_vae", "Automatic")
            wait(page).until(lambda d: d.find_element("id", "model-status").text == "Loaded VAE Automatic")

    inpaint = next(o.text for o in page.find_elements("css selector", "#sd_model_checkpoint option")
                   if o.text.startswith("sd1-inpaint-tiny"))
    main = page.execute_script("return document.getElementById('sd_model_checkpoint').value")
    try:
        _choose(page, "sd_model_checkpoint", inpaint)
        wait(page).until(lambda d: d.find_element("id", "model-status").text.startswith("Loaded"))
        _set(page, "prompt", "a tree")
        other = base64.b64decode(generate(page))
        screenshot(page, "page-pickers", tmp_path)
        want = api_png(api.txt2img(prompt="a tree", seed=9, sampler_name="Euler", scheduler="Automatic",
                                   override_settings={"sd_model_checkpoint": inpaint}, **SMALL))
        assert other == want and other != plain
    finally:
        if page.execute_script("return document.getElementById('sd_model_checkpoint').value") != main:
            _choose(page, "sd_model_checkpoint", main)
            wait(page).until(lambda d: d.find_element("id", "model-status").text == f"Loaded {main}")
