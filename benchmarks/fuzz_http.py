"""The server's request bodies fuzzed over loopback (issue 26): ``tritonsd serve`` started on the fixtures' tiny
SD1 model (a LoRA folder holding malformed LoRAs beside the good one, the fixtures' embeddings), its own OpenAPI
document read from ``/openapi.json``, and N bodies generated from each POST route's schema by Hypothesis
(tests/fuzz_inputs.py ``body_strategy``: every field drawn from its type, often of the wrong type or extreme,
plus unknown keys; prompts and images drawn from a list of hostile ones). Each request must get an answer within
``--timeout`` seconds (else a hang) that is not a 5xx; the server's peak RSS rise (VmHWM over its RSS after a
warm-up) is recorded with the counts::

    nice -n 19 python benchmarks/fuzz_http.py --requests 5000 --out benchmarks/results/fuzz-http.json

The test tests/test_fuzz_inputs.py runs the same at a small count.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_inputs as fi  # noqa: E402
from tritonsd.bench import environment  # noqa: E402

ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/sdapi/v1/options")


def malformed_loras(folder: Path) -> list[str]:
    """LoRA files of the shapes that gave 500 before issue 26 (names: what they hold)."""
    import torch

    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    files = {
        "zero-dim": {"lora_up.weight": torch.tensor(1.0), "lora_down.weight": torch.tensor(1.0)},
        "inner-mismatch": {"lora_up.weight": torch.ones(32, 4), "lora_down.weight": torch.ones(3, 32)},
        "alpha-vector": {"lora_up.weight": torch.ones(32, 4), "lora_down.weight": torch.ones(4, 32),
                         "alpha": torch.ones(3)},
        "huge-product": {"lora_up.weight": torch.ones(16384, 1), "lora_down.weight": torch.ones(1, 16384)},
        "down-3d": {"lora_up.weight": torch.ones(32, 4), "lora_down.weight": torch.ones(4, 32, 2)},
        "hada-broadcast": {"hada_w1_a": torch.ones(1024, 1), "hada_w1_b": torch.ones(1, 1),
                           "hada_w2_a": torch.ones(1, 1), "hada_w2_b": torch.ones(1, 1024)},
        "alpha-1e30": {"lora_up.weight": torch.ones(32, 4), "lora_down.weight": torch.ones(4, 32),
                       "alpha": torch.tensor(1e30)},
    }
    for name, parts in files.items():
        data = fi.safetensors_bytes({f"{module}.{k}": v for k, v in parts.items()})
        (folder / f"{name}.safetensors").write_bytes(data)
    return sorted(files)


def hostile_values(bad_loras: list[str]) -> dict[str, list]:
    """Field name -> values worth drawing beside the schema's (prompts, images, infotexts)."""
    png = base64.b64encode(fi.png_with_text("a\nSteps: 3, Seed: 1, Size: 64x64")).decode()
    slow_png = base64.b64encode(fi.png_with_text("a" * 32_000)).decode()  # froze the server for 8 s before
    big_png = base64.b64encode(fi.png_with_text("ab: x, " * 20_000)).decode()
    tiny = base64.b64encode(fi.png_with_text("", image_size=(8, 8))).decode()
    prompts = ["a cat", "(" * 3000 + "x", "(x:1e38)", "((((((((((x:1e3))))))))))", "[a:b:0.5]", "a" * 20_000,
               "<lora:lora-sd1-tiny:1>", "<lora:lora-sd1-tiny:1e38>", "<lora:missing:1>", "\x00", "\ud800",
               "[a|b|c] BREAK x", "<lora:lora-sd1-tiny:nan>"] + [f"x <lora:{n}:1>" for n in bad_loras]
    images = [png, slow_png, big_png, tiny, "data:image/png;base64," + tiny, "!!!", ""]
    return {"prompt": prompts, "negative_prompt": prompts, "image": images, "init_images": [[i] for i in images],
            "mask": images, "infotext": ["a\nSteps: 3, Seed: 1, Size: 64x64", "ab: c" * 10_000, "x\n" * 1000,
                                         "a\nSteps: 1000000, Size: 99999x99999, Seed: -1"],
            "override_settings": [{"CLIP_stop_at_last_layers": 99}, {"eta_ddim": 5}, {"x" * 100: "y" * 1000},
                                  {"sd_model_checkpoint": "\x1b[2J"}, {"randn_source": "CPU"}],
            "cfg_scale": [1e30, 7, -1, 101], "eta": [5, 0.5, 1], "sampler_name": ["DDIM", "Euler a", "x"]}


