"""The server's speed: images per second through ``/sdapi/v1/txt2img`` on loopback, for one client and for
several at once, at 512x512 and 20 steps by default, on a full-size random-weight model (``bench e2e``'s
manifests: the layout and dtype of the released file, random values; speed does not depend on them).

    python -m tritonsd.serve.bench                       # sd15, 512x512, 20 steps, 1 and 8 clients (CUDA)
    python -m tritonsd.serve.bench --model demo:sd1 --size 64 --steps 3 --requests 4    # a CPU smoke run

Writes ``benchmarks/results/serve-<device>-<dtype>-<date>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from tritonsd.bench import environment
from tritonsd.bench.random_weights import build_random_model
from tritonsd.devices import default_dtype, dtype_name, resolve_device, resolve_dtype
from tritonsd.load_spec import LoadSpec
from tritonsd.pipeline import Pipeline, load_spec
from tritonsd.serve import build_state, create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline(name: str, dtype: str, device: str):
    if name.startswith("demo:"):
        return load_spec(LoadSpec(name, device=device, dtype=dtype))
    model = build_random_model(name, dtype=resolve_dtype(dtype), device=device, seed=0)
    return Pipeline(model, name=f"{name}-random", model_hash="0000000000")


def _serve(state):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _run_clients(url: str, body: dict, clients: int, requests_total: int) -> dict:
    import requests

    per_client = max(1, requests_total // clients)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> int:
        s = requests.Session()
        images = 0
        for j in range(per_client):
            t = time.perf_counter()
            r = s.post(url + "/sdapi/v1/txt2img", json={**body, "seed": 1000 * k + j}, timeout=600)
            r.raise_for_status()
            images += len(r.json()["images"])
            with lock:
                latencies.append(time.perf_counter() - t)
        return images

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        images = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": per_client * clients, "images": images, "wall_s": round(wall, 3),
            "images_per_s": round(images / wall, 3), "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_max_s": round(max(latencies), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonsd.serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", help="a bench e2e manifest name (sd15, sd21, ...) or demo:sd1")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--requests", type=int, default=32, help="requests per measurement (default: 32)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--json", type=Path, default=None, help="output file (default: benchmarks/results/serve-...json)")
    args = p.parse_args(argv)

    device = str(resolve_device(args.device))
    dtype = dtype_name(args.dtype) if args.dtype else default_dtype(device)
    pipe = _pipeline(args.model, dtype, device)
    label = args.model if args.model.startswith("demo:") else f"demo:{args.model}-random"
    state = build_state(label, pipe=pipe)
    server, thread, url = _serve(state)
    body = {"prompt": "a photograph of an astronaut riding a horse", "negative_prompt": "", "steps": args.steps,
            "width": args.size, "height": args.size, "sampler_name": args.sampler, "cfg_scale": 7.0}
    try:
        _run_clients(url, body, 1, 2)  # warm-up: kernels compiled, the sampler loop captured
        rows = [_run_clients(url, body, c, args.requests) for c in args.clients]
    finally:
        server.should_exit = True
        thread.join(30)
        state.worker.stop(30)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    result = {"bench": "serve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": name, "torch": torch.__version__, "python": platform.python_version(),
              "settings": {"model": args.model, "size": args.size, "steps": args.steps, "sampler": args.sampler,
                           "dtype": dtype, "cfg": 7.0, "route": "/sdapi/v1/txt2img", "transport": "loopback HTTP"},
              "rows": rows}
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    path = args.json or environment.results_dir() / f"serve-{safe}-{dtype}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['clients']} client(s): {r['images_per_s']:.3f} images/s, p50 latency {r['latency_p50_s']:.3f} s")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
