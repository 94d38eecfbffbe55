"""``tritonsd serve`` against the real server: the command line started on a free loopback port with the fixtures'
tiny SD1 models on the CPU, driven by the real ``webuiapi`` client (and raw HTTP for the malformed requests).

The server's PNGs are compared byte for byte with what ``Pipeline.save`` writes for the same settings, so the
expected bytes never come from the server's code. 64x64 images, 3 steps: each generation takes well under a
second on the CPU.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket
import threading
import time

import pytest
from PIL import Image

try:
    import requests
    import webuiapi
except ModuleNotFoundError as e:  # a skipped server test proves nothing: install the test extra
    pytest.fail(f"{e.name} is not installed: pip install -e '.[test]'", pytrace=False)

from _serve_server import Server  # noqa: E402

pytestmark = pytest.mark.slow  # a server process started for the module

A1111_INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                   "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
                   "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
                   "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                   "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                   "clip_skip", "is_using_inpainting_conditioning"}
SMALL = dict(width=64, height=64, steps=3)
A1111_CFG = 7.0  # A1111's API default CFG scale (the Pipeline's own default is 7.5)


@pytest.fixture(scope="module")
def server(fixtures, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    for suffix in (".safetensors", ".yaml"):
        (models / f"sd1-inpaint-tiny{suffix}").symlink_to(fixtures / f"sd1-inpaint-tiny{suffix}")
    (loras / "lora-sd1-tiny.safetensors").symlink_to(fixtures / "lora-sd1-tiny.safetensors")
    vaes = root / "vae"
    vaes.mkdir()
    write_checkpoints_vae(fixtures / "sd1-tiny.safetensors", vaes / "tiny-vae.safetensors")
    s = Server(["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                "--models-dir", str(models), "--lora-dir", str(loras), "--vae-dir", str(vaes),
                "--embeddings-dir", str(fixtures / "embeddings")], root / "server.log")
    yield s
    s.stop()


def write_checkpoints_vae(checkpoint, out) -> None:
    """The checkpoint's own VAE as an external VAE file (bare keys): the same weights under another name."""
    from safetensors.torch import load_file, save_file

    prefix = "first_stage_model."
    save_file({k[len(prefix):]: v.contiguous() for k, v in load_file(checkpoint).items() if k.startswith(prefix)},
              out)


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


@pytest.fixture(scope="module")
def pipe(fixtures):
    import tritonsd

    return tritonsd.load(fixtures / "sd1-tiny.safetensors", text_heads=2)


def saved_png(pipe, images, tmp_path) -> list[bytes]:
    return [p.read_bytes() for p in pipe.save(images, tmp_path)]


def server_pngs(result) -> list[bytes]:
    return [base64.b64decode(b) for b in result.json["images"]]


def test_txt2img_png_equals_pipeline(api, pipe, tmp_path):
    r = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=1234, cfg_scale=6.5,
                    sampler_name="DPM++ 2M", scheduler="Karras", **SMALL)
    want = pipe("a red circle", "blurry", seed=1234, cfg_scale=6.5, sampler="dpmpp_2m", karras=True, **SMALL)
    assert server_pngs(r) == saved_png(pipe, want, tmp_path)
    info = r.info
    assert A1111_INFO_KEYS <= set(info)
    assert info["seed"] == 1234 and info["all_seeds"] == [1234]
    assert info["infotexts"] == [want[0].info["parameters"]]
    assert info["sd_model_name"] == "sd1-tiny" and info["sd_model_hash"] == pipe.model_hash
    assert info["ignored_fields"] == []  # webuiapi's defaults change nothing A1111 would do
    assert r.parameters["steps"] == 3 and r.parameters["prompt"] == "a red circle"


def post(server, path: str, body: dict) -> tuple[int, dict]:
    resp = requests.post(server.url + path, json=body, timeout=120)
    return resp.status_code, resp.json()


def test_webuiapi_default_img2img_payload_is_accepted(api):
    """webuiapi sends its whole default payload on every call (eta 1.0, s_tmax 0, seed_resize 0, ...): nothing
    in it asks for what is not implemented, so it is a 200 with nothing named (issue 28, point 2)."""
    r = api.img2img(images=[Image.new("RGB", (64, 64), (120, 30, 200))], prompt="x", seed=2, **SMALL)
    assert len(r.images) == 1 and r.info["ignored_fields"] == []