def strategies(spec: dict, bad_loras: list[str]):
    from hypothesis import strategies as st

    extra = hostile_values(bad_loras)
    out = {}
    for route in ROUTES:
        op = spec["paths"][route]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        body = fi.body_strategy(schema, spec)

        def with_hostile(b, route=route):
            return st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in extra.items()
                                                       if route != "/sdapi/v1/options"}).map(lambda h: {**b, **h})

        base = _valid_base(route, extra)
        near_valid = st.tuples(base, body).flatmap(lambda t: st.lists(
            st.sampled_from(sorted(t[1]) or ["prompt"]), max_size=2).map(
            lambda keys, t=t: {**t[0], **{k: t[1][k] for k in keys if k in t[1]}}))
        out[route] = st.one_of(body, body.flatmap(with_hostile), near_valid, base.flatmap(with_hostile))
    return out


def _valid_base(route: str, extra: dict):
    """A body the route accepts (small and cheap), for the draws that change one or two fields of it: the
    paths past validation (sampling, LoRAs, img2img geometry, options) get their share of the requests."""
    from hypothesis import strategies as st

    tiny = extra["init_images"][3]
    if route == "/sdapi/v1/png-info":
        return st.fixed_dictionaries({"image": st.sampled_from(extra["image"][:4])})
    if route == "/sdapi/v1/options":
        return st.fixed_dictionaries({}, optional={"CLIP_stop_at_last_layers": st.integers(1, 12),
                                                   "eta_ddim": st.floats(0, 1), "randn_source": st.just("CPU")})
    prompts = st.one_of(st.sampled_from(["a cat", "a red fox, (sky:1.2)", "<lora:lora-sd1-tiny:0.7> a dog"]),
                        st.sampled_from(extra["prompt"]))
    fields = {"prompt": prompts, "steps": st.integers(1, 3),
              "width": st.sampled_from([64, 56]), "height": st.sampled_from([64, 48]),
              "sampler_name": st.sampled_from(["Euler", "DDIM", "Euler a", "DPM++ 2M"])}
    if route == "/sdapi/v1/img2img":
        fields["init_images"] = st.just(tiny)
    return st.fixed_dictionaries(fields)


def _one_line_error(resp) -> bool:
    """A1111's error JSON whose message is one line (no traceback)."""
    try:
        payload = resp.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and "\n" not in str(payload.get("errors", "")) and "Traceback" not in resp.text


