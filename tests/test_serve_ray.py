"""``tritonsd serve --ray`` on a local Ray cluster: the fixtures' sd1-tiny (text heads 2) at 64 px on CPU replicas
of half a CPU each, answering as the single-process server does.

One Ray Serve application serves the module (a cluster and two warm replicas cost ~20 s): two generator
replicas, ``--models-per-replica 1`` and a models folder with a second checkpoint. The single-process server it
is compared with is ``create_app(build_state(...))`` in this process (the same app and worker ``tritonsd serve``
runs), driven through FastAPI's TestClient with the very JSON each Ray request sent.

Which replica ran what is read from the replicas' own log files (``logs/serve/replica_*Generator*.log``): a
line per job naming its task and model, and a line per model load.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

try:
    import ray
    import requests
    import webuiapi
    from fastapi.testclient import TestClient
    from ray import serve
except ImportError:  # the test extra installs them: missing, these tests fail (in the fixture) rather than skip
    ray = None

from tritonsd.load_spec import LoadSpec  # noqa: E402
from tritonsd.serve import build_state, create_app  # noqa: E402
from tritonsd.tools.cli import main as cli_main  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = {"steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}
HANG_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_app(fixtures: Path, models: Path, **over):
    from tritonsd.serve.ray_deploy import RayApp  # lazy: Ray Serve, after the fixture checked it is there

    fields = dict(spec={"path": str(fixtures / "sd1-tiny.safetensors"), "config": str(fixtures / "sd1-tiny.yaml"),
                        "text_heads": 2, "device": "cpu"},
                  models_dir=str(models), replicas="2", cpus_per_replica=0.5, models_per_replica=1,
                  request_timeout=100.0, env={"OMP_NUM_THREADS": "1"})
    return RayApp(**{**fields, **over})


@pytest.fixture(scope="module")
def models(fixtures, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for suffix in (".safetensors", ".yaml"):
        (d / f"sd1-inpaint-tiny{suffix}").symlink_to(fixtures / f"sd1-inpaint-tiny{suffix}")
    return d


@pytest.fixture(scope="module")
def cluster(fixtures, models):
    """The application on a local cluster of 2 logical CPUs; yields its URL."""
    if ray is None:
        pytest.fail("the Ray Serve tests need ray[serve], requests, webuiapi: pip install -e '.[test]'",
                    pytrace=False)
    from tritonsd.serve.ray_deploy import APP_NAME, build  # lazy: Ray Serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(ray_app(fixtures, models)), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def single(fixtures, models):
    """The single-process server (its app and worker), in this process."""
    spec = LoadSpec(fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", device="cpu", text_heads=2)
    state = build_state(spec, models_dir=models, allowed_hosts=None)
    with TestClient(create_app(state)) as client:
        yield client
    state.worker.stop(10)


# ---------------------------------------------------------------- helpers


def replica_logs() -> dict[str, str]:
    """replica id -> its log text, for the generator replicas of this cluster (dead ones included)."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    out = {}
    for p in logs.glob("replica_tritonsd_Generator_*.log"):
        out[p.stem.rsplit("_", 1)[-1]] = p.read_text(errors="replace")
    return out


def events(text: str) -> list[tuple[str, str]]:
    """("load" | "task", model file / task id) in the order a replica logged them."""
    out = []
    for line in text.splitlines():
        if m := re.search(r"tritonsd replica \S+: loading model (\S+)", line):
            out.append(("load", m.group(1)))
        elif m := re.search(r"tritonsd replica \S+: task (\S+) on model (\S+) \(pid (\d+)\)", line):
            out.append(("task", m.group(1), m.group(2), int(m.group(3))))
    return out


def tasks_by_replica() -> dict[str, list[str]]:
    return {rid: [e[1] for e in events(text) if e[0] == "task"] for rid, text in replica_logs().items()}


def post(url: str, path: str, body, timeout: float = HANG_S) -> requests.Response:
    return requests.post(url + path, json=body, timeout=timeout)


def wait_active(url: str, task_id: str, steps: int = 2) -> dict:
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        p = post(url, "/internal/progress", {"id_task": task_id}).json()
        if p["active"] and p["progress"] and p["progress"] > steps / 1000:
            return p
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never ran")


def pid_of(task_id: str) -> int:
    """The process of the replica that logged ``task_id``."""
    pids = [e[3] for text in replica_logs().values() for e in events(text) if e[0] == "task" and e[1] == task_id]
    assert len(pids) == 1, pids
    return pids[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def replica_states() -> dict:
    return serve.status().applications["tritonsd"].deployments["Generator"].replica_states


def wait_replicas(count: int, timeout: float) -> float:
    """Seconds until exactly ``count`` generator replicas run (and no other state)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if replica_states() == {"RUNNING": count}:
            return time.monotonic() - t0
        time.sleep(0.25)
    raise AssertionError(f"not {count} running replicas after {timeout} s: {replica_states()}")


class Recording(requests.Session):
    """webuiapi's session, keeping each POST's JSON and answer (to replay on the single-process server)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict, requests.Response]] = []

    def post(self, url, json=None, **kw):
        r = super().post(url, json=json, timeout=HANG_S, **kw)
        self.calls.append((url.split("/sdapi/v1", 1)[1], json, r))
        return r