def test_unsupported_fields_are_refused_by_name(server):
    """Fields that ask A1111 for what tritonsd does not implement: a 422 naming them (issue 28, point 2)."""
    status, body = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 3, "restore_faces": True,
                                                      "script_name": "x/y/z plot", **SMALL})
    assert status == 422 and body["error"] == "UnsupportedFields"
    assert "restore_faces" in body["detail"] and "script_name" in body["detail"]
    status, body = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 3, "alwayson_scripts": {
        "ADetailer": {"args": [True]}}, **SMALL})
    assert status == 422 and "alwayson_scripts.ADetailer" in body["detail"]
    status, body = post(server, "/sdapi/v1/txt2img", {"infotext": "x\nSteps: 2, Seed: 1, Face restoration: "
                                                                  "CodeFormer", **SMALL})
    assert status == 422 and "infotext.Face restoration" in body["detail"]


def test_tiling_png_equals_pipeline(server, api, pipe, tmp_path):
    """``tiling: true`` is implemented (issue 28): the Pipeline's tiling PNG, byte for byte, and its infotext's
    ``Tiling: True`` brings it back through the ``infotext`` field."""
    r = api.txt2img(prompt="a brick wall", seed=31, cfg_scale=A1111_CFG, sampler_name="Euler a", tiling=True,
                    **SMALL)
    want = pipe("a brick wall", seed=31, cfg_scale=A1111_CFG, sampler="Euler a", tiling=True, **SMALL)
    assert server_pngs(r) == saved_png(pipe, want, tmp_path)
    assert "Tiling: True" in r.info["infotexts"][0] and r.info["ignored_fields"] == []
    status, body = post(server, "/sdapi/v1/txt2img", {"infotext": want[0].info["parameters"], "sampler_name":
                                                      "Euler a"})
    assert status == 200 and base64.b64decode(body["images"][0]) == server_pngs(r)[0]


def test_batch_and_iterations_count_seeds_on(api, pipe, tmp_path):
    r = api.txt2img(prompt="seeds", seed=40, batch_size=2, n_iter=2, sampler_name="Euler", **SMALL)
    assert r.info["all_seeds"] == [40, 41, 42, 43]
    want = pipe("seeds", seed=42, batch_size=2, sampler="euler", cfg_scale=A1111_CFG, **SMALL)  # the second iteration
    assert server_pngs(r)[2:] == saved_png(pipe, want, tmp_path)


def test_samplers_and_schedulers_lists(api):
    names = {s["name"] for s in api.get_samplers()}
    assert {"DPM++ 2M", "Euler a", "Euler", "DDIM", "PLMS"} <= names
    assert not any("Karras" in n for n in names)  # v1.10: the schedule is its own field
    assert {s["label"] for s in api.get_schedulers()} >= {"Automatic", "Uniform", "Karras"}


def test_old_combined_sampler_name_is_accepted(api):
    old = api.txt2img(prompt="k", seed=9, sampler_name="Euler Karras", **SMALL)  # webuiapi sends "automatic"
    new = api.txt2img(prompt="k", seed=9, sampler_name="Euler", scheduler="Karras", **SMALL)
    assert server_pngs(old) == server_pngs(new)
    assert "Schedule type: Karras" in old.info["infotexts"][0]


def test_clip_skip_from_override_settings(api, pipe, tmp_path):
    r = api.txt2img(prompt="a tall tree", seed=77, sampler_name="Euler",
                    override_settings={"CLIP_stop_at_last_layers": 2}, **SMALL)
    assert r.info["clip_skip"] == 2
    want = pipe("a tall tree", seed=77, sampler="euler", clip_skip=2, cfg_scale=A1111_CFG, **SMALL)
    assert server_pngs(r) == saved_png(pipe, want, tmp_path)


def test_raw_base64_and_data_url_init_images(server, api, pipe, tmp_path):
    init = gradient(64, 64)
    r = api.img2img(images=[init], prompt="a blue square", seed=5, denoising_strength=0.6, sampler_name="Euler",
                    **SMALL)  # webuiapi sends a data: URL
    want = pipe("a blue square", init_image=init, strength=0.6, seed=5, sampler="euler", cfg_scale=A1111_CFG,
                **SMALL)
    expected = saved_png(pipe, want, tmp_path)
    assert server_pngs(r) == expected
    assert r.info["denoising_strength"] == 0.6
    raw = base64.b64encode(png(init)).decode()
    body = {"init_images": [raw], "prompt": "a blue square", "seed": 5, "denoising_strength": 0.6,
            "sampler_name": "Euler", **SMALL}
    resp = requests.post(server.url + "/sdapi/v1/img2img", json=body, timeout=60)
    assert resp.status_code == 200
    assert [base64.b64decode(b) for b in resp.json()["images"]] == expected
    assert resp.json()["parameters"]["init_images"] is None  # left out unless include_init_images


