"""The generation back-end of ``tritonsd serve --ray``, in the two places it runs.

* ``RayWorker`` stands in the ingress where the single-process server has its ``Worker``: the same ``submit(job)``
  (a Future), ``snapshot()``, ``task_progress()``, ``waiting()`` and ``interrupt()``, so ``app.create_app``
  serves the same routes, checks and error bodies over it. A job goes to the generator deployment through its
  handle, routed by model id (``serve.multiplexed``), with a deadline (``--request-timeout``: 504), the
  deployment's queue bound (503 with Retry-After) and one retry when the replica died under it (503 naming the
  cause when the retry's replica dies too).
* ``ReplicaWorker`` is what a job's ``run(worker)`` sees on a generator replica: the replica's warm Pipeline as
  ``host``, a ``progress`` that reports to the task board, and the interrupt flag the board hands back.

Progress and interrupts of every job live on the task board (``TaskBoard``, one small deployment), so the ingress
answers ``/sdapi/v1/progress`` (the oldest running job) and ``/internal/progress`` (one task) whichever replica
runs the job, and ``/sdapi/v1/interrupt`` reaches it there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
import types

import ray
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from tritonsd.serve import limits
from tritonsd.serve.errors import ApiError, Busy, printable
from tritonsd.sampler.preview import DEFAULT_EVERY
from tritonsd.serve.host import ModelKey
from tritonsd.serve.tasks import TaskLog, internal_progress
from tritonsd.serve.worker import Interrupted, Progress

log = logging.getLogger("tritonsd.serve")
BOARD_TIMEOUT_S = 10.0  # a call to the task board (it answers in milliseconds)
REPORT_EVERY_S = 0.2  # a replica reports a job's steps to the board at most this often


class Unavailable(ApiError):
    """503: no replica could run the job (it died under it, twice; or the deployment is gone)."""

    def __init__(self, detail: str):
        super().__init__(503, detail, "ServiceUnavailable", {"Retry-After": str(limits.RETRY_AFTER_S)})


class GatewayTimeout(ApiError):
    def __init__(self, detail: str):
        super().__init__(504, detail, "GatewayTimeout")


def model_id(key: ModelKey) -> str:
    """The ``serve.multiplexed`` model id of a ModelKey (JSON: the checkpoint's path and the VAE's)."""
    return json.dumps([key.checkpoint, key.vae])


def model_key(text: str) -> ModelKey:
    checkpoint, vae = json.loads(text)
    return ModelKey(checkpoint, vae)


# ---------------------------------------------------------------- the ingress's side


class RayWorker:
    """The ingress's ``Worker``: jobs to the generator deployment. ``host``: the ingress's ``ModelHost`` (its
    ``default`` is the model of jobs that name none)."""

    def __init__(self, generator, board, host, request_timeout_s: float):
        self.generator, self.board, self.host = generator, board, host
        self.request_timeout_s = request_timeout_s
        self.previews = BoardPreviews(board)  # what the progress route and /options read and set

    def submit(self, job) -> concurrent.futures.Future:
        """Called on the ingress's event loop (``app.run_job``); the Future is cancelled when the client goes,
        which cancels the request on its replica (the job stops at its next step)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(job, future))
        future.add_done_callback(lambda f: f.cancelled() and loop.call_soon_threadsafe(task.cancel))
        return future

    async def _run(self, job, future: concurrent.futures.Future) -> None:
        key = job.key or self.host.default
        payload = {"name": job.name, "run": job.run, "job_count": job.job_count, "task_id": job.task_id,
                   "default": model_id(self.host.default),
                   "preview_every": self.previews.every if self.previews.enabled else 0}
        handle = self.generator.options(multiplexed_model_id=model_id(key))
        try:
            await self.board.queued.remote(job.task_id)
            out = await asyncio.wait_for(self._call(handle, payload, job), self.request_timeout_s)
            default = model_key(out["default"])
            if default != self.host.default:  # a job that set the default (restore afterwards off, a switch)
                self.host.default = default
            if not future.done():
                future.set_result(out["result"])
        except asyncio.TimeoutError:
            _settle(future, GatewayTimeout(f"the request did not finish within {self.request_timeout_s:g} s "
                                           "(--request-timeout); it was stopped"))
        except asyncio.CancelledError:
            future.cancel()
        except BaseException as e:  # noqa: BLE001 - every failure goes to its request
            _settle(future, e)
        finally:
            self.board.finished.remote(job.task_id)

    async def _call(self, handle, payload: dict, job) -> dict:
        """The generator's answer; a replica that dies under the job (killed, out of memory) costs one retry,
        which the router sends to a live replica."""
        for attempt in (1, 2):
            response = handle.run.remote(payload)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()  # the deadline, or the client went away: stop the job on its replica
                raise
            except ray.exceptions.RayTaskError as e:  # the job's own exception (a ValueError: the user's)
                cause = e.cause if isinstance(e.cause, Exception) else RuntimeError(_last_line(e))
                raise cause from None
            except BackPressureError:
                raise Busy("every replica is busy and the queue is full; try again later",
                           limits.RETRY_AFTER_S) from None
            except (ray.exceptions.RayActorError, DeploymentUnavailableError) as e:
                cause = _cause(e)
                if attempt == 1:
                    log.warning("job %s (%s): its replica failed (%s); retrying once on another replica",
                                job.name, printable(job.task_id), cause)
                    continue
                raise Unavailable(f"the job's replica failed twice, the last time: {cause}") from None
        raise AssertionError("unreachable")

    def snapshot(self) -> dict:
        return self.board.snapshot.remote().result(timeout_s=BOARD_TIMEOUT_S)

    def task_progress(self, task_id: str) -> dict:
        return self.board.task_progress.remote(task_id).result(timeout_s=BOARD_TIMEOUT_S)

    def waiting(self) -> int:
        return self.board.waiting.remote().result(timeout_s=BOARD_TIMEOUT_S)

    def interrupt(self, task_id: str | None = None) -> None:
        self.board.interrupt.remote(task_id).result(timeout_s=BOARD_TIMEOUT_S)


