"""Task ids without a model: the single-process worker's ``/internal/progress`` states (A1111 v1.10's
``modules/progress.py``: queued, then active, then completed), interrupt by task id (only that job) and without
one (the running job), the Ray task board's bookkeeping, the Ray back-end's retry and error statuses (with a fake
handle), and ``--ray``'s command line (its usage errors, the line saying what to install, ``--write-config``; one
test starts a local cluster: marked ``ray`` and ``slow``)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import types

import pytest

try:
    import fastapi  # noqa: F401
except ModuleNotFoundError:
    pytest.fail("fastapi is not installed: pip install -e '.[test]'", pytrace=False)

from tritonsd.serve.tasks import TaskLog, internal_progress, task_id_of  # noqa: E402
from tritonsd.serve.worker import Interrupted, Job, Worker  # noqa: E402
from tritonsd.tools.cli import main  # noqa: E402


def stepping_job(task_id: str, started: threading.Event, steps: int = 2000) -> Job:
    """A job that reports steps and honours interrupts, as ``jobs.run_plan`` does; returns the steps it ran."""

    def run(worker):
        worker.progress.update(sampling_step=0, sampling_steps=steps)
        for i in range(steps):
            worker.progress.update(sampling_step=i + 1)
            started.set()
            try:
                worker.check_interrupt()
            except Interrupted:
                return i + 1
            time.sleep(0.005)
        return steps

    return Job("scripts_txt2img", run, task_id=task_id)


def test_task_states_follow_a1111_and_interrupt_by_id_stops_only_that_job():
    worker = Worker(host=None)
    try:
        first_started, second_started = threading.Event(), threading.Event()
        first = worker.submit(stepping_job("task(a)", first_started))
        second = worker.submit(stepping_job("task(b)", second_started, steps=20))
        assert first_started.wait(10)
        a, b = worker.task_progress("task(a)"), worker.task_progress("task(b)")
        assert a["active"] and not a["queued"] and not a["completed"] and 0 < a["progress"] < 1
        assert not b["active"] and b["queued"] and b["textinfo"] == "Queued..." and b["progress"] is None
        worker.interrupt("task(b)")  # not running: nothing happens to the running one
        time.sleep(0.05)
        assert not first.done()
        worker.interrupt("task(a)")
        assert first.result(10) < 2000
        assert second.result(10) == 20  # the next job runs whole: the interrupt was the other job's
        done = worker.task_progress("task(a)")
        assert done["completed"] and not done["active"] and not done["queued"]
        assert worker.task_progress("task(unknown)")["textinfo"] == "Waiting..."
    finally:
        worker.stop(10)


def test_interrupt_without_an_id_stops_the_running_job():
    worker = Worker(host=None)
    try:
        started = threading.Event()
        future = worker.submit(stepping_job("t", started))
        assert started.wait(10)
        worker.interrupt()
        assert future.result(10) < 2000
    finally:
        worker.stop(10)


def test_task_ids_and_the_log():
    assert task_id_of("mine") == "mine"
    assert task_id_of(None).startswith("task(") and task_id_of("") != task_id_of("")
    log = TaskLog()
    log.queue("x")
    log.queue("y")
    log.start("y")
    log.start("x")
    assert log.oldest_running() == "y" and log.state("x") == (True, False, False)
    log.finish("y")
    assert log.oldest_running() == "x" and log.state("y") == (False, False, True)
    for i in range(20):
        log.finish(f"z{i}")
    assert log.state("y") == (False, False, False)  # A1111 keeps the last 16
    assert internal_progress(False, True, False)["textinfo"] == "Queued..."


def test_the_task_board_reports_the_oldest_job_and_interrupts_by_id():
    pytest.importorskip("ray.serve")
    from tritonsd.serve.ray_worker import TaskBoard

    board = TaskBoard()
    board.queued("old")
    board.queued("new")
    assert board.waiting() == 2
    assert board.started("old", "scripts_txt2img", 1) is False
    board.update("old", {"sampling_step": 3, "sampling_steps": 10})
    board.started("new", "scripts_txt2img", 1)
    board.update("new", {"sampling_step": 1, "sampling_steps": 1000})
    assert board.snapshot()["state"]["sampling_steps"] == 10
    board.interrupt("new")
    assert board.update("new", {"sampling_step": 2}) is True and board.update("old", {}) is False
    assert board.task_progress("old")["progress"] == pytest.approx(0.3)
    board.update("new", {}, "NEW-PREVIEW")
    assert board.current_image() is None  # the oldest job has none yet
    board.update("old", {}, "OLD-PREVIEW")
    assert board.current_image() == "OLD-PREVIEW"
    board.interrupt()
    assert board.update("old", {}) is True
    board.finished("old")
    assert board.snapshot()["state"]["sampling_steps"] == 1000 and board.task_progress("old")["completed"]
    assert board.current_image() == "NEW-PREVIEW"


def test_ray_flags_without_ray_serve_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["serve", "--checkpoint", "demo:sd1", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tritonsd serve --ray needs Ray Serve: pip install 'tritonsd[ray]' (or 'ray[serve]')"]


@pytest.mark.parametrize("argv, message", [
    (["--ray", "--replicas", "3:1"], "--replicas needs 1 <= MIN <= MAX"),
    (["--ray", "--replicas", "two"], "--replicas takes N or MIN:MAX"),
    (["--ray", "--ray-cpus-per-replica", "0"], "--ray-cpus-per-replica must be above 0"),
    (["--ray", "--models-per-replica", "0"], "--models-per-replica must be at least 1"),
    (["--ray", "--request-timeout", "-1"], "--request-timeout must be between"),
    (["--ray", "--taesd", __file__], "--taesd does not go with --ray"),
])
def test_ray_usage_errors_exit_2(argv, message, capsys):
    pytest.importorskip("ray.serve")
    assert main(["serve", "--checkpoint", "demo:sd1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritonsd serve: error:") and message in err and "Traceback" not in err


def test_write_config_is_a_serve_run_config_whose_builder_builds_the_app(tmp_path, fixtures, capsys):
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tritonsd.serve.ray_deploy import app_builder

    path = tmp_path / "serve.yaml"
    assert main(["serve", "--checkpoint", str(fixtures / "sd1-tiny.safetensors"), "--text-heads", "2", "--ray",
                 "--ray-cpus-per-replica", "0.5", "--replicas", "1:3", "--models-per-replica", "1",
                 "--port", "8123", "--preview-every", "0", "--write-config", str(path)]) == 0
    assert "serve run" in capsys.readouterr().err
    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)  # what serve run / serve deploy read
    assert schema.http_options.port == 8123
    (app,) = config["applications"]
    assert app["import_path"] == "tritonsd.serve.ray_deploy:app_builder" and app["route_prefix"] == "/"
    assert app["args"]["spec"]["path"] == str(fixtures / "sd1-tiny.safetensors")
    assert app["args"]["preview_every"] == 0 and app["args"]["models_per_replica"] == 1
    built = app_builder(app["args"])  # serve run calls the import path's builder with args
    deployments = {d.name: d for d in _deployments(built)}
    assert set(deployments) == {"Ingress", "Generator", "TaskBoard"}
    gen = deployments["Generator"]
    assert gen.ray_actor_options["num_cpus"] == 0.5 and gen.ray_actor_options.get("num_gpus", 0) == 0
    assert gen._deployment_config.autoscaling_config.max_replicas == 3
    assert deployments["Ingress"].ray_actor_options["num_cpus"] == 0


def _deployments(app) -> list:
    """The deployments of a built application (Ray Serve's own walk over what the ingress binds)."""
    from ray.serve._private.build_app import build_app

    return build_app(app, name="tritonsd").deployments


@pytest.mark.ray
@pytest.mark.slow
def test_ray_local_without_a_gpu_asks_for_cpu_replicas_in_one_line(tmp_path):
    """The command line's own cluster start (``--ray=local``) and its one-line refusal of GPU replicas where
    there is no GPU (the replicas would never be placed: a server that never comes up)."""
    pytest.importorskip("ray.serve")
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "serve", "--checkpoint", "demo:sd1", "--ray=local",
                        "--port", "0"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("tritonsd serve: error: the Ray cluster has no GPU for the replicas (one each); for CPU "
                    "replicas give --ray-cpus-per-replica N"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


class FakeGenerator:
    """A generator handle whose calls fail as listed (an exception, or a dict answered), in order."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0
        self.run = self

    def options(self, **_kw):
        return self

    def remote(self, payload):
        self.calls += 1
        outcome = self.outcomes.pop(0)

        async def answer():
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome == "hang":
                await asyncio.sleep(3600)
            return outcome

        return FakeResponse(answer())


class FakeResponse:
    def __init__(self, coro):
        self.coro = coro
        self.cancelled = False

    def __await__(self):
        return self.coro.__await__()

    def cancel(self):
        self.cancelled = True


class FakeBoard:
    def __getattr__(self, name):
        return types.SimpleNamespace(remote=lambda *a: asyncio.sleep(0))


def ray_job(outcomes, timeout_s: float = 30.0):
    """The answer (or the error) a RayWorker gives a job when its generator calls go as ``outcomes``."""
    from tritonsd.serve.host import ModelKey
    from tritonsd.serve.ray_worker import RayWorker

    gen = FakeGenerator(*outcomes)
    worker = RayWorker(gen, FakeBoard(), types.SimpleNamespace(default=ModelKey("/m.safetensors")), timeout_s)

    async def go():
        return await asyncio.wrap_future(worker.submit(Job("scripts_txt2img", lambda w: None, task_id="t")))

    try:
        return asyncio.run(go()), gen.calls
    except Exception as e:  # noqa: BLE001 - the error is the result here
        return e, gen.calls


def test_a_replica_death_costs_one_retry_and_a_second_is_a_503_naming_it():
    pytest.importorskip("ray.serve")
    import ray.exceptions

    ok = {"result": {"images": ["x"]}, "default": '["/m.safetensors", null]'}
    assert ray_job([ray.exceptions.ActorDiedError(), ok]) == ({"images": ["x"]}, 2)
    err, calls = ray_job([ray.exceptions.ActorDiedError(), ray.exceptions.ActorDiedError()])
    assert calls == 2 and err.status == 503 and err.error == "ServiceUnavailable"
    assert err.detail == ("the job's replica failed twice, the last time: the replica's process died (killed or "
                          "crashed)")


def test_user_errors_pass_through_and_queue_and_deadline_errors_are_json_statuses():
    pytest.importorskip("ray.serve")
    import ray.exceptions
    from ray.serve.exceptions import BackPressureError

    from tritonsd.serve.errors import NotFound

    cause = NotFound("no such model")
    err, calls = ray_job([ray.exceptions.RayTaskError("run", "tb", cause)])
    assert calls == 1 and isinstance(err, NotFound) and err.status == 404  # no retry: the job's own error
    err, _ = ray_job([BackPressureError(num_queued_requests=3, max_queued_requests=2)])
    assert err.status == 503 and err.headers["Retry-After"]
    t0 = time.monotonic()
    err, _ = ray_job(["hang"], timeout_s=0.5)
    assert err.status == 504 and err.error == "GatewayTimeout" and time.monotonic() - t0 < 5