@pytest.mark.parametrize("full_res", [True, False])
def test_inpainting_pastes_the_original_back(api, full_res):
    init = gradient(64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    r = api.img2img(images=[init], mask_image=mask, prompt="a yellow duck", seed=11, mask_blur=4,
                    inpaint_full_res=full_res, inpaint_full_res_padding=8, sampler_name="Euler",
                    override_settings={"sd_model_checkpoint": "sd1-inpaint-tiny"}, **SMALL)
    out = r.image.convert("RGB")
    assert out.size == (64, 64)
    assert r.info["sd_model_name"] == "sd1-inpaint-tiny" and r.info["is_using_inpainting_conditioning"]
    src, got = init.load(), out.load()
    reach = 24 - (2 * int(2.5 * 4 + 0.5) + 1) // 2  # a blur of 4 reaches 10 px beyond the square
    outside = [(x, y) for x in range(64) for y in range(64)
               if x < reach or y < reach or x >= 64 - reach or y >= 64 - reach]
    assert all(got[p] == src[p] for p in outside), "pixels outside the mask changed"
    assert any(got[x, y] != src[x, y] for x in range(28, 36) for y in range(28, 36)), "the masked area was kept"
    assert api.get_options()["sd_model_checkpoint"].startswith("sd1-tiny.safetensors")  # override restored


def test_vae_from_override_settings(api):
    """The external file holds the checkpoint's own VAE weights: the same pixels, a different infotext."""
    assert [v["model_name"] for v in api.get_sd_vae()] == ["tiny-vae.safetensors"]
    plain = api.txt2img(prompt="vae", seed=4, **SMALL)
    r = api.txt2img(prompt="vae", seed=4, override_settings={"sd_vae": "tiny-vae.safetensors"}, **SMALL)
    assert r.info["sd_vae_name"] == "tiny-vae.safetensors" and plain.info["sd_vae_name"] is None
    assert "VAE: tiny-vae.safetensors" in r.info["infotexts"][0]
    assert r.image.tobytes() == plain.image.tobytes()
    assert api.get_options()["sd_vae"] == "Automatic"


def test_model_switch_through_options(api):
    titles = api.util_get_model_names()
    inpaint = next(t for t in titles if t.startswith("sd1-inpaint-tiny"))
    main = next(t for t in titles if t.startswith("sd1-tiny"))
    rows = api.get_sd_models()
    assert all({"title", "model_name", "hash", "sha256", "filename"} <= set(row) for row in rows)
    try:
        api.util_set_model(inpaint, find_closest=False)
        assert api.get_options()["sd_model_checkpoint"] == inpaint
        assert api.txt2img(prompt="p", seed=1, **SMALL).info["sd_model_name"] == "sd1-inpaint-tiny"
    finally:
        api.util_set_model(main, find_closest=False)
    assert api.txt2img(prompt="p", seed=1, **SMALL).info["sd_model_name"] == "sd1-tiny"


def test_progress_while_running_and_interrupt(api):
    """A job of 1000 steps (minutes on this machine) is watched, then interrupted."""
    done: dict = {}
    job = threading.Thread(target=lambda: done.setdefault("r", api.txt2img(
        prompt="slow", seed=8, width=64, height=64, steps=1000, sampler_name="Euler")))
    job.start()
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2:
            seen = p
            break
        time.sleep(0.05)
    assert seen is not None, "no progress seen"
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 1000
    t0 = time.monotonic()
    api.interrupt()
    job.join(120)
    assert not job.is_alive()
    r = done["r"]
    assert time.monotonic() - t0 < 60
    assert len(r.images) == 1 and r.info["steps"] == 1000  # what it had, decoded, as A1111 returns it
    after = api.get_progress()
    assert after["state"]["job_count"] == 0 and after["progress"] == 0


def test_infotext_field_fills_what_the_request_did_not_send(server):
    infotext = ("a fox\nNegative prompt: dull\n"
                "Steps: 3, Sampler: Euler, CFG scale: 6, Seed: 123, Size: 64x56, Clip skip: 2")
    url = server.url + "/sdapi/v1/txt2img"
    info = json.loads(requests.post(url, json={"infotext": infotext}, timeout=120).json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["steps"]) == ("a fox", "dull", 3)
    assert info["sampler_name"] == "Euler"
    assert (info["cfg_scale"], info["seed"], info["width"], info["height"], info["clip_skip"]) == (6, 123, 64, 56, 2)
    sent = json.loads(requests.post(url, json={"infotext": infotext, "seed": 5, "prompt": "a cat"}, timeout=120)
                      .json()["info"])
    assert (sent["seed"], sent["prompt"], sent["steps"]) == (5, "a cat", 3)


def test_png_info_reads_the_infotext(api):
    r = api.txt2img(prompt="info please", negative_prompt="nothing", seed=21, **SMALL)
    got = api.png_info(r.image)
    assert got.info == r.info["infotexts"][0]
    params = got.json["parameters"]
    assert params["Prompt"] == "info please" and params["Negative prompt"] == "nothing"
    assert params["Seed"] == "21" and params["Steps"] == "3"


def test_lora_and_embedding_listings(api):
    assert [x["name"] for x in api.get_loras()] == ["lora-sd1-tiny"]
    emb = api.get_embeddings()
    assert set(emb) == {"loaded", "skipped"} and emb["loaded"]
    assert all({"shape", "vectors"} <= set(e) for e in emb["loaded"].values())


# ---------------------------------------------------------------- load


def test_load_32_requests_from_8_clients(server):
    """Every answer arrives, in full, and equals the same request sent alone."""
    variants = [{"prompt": f"load {i}", "seed": 500 + i, "sampler_name": ["Euler a", "DPM++ 2M"][i % 2], **SMALL}
                for i in range(8)]
    url = server.url + "/sdapi/v1/txt2img"
    session = requests.Session()
    twins = [base64.b64decode(session.post(url, json=v, timeout=120).json()["images"][0]) for v in variants]

    def client(k: int) -> list[tuple[int, int, bytes]]:
        s = requests.Session()
        out = []
        for j in range(4):
            i = (k + j) % 8
            resp = s.post(url, json=variants[i], timeout=300)
            out.append((i, resp.status_code, base64.b64decode(resp.json()["images"][0])))
        return out

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [row for rows in pool.map(client, range(8)) for row in rows]
    assert time.monotonic() - t0 < 300
    assert len(results) == 32
    assert all(status == 200 for _, status, _ in results)
    assert all(image == twins[i] for i, _, image in results)


# ---------------------------------------------------------------- bad input


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def gradient(w: int, h: int) -> Image.Image:
    image = Image.new("RGB", (w, h))
    image.putdata([(4 * x % 256, 4 * y % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    return image


def bomb_png() -> bytes:
    """A valid PNG header for a 100000 x 100000 image (10 gigapixels) with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def malformed_cases() -> list[tuple[str, str, object]]:
    """(method path, description, body): body is bytes (sent raw) or a JSON-able value."""
    t2i, i2i = "POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img"
    ok = {"prompt": "x", **SMALL}
    img = _b64(png(gradient(64, 64)))
    cases = [
        (t2i, "malformed JSON", b"{"),
        (t2i, "a JSON array", []),
        (t2i, "a JSON string", "x"),
        (t2i, "an empty body", b""),
        (t2i, "invalid UTF-8", b"\xff\xfe\xfd"),
        (t2i, "deeply nested JSON", b"[" * 100000 + b"]" * 100000),
        (t2i, "width of the wrong type", {**ok, "width": "wide"}),
        (t2i, "width 100", {**ok, "width": 100}),
        (t2i, "width 0", {**ok, "width": 0}),
        (t2i, "negative height", {**ok, "height": -64}),
        (t2i, "a billion pixels wide", {**ok, "width": 1_000_000_000}),
        (t2i, "steps 0", {**ok, "steps": 0}),
        (t2i, "negative steps", {**ok, "steps": -1}),
        (t2i, "a million steps", {**ok, "steps": 1_000_000}),
        (t2i, "fractional steps", {**ok, "steps": 2.5}),
        (t2i, "cfg_scale as text", {**ok, "cfg_scale": "high"}),
        (t2i, "cfg_scale NaN", b'{"prompt": "x", "width": 64, "height": 64, "steps": 3, "cfg_scale": NaN}'),
        (t2i, "seed as text", {**ok, "seed": "abc"}),
        (t2i, "negative seed", {**ok, "seed": -5}),
        (t2i, "huge seed", {**ok, "seed": 2 ** 70}),
        (t2i, "batch_size 0", {**ok, "batch_size": 0}),
        (t2i, "batch_size 10000", {**ok, "batch_size": 10000}),
        (t2i, "n_iter 0", {**ok, "n_iter": 0}),
        (t2i, "unknown sampler", {**ok, "sampler_name": "Nope 3000"}),
        (t2i, "unknown scheduler", {**ok, "scheduler": "bogus"}),
        (t2i, "a 10 MB prompt", {**ok, "prompt": "a" * 10_000_000}),
        (t2i, "a prompt over the token limit", {**ok, "prompt": "red, " * 1500}),
        (t2i, "a NUL in the negative prompt", {**ok, "negative_prompt": "a\u0000b"}),
        (t2i, "prompt as a number", {**ok, "prompt": 5}),
        (t2i, "override_settings not an object", {**ok, "override_settings": "x"}),
        (t2i, "override to a missing model", {**ok, "override_settings": {"sd_model_checkpoint": "missing"}}),
        (t2i, "clip skip 99", {**ok, "override_settings": {"CLIP_stop_at_last_layers": 99}}),
        (t2i, "subseed_strength 2", {**ok, "subseed_strength": 2}),
        (i2i, "no init image", ok),
        (i2i, "bad base64", {**ok, "init_images": ["!!!not base64!!!"]}),
        (i2i, "base64 of text", {**ok, "init_images": [_b64(b"hello, not an image")]}),
        (i2i, "a truncated PNG", {**ok, "init_images": [_b64(png(gradient(64, 64))[:80])]}),
        (i2i, "a decompression bomb", {**ok, "init_images": [_b64(bomb_png())]}),
        (i2i, "a data: URL without base64", {**ok, "init_images": ["data:image/png,xyz"]}),
        (i2i, "bad base64 mask", {**ok, "init_images": [img], "mask": "%%%"}),
        (i2i, "two init images", {**ok, "init_images": [img, img]}),
        (i2i, "resize_mode 7", {**ok, "init_images": [img], "resize_mode": 7}),
        (i2i, "width 100 with an image", {**ok, "init_images": [img], "width": 100}),
        (i2i, "denoising_strength 3", {**ok, "init_images": [img], "denoising_strength": 3}),
        (i2i, "mask_blur 1000", {**ok, "init_images": [img], "mask": img, "mask_blur": 1000}),
        (i2i, "a 1x20000 image cropped to a square", {**ok, "init_images": [_b64(png(Image.new("RGB", (1, 20000))))],
                                                      "resize_mode": 1}),
        (t2i, "randn_source as a list", {**ok, "override_settings": {"randn_source": [1]}}),
        ("POST /sdapi/v1/png-info", "png-info bad base64", {"image": "@@@"}),
        ("POST /sdapi/v1/png-info", "png-info without image", {}),
        ("POST /sdapi/v1/options", "options: missing model", {"sd_model_checkpoint": "nope"}),
        ("POST /sdapi/v1/options", "options: clip skip as text", {"CLIP_stop_at_last_layers": "x"}),
        ("POST /sdapi/v1/options", "options: a list", [1, 2]),
        ("POST /sdapi/v1/options", "options: randn_source as an object", {"randn_source": {"a": 1}}),
        ("POST /sdapi/v1/options", "options: live_previews_enable as text", {"live_previews_enable": "yes"}),
        ("GET /sdapi/v1/progress?skip_current_image=maybe", "progress: bad query", None),
        ("GET /sdapi/v1/no-such-route", "unknown route", None),
        ("GET /sdapi/v1/txt2img", "wrong method", None),
    ]
    return cases


def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server):
    cases = malformed_cases()
    assert len(cases) >= 30
    failures, statuses = [], []
    for route, what, body in cases:
        method, path = route.split(" ", 1)
        if isinstance(body, (bytes, type(None))):
            resp = requests.request(method, server.url + path, data=body, timeout=120,
                                    headers={"Content-Type": "application/json"})
        else:
            resp = requests.request(method, server.url + path, json=body, timeout=120)
        statuses.append(resp.status_code)
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        if not (400 <= resp.status_code < 500 and isinstance(payload, dict) and "error" in payload
                and "detail" in payload and "Traceback" not in resp.text):
            failures.append(f"{what}: {resp.status_code} {resp.text[:200]}")
    assert not failures, "\n".join(failures)
    assert sum(s >= 500 for s in statuses) == 0
    assert server.alive()
    ok = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "still here", "seed": 1, **SMALL},
                       timeout=120)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_body_over_64_mib_gets_413(server):
    """Refused from its Content-Length, before the body is read."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n{" % (64 * 2 ** 20 + 1))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"413"
    assert json.loads(body)["error"] == "PayloadTooLarge"


def test_chunked_body_over_64_mib_gets_413(server):
    """A body without Content-Length is counted as it arrives."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        block = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        try:
            for _ in range(66):
                s.sendall(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data.split(b" ")[1] == b"413", data[:200]