def _status_of_proc(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run(args: argparse.Namespace) -> dict:
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from _serve_server import Server
    from tritonsd.testing.reference import fixtures_dir

    fixtures = Path(args.fixtures) if args.fixtures else fixtures_dir()
    root = Path(tempfile.mkdtemp(prefix="tritonsd-fuzz-http-"))
    loras = root / "loras"
    loras.mkdir()
    (loras / "lora-sd1-tiny.safetensors").symlink_to(fixtures / "lora-sd1-tiny.safetensors")
    bad = malformed_loras(loras)
    server = Server(["--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", "--lora-dir",
                     str(loras), "--embeddings-dir", str(fixtures / "embeddings")], root / "server.log")
    counts: Counter[str] = Counter()
    by_route: dict[str, Counter] = {r: Counter() for r in ROUTES}
    failures: list[dict] = []
    errors: Counter[str] = Counter()
    times: list[float] = []
    try:
        session = requests.Session()
        spec = session.get(server.url + "/openapi.json", timeout=60).json()
        for warm in ({"prompt": "warm", "steps": 2, "width": 64, "height": 64}, {"prompt": "<lora:lora-sd1-tiny:1>",
                                                                                 "steps": 2, "width": 64,
                                                                                 "height": 64}):
            session.post(server.url + "/sdapi/v1/txt2img", json=warm, timeout=300)
        baseline = _status_of_proc(server.proc.pid, "VmRSS")
        routes = strategies(spec, bad)
        start = time.monotonic()

        @settings(max_examples=args.requests, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(ROUTES).flatmap(lambda r: st.tuples(st.just(r), routes[r])))
        def one(route_body):
            route, body = route_body
            data = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
            t0 = time.monotonic()
            try:
                resp = session.post(server.url + route, data=data, timeout=args.timeout,
                                    headers={"Content-Type": "application/json"})
            except requests.Timeout:
                counts["hang"] += 1
                failures.append({"route": route, "result": "hang", "body": data[:300].decode("utf-8", "replace")})
                return
            except requests.ConnectionError as e:
                counts["connection_error"] += 1
                failures.append({"route": route, "result": "connection error", "error": str(e)[:200]})
                return
            times.append(time.monotonic() - t0)
            code = resp.status_code
            if code >= 400:
                try:
                    errors[f"{route} {code} {resp.json().get('error')}"] += 1
                except (ValueError, AttributeError):
                    errors[f"{route} {code} (no JSON)"] += 1
            counts[f"{code // 100}xx"] += 1
            by_route[route][str(code)] += 1
            if code >= 500:
                failures.append({"route": route, "status": code, "answer": resp.text[:300],
                                 "body": data[:300].decode("utf-8", "replace")})
            elif code >= 400 and not _one_line_error(resp):
                counts["multi_line_error"] += 1
                failures.append({"route": route, "status": code, "result": "not one line of JSON",
                                 "answer": resp.text[:300]})
            n = sum(by_route[r].total() for r in ROUTES)
            if n % 500 == 0:
                print(f"{n}/{args.requests} requests, {dict(counts)}, {time.monotonic() - start:.0f} s", flush=True)

        one()
        alive = server.alive()
        peak = _status_of_proc(server.proc.pid, "VmHWM") if alive else 0
        progress_ok = alive and session.get(server.url + "/sdapi/v1/progress", timeout=30).status_code == 200
    finally:
        log = server.log()
        server.stop()
    times.sort()
    return {
        "command": f"python benchmarks/fuzz_http.py --requests {args.requests} --timeout {args.timeout:g}",
        "run_as": "PYTHONPATH=<checkout>/.pp OMP_NUM_THREADS=1 nice -n 19 <command> --out <this file>",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": environment.git_commit()[0] or "unknown", "python": platform.python_version(),
        "machine": platform.machine(),
        "generator": "Hypothesis strategies built from the server's /openapi.json request schemas "
                     "(tests/fuzz_inputs.py body_strategy), plus hostile prompts, images, infotexts and overrides",
        "server": "tritonsd serve --checkpoint sd1-tiny.safetensors --text-heads 2 --lora-dir <the fixture LoRA "
                  f"and {len(bad)} malformed ones: {', '.join(bad)}> --embeddings-dir embeddings",
        "requests": sum(by_route[r].total() for r in ROUTES) + counts["hang"] + counts["connection_error"],
        "outcomes": dict(counts), "by_route_status": {r: dict(v) for r, v in by_route.items()},
        "errors_by_type": dict(errors.most_common()),
        "server_errors_5xx": counts["5xx"], "hangs": counts["hang"], "connection_errors": counts["connection_error"],
        "multi_line_errors": counts["multi_line_error"], "server_alive_after": alive,
        "progress_answers_after": progress_ok, "request_timeout_s": args.timeout,
        "server_rss_after_warmup_mb": round(baseline / 2**20, 1),
        "server_peak_rss_rise_mb": round((peak - baseline) / 2**20, 1) if peak else None,
        "slowest_request_s": round(times[-1], 3) if times else None,
        "median_request_s": round(times[len(times) // 2], 4) if times else None,
        "elapsed_s": round(time.monotonic() - start, 1), "failures": failures[:50],
        "server_log_tail": log[-1500:] if failures else "",
    }



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as a hang")
    p.add_argument("--fixtures", default=None)
    p.add_argument("--out", default=None, help="write the record here (JSON)")
    args = p.parse_args(argv)
    record = run(args)
    text = json.dumps(record, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    bad = record["server_errors_5xx"] + record["hangs"] + record["connection_errors"] + record["multi_line_errors"]
    return 0 if bad == 0 and record["server_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
