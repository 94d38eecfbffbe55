"""The FastAPI app: A1111's ``/sdapi/v1`` routes over one resident Pipeline, and the web page at ``/``.

Requests are checked and their images decoded on the request's side; the generation itself is a Job for the
device's single worker (``worker.py``), awaited without holding a thread. Every error a client can cause is a
4xx with A1111's JSON error body; anything else is a 500 with the error's type and no traceback (that goes to
the log), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritonsd.serve import jobs, limits
from tritonsd.serve.catalog import Catalog
from tritonsd.serve.errors import ApiError, BadRequest, error_body, printable
from tritonsd.sampler.upscale import LATENT_UPSCALE_MODES
from tritonsd.serve.extras import ExtrasSingleImageRequest, extras_job
from tritonsd.upscalers import Upscalers
from tritonsd.serve.host import ModelHost, ModelKey
from tritonsd.serve.images import decode_image, text_items
from tritonsd.serve.jobs import Options
from tritonsd.serve.schema import Img2ImgRequest, PNGInfoRequest, Txt2ImgRequest
from tritonsd.serve.worker import Worker
from tritonsd.sampler.infotext_parse import parse_infotext
from tritonsd.sampler.registry import SAMPLERS

log = logging.getLogger("tritonsd.serve")
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


@dataclass
class ServerState:
    catalog: Catalog
    host: ModelHost
    worker: Worker
    options: Options = field(default_factory=Options)
    credentials: dict[str, str] = field(default_factory=dict)  # --api-auth user -> password
    ignore_unsupported: bool = False  # --ignore-unsupported: unimplemented fields listed, not refused
    lock: threading.Lock = field(default_factory=threading.Lock)


def parse_auth(text: str | None) -> dict[str, str]:
    """``USER:PASS[,USER:PASS...]`` (A1111's ``--api-auth``); ValueError on a malformed entry."""
    creds = {}
    for entry in (text or "").split(","):
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth takes USER:PASS (comma-separated for several), got {entry!r}")
        creds[user] = password
    return creds


# ---------------------------------------------------------------- middleware (pure ASGI)


class BodyLimit:
    """413 for a body over ``limit`` bytes: by its Content-Length at once; a body without one (chunked) is read
    here up to the limit, then handed on."""

    def __init__(self, app, limit: int = limits.MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)  # the server holds the body to its Content-Length
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await _send_json(send, 413, error_body("PayloadTooLarge",
                                               f"the request body is over the limit of {self.limit} bytes"))


class BasicAuth:
    """HTTP basic auth on every path (the page included) when ``--api-auth`` is given."""

    def __init__(self, app, credentials: dict[str, str]):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.credentials or self._ok(dict(scope.get("headers") or [])):
            return await self.app(scope, receive, send)
        await _send_json(send, 401, error_body("HTTPException", "Incorrect username or password"),
                         [(b"www-authenticate", b'Basic realm="tritonsd"')])

    def _ok(self, headers: dict) -> bool:
        value = headers.get(b"authorization", b"")
        if not value[:6].lower() == b"basic ":
            return False
        try:
            user, _, password = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------- errors


def _validation_detail(exc: RequestValidationError) -> list[dict]:
    out = []
    for e in exc.errors()[:20]:
        out.append({"loc": [str(x) for x in e.get("loc", ())], "msg": printable(e.get("msg", ""), 200),
                    "type": str(e.get("type", ""))})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_request, exc: RequestValidationError):
        detail = _validation_detail(exc)
        summary = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in detail)
        return JSONResponse(status_code=422, content=error_body("RequestValidationError", detail, summary))

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(status_code=exc.status, content=error_body(exc.error, exc.detail))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content=error_body("HTTPException", str(exc.detail)),
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ValueError)
    async def value_error(_request, exc: ValueError):
        # SettingsError, PromptTooLongError, LoraError, EmbeddingError, ...: one line each, the user's to fix
        return JSONResponse(status_code=422, content=error_body(type(exc).__name__, printable(exc, 500)))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content=error_body(
            type(exc).__name__, "internal error; the server log has the details"))


