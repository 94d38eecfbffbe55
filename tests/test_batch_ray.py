"""``tritonsd batch`` on a local Ray cluster (CPU, the fixtures' sd1-tiny at 64 px, 2 steps): 12 jobs over 2
Pipeline actors give the PNGs ``tritonsd generate`` writes for the same settings, byte for byte; a driver killed
midway (SIGKILL) leaves no partial PNG, and the rerun completes the set with each image once.

One local cluster serves the module (Ray start-up costs seconds); the killed driver is a separate process that
joins it by address, as a driver joins any cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:  # the test extra installs Ray: a missing Ray fails these tests (in cluster) rather than skip
    ray = None  # them, and -m "not ray" still collects this module without it

import tritonsd  # noqa: E402
from tritonsd.tools.cli import main as cli_main  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a local Ray cluster and Pipeline actors

ACTORS = 2
SMALL = {"steps": 2, "width": 64, "height": 64}
# A1111 field values -> (tritonsd generate's sampler flags)
SAMPLER_FLAGS = {("Euler a", None): ["--sampler", "euler_a"], ("DPM++ 2M Karras", None): ["--sampler", "dpmpp_2m"],
                 ("Euler", "Karras"): ["--sampler", "euler", "--karras"], ("DDIM", None): ["--sampler", "ddim"],
                 ("dpmpp_2m", "Uniform"): ["--sampler", "dpmpp_2m", "--no-karras"]}


def twelve_jobs() -> list[dict]:
    samplers = list(SAMPLER_FLAGS)
    jobs = []
    for i in range(12):
        name, schedule = samplers[i % len(samplers)]
        job = {"id": f"img-{i:02d}", "prompt": f"a small red house number {i}", "sampler_name": name, **SMALL,
               "cfg_scale": [7.0, 1.0, 4.5][i % 3]}
        if schedule:
            job["scheduler"] = schedule
        if i % 4 != 3:
            job["seed"] = 1000 + 7 * i  # every fourth job: the seed derived from its id
        if i % 2:
            job["negative_prompt"] = "blurry"
        if i == 5:
            job["width"] = 48  # another shape in the same run
        jobs.append(job)
    return jobs


def model_args(fixtures: Path) -> dict:
    return {"checkpoint": str(fixtures / "sd1-tiny.safetensors"), "config": str(fixtures / "sd1-tiny.yaml"),
            "text_heads": 2}


def generate_flags(job: dict, seed: int) -> list[str]:
    flags = ["--prompt", job["prompt"], "--negative-prompt", job.get("negative_prompt", ""), "--seed", str(seed),
             "--steps", str(job["steps"]), "--cfg", str(job["cfg_scale"]), "--width", str(job["width"]),
             "--height", str(job["height"])]
    return flags + SAMPLER_FLAGS[(job["sampler_name"], job.get("scheduler"))]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: a logical CPU per actor plus two for Ray Data's own tasks."""
    if ray is None:
        pytest.fail("the Ray tests need Ray Data: pip install -e '.[test]'", pytrace=False)
    ray.init(num_cpus=ACTORS + 2, include_dashboard=False, object_store_memory=200 * 2 ** 20,
             logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def expected(fixtures, tmp_path_factory) -> dict[str, bytes]:
    """id -> the PNG ``tritonsd generate`` writes for that job's settings (its seed: given or from the id)."""
    m = model_args(fixtures)
    out = {}
    for job in twelve_jobs():
        seed = job.get("seed", tritonsd.batch.seed_from_id(job["id"]))
        d = tmp_path_factory.mktemp(job["id"])
        rc = cli_main(["generate", "--checkpoint", m["checkpoint"], "--config", m["config"], "--text-heads", "2",
                       "--device", "cpu", "--quiet", "--out", str(d), *generate_flags(job, seed)])
        assert rc == 0
        (png,) = d.glob("*.png")
        out[job["id"]] = png.read_bytes()
    return out


def results_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_twelve_jobs_over_two_actors_match_generate(cluster, fixtures, expected, tmp_path):
    jobs = twelve_jobs()
    report = tritonsd.batch([json.dumps(j) for j in jobs], tmp_path, ray="local", workers=ACTORS, device="cpu",
                            **model_args(fixtures))
    assert sorted(report.written) == [j["id"] for j in jobs] and not report.errors and not report.skipped
    for job in jobs:
        assert (tmp_path / f"{job['id']}.png").read_bytes() == expected[job["id"]], job["id"]
    rows = results_rows(tmp_path)
    assert sorted(r["line"] for r in rows) == list(range(1, 13))
    by_id = {r["id"]: r for r in rows}
    assert by_id["img-03"]["seed"] == tritonsd.batch.seed_from_id("img-03")
    assert by_id["img-04"] == {**by_id["img-04"], "file": "img-04.png", "seed": 1028, "line": 5}
    assert all(r["seconds"] > 0 for r in rows)


def test_killed_driver_then_resume_gives_each_image_once(cluster, fixtures, expected, tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(j) + "\n" for j in twelve_jobs()))
    out = tmp_path / "out"
    m = model_args(fixtures)
    cmd = [sys.executable, "-m", "tritonsd.tools.cli", "batch", str(jobs_file), "--out", str(out),
           "--checkpoint", m["checkpoint"], "--config", m["config"], "--text-heads", "2", "--device", "cpu",
           f"--ray={cluster}", "--workers", str(ACTORS), "--quiet"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    stderr = driver.communicate(timeout=60)[1].decode(errors="replace")
    first = sorted(p.stem for p in out.glob("*.png"))
    assert 1 <= len(first) < 12, f"the driver was to be killed midway; it wrote {len(first)} PNGs\n{stderr[-2000:]}"
    for png in out.glob("*.png"):  # every PNG there is whole
        with Image.open(png) as im:
            im.load()

    report = tritonsd.batch(jobs_file, out, ray="local", workers=ACTORS, device="cpu", **m)
    assert sorted(report.skipped) == first
    assert sorted(report.written + report.skipped) == sorted(expected) and not report.errors
    for job_id, data in expected.items():
        assert (out / f"{job_id}.png").read_bytes() == data, job_id
    rows = results_rows(out)
    assert sorted(r["line"] for r in rows) == list(range(1, 13))  # each line once, the kept rows renumbered
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.png" for i in expected] +
                                                           ["results.jsonl", ".tritonsd-batch.lock"])