def client(url: str) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=url + "/sdapi/v1", sampler="Euler", steps=4)
    api.session = Recording()
    return api


def twin_png(single: TestClient, path: str, body: dict) -> list[str]:
    r = single.post("/sdapi/v1" + path, json=body)
    assert r.status_code == 200, r.text[:300]
    return r.json()["images"]


# ---------------------------------------------------------------- the tests


def test_16_concurrent_requests_from_8_clients_equal_the_single_process_server(cluster, single):
    before = tasks_by_replica()
    clients = [client(cluster) for _ in range(8)]

    def two_requests(i: int) -> None:
        api = clients[i]
        for j in range(2):
            n = 2 * i + j
            api.txt2img(prompt=f"a red house number {n}", seed=100 + n, width=64, height=64, steps=4,
                        sampler_name=["Euler", "Euler a", "DPM++ 2M"][n % 3], cfg_scale=[7.0, 4.5][n % 2],
                        negative_prompt="blurry" if n % 4 == 0 else "")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(two_requests, range(8)))
    calls = [c for api in clients for c in api.session.calls]
    assert len(calls) == 16
    for path, body, r in calls:
        assert r.status_code == 200, r.text[:300]
        assert r.json()["images"] == twin_png(single, path, body), body["prompt"]
    after = tasks_by_replica()
    served = {rid: len(after[rid]) - len(before.get(rid, [])) for rid in after}
    assert sum(served.values()) == 16
    assert sum(n > 0 for n in served.values()) == 2, served


def test_two_models_alternate_and_load_only_where_not_warm(cluster, single, fixtures, tmp_path):
    """Each request gets its own model's image (the second model's checked against the Pipeline's own PNG too),
    and a replica logs a load exactly when the model was not the one it had warm."""
    import tritonsd

    before = {rid: len(events(t)) for rid, t in replica_logs().items()}
    models = ["sd1-tiny.safetensors", "sd1-inpaint-tiny.safetensors"]
    for i in range(6):
        body = {"prompt": f"a fox {i}", "seed": 7 + i, **SMALL, "force_task_id": f"models-{i}",
                "override_settings": {"sd_model_checkpoint": models[i % 2]}}
        r = post(cluster, "/sdapi/v1/txt2img", body)
        assert r.status_code == 200, r.text[:300]
        assert json.loads(r.json()["info"])["sd_model_name"] == models[i % 2].split(".")[0]
        assert r.json()["images"] == twin_png(single, "/txt2img", body)
        if i == 1:
            inpaint = tritonsd.load(fixtures / "sd1-inpaint-tiny.safetensors", text_heads=2, device="cpu")
            want = inpaint(f"a fox {i}", seed=7 + i, steps=4, width=64, height=64, sampler="euler", cfg_scale=7.0)
            assert [base64.b64decode(b) for b in r.json()["images"]] == \
                [p.read_bytes() for p in inpaint.save(want, tmp_path)]
    loads = 0
    for rid, text in replica_logs().items():
        warm = None  # --models-per-replica 1: a replica's warm model is the last it loaded
        for e in events(text):
            if e[0] == "load":
                assert e[1] != warm, f"replica {rid} loaded {e[1]} while it was warm"
                warm = e[1]
            else:
                assert e[2] == warm, f"replica {rid} ran {e[1]} on {e[2]} without loading it (warm: {warm})"
        loads += sum(1 for e in events(text)[before.get(rid, 0):] if e[0] == "load")
    assert 1 <= loads <= 2, loads  # the second model loaded once or twice (both replicas), never per request


