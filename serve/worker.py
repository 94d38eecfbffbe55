"""One worker per device: a thread that takes jobs from a FIFO queue and runs them one at a time, so jobs never
overlap on the device, none is dropped and they finish in the order they came. Requests wait on a Future.

The worker also keeps A1111's progress state (``shared.state``): what ``/sdapi/v1/progress`` reads, and the
interrupt flag ``/sdapi/v1/interrupt`` sets for the running job."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable

from tritonsd.serve import limits
from tritonsd.serve.errors import Busy
from tritonsd.serve.previews import Previews

log = logging.getLogger("tritonsd.serve")


class Interrupted(Exception):
    """Raised from the step callback when the running job was interrupted."""


class Progress:
    """A1111's ``shared.state`` fields, written by the worker, read by the progress route (under a lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.job, self.job_count, self.job_no = "", 0, 0
        self.sampling_step, self.sampling_steps = 0, 0
        self.interrupted = self.skipped = self.stopping_generation = False
        self.job_timestamp, self.time_start = "0", 0.0
        self.textinfo: str | None = None

    def begin(self, job: str, job_count: int) -> None:
        with self._lock:
            self.reset()
            self.job, self.job_count = job, job_count
            self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            self.time_start = time.time()

    def update(self, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(self, k, v)

    def end(self) -> None:
        with self._lock:
            interrupted = self.interrupted
            self.reset()
            self.interrupted = interrupted

    def interrupt(self) -> None:
        with self._lock:
            if self.job_count:
                self.interrupted = True
                self.textinfo = "Interrupted"

    def snapshot(self) -> dict:
        """``/sdapi/v1/progress``'s answer, computed as A1111's ``progressapi``."""
        with self._lock:
            state = {"skipped": self.skipped, "interrupted": self.interrupted,
                     "stopping_generation": self.stopping_generation, "job": self.job,
                     "job_count": self.job_count, "job_timestamp": self.job_timestamp, "job_no": self.job_no,
                     "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}
            if self.job_count == 0:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                        "textinfo": self.textinfo}
            progress = 0.01 + self.job_no / self.job_count
            if self.sampling_steps > 0:
                progress += self.sampling_step / self.sampling_steps / self.job_count
            elapsed = time.time() - self.time_start
            eta_relative = elapsed / progress - elapsed
            return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state,
                    "current_image": None, "textinfo": self.textinfo}


class Job:
    """``run(worker)`` on the worker thread; its result or exception goes to ``future``."""

    def __init__(self, name: str, run: Callable, job_count: int = 1):
        self.name = name
        self.run = run
        self.job_count = job_count
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class Worker:
    """``max_queue``: jobs that may wait (the running one not counted); ``submit`` raises ``Busy`` (503 with
    Retry-After) past it, so a flood of requests costs a bounded queue, not unbounded memory and latency."""

    def __init__(self, host, name: str = "device", max_queue: int = limits.MAX_QUEUE):
        self.host = host
        self.max_queue = max_queue
        self.progress = Progress()
        self.previews = Previews()  # the running job's live preview (progress' current_image)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._submit_lock = threading.Lock()
        self._interrupt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tritonsd-worker-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._submit_lock:
            if self._waiting() >= self.max_queue:
                raise Busy(f"the server has {self.max_queue} jobs waiting, its limit; try again later",
                           limits.RETRY_AFTER_S)
            self._queue.put(job)
        return job.future

    def waiting(self) -> int:
        """Jobs waiting for the device (not counting the running one)."""
        with self._submit_lock:
            return self._waiting()

    def _waiting(self) -> int:
        """Jobs waiting; those whose request went away (cancelled) are dropped from the queue here, so they
        neither count nor hold their decoded images until the worker reaches them."""
        with self._queue.mutex:
            waiting = self._queue.queue
            live = [j for j in waiting if j is None or not j.future.cancelled()]
            if len(live) != len(waiting):
                waiting.clear()
                waiting.extend(live)
            return sum(j is not None for j in live)

    def interrupt(self) -> None:
        """Stop the running job at its next step (A1111's ``state.interrupt``); queued jobs still run."""
        self._interrupt.set()
        self.progress.interrupt()

    def check_interrupt(self) -> None:
        if self._interrupt.is_set():
            raise Interrupted()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def stop(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # its request went away while it waited
            self._interrupt.clear()
            self.progress.begin(job.name, job.job_count)
            self.previews.reset()
            result = error = None
            try:
                result = job.run(self)
            except BaseException as e:  # noqa: BLE001 - every failure goes to its request; the worker lives on
                if not isinstance(e, (ValueError, Interrupted)):
                    log.error("job %s failed: %s: %s", job.name, type(e).__name__, e)
                error = e
            finally:
                self.progress.end()  # before the answer: a client that has its answer sees the job over
                self.previews.reset()
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
