"""``tritonsd serve``: keep one model loaded and warm behind AUTOMATIC1111's HTTP API and a small web page
(``serve/``). Needs the ``serve`` extra (``pip install 'tritonsd[serve]'``: FastAPI and uvicorn)."""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
from pathlib import Path

from tritonsd.devices import DTYPE_NAMES
from tritonsd.escape import escape
from tritonsd.model.taesd import load_taesd_decoder
from tritonsd.serve import limits
from tritonsd.serve.guard import allowed_hosts
from tritonsd.tools.cli import UsageError
from tritonsd.tools.generate import load_spec_of


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a resident model over AUTOMATIC1111's HTTP API and a web page",
                              description="Load a checkpoint once and serve it over AUTOMATIC1111's /sdapi/v1 "
                                          "API (txt2img, img2img, progress, interrupt, options, ...) and a web "
                                          "page at /. One worker per device runs the jobs in order.")
    m = p.add_argument_group("models")
    m.add_argument("--checkpoint", required=True, metavar="FILE",
                   help=".safetensors or .ckpt file, or demo:sd1 (the built-in tiny random-weight model)")
    m.add_argument("--config", type=Path, default=None, metavar="YAML",
                   help="the checkpoint's original inference YAML (default: CHECKPOINT.yaml beside it)")
    m.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                   help="more checkpoints, switched to with sd_model_checkpoint (options or override_settings)")
    m.add_argument("--vae-dir", type=Path, default=None, metavar="DIR", help="VAE files for sd_vae")
    m.add_argument("--lora-dir", type=Path, default=None, metavar="DIR", help="LoRAs for <lora:name:w> in prompts")
    m.add_argument("--embeddings-dir", type=Path, default=None, metavar="DIR", help="textual-inversion embeddings")
    m.add_argument("--upscaler-dir", type=Path, default=None, metavar="DIR",
                   help="upscaler model files for hires fix and /sdapi/v1/extra-single-image (ESRGAN, ...; needs "
                        "spandrel)")
    m.add_argument("--controlnet-dir", type=Path, default=None, metavar="DIR",
                   help="ControlNet files, listed by /controlnet/model_list as 'name [hash]' and named by the units "
                        "of alwayson_scripts.controlnet")
    m.add_argument("--text-heads", type=int, default=None, metavar="N",
                   help="attention heads of the text towers (not in the weights; default width / 64)")
    m.add_argument("--parameterization", choices=("eps", "v"), default=None,
                   help="prediction type, when no YAML says it")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, metavar="DEVICE",
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default=None,
                   help="default: fp16 on cuda, fp32 on cpu")
    r.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto")
    r.add_argument("--preview-every", type=int, default=10, metavar="N",
                   help="a live preview every N sampling steps, A1111's 'Approx cheap' (show_progress_every_n_steps; "
                        "default: %(default)s; 0: none)")
    r.add_argument("--taesd", type=Path, default=None, metavar="FILE",
                   help="a TAESD decoder (taesd_decoder / taesdxl_decoder .safetensors or .pth) whose decode is the "
                        "live preview instead of the cheap latent-to-RGB map (A1111's 'TAESD' preview)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    n.add_argument("--port", type=int, default=7860,
                   help="default: 7860; checked before the model loads (exit 1 when taken)")
    n.add_argument("--api-auth", default=None, metavar="USER:PASS",
                   help="HTTP basic auth for every route (comma-separated for several users)")
    r.add_argument("--ignore-unsupported", action="store_true",
                   help="serve requests whose fields ask for what tritonsd does not implement (restore_faces, "
                        "script_name, alwayson_scripts entries, ...), naming them in the response's info, instead "
                        "of refusing them with a 422")
    n.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="without --api-auth the server answers only requests naming it 127.0.0.1, localhost, ::1 "
                        "or --host; add comma-separated host names here ('*': any, which lets any web page "
                        "reach the server through DNS rebinding)")
    n.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help=f"jobs that may wait for the device (default {limits.MAX_QUEUE}); more get 503 with "
                        "Retry-After")
    n.add_argument("--header-timeout", type=float, default=limits.HEADER_TIMEOUT_S, metavar="SECONDS",
                   help="a connection must send a request's headers within this (default: %(default)s)")
    n.add_argument("--body-timeout", type=float, default=limits.BODY_IDLE_TIMEOUT_S, metavar="SECONDS",
                   help="the longest pause allowed inside a request body; 408 after it (default: %(default)s)")
    p.set_defaults(run=run)