def test_img2img_extras_options_and_the_page_answer_as_the_single_process_server(cluster, single):
    """The routes beside txt2img go through the same back-end: img2img (its init image travels to the replica),
    extras (run on a replica), a model switch by /sdapi/v1/options (the default of later requests), the page."""
    from test_serve_api import _b64, gradient, png

    init = _b64(png(gradient(64, 64)))
    body = {"prompt": "a painting", "seed": 11, **SMALL, "init_images": [init], "denoising_strength": 0.6}
    r = post(cluster, "/sdapi/v1/img2img", body)
    assert r.status_code == 200 and r.json()["images"] == twin_png(single, "/img2img", body)
    extras = {"image": init, "upscaler_1": "Lanczos", "upscaling_resize": 2}
    r = post(cluster, "/sdapi/v1/extra-single-image", extras)
    assert r.status_code == 200 and r.json() == single.post("/sdapi/v1/extra-single-image", json=extras).json()
    try:
        assert post(cluster, "/sdapi/v1/options", {"sd_model_checkpoint": "sd1-inpaint-tiny"}).status_code == 200
        options = requests.get(cluster + "/sdapi/v1/options", timeout=HANG_S).json()
        assert options["sd_model_checkpoint"].startswith("sd1-inpaint-tiny")
        r = post(cluster, "/sdapi/v1/txt2img", {"prompt": "after the switch", "seed": 1, **SMALL})
        assert json.loads(r.json()["info"])["sd_model_name"] == "sd1-inpaint-tiny"
    finally:
        assert post(cluster, "/sdapi/v1/options", {"sd_model_checkpoint": "sd1-tiny"}).status_code == 200
    page = requests.get(cluster + "/", timeout=HANG_S)
    assert page.status_code == 200 and page.text == single.get("/").text