# ---------------------------------------------------------------- the app


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tritonsd", docs_url="/docs", redoc_url=None)
    app.state.server = state
    install_error_handlers(app)

    async def run_job(job):
        return await asyncio.wrap_future(state.worker.submit(job))

    async def generate(req, mode: str):
        plan = await run_in_threadpool(jobs.build_plan, req, mode, options=state.options, catalog=state.catalog,
                                       host=state.host, ignore_unsupported=state.ignore_unsupported)
        return await run_job(jobs.generation_job(plan))

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        return await generate(req, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest):
        return await generate(req, "img2img")

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PNGInfoRequest):
        image = decode_image("image", req.image)
        geninfo = image.info.get("parameters")
        geninfo = geninfo if isinstance(geninfo, str) else ""
        return {"info": geninfo, "items": text_items(image),
                "parameters": parse_infotext(geninfo) if geninfo.strip() else {}}

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        return state.worker.progress.snapshot()

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        state.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        return {}

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": s.a1111_name, "aliases": list(s.a1111_aliases),
                 "options": {"scheduler": "karras"} if s.karras else {}} for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False},
                {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1,
                 "need_inner_model": True},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                 "need_inner_model": False}]

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        ups = Upscalers(state.host.spec.upscaler_dir)
        files = ups.files()
        return [{"name": name, "model_name": None, "model_path": str(files[name]) if name in files else None,
                 "model_url": None, "scale": None} for name in ups.names()]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @app.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(req: ExtrasSingleImageRequest):
        return await run_job(extras_job(req))

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        state.catalog.refresh()
        return [c.item() for c in state.catalog.checkpoints]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        state.catalog.refresh()
        threading.Thread(target=state.catalog.hash_all, daemon=True).start()
        return {}

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae():
        return state.catalog.vaes()

    @app.get("/sdapi/v1/loras")
    def loras():
        return state.catalog.loras()

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return {}

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return state.catalog.embeddings()

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    def get_options():
        return options_dict(state)

    @app.post("/sdapi/v1/options")
    async def set_options(req: dict):
        await run_in_threadpool(set_options_sync, state, req)
        await _maybe_switch(state, req, run_job)
        return None

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC_FILES:
            raise StarletteHTTPException(404, "Not Found")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    return BasicAuth(BodyLimit(app), state.credentials) if state.credentials else BodyLimit(app)


def options_dict(state: ServerState) -> dict:
    """A1111's options as far as they mean something here, plus whatever clients stored."""
    host, o = state.host, state.options
    ckpt = next((c for c in state.catalog.checkpoints if c.path == host.default.checkpoint), state.catalog.main)
    return {**o.other, "sd_model_checkpoint": ckpt.title, "sd_checkpoint_hash": ckpt.sha256,
            "sd_vae": o.sd_vae, "CLIP_stop_at_last_layers": o.clip_skip, "randn_source": o.randn_source,
            "eta_ddim": o.eta_ddim, "samples_format": "png"}


def set_options_sync(state: ServerState, req: dict) -> None:
    """Checks every value first, then sets them (nothing is set when one is bad); the model switch itself is
    queued (``_maybe_switch``)."""
    o = state.options
    if "sd_model_checkpoint" in req:
        state.catalog.find_checkpoint(req["sd_model_checkpoint"])
    if "sd_vae" in req:
        state.catalog.find_vae(req["sd_vae"])
    clip_skip = req.get("CLIP_stop_at_last_layers", o.clip_skip)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
        raise BadRequest(f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {printable(clip_skip)}")
    randn = req.get("randn_source", o.randn_source)
    if not isinstance(randn, str) or randn not in jobs.RNG_SOURCES:
        raise BadRequest(f"randn_source must be one of {', '.join(jobs.RNG_SOURCES)}, got {printable(randn)}")
    eta = req.get("eta_ddim", o.eta_ddim)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise BadRequest(f"eta_ddim must be a number from 0 to 1, got {printable(eta)}")
    with state.lock:
        o.clip_skip, o.randn_source, o.eta_ddim = clip_skip, randn, float(eta)
        if "sd_vae" in req:
            o.sd_vae = req["sd_vae"] or "Automatic"
        handled = {"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "randn_source", "eta_ddim"}
        o.other.update({k: v for k, v in req.items() if k not in handled})
    return None


async def _maybe_switch(state: ServerState, req: dict, run_job) -> None:
    """Queue a switch when the checkpoint or the VAE changes; answers once the new model is loaded."""
    if "sd_model_checkpoint" not in req and "sd_vae" not in req:
        return None

    ckpt = (state.catalog.find_checkpoint(req["sd_model_checkpoint"]).path if "sd_model_checkpoint" in req
            else state.host.default.checkpoint)
    vae = state.catalog.find_vae(req["sd_vae"]) if "sd_vae" in req else state.host.default.vae
    await run_job(jobs.switch_job(ModelKey(ckpt, vae)))
    return None
