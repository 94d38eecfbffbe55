"""Task ids, as AUTOMATIC1111 v1.10 keeps them (``modules/progress.py``): every generation has one (the request's
``force_task_id``, else ``task(<random>)``), is pending until a worker starts it, then current, then among the
last finished ones. ``/internal/progress`` answers for one task id; ``/sdapi/v1/interrupt`` may name one.

``TaskLog`` is the bookkeeping, shared by the single-process worker (one current task) and the Ray Serve task
board (a current task per replica). No fastapi here: the routes are in ``app.py``.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time

MAX_FINISHED = 16  # A1111 remembers the last 16 finished task ids
MAX_TASK_ID = 200  # characters of a client's force_task_id kept


def new_task_id() -> str:
    """A1111's ``create_task_id`` shape (``task(<random>)``) for a request that did not force one."""
    return f"task({secrets.token_hex(8)})"


def task_id_of(forced) -> str:
    """The request's ``force_task_id`` when it gives a usable one, else a new id."""
    if isinstance(forced, str) and forced.strip():
        return forced[:MAX_TASK_ID]
    return new_task_id()


class TaskLog:
    """Pending, running and finished task ids, under a lock. Several may run at once (one per Ray replica)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.pending: dict[str, float] = {}  # id -> when queued
        self.running: dict[str, float] = {}  # id -> when started
        self.finished: collections.deque[str] = collections.deque(maxlen=MAX_FINISHED)

    def queue(self, task_id: str) -> None:
        with self._lock:
            self.pending[task_id] = time.time()

    def start(self, task_id: str) -> None:
        with self._lock:
            self.pending.pop(task_id, None)
            self.running[task_id] = time.time()

    def finish(self, task_id: str) -> None:
        with self._lock:
            self.pending.pop(task_id, None)
            if self.running.pop(task_id, None) is not None or task_id not in self.finished:
                self.finished.append(task_id)

    def drop(self, task_id: str) -> None:
        """A job that never ran (its client went away while it waited)."""
        with self._lock:
            self.pending.pop(task_id, None)

    def oldest_running(self) -> str | None:
        with self._lock:
            return min(self.running, key=self.running.get) if self.running else None

    def state(self, task_id: str) -> tuple[bool, bool, bool]:
        """(active, queued, completed)."""
        with self._lock:
            return task_id in self.running, task_id in self.pending, task_id in self.finished

    def waiting(self) -> int:
        with self._lock:
            return len(self.pending)


def internal_progress(active: bool, queued: bool, completed: bool, progress=None) -> dict:
    """A1111's ``InternalProgressResponse`` for one task; ``progress`` is the running job's ``Progress`` (its
    fields) when ``active``. No live previews here: ``live_preview`` is None, ``id_live_preview`` -1."""
    if not active or progress is None:
        return {"active": active, "queued": queued, "paused": False, "completed": completed, "progress": None,
                "eta": None, "live_preview": None, "id_live_preview": -1,
                "textinfo": "Queued..." if queued else "Waiting..."}
    done = 0.0
    if progress.job_count > 0:
        done += progress.job_no / progress.job_count
        if progress.sampling_steps > 0:
            done += progress.sampling_step / progress.sampling_steps / progress.job_count
    done = min(done, 1.0)
    elapsed = time.time() - progress.time_start
    eta = elapsed / done - elapsed if done > 0 else None
    return {"active": True, "queued": queued, "paused": False, "completed": completed, "progress": done,
            "eta": eta, "live_preview": None, "id_live_preview": -1, "textinfo": progress.textinfo}


__all__ = ["TaskLog", "internal_progress", "new_task_id", "task_id_of"]