def test_interrupt_by_task_id_stops_only_that_job(cluster, single):
    long_body = {"prompt": "slow", "seed": 3, "width": 64, "height": 64, "steps": 1000, "sampler_name": "Euler",
                 "force_task_id": "victim-of-interrupt"}
    other_body = {"prompt": "keeps going", "seed": 4, "width": 64, "height": 64, "steps": 300,
                  "sampler_name": "Euler", "force_task_id": "keeps-going"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        other = pool.submit(post, cluster, "/sdapi/v1/txt2img", other_body)
        wait_active(cluster, "keeps-going")
        victim = pool.submit(post, cluster, "/sdapi/v1/txt2img", long_body)
        wait_active(cluster, "victim-of-interrupt")
        oldest = requests.get(cluster + "/sdapi/v1/progress", timeout=HANG_S).json()
        assert oldest["state"]["sampling_steps"] == 300  # the oldest running job's
        deadline = time.monotonic() + 10
        while oldest["current_image"] is None and time.monotonic() < deadline:  # its replica's live preview
            time.sleep(0.2)
            oldest = requests.get(cluster + "/sdapi/v1/progress", timeout=HANG_S).json()
        assert Image.open(io.BytesIO(base64.b64decode(oldest["current_image"]))).format == "PNG"
        t0 = time.monotonic()
        assert post(cluster, "/sdapi/v1/interrupt", {"id_task": "victim-of-interrupt"}).status_code == 200
        r = victim.result(HANG_S)
        assert time.monotonic() - t0 < 10  # its 1,000 steps take over 17 s here
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        done = other.result(HANG_S)
    assert done.status_code == 200
    assert done.json()["images"] == twin_png(single, "/txt2img", other_body)
    state = post(cluster, "/internal/progress", {"id_task": "victim-of-interrupt"}).json()
    assert state["completed"] and not state["active"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # without an id: every running job, as webuiapi asks
        both = [pool.submit(post, cluster, "/sdapi/v1/txt2img", {**long_body, "force_task_id": f"all-{i}"})
                for i in range(2)]
        for i in range(2):
            wait_active(cluster, f"all-{i}")
        t0 = time.monotonic()
        client(cluster).interrupt()
        assert all(f.result(HANG_S).status_code == 200 for f in both) and time.monotonic() - t0 < 10


def test_malformed_requests_get_the_single_process_servers_4xx_json(cluster, single):
    from test_serve_api import malformed_cases

    differ = []
    for route, what, body in malformed_cases():
        method, path = route.split(" ", 1)
        kw = {"content": body} if isinstance(body, (bytes, type(None))) else {"json": body}
        mine = single.request(method, path, headers={"Content-Type": "application/json"}, **kw)
        kw = {"data": body} if isinstance(body, (bytes, type(None))) else {"json": body}
        theirs = requests.request(method, cluster + path, headers={"Content-Type": "application/json"},
                                  timeout=HANG_S, **kw)
        assert 400 <= mine.status_code < 500, f"{what}: single-process {mine.status_code}"
        if (theirs.status_code, theirs.json()) != (mine.status_code, mine.json()):
            differ.append(f"{what}: {theirs.status_code} {theirs.text[:200]} != {mine.status_code} "
                          f"{mine.text[:200]}")
    assert not differ, "\n".join(differ)
    with socket.create_connection(("127.0.0.1", int(cluster.rsplit(":", 1)[1])), timeout=HANG_S) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n{" % (64 * 2 ** 20 + 1))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"413" and json.loads(body)["error"] == "PayloadTooLarge"
    assert requests.get(cluster + "/", headers={"Host": "evil.example"}, timeout=HANG_S).status_code == 400


def test_a_killed_replica_loses_no_request(cluster, single):
    """SIGKILL of the replica running a 1,000-step job: that request is answered (the retry's image, or a 503
    naming the cause) within 120 s, 8 requests sent meanwhile get their images, and two replicas run again."""
    long_body = {"prompt": "killed", "seed": 5, "width": 64, "height": 64, "steps": 1000, "sampler_name": "Euler",
                 "force_task_id": "killed-mid-run"}
    bodies = [{"prompt": f"meanwhile {i}", "seed": 50 + i, **SMALL} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        t0 = time.monotonic()
        victim = pool.submit(post, cluster, "/sdapi/v1/txt2img", long_body, 120)
        wait_active(cluster, "killed-mid-run", steps=5)
        pid = pid_of("killed-mid-run")
        os.kill(pid, signal.SIGKILL)
        others = [pool.submit(post, cluster, "/sdapi/v1/txt2img", b) for b in bodies]
        r = victim.result(HANG_S)
        answered = time.monotonic() - t0
        results = [f.result(HANG_S) for f in others]
    print(f"the killed replica's request: {r.status_code} after {answered:.1f} s")  # -rP shows which way
    assert answered < 120
    if r.status_code == 200:  # the retry's image is the request's own, from another replica
        assert r.json()["images"] == twin_png(single, "/txt2img", long_body)
        ran = [e[3] for text in replica_logs().values() for e in events(text) if e[:2] == ("task", "killed-mid-run")]
        assert len(ran) == 2 and pid in ran and len(set(ran)) == 2, ran  # (log files in no particular order)
    else:
        assert r.status_code == 503 and "replica" in r.json()["detail"], r.text[:300]
    for body, res in zip(bodies, results):
        assert res.status_code == 200, res.text[:300]
        assert res.json()["images"] == twin_png(single, "/txt2img", body)
    wait_replicas(2, 90)
    assert not alive(pid)
    assert post(cluster, "/sdapi/v1/txt2img", {"prompt": "healthy", "seed": 1, **SMALL}).status_code == 200


def test_autoscaling_goes_1_2_1_and_deadlines_answer_504(cluster, fixtures, models):
    """The same application redeployed with ``--replicas 1:2``, short delays and ``--request-timeout 8``: idle,
    it shrinks to 1; a burst grows it to 2; idle again, back to 1. A job past the deadline is answered 504 JSON
    in time and stopped on its replica (the next request is served at once)."""
    from tritonsd.serve.ray_deploy import APP_NAME, build  # lazy: Ray Serve

    app = ray_app(fixtures, models, replicas="1:2", upscale_delay=0.5, downscale_delay=3.0, request_timeout=8.0)
    serve.run(build(app), name=APP_NAME, route_prefix="/")
    wait_replicas(1, 60)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            post(cluster, "/sdapi/v1/txt2img", {"prompt": "burst", "seed": 1, **{**SMALL, "steps": 40}})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        burst = [pool.submit(load) for _ in range(4)]
        try:
            wait_replicas(2, 90)
        finally:
            stop.set()
        for f in burst:
            f.result(HANG_S)
    wait_replicas(1, 60)
    t0 = time.monotonic()
    r = post(cluster, "/sdapi/v1/txt2img", {"prompt": "too long", "seed": 1, **{**SMALL, "steps": 1000}})
    assert r.status_code == 504 and r.json()["error"] == "GatewayTimeout", r.text[:300]
    assert time.monotonic() - t0 < 20
    t0 = time.monotonic()
    assert post(cluster, "/sdapi/v1/txt2img", {"prompt": "next", "seed": 2, **SMALL}).status_code == 200
    assert time.monotonic() - t0 < 6  # the stopped job no longer holds the one replica


def declarative() -> bool:
    """Whether the running application came from a config (``serve run FILE``) rather than ``serve.run``."""
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details().get("applications", {}).get("tritonsd", {})
    return app.get("source") == "declarative" and app.get("deployed_app_config") is not None


def test_the_written_config_starts_with_serve_run(cluster, fixtures, models, tmp_path):
    """``tritonsd serve --ray --write-config`` then Ray's own ``serve run`` on this cluster: the application
    comes up from the config (2 replicas, as written) and answers."""
    path = tmp_path / "serve.yaml"
    port = cluster.rsplit(":", 1)[1]
    assert cli_main(["serve", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2",
                     "--models-dir", str(models), "--ray", "--ray-cpus-per-replica", "0.5", "--replicas", "2",
                     "--port", port, "--write-config", str(path)]) == 0
    log = tmp_path / "serve-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run",
                                 "--address", ray.get_runtime_context().gcs_address, str(path)],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + HANG_S
        while not (declarative() and serve.status().applications["tritonsd"].status == "RUNNING"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        wait_replicas(2, 60)
        assert post(cluster, "/sdapi/v1/txt2img", {"prompt": "from the config", "seed": 1, **SMALL}).status_code \
            == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
