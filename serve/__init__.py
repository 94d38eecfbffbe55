"""``tritonsd serve``: one resident Pipeline behind AUTOMATIC1111's HTTP API (v1.10's ``/sdapi/v1`` routes,
field names, defaults and response shapes) and a small web page, on FastAPI + uvicorn (the ``serve`` extra).

    from tritonsd import LoadSpec
    from tritonsd.serve import build_state, create_app
    state = build_state(LoadSpec("model.safetensors", device="cuda"), models_dir="models/")  # or a bare path
    app = create_app(state)            # an ASGI app; uvicorn.run(app, host="127.0.0.1", port=7860)

Modules: ``app`` (routes, errors, body limit, auth), ``schema`` (A1111's request fields), ``jobs`` (request ->
GenerationSettings plan -> images), ``worker`` (the device's single worker and A1111's progress state), ``host``
(the resident Pipeline and model switches), ``catalog`` (checkpoints, VAEs, LoRAs, embeddings), ``controlnet`` +
``controlnet_routes`` (the A1111 extension's units and ``/controlnet/*`` routes),
``images`` (base64 / PNG), ``limits``.
"""

from __future__ import annotations

from tritonsd.load_spec import LoadSpec
from tritonsd.serve import guard, limits
from tritonsd.serve.catalog import Catalog
from tritonsd.serve.host import ModelHost
from tritonsd.serve.worker import Worker


def build_state(spec, *, models_dir=None, vae_dir=None, credentials: dict | None = None, pipe=None,
                ignore_unsupported: bool = False, allowed_hosts="loopback", max_queue: int | None = None,
                body_timeout: float | None = None, controlnet_dir=None):
    """Load ``spec`` (a ``tritonsd.LoadSpec``, or a checkpoint path loaded with the defaults) unless ``pipe`` is
    given ready, and start the device's worker. ``models_dir`` / ``vae_dir``: more checkpoints and VAEs that jobs
    switch to (loaded as ``spec`` says for the rest; ``spec.vae`` is not used: the VAE is the job's).
    ``allowed_hosts``: the Host names answered without auth (``serve.guard``; "loopback": 127.0.0.1, localhost,
    ::1; None: any); ``max_queue``: jobs that may wait (``limits.MAX_QUEUE``); ``body_timeout``: the longest pause
    inside a request body, in seconds (``limits.BODY_IDLE_TIMEOUT_S``); ``controlnet_dir``: the ControlNet files
    units name (``serve/controlnet.py``)."""
    from tritonsd.serve.app import ServerState  # lazy: fastapi (the serve extra), only when a server is built

    if not isinstance(spec, LoadSpec):
        spec = LoadSpec(spec)
    catalog = Catalog(spec.path, config=spec.config, models_dir=models_dir, vae_dir=vae_dir,
                      lora_dir=spec.lora_dir, embeddings_dir=spec.embeddings_dir)
    catalog.controlnet_dir = spec.controlnet_dir if controlnet_dir is None else controlnet_dir
    host = ModelHost(catalog, spec, pipe=pipe)
    if pipe is None:
        host.ensure(host.default)
    hosts = guard.allowed_hosts(None) if allowed_hosts == "loopback" else allowed_hosts
    worker = Worker(host, max_queue=max_queue or limits.MAX_QUEUE)
    return ServerState(catalog=catalog, host=host, worker=worker, credentials=dict(credentials or {}),
                       ignore_unsupported=ignore_unsupported, allowed_hosts=hosts,
                       body_timeout_s=body_timeout or limits.BODY_IDLE_TIMEOUT_S)


def create_app(state):
    from tritonsd.serve.app import create_app as _create_app  # lazy: fastapi, as above

    return _create_app(state)


__all__ = ["build_state", "create_app"]
