"""Live previews: the "Approx cheap" map against webui's coefficients (typed here from v1.10's
``modules/sd_vae_approx.py``, ``cheap_approximation``) and its pixels (``sd_samplers_common.single_sample_to_image``),
the preview maker's timing and copies, and ``/sdapi/v1/progress``' ``current_image`` on a real server."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tritonsd.sampler.preview import cheap_rgb, due, grid, preview_pixels

# webui v1.10 sd_vae_approx.cheap_approximation: coeffs[latent channel] = [r, g, b]
WEBUI_SD = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
WEBUI_SDXL = [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
              [-0.3730, -0.2499, -0.2088]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def webui_pixel(latent: list[float], coeffs) -> tuple[float, float, float]:
    """One pixel as webui makes it, in float64: sum_l latent[l] * coeffs[l][rgb], * 0.5 + 0.5, clamped, * 255
    (before the uint8 truncation)."""
    out = []
    for c in range(3):
        v = sum(latent[l] * coeffs[l][c] for l in range(4)) * 0.5 + 0.5
        out.append(255.0 * min(max(v, 0.0), 1.0))
    return tuple(out)


LATENTS = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
           [0.0, 0.0, 0.0, 1.0], [0.3, -0.7, 1.1, -0.2], [-1.3, 0.4, 0.25, 0.9], [4.0, 4.0, 4.0, -4.0],
           [-4.0, -4.0, -4.0, 4.0], [0.5, 0.5, -0.5, 0.5]]


@pytest.mark.parametrize("family, coeffs", [("sd1", WEBUI_SD), ("sd2", WEBUI_SD), ("sdxl", WEBUI_SDXL)])
def test_cheap_preview_is_webuis_map(family, coeffs):
    # a [4, 2, 5] latent whose pixels are the test latents (column-major in the 2x5 grid)
    latent = torch.tensor(LATENTS, dtype=torch.float32).T.reshape(4, 2, 5)
    got = preview_pixels(latent, family)
    assert got.shape == (2, 5, 3) and got.dtype == np.uint8
    for k, lat in enumerate(LATENTS):
        want = webui_pixel([float(np.float32(v)) for v in lat], coeffs)
        for c in range(3):
            frac = want[c] - int(want[c])
            if want[c] in (0.0, 255.0) or 0.001 < frac < 0.999:  # away from a truncation edge float32 could cross
                assert got[k // 5, k % 5, c] == int(want[c]), (family, lat, c)


@pytest.mark.parametrize("family, coeffs", [("sd1", WEBUI_SD), ("sd2", WEBUI_SD), ("sdxl", WEBUI_SDXL)])
def test_cheap_rgb_is_webuis_linear_map(family, coeffs):
    """The map before quantisation: every coefficient shows (float32 arithmetic against float64)."""
    latent = torch.tensor(LATENTS, dtype=torch.float32).T.reshape(4, 2, 5)
    got = cheap_rgb(latent, family).double()
    for k, lat in enumerate(LATENTS):
        for c in range(3):
            want = sum(float(np.float32(lat[l])) * coeffs[l][c] for l in range(4))
            assert abs(got[c, k // 5, k % 5].item() - want) <= 1e-6 * (1 + abs(want)), (family, lat, c)


def test_half_precision_latents_and_wrong_shapes():
    latent = torch.tensor(LATENTS[5], dtype=torch.float16).reshape(4, 1, 1)
    assert preview_pixels(latent, "sd1").shape == (1, 1, 3)
    with pytest.raises(ValueError, match="4, H, W"):
        preview_pixels(torch.zeros(9, 2, 2), "sd1")  # an inpainting UNet's input, not its latent


def test_grid_is_webuis_image_grid_with_its_defaults():
    tiles = [np.full((2, 3, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)]
    g = grid(tiles)  # 5 images: round(sqrt(5)) = 2 rows, 3 columns, the last spot black
    assert g.shape == (4, 9, 3)
    assert [g[r * 2, c * 3, 0] for r in range(2) for c in range(3)] == [10, 20, 30, 40, 50, 0]
    assert grid(tiles[:1]).shape == (2, 3, 3) and grid(tiles[:3]).shape == (4, 6, 3)


def test_due_every_n_steps_from_step_zero():
    assert [i for i in range(25) if due(i, 10)] == [0, 10, 20]
    assert not any(due(i, 0) for i in range(5)) and not any(due(i, -1) for i in range(5))


def test_previews_copy_the_latent_and_encode_on_their_own_thread():
    from tritonsd.serve.previews import Previews

    p = Previews(every=2)
    latent = torch.randn(2, 4, 3, 3)
    assert not p.offer(1, latent, "sd1") and p.image() is None  # not due
    want = np.concatenate([preview_pixels(latent[0].clone(), "sd1"), preview_pixels(latent[1].clone(), "sd1")],
                          axis=1)  # two images: one row (A1111's round(sqrt(2)) rows)
    assert p.offer(2, latent, "sd1")
    latent.zero_()  # the loop updates its latent in place: the preview was taken from a copy
    deadline = time.monotonic() + 10
    while p.image() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    data = base64.b64decode(p.image())
    assert data.startswith(PNG_MAGIC)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), want)
    p.reset()
    assert p.image() is None
    assert not p.offer(0, latent, "unknown-family") and not Previews(every=0).offer(0, latent, "sd1")


def test_a_job_hands_its_preview_sink_to_a_captured_loop():
    """serve/jobs.py's step callback carries the period and the sink a graph runner's previews go to
    (``pipeline._denoise_graphed`` reads them): a host latent offered from the runner's thread is the preview."""
    from types import SimpleNamespace

    from tritonsd.serve import jobs
    from tritonsd.serve.previews import Previews

    latent = torch.randn(1, 4, 3, 3)
    seen = {}

    class Pipe:
        config = SimpleNamespace(family="sd1")

        def generate(self, s, callback):
            seen["every"] = callback.preview_every
            callback({"i": 0, "total": 1})  # the replay's progress: no latent
            threading.Thread(target=callback.preview, args=(0, latent)).start()  # the runner's reader thread
            return torch.zeros(1, 3, 8, 8)

        def to_pil(self, out, s):
            return []

    class Progress:
        def update(self, **kw):
            pass

    worker = SimpleNamespace(previews=Previews(every=3), progress=Progress(), check_interrupt=lambda: None)
    jobs._generate(Pipe(), None, worker)
    deadline = time.monotonic() + 10
    while worker.previews.image() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen["every"] == 3
    data = base64.b64decode(worker.previews.image())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), preview_pixels(latent[0], "sd1"))

    worker.previews.reset()
    worker.previews.enabled = False  # live_previews_enable off: no period for the loop, nothing offered kept
    jobs._generate(Pipe(), None, worker)
    time.sleep(0.2)
    assert seen["every"] == 0 and worker.previews.image() is None
    assert not worker.previews.offer(0, latent, "sd1")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_preview_does_not_synchronize_the_loop():
    """The copy out of a CUDA latent is queued (pinned host memory, non_blocking, an event): torch's sync debug
    mode raises on any call that would make the sampling thread wait for the device."""
    from tritonsd.serve.previews import Previews

    p = Previews(every=1)
    latent = torch.randn(1, 4, 64, 64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            latent = latent * 1.01  # the loop's next step, queued behind the copy
            assert p.offer(i, latent, "sd1")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    deadline = time.monotonic() + 10
    while p.image() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert base64.b64decode(p.image()).startswith(PNG_MAGIC)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_previews_of_a_replayed_graph_do_not_synchronize_the_loop(monkeypatch):
    """A captured loop with previews every step: its replay (the sampling thread's whole part) makes no call that
    waits for the device (sync debug mode "error"); the previews come from the tap's reader thread, host copies,
    one per step, equal to the uncaptured loop's (a ring as long as the loop: no slot reused, none dropped)."""
    from tritonsd.sampler.graph import GraphRunner
    from tritonsd.sampler.graph_preview import PreviewTap

    monkeypatch.setattr(PreviewTap, "RING", 8)
    from tritonsd.sampler.schedule import get_sigmas_karras

    class Toy:  # x, sigma and the context: cheap, capturable
        def __call__(self, x, sigma, context):
            return x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5 + context.mean(dim=(1, 2))[:, None, None, None]

    sigmas = get_sigmas_karras(6, 0.03, 14.6)
    x = torch.randn(1, 4, 16, 16, device="cuda") * sigmas[0]
    cond, uncond = torch.randn(2, 1, 77, 8, device="cuda")
    graphed = GraphRunner(Toy(), device="cuda")
    eager = GraphRunner(Toy(), device="cuda", use_graphs=False)

    def previews(runner, debug):
        got = []
        if debug:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=7.5, sampler="euler", preview_every=1,
                       preview=lambda i, latent: got.append((i, latent)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        deadline = time.monotonic() + 10
        while len(got) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        return got

    previews(graphed, debug=False)  # the capture synchronises (warm-up): not under the debug mode
    got = previews(graphed, debug=True)
    want = previews(eager, debug=False)
    assert [i for i, _ in got] == [i for i, _ in want] == list(range(6))
    for (i, a), (_, b) in zip(got, want):
        assert a.device.type == "cpu" and torch.allclose(a, b, rtol=1e-5, atol=1e-5), i


@pytest.mark.slow
def test_progress_route_returns_the_preview_while_a_job_runs(fixtures, tmp_path):
    import requests

    from _serve_server import Server

    server = Server(["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                     "--preview-every", "5"], tmp_path / "server.log")
    url = server.url + "/sdapi/v1"
    try:
        assert requests.get(url + "/options", timeout=10).json()["show_progress_every_n_steps"] == 5
        bad = requests.post(url + "/options", json={"show_progress_every_n_steps": "often"}, timeout=10)
        assert bad.status_code == 422 and "show_progress_every_n_steps" in bad.json()["detail"]
        assert requests.post(url + "/options", json={"show_progress_every_n_steps": 10}, timeout=10).ok
        assert requests.get(url + "/options", timeout=10).json()["show_progress_every_n_steps"] == 10

        job = threading.Thread(target=lambda: requests.post(url + "/txt2img", json={
            "prompt": "slow", "seed": 3, "width": 64, "height": 64, "steps": 1000, "sampler_name": "Euler"},
            timeout=300))
        job.start()
        images, deadline = [], time.monotonic() + 120
        while len(set(images)) < 2 and time.monotonic() < deadline:
            p = requests.get(url + "/progress", timeout=10).json()
            if p["current_image"]:
                images.append(p["current_image"])
                skipped = requests.get(url + "/progress?skip_current_image=true", timeout=10).json()
                assert skipped["current_image"] is None
            time.sleep(0.02)
        requests.post(url + "/interrupt", timeout=10)
        job.join(120)
        assert len(set(images)) >= 2, "fewer than two different previews while the job ran"
        for b64 in images:
            data = base64.b64decode(b64)
            assert data.startswith(PNG_MAGIC) and Image.open(io.BytesIO(data)).size == (8, 8)
        assert requests.get(url + "/progress", timeout=10).json()["current_image"] is None  # no job: none

        # previews off (A1111's live_previews_enable; a period of 0: the unit test above): none
        bad = requests.post(url + "/options", json={"live_previews_enable": 1}, timeout=10)
        assert bad.status_code == 422 and "live_previews_enable" in bad.json()["detail"]
        assert requests.get(url + "/options", timeout=10).json()["live_previews_enable"] is True
        assert requests.post(url + "/options", json={"live_previews_enable": False}, timeout=10).ok
        assert requests.get(url + "/options", timeout=10).json()["live_previews_enable"] is False
        job = threading.Thread(target=lambda: requests.post(url + "/txt2img", json={
            "prompt": "slow", "seed": 3, "width": 64, "height": 64, "steps": 1000, "sampler_name": "Euler"},
            timeout=300))
        job.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            p = requests.get(url + "/progress", timeout=10).json()
            if p["state"]["sampling_step"] >= 30:
                break
            time.sleep(0.02)
        assert p["state"]["sampling_step"] >= 30 and p["current_image"] is None
        requests.post(url + "/interrupt", timeout=10)
        job.join(120)
    finally:
        server.stop()
