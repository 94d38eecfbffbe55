"""``--ray``: the same units run on Ray Data, one Pipeline actor per GPU (``map_batches`` with a callable class).

Each dataset row is one unit (a JSON list of jobs), in its own block so the actors share the work; an actor
returns one row per job with the PNG bytes, and the driver writes the files, so the workers need no shared
storage. The actor pool's size (its ``concurrency``) is ``--workers`` or the cluster's GPU count (1 on a cluster
without GPUs); each actor takes one GPU when the cluster has any (``num_gpus=1``) and one logical CPU. A local
cluster (``--ray local``) declares enough logical CPUs for the actors plus Ray Data's own read and output tasks,
so those never wait behind an actor that holds the last CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from typing import Iterator

import numpy as np

from tritonsd.batch.jobs import Job, escape
from tritonsd.batch.worker import BatchWorker, Result, one_line
from tritonsd.load_spec import LoadSpec
from tritonsd.pipeline import load_spec

SPARE_CPUS = 2  # logical CPUs a local cluster declares beyond one per actor, for Ray Data's own tasks


class RayError(RuntimeError):
    """Ray is missing, cannot be reached, or a worker failed (one line)."""


class PipelineActor:
    """The ``map_batches`` class: loads the Pipeline once per actor (its ``LoadSpec`` checked there, on the
    actor's node), then turns units into result rows."""

    def __init__(self, spec: dict, group_size: int):
        self.worker = BatchWorker(load_spec(LoadSpec(**spec)), group_size)

    def __call__(self, batch: dict) -> dict:
        rows, pngs = [], []
        for text in batch["unit"]:
            jobs = [Job.from_dict(d) for d in json.loads(text)]
            for r in self.worker.run(jobs):
                rows.append(json.dumps({"line": r.line, "id": r.id, "seed": r.seed, "seconds": r.seconds,
                                        "error": r.error}))
                pngs.append(r.png or b"")
        return {"result": np.array(rows, dtype=object), "png": np.array(pngs, dtype=object)}


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayError("--ray needs Ray Data: pip install 'tritonsd[ray]'") from None
    return ray


def connect(ray, address: str, workers: int | None) -> bool:
    """Connect to (or start) the cluster; True when this call started a local one (to shut down after)."""
    if ray.is_initialized():
        return False  # the caller's own connection (e.g. a notebook, or a test's shared local cluster)
    kw = dict(logging_level=logging.ERROR, configure_logging=True, log_to_driver=False)  # no Ray chatter on a
    # good run: a worker's failure comes back as its result row's error or as the exception below
    try:
        if address == "local":
            import torch

            gpus = torch.cuda.device_count()
            actors = workers or max(gpus, 1)
            ray.init(num_cpus=actors + SPARE_CPUS, num_gpus=gpus, include_dashboard=False, **kw)
            return True
        ray.init(address=address, **kw)  # "auto": the cluster this machine belongs to
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address == "auto":  # Ray's own message names its CLI's --address flag, which tritonsd does not have
            raise RayError("no running Ray cluster was found from this machine; start one (ray start --head), "
                           "give its address (--ray=ADDRESS) or run one here (--ray=local)") from None
        raise RayError(f"cannot connect to the Ray cluster at {escape(address, 200)} (--ray={escape(address, 200)}): "
                       f"{_without_ray_flags(one_line(e))}") from None
    return False


def run_on_ray(units: list[list[Job]], spec: LoadSpec, group_size: int, address: str = "local",
               workers: int | None = None) -> Iterator[Result]:
    """Results as the actors finish them (any order)."""
    ray = import_ray()
    started = connect(ray, address, workers)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows its own bar (jobs, with an ETA)
        ctx.print_on_execution_start = False
        gpus = int(ray.cluster_resources().get("GPU", 0)) if str(spec.device) != "cpu" else 0
        concurrency = workers or max(gpus, 1)
        if not units:
            return
        items = [{"unit": json.dumps([j.to_dict() for j in unit])} for unit in units]
        ds = ray.data.from_items(items, override_num_blocks=len(items))  # a block per unit: actors share them
        with warnings.catch_warnings():  # Ray 2.60 names max_restarts a deprecated "ray_remote_args"; no
            # named parameter takes it yet
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = _map(ray, ds, spec, group_size, concurrency, gpus)
        try:
            with _quiet("ray.data"):  # no per-dataset chatter on the driver
                for row in ds.iter_rows():
                    d = json.loads(row["result"])
                    yield Result(d["line"], d["id"], d["seed"], d["seconds"], bytes(row["png"]) or None,
                                 d["error"])
        except ray.exceptions.RayError as e:
            raise RayError(f"a Ray worker failed: {_last_line(e)}") from None
    finally:
        if started:
            ray.shutdown()


def _map(ray, ds, spec: LoadSpec, group_size: int, concurrency: int, gpus: int):
    """The actor pool over ``ds``: one Pipeline per actor, a failed actor reported, not restarted (with
    restarts, Ray's core logs an error line on every good run: the constructor's arguments live in the object
    store)."""
    return ds.map_batches(PipelineActor, fn_constructor_kwargs={"spec": dataclasses.asdict(spec),
                                                               "group_size": group_size},
                          batch_size=1, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=1,
                          num_gpus=1 if gpus else 0, max_restarts=0)


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _without_ray_flags(text: str) -> str:
    """Ray's message with its hints about Ray's own CLI flags (``--address``) cut: tritonsd has ``--ray=``."""
    return text.split(" Please specify", 1)[0].replace("`--address` flag", "--ray=ADDRESS")


def _last_line(e: BaseException) -> str:
    """The worker's own exception line out of Ray's wrapped traceback."""
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return escape(lines[-1].strip() if lines else type(e).__name__, 300)