class BoardPreviews:
    """The ingress's ``previews``: ``every`` (``show_progress_every_n_steps``, sent with each job) and the oldest
    running job's latest preview, which its replica made and reported to the task board."""

    def __init__(self, board, every: int = DEFAULT_EVERY):
        self.board, self.every = board, every
        self.enabled = True  # live_previews_enable: off, the jobs are sent with no preview period

    def image(self) -> str | None:
        return self.board.current_image.remote().result(timeout_s=BOARD_TIMEOUT_S)


def _settle(future: concurrent.futures.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _cause(e: BaseException) -> str:
    """One line naming why a replica failed (Ray's messages are paragraphs)."""
    if isinstance(e, ray.exceptions.ActorDiedError):
        text = str(e)
        if "OutOfMemory" in text or "out of memory" in text.lower():
            return "the replica ran out of memory and was killed"
        return "the replica's process died (killed or crashed)"
    if isinstance(e, ray.exceptions.ActorUnavailableError):
        return "the replica became unreachable"
    return f"{type(e).__name__}: {_last_line(e)}"


def _last_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return printable(lines[-1] if lines else type(e).__name__, 300)


# ---------------------------------------------------------------- the task board (a deployment)


class TaskBoard:
    """Every job's task id, progress and interrupt flag, for all the replicas and the ingress."""

    def __init__(self):
        self.tasks = TaskLog()
        self.progress: dict[str, Progress] = {}
        self.images: dict[str, str] = {}  # task id -> its latest live preview (base64 PNG)
        self.interrupted: set[str] = set()

    def queued(self, task_id: str) -> None:
        self.tasks.queue(task_id)

    def started(self, task_id: str, name: str, job_count: int) -> bool:
        self.tasks.start(task_id)
        p = self.progress[task_id] = Progress()
        p.begin(name, job_count)
        return task_id in self.interrupted

    def update(self, task_id: str, fields: dict, image: str | None = None) -> bool:
        """A replica's report (with a new live preview, or None); the answer: whether the job was interrupted."""
        p = self.progress.get(task_id)
        if p is not None:
            p.update(**fields)
            if image is not None:
                self.images[task_id] = image
        return task_id in self.interrupted

    def current_image(self) -> str | None:
        """The oldest running job's latest preview."""
        oldest = self.tasks.oldest_running()
        return self.images.get(oldest) if oldest is not None else None

    def finished(self, task_id: str) -> None:
        self.tasks.finish(task_id)
        self.progress.pop(task_id, None)
        self.images.pop(task_id, None)
        self.interrupted.discard(task_id)

    def interrupt(self, task_id: str | None = None) -> None:
        """Every running job, or only ``task_id`` (when it runs)."""
        ids = list(self.progress) if task_id is None else [task_id] if task_id in self.progress else []
        for i in ids:
            self.interrupted.add(i)
            self.progress[i].interrupt()

    def snapshot(self) -> dict:
        """``/sdapi/v1/progress``: the oldest running job's."""
        oldest = self.tasks.oldest_running()
        p = self.progress.get(oldest) if oldest is not None else None
        return (p or Progress()).snapshot()

    def task_progress(self, task_id: str) -> dict:
        active, queued, completed = self.tasks.state(task_id)
        p = self.progress.get(task_id)
        return internal_progress(active, queued, completed, p.fields() if active and p is not None else None)

    def waiting(self) -> int:
        return self.tasks.waiting()


# ---------------------------------------------------------------- a generator replica's side


class ReplicaHost:
    """What ``jobs.run_plan`` reads as ``worker.host`` on a replica: the Pipeline the router chose this replica
    for (already warm), its key, the load spec, and the ingress's default model (which a job may change)."""

    def __init__(self, pipe, key: ModelKey, spec, default: ModelKey):
        self.pipe, self.key, self.spec, self.default = pipe, key, spec, default

    def ensure(self, key: ModelKey):
        if key != self.key:
            raise RuntimeError("a job reached a replica for another model than its own")
        return self.pipe


class BoardProgress:
    """``worker.progress`` on a replica: the fields kept here and sent to the task board (at most every
    ``REPORT_EVERY_S``, and whenever an iteration starts); each report's answer says whether the job was
    interrupted. A board that does not answer never fails the job."""

    def __init__(self, board, task_id: str, on_interrupt, previews=None):
        self.board, self.task_id, self.on_interrupt = board, task_id, on_interrupt
        self.previews = previews  # the replica's Previews: a new image goes with the next report
        self.fields: dict = {}
        self._sent = 0.0
        self._image: str | None = None

    def begin(self, name: str, job_count: int) -> None:
        self._ask(self.board.started, name, job_count)

    def end(self) -> None:
        """The job is over here (the ingress says so too: either one is enough, should the other die)."""
        self._ask(self.board.finished)

    def update(self, **fields) -> None:
        self.fields.update(fields)
        now = time.monotonic()
        if "job_no" in fields or now - self._sent >= REPORT_EVERY_S:
            self._sent = now
            image = self.previews.image() if self.previews is not None else None
            new, self._image = (image if image is not self._image else None), image
            self._ask(self.board.update, dict(self.fields), new)

    def _ask(self, method, *args) -> None:
        try:
            if method.remote(self.task_id, *args).result(timeout_s=BOARD_TIMEOUT_S):
                self.on_interrupt()
        except Exception as e:  # noqa: BLE001 - progress is a report: the job goes on without it
            log.warning("task board unreachable: %s", _last_line(e))


class NoPreviews:
    """``worker.previews`` for a job without live previews."""

    def offer(self, *_args) -> None:
        pass

    def reset(self) -> None:
        pass

    def image(self) -> None:
        return None


class ReplicaWorker:
    """The ``worker`` a job runs with on a replica (``host``, ``progress``, ``previews``, ``check_interrupt``,
    ``interrupted``); ``stop()`` interrupts it (its request was cancelled: deadline or client gone)."""

    def __init__(self, host: ReplicaHost, board, task_id: str, previews=None):
        self.host = host
        self.previews = previews if previews is not None else NoPreviews()
        self._interrupt = threading.Event()
        self.progress = BoardProgress(board, task_id, self._interrupt.set, previews)

    def stop(self) -> None:
        self._interrupt.set()

    def check_interrupt(self) -> None:
        if self._interrupt.is_set():
            raise Interrupted()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()


def run_payload(payload: dict, worker: ReplicaWorker) -> dict:
    """A job on a replica (its thread): the job's result and the default model afterwards."""
    worker.previews.reset()
    worker.progress.begin(payload["name"], payload["job_count"])
    try:
        result = payload["run"](worker)
    finally:
        worker.previews.reset()
        worker.progress.end()
    return {"result": result, "default": model_id(worker.host.default)}


def shape_of(device: str, dtype) -> types.SimpleNamespace:
    """The ingress's stand-in for a Pipeline in ``jobs._check_memory`` (``device``, ``dtype``): the replicas'."""
    return types.SimpleNamespace(device=device, dtype=dtype)


__all__ = ["RayWorker", "ReplicaHost", "ReplicaWorker", "TaskBoard", "model_id", "model_key", "run_payload"]