def check_usage(args: argparse.Namespace) -> dict:
    from tritonsd.serve.app import parse_auth  # lazy: fastapi (the serve extra), for this subcommand only

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if args.text_heads is not None and args.text_heads < 1:
        raise UsageError(f"--text-heads must be at least 1, got {args.text_heads}")
    if not 0 <= args.preview_every <= 1000:
        raise UsageError(f"--preview-every must be between 0 and 1000, got {args.preview_every}")
    if args.max_queue is not None and args.max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {args.max_queue}")
    for flag in ("header_timeout", "body_timeout"):
        value = getattr(args, flag)
        if not 0 < value <= 3600:
            raise UsageError(f"--{flag.replace('_', '-')} must be between 0 and 3600 seconds, got {value:g}")
    if args.taesd is not None and not args.taesd.is_file():
        raise UsageError(f"--taesd {escape(args.taesd)} is not a file")
    for flag in ("models_dir", "vae_dir", "lora_dir", "embeddings_dir", "upscaler_dir", "controlnet_dir"):
        d = getattr(args, flag)
        if d is not None and not d.is_dir():
            raise UsageError(f"--{flag.replace('_', '-')} {d} is not a directory")
    try:
        return parse_auth(args.api_auth)
    except ValueError as e:
        raise UsageError(str(e)) from None


class ServeError(RuntimeError):
    """The server cannot start (its port is taken, ...): one line, exit code 1."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: the server stops with a line saying so (exit code 128 + the signal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, _frame):
    raise Stopped(signum)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads: a taken port costs no load. uvicorn serves
    on this very socket, so nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not "in use"
        try:
            sock.bind(infos[0][4])
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        reason = e.strerror or str(e)
        hint = "; another server holds it: stop that one or give another --port" if \
            e.errno == errno.EADDRINUSE else ""
        raise ServeError(f"cannot listen on {host}:{port}: {reason}{hint}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise RuntimeError(f"{e.name} is not installed; install the serve extra: pip install 'tritonsd[serve]'") \
            from None
    credentials = check_usage(args)
    sock = listen(args.host, args.port)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve(args, credentials, sock, uvicorn)
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"tritonsd serve: stopped by {name}{' (Ctrl-C)' if e.signum == signal.SIGINT else ''}",
              file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return 0


def serve(args: argparse.Namespace, credentials: dict, sock: socket.socket, uvicorn) -> None:
    """Load the model and serve on ``sock`` until a signal: uvicorn shuts down gracefully, then raises the signal
    again, which ``_stop`` turns into ``Stopped``."""
    if args.host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        print(f"tritonsd serve: warning: listening on {args.host} without --api-auth: anyone who can reach this "
              "address can use the server", file=sys.stderr)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tritonsd.serve import build_state, create_app  # lazy: fastapi (the serve extra), for this subcommand only

    from tritonsd.serve.protocol import protocol_class  # lazy: uvicorn (the serve extra), as above

    taesd = load_taesd_decoder(args.taesd) if args.taesd is not None else None  # a bad file: before the model
    state = build_state(load_spec_of(args), models_dir=args.models_dir, vae_dir=args.vae_dir,
                        credentials=credentials, ignore_unsupported=args.ignore_unsupported,
                        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts), max_queue=args.max_queue,
                        body_timeout=args.body_timeout, controlnet_dir=args.controlnet_dir)
    state.worker.previews.every = args.preview_every
    if taesd is not None:
        state.worker.previews.decoder = taesd.to(state.host.pipe.device)
    state.catalog.start_hashing()
    print(f"tritonsd serve: {state.catalog.main.name} loaded on {state.host.pipe.device}; "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                            http=protocol_class(args.header_timeout), timeout_keep_alive=limits.KEEP_ALIVE_S,
                            limit_concurrency=limits.MAX_CONNECTIONS)
    uvicorn.Server(config).run(sockets=[sock])
