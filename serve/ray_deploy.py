"""``tritonsd serve --ray``: the server as a Ray Serve application of three deployments.

* ``Ingress`` (FastAPI, ``num_cpus=0``): ``app.create_app`` itself over a ``RayWorker``, so the routes, request
  checks, 4xx bodies, the 64 MiB body limit, auth, the Host guard, the ``info`` JSON and the web page are the
  single-process server's by construction.
* ``Generator``: a warm Pipeline per replica (``num_gpus=1``; or ``--ray-cpus-per-replica`` CPUs for CPU
  replicas), one job at a time (``max_ongoing_requests=1``), models loaded through ``serve.multiplexed``
  (``--models-per-replica`` warm, least recently used evicted), so the router sends a request where its model is
  warm; ``--replicas MIN:MAX`` autoscales on ongoing requests per replica.
* ``TaskBoard`` (``num_cpus=0``): every job's task id, progress and interrupt flag (``ray_worker.TaskBoard``).

``build(RayApp)`` gives the application; ``app_builder(args)`` is the import path a ``serve run`` config names
(``--write-config``), with the same fields as ``args``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import threading
from dataclasses import dataclass, field

import torch
from ray import serve

from tritonsd.devices import DTYPES
from tritonsd.load_spec import LoadSpec
from tritonsd.sampler.preview import DEFAULT_EVERY
from tritonsd.serve import limits
from tritonsd.serve.catalog import Catalog
from tritonsd.serve.errors import NotFound, printable
from tritonsd.serve.guard import allowed_hosts
from tritonsd.serve.host import ModelHost, ModelKey, load_pipeline
from tritonsd.serve.previews import Previews
from tritonsd.serve.ray_worker import (RayWorker, ReplicaHost, ReplicaWorker, TaskBoard, model_id, model_key,
                                       run_payload, shape_of)

APP_NAME = "tritonsd"
IMPORT_PATH = "tritonsd.serve.ray_deploy:app_builder"
replica_log = logging.getLogger("ray.serve")  # a replica's own log file (logs/serve/replica_*.log)


@dataclass
class RayApp:
    """Everything the application is built from; JSON-able (``--write-config`` writes it as the config's
    ``args``). ``spec``: the ``LoadSpec``'s fields (paths as every node sees them). ``replicas``: "N" or
    "MIN:MAX" (autoscaling on ``target_ongoing_requests``). ``cpus_per_replica``: None for GPU replicas (one GPU
    each). ``env``: environment variables of every replica (e.g. ``OMP_NUM_THREADS``)."""

    spec: dict
    models_dir: str | None = None
    vae_dir: str | None = None
    controlnet_dir: str | None = None
    api_auth: str | None = None
    host: str = "127.0.0.1"
    allowed_hosts: str | None = None
    ignore_unsupported: bool = False
    max_queue: int = limits.MAX_QUEUE
    body_timeout: float = limits.BODY_IDLE_TIMEOUT_S
    request_timeout: float = 600.0
    replicas: str = "1"
    target_ongoing_requests: float = 1.0
    upscale_delay: float = 5.0
    downscale_delay: float = 60.0
    cpus_per_replica: float | None = None
    models_per_replica: int = 2
    preview_every: int = DEFAULT_EVERY
    env: dict = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.cpus_per_replica is None and self.spec.get("device") != "cpu"


def parse_replicas(text: str) -> tuple[int, int]:
    """``"N"`` -> (N, N); ``"MIN:MAX"`` -> (MIN, MAX); ValueError (one line) otherwise."""
    low, sep, high = str(text).partition(":")
    try:
        lo, hi = int(low), int(high) if sep else int(low)
    except ValueError:
        raise ValueError(f"--replicas takes N or MIN:MAX (integers), got {printable(text)}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"--replicas needs 1 <= MIN <= MAX, got {printable(text)}")
    return lo, hi


# ---------------------------------------------------------------- deployments


class Generator:
    """A replica: the default model loaded warm at start, more loaded on demand (``serve.multiplexed``)."""

    async def __init__(self, spec: dict, models_dir: str | None, vae_dir: str | None, models_per_replica: int,
                       default: str, board):
        self.spec = LoadSpec(**spec)
        self.catalog = Catalog(self.spec.path, config=self.spec.config, models_dir=models_dir, vae_dir=vae_dir,
                               lora_dir=self.spec.lora_dir, embeddings_dir=self.spec.embeddings_dir)
        self.board = board
        self.name = serve.get_replica_context().replica_id.unique_id
        self.device_lock = threading.Lock()  # one job at a time on the device, a cancelled one's tail included
        self.previews = Previews()  # the running job's live preview, made on its own thread, sent to the board

        async def load(mid: str):  # a function, not the bound method: the multiplexer keeps its cache on it
            return await self._load(mid)

        self.get_model = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)
        await self.get_model(default)  # warm before the replica takes requests

    async def _load(self, mid: str):
        key = model_key(mid)
        ckpt = next((c for c in self.catalog.checkpoints if c.path == key.checkpoint), None)
        if ckpt is None:
            self.catalog.refresh()
            ckpt = next((c for c in self.catalog.checkpoints if c.path == key.checkpoint), None)
        if ckpt is None:
            raise NotFound("the requested model is not in this replica's models folder")
        gc.collect()  # what the multiplexer evicted goes before the new one loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        replica_log.info("tritonsd replica %s: loading model %s%s (not warm here)", self.name,
                         printable(ckpt.name), f" with VAE {printable(key.vae)}" if key.vae else "")
        pipe = await asyncio.to_thread(load_pipeline, ckpt, key.vae, self.spec)
        return ModelSlot(key, pipe)

    async def run(self, payload: dict) -> dict:
        """One job on this replica, on the Pipeline of the request's model id."""
        slot = await self.get_model(serve.get_multiplexed_model_id())
        replica_log.info("tritonsd replica %s: task %s on model %s (pid %d)", self.name,
                         printable(payload["task_id"]), printable(os.path.basename(slot.key.checkpoint)), os.getpid())
        host = ReplicaHost(slot.pipe, slot.key, self.spec, model_key(payload["default"]))
        worker = ReplicaWorker(host, self.board, payload["task_id"], self.previews)
        work = asyncio.get_running_loop().run_in_executor(None, self._locked, payload, worker)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            worker.stop()  # the deadline, or the client went away: stop at the next step
            raise

    def _locked(self, payload: dict, worker: ReplicaWorker) -> dict:
        with self.device_lock:
            self.previews.every = payload.get("preview_every", self.previews.every)
            return run_payload(payload, worker)


