"""``tritonsd serve --ray``: the server's flags turned into a Ray Serve application (``serve/ray_deploy.py``),
run on a local cluster, the cluster this machine belongs to, or one at an address; or written as a ``serve run``
config (``--write-config``). Needs the ``ray`` extra (``pip install 'tritonsd[ray]'``: Ray Serve)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

from tritonsd.escape import escape
from tritonsd.sampler.preview import DEFAULT_EVERY
from tritonsd.serve import limits
from tritonsd.tools.cli import UsageError
from tritonsd.tools.generate import load_spec_of

MISSING = "tritonsd serve --ray needs Ray Serve: pip install 'tritonsd[ray]' (or 'ray[serve]')"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (--ray)")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|local|ADDRESS",
                   help="serve on Ray Serve: the cluster this machine belongs to (auto, the default), a cluster "
                        "started here (local) or one at ADDRESS (ray://... or HOST:PORT)")
    g.add_argument("--replicas", default="1", metavar="MIN:MAX",
                   help="generator replicas: N, or MIN:MAX to autoscale on ongoing requests (default 1)")
    g.add_argument("--target-ongoing-requests", type=float, default=1.0, metavar="N",
                   help="autoscaling's target of ongoing (running and queued) requests per replica (default 1)")
    g.add_argument("--upscale-delay", type=float, default=5.0, metavar="SECONDS",
                   help="how long the load must stay high before a replica is added (default 5)")
    g.add_argument("--downscale-delay", type=float, default=60.0, metavar="SECONDS",
                   help="how long the load must stay low before a replica is removed (default 60)")
    g.add_argument("--ray-cpus-per-replica", type=float, default=None, metavar="N",
                   help="CPU replicas of N CPUs each (fractions allowed); default: one GPU per replica")
    g.add_argument("--models-per-replica", type=int, default=2, metavar="N",
                   help="checkpoints kept warm per replica, least recently used evicted (default 2)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="every generation's deadline, queueing included: 504 after it (default 600)")
    g.add_argument("--write-config", type=Path, default=None, metavar="FILE",
                   help="write a Ray Serve config (serve run FILE starts it on a cluster) and exit")


def check_ray_usage(args: argparse.Namespace) -> None:
    from tritonsd.serve.ray_deploy import parse_replicas  # lazy: Ray Serve (the ray extra), checked first

    try:
        parse_replicas(args.replicas)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cpus = args.ray_cpus_per_replica
    if cpus is not None and not 0 < cpus <= 1024:
        raise UsageError(f"--ray-cpus-per-replica must be above 0, got {cpus:g}")
    if cpus is not None and args.device not in (None, "cpu"):
        raise UsageError("--ray-cpus-per-replica makes CPU replicas; it cannot go with --device "
                         f"{escape(args.device, 40)}")
    if getattr(args, "taesd", None) is not None:
        raise UsageError("--taesd does not go with --ray yet: replicas make A1111's cheap previews")
    if args.models_per_replica < 1:
        raise UsageError(f"--models-per-replica must be at least 1, got {args.models_per_replica}")
    if not args.target_ongoing_requests > 0:
        raise UsageError("--target-ongoing-requests must be above 0")
    for flag in ("request_timeout", "upscale_delay", "downscale_delay"):
        value = getattr(args, flag)
        if not 0 < value <= 86400:
            raise UsageError(f"--{flag.replace('_', '-')} must be between 0 and 86400 seconds, got {value:g}")


def ray_app_of(args: argparse.Namespace):
    """The ``RayApp`` of the flags (paths absolute: every node must see them at the same place)."""
    from tritonsd.serve.ray_deploy import RayApp  # lazy: Ray Serve, as above

    spec = dataclasses.asdict(load_spec_of(args))
    if args.ray_cpus_per_replica is not None:
        spec["device"] = "cpu"
    for name in ("path", "config", "lora_dir", "embeddings_dir", "upscaler_dir"):
        if spec.get(name) and not str(spec[name]).startswith("demo:"):
            spec[name] = os.path.abspath(spec[name])
    absolute = lambda d: os.path.abspath(d) if d is not None else None  # noqa: E731
    env = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]} if "OMP_NUM_THREADS" in os.environ else {}
    return RayApp(spec=spec, models_dir=absolute(args.models_dir), vae_dir=absolute(args.vae_dir),
                  controlnet_dir=absolute(getattr(args, "controlnet_dir", None)),
                  api_auth=args.api_auth, host=args.host, allowed_hosts=args.allowed_hosts,
                  ignore_unsupported=args.ignore_unsupported, max_queue=args.max_queue or limits.MAX_QUEUE,
                  body_timeout=args.body_timeout, request_timeout=args.request_timeout, replicas=args.replicas,
                  target_ongoing_requests=args.target_ongoing_requests, upscale_delay=args.upscale_delay,
                  downscale_delay=args.downscale_delay, cpus_per_replica=args.ray_cpus_per_replica,
                  models_per_replica=args.models_per_replica, env=env,
                  preview_every=getattr(args, "preview_every", DEFAULT_EVERY))


def config_of(app, host: str, port: int) -> dict:
    """A ``serve run`` / ``serve deploy`` config: the HTTP options and the application's builder and args."""
    from tritonsd.serve.ray_deploy import APP_NAME, IMPORT_PATH  # lazy: Ray Serve, as above

    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": dataclasses.asdict(app)}]}


