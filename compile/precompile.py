"""Compile many kernel variants in parallel into Triton's on-disk cache (compile only: no CUDA, no timing).

A task is one :class:`~.variants.Launch` x one autotune config x one target. Workers are separate processes
(``spawn``: no CUDA state is inherited, none is created) that replay the launch through the kernel's own
``warmup`` under :func:`.aot.target`; the parent only collects results. A second run finds every task in the
cache (``cache_hit``), which is what a GPU process launching the same variant looks up too.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import triton

from tritonsd.compile import aot
from tritonsd.compile.variants import Launch
from tritonsd.kernels._triton import INTERPRET


@dataclass(frozen=True)
class Task:
    launch: Launch
    config: int | None  # index into the autotuner's configs; None for a kernel that is not autotuned
    arch: str  # "sm_90", ...
    resources: bool = False  # also run ptxas -v for registers / spills (check-compile)


@dataclass
class Result:
    task: Task
    seconds: float
    cache_hit: bool | None
    error: str | None = None
    config: str = ""
    resources: dict | None = None


@dataclass
class CompileReport:
    results: list[Result] = field(default_factory=list)
    wall_seconds: float = 0.0
    jobs: int = 1

    @property
    def misses(self) -> int:
        return sum(1 for r in self.results if r.cache_hit is False)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.error]

    @property
    def compile_seconds(self) -> float:
        """CPU seconds spent in compiles (the sum over tasks, whatever ran in parallel)."""
        return sum(r.seconds for r in self.results)


def tasks_for(launches: Iterable[Launch], archs: Iterable[str], resources: bool = False) -> list[Task]:
    """Every (launch, shipped config, arch); launches should already be unique variants."""
    out = []
    archs = list(archs)
    for launch in launches:
        kernel = launch.resolve()
        n = len(kernel.configs) if isinstance(kernel, triton.runtime.Autotuner) else 0
        for arch in archs:
            for i in (range(n) if n else [None]):
                out.append(Task(launch, i, arch, resources))
    return out


def config_of(launch: Launch, index: int | None) -> triton.Config | None:
    if index is None:
        return None
    return launch.resolve().configs[index]


_last_hit: list[bool] = []


def _listener(*_, cache_hit: bool = False, **__) -> None:
    _last_hit.append(bool(cache_hit))


def run_task(task: Task) -> Result:
    """Compile one task here (in a worker, or in-process)."""
    from dataclasses import asdict

    from triton import knobs

    config = config_of(task.launch, task.config)
    args, kwargs = task.launch.call_args()
    knobs.compilation.listener = _listener
    _last_hit.clear()
    start = time.perf_counter()
    try:
        with aot.target(task.arch):
            compiled = aot.compile_config(task.launch.resolve(), args, kwargs, config)
            res = asdict(aot.resources(compiled, task.arch)) if task.resources else None
    except Exception as e:  # noqa: BLE001 - any compile failure is reported per task, not fatal to the batch
        msg = str(e).strip().splitlines()
        return Result(task, time.perf_counter() - start, None, f"{type(e).__name__}: {msg[0] if msg else ''}"[:400],
                      str(config) if config else "")
    finally:
        knobs.compilation.listener = None
    hit = _last_hit[-1] if _last_hit else None
    return Result(task, time.perf_counter() - start, hit, None, _short(config), res)


def _short(config: triton.Config | None) -> str:
    if config is None:
        return "-"
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw}{',' if kw else ''}w={config.num_warps},s={config.num_stages}"


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def compile_all(tasks: list[Task], jobs: int | None = None, progress=None) -> CompileReport:
    """Run ``tasks`` on ``jobs`` worker processes (1: in this process); ``progress(done, total)`` after each."""
    jobs = default_jobs() if jobs is None else max(1, jobs)
    report = CompileReport(jobs=jobs)
    start = time.perf_counter()
    for i, result in enumerate(_run(tasks, jobs), 1):
        report.results.append(result)
        if progress is not None:
            progress(i, len(tasks))
    report.wall_seconds = time.perf_counter() - start
    return report


def _run(tasks: list[Task], jobs: int) -> Iterator[Result]:
    if (jobs == 1 or len(tasks) <= 1) and not INTERPRET:  # this process's kernels are interpreted: use a worker
        for t in tasks:
            yield run_task(t)
        return
    env_interpret = os.environ.pop("TRITON_INTERPRET", None)  # workers compile: no interpreter
    try:
        with worker_pool(jobs) as pool:
            # the longest first (float32 3x3 convolutions) so that they do not trail at the end
            order = sorted(tasks, key=lambda t: -_cost_hint(t))
            yield from pool.map(run_task, order, chunksize=1)
    finally:
        if env_interpret is not None:
            os.environ["TRITON_INTERPRET"] = env_interpret


def worker_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """``jobs`` compile worker processes that end themselves when this process goes away.

    ``spawn``: a parent that holds a CUDA context must not fork; the workers never touch CUDA. A parent that is
    killed (SIGKILL, or SIGTERM from ``timeout``, which Python does not turn into a clean shutdown) never
    tells its executor's workers to stop, and they would compile on, or wait forever on their task queue (they
    hold its write end too, so they never read end-of-file): each worker watches its parent instead.
    """
    ctx = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_watch_parent,
                                                  initargs=(os.getpid(),))


ORPHAN_POLL_SECONDS = 0.5


def _watch_parent(parent_pid: int) -> None:
    """Worker initializer: a daemon thread that exits this process once its parent is no longer ``parent_pid``
    (a dead parent's children are re-parented to init or a subreaper)."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_POLL_SECONDS)
        os._exit(1)  # no cleanup to do: results go to the parent, compiles to Triton's atomic cache writes
    threading.Thread(target=watch, name="tritonsd-orphan-watch", daemon=True).start()


def _cost_hint(task: Task) -> float:
    args = dict(task.launch.kwargs)
    dtypes = {a.dtype for a in task.launch.args if hasattr(a, "dtype")}
    base = 4.0 if "float32" in dtypes else 1.0
    return base * (args.get("KH", 1) * args.get("KW", 1) if "KH" in args else 1)