@dataclass
class ModelSlot:
    key: ModelKey
    pipe: object


class Ingress:
    """The ingress: ``app.create_app`` over a ``RayWorker`` (``serve.ingress`` takes the app this builds)."""

    def __init__(self, app: dict, generator, board):
        from tritonsd.serve import app as http  # lazy: fastapi (the serve extra), on the ingress replica

        a = RayApp(**app)
        spec = LoadSpec(**a.spec)
        catalog = Catalog(spec.path, config=spec.config, models_dir=a.models_dir, vae_dir=a.vae_dir,
                          lora_dir=spec.lora_dir, embeddings_dir=spec.embeddings_dir)
        catalog.controlnet_dir = a.controlnet_dir  # units are resolved here, to paths every node has
        # The memory check before a job is queued: against this node's RAM, with the replicas' dtype (CPU
        # replicas: the single-process server's very check; GPU replicas: the ingress has no GPU to ask, so a
        # request is refused here only when it would not fit this node's memory either).
        dtype = DTYPES[spec.dtype or ("fp16" if a.gpu else "fp32")]
        host = ModelHost(catalog, spec, pipe=shape_of("cpu", dtype))
        host.key = None  # nothing is loaded here
        worker = RayWorker(generator, board, host, a.request_timeout)
        worker.previews.every = a.preview_every
        self.state = http.ServerState(catalog=catalog, host=host, worker=worker,
                                      credentials=http.parse_auth(a.api_auth),
                                      ignore_unsupported=a.ignore_unsupported,
                                      allowed_hosts=allowed_hosts(a.host, a.allowed_hosts),
                                      body_timeout_s=a.body_timeout)
        catalog.start_hashing()

    def __serve_build_asgi_app__(self):
        from tritonsd.serve import app as http  # lazy: fastapi, as above

        return http.create_app(self.state)


# ---------------------------------------------------------------- the application


def generator_args(a: RayApp) -> dict:
    return {"spec": a.spec, "models_dir": a.models_dir, "vae_dir": a.vae_dir,
            "models_per_replica": a.models_per_replica}


def generator_options(a: RayApp) -> dict:
    """The generator's deployment options."""
    lo, hi = parse_replicas(a.replicas)
    actor = {"num_cpus": a.cpus_per_replica if not a.gpu else 1, "num_gpus": 1 if a.gpu else 0,
             "runtime_env": {"env_vars": {k: str(v) for k, v in a.env.items()}}}
    opts = {"ray_actor_options": actor, "max_ongoing_requests": 1, "max_queued_requests": a.max_queue}
    if lo == hi:
        opts["num_replicas"] = lo
    else:
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                                      "target_ongoing_requests": a.target_ongoing_requests,
                                      "upscale_delay_s": a.upscale_delay, "downscale_delay_s": a.downscale_delay,
                                      "metrics_interval_s": 1.0, "look_back_period_s": 2.0}
    return opts


def build(a: RayApp):
    """The Ray Serve application (``serve.run(build(...), name=APP_NAME, route_prefix="/")``)."""
    parse_replicas(a.replicas)
    app = dataclasses.asdict(a)
    default = model_id(ModelHost(_catalog_of(a), LoadSpec(**a.spec)).default)
    board = serve.deployment(TaskBoard, name="TaskBoard", num_replicas=1, max_ongoing_requests=10_000,
                             ray_actor_options={"num_cpus": 0},
                             logging_config={"enable_access_log": False}).bind()  # a line per report: no
    generator = serve.deployment(Generator, name="Generator", **generator_options(a)).bind(
        **generator_args(a), default=default, board=board)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1,
                               max_ongoing_requests=limits.MAX_CONNECTIONS, ray_actor_options={"num_cpus": 0})
    return ingress.bind(app, generator, board)


def _catalog_of(a: RayApp) -> Catalog:
    spec = LoadSpec(**a.spec)
    return Catalog(spec.path, config=spec.config, models_dir=a.models_dir, vae_dir=a.vae_dir)


def app_builder(args: dict):
    """The import path of ``--write-config``'s YAML: ``args`` are ``RayApp``'s fields."""
    return build(RayApp(**args))


__all__ = ["APP_NAME", "IMPORT_PATH", "RayApp", "app_builder", "build", "parse_replicas"]