def write_config(path: Path, config: dict) -> None:
    import yaml  # lazy: PyYAML comes with Ray

    from tritonsd.outputs import atomic_write  # lazy: only --write-config writes a file

    text = yaml.safe_dump(config, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


def run_ray(args: argparse.Namespace, stop_signals) -> int:
    """``--ray`` / ``--write-config``: exit 2 with one line when Ray Serve is missing. ``stop_signals()``
    installs the signal handlers once the application runs."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print(MISSING, file=sys.stderr)
        return 2
    check_ray_usage(args)
    app = ray_app_of(args)
    if args.write_config is not None:
        write_config(args.write_config, config_of(app, args.host, args.port))
        print(f"tritonsd serve: wrote {escape(str(args.write_config), 300)}; start it with: serve run "
              f"{escape(str(args.write_config), 300)}", file=sys.stderr)
        return 0
    started = connect(ray, args.ray or "auto", app)
    try:
        from tritonsd.batch.ray_run import RayError  # lazy: the shared Ray error (one line, exit 1)
        from tritonsd.serve.ray_deploy import APP_NAME, build  # lazy: Ray Serve, as above

        if app.gpu and not ray.cluster_resources().get("GPU"):
            raise RayError("the Ray cluster has no GPU for the replicas (one each); for CPU replicas give "
                           "--ray-cpus-per-replica N")
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build(app), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"tritonsd serve: on Ray Serve ({app.replicas} replicas of {os.path.basename(app.spec['path'])}); "
              f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
        stop_signals()
        while True:
            time.sleep(3600)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
        elif ray.is_initialized():
            serve.delete(APP_NAME)


def connect(ray, address: str, app) -> bool:
    """Connect to (or start) the cluster; True when this call started a local one."""
    from tritonsd.batch.ray_run import RayError, _without_ray_flags, one_line  # lazy: the shared Ray messages

    kw = dict(logging_level=logging.ERROR, configure_logging=True, log_to_driver=False)
    try:
        if address == "local":
            from tritonsd.serve.ray_deploy import parse_replicas  # lazy: Ray Serve, as above

            high = parse_replicas(app.replicas)[1]
            need = math.ceil(high * (app.cpus_per_replica or 1))
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, **kw)
            return True
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address == "auto":
            raise RayError("no running Ray cluster was found from this machine; start one (ray start --head), "
                           "give its address (--ray=ADDRESS) or run one here (--ray=local)") from None
        raise RayError(f"cannot connect to the Ray cluster at {escape(address, 200)}: "
                       f"{_without_ray_flags(one_line(e))}") from None
    return False


__all__ = ["MISSING", "add_arguments", "config_of", "ray_app_of", "run_ray"]
