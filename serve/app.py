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
import json
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritonsd.serve import jobs, limits
from tritonsd.serve.catalog import Catalog
from tritonsd.serve.controlnet_routes import install_routes as install_controlnet_routes
from tritonsd.serve.errors import ApiError, BadRequest, TooLarge, error_body, json_object, printable
from tritonsd.sampler.upscale import LATENT_UPSCALE_MODES
from tritonsd.serve.extras import ExtrasSingleImageRequest, extras_job
from tritonsd.serve.guard import HostGuard, allowed_hosts
from tritonsd.upscalers import Upscalers
from tritonsd.serve.host import ModelHost, ModelKey
from tritonsd.serve.images import decode_image, text_items
from tritonsd.serve.jobs import Options
from tritonsd.serve.previews import check_enabled, check_every
from tritonsd.serve.schema import Img2ImgRequest, PNGInfoRequest, Txt2ImgRequest
from tritonsd.serve.tasks import task_id_of
from tritonsd.serve.worker import Worker
from tritonsd.sampler.infotext_parse import parse_infotext
from tritonsd.sampler.registry import SAMPLERS

log = logging.getLogger("tritonsd.serve")
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
                "mask.js": "text/javascript; charset=utf-8", "gallery.js": "text/javascript; charset=utf-8"}


@dataclass
class ServerState:
    catalog: Catalog
    host: ModelHost
    worker: Worker
    options: Options = field(default_factory=Options)
    credentials: dict[str, str] = field(default_factory=dict)  # --api-auth user -> password
    ignore_unsupported: bool = False  # --ignore-unsupported: unimplemented fields listed, not refused
    allowed_hosts: set[str] | None = field(default_factory=lambda: allowed_hosts(None))  # None: any Host
    body_timeout_s: float = limits.BODY_IDLE_TIMEOUT_S  # the longest pause inside a request body
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
    """Every request body is read here, whole, before the app sees it: 413 past ``limit`` bytes, however it is
    framed (by its Content-Length at once; chunked, counted as it arrives), 400 for a request that gives both
    Content-Length and Transfer-Encoding (which framing counts is ambiguous: request smuggling's opening), and
    408 when the client pauses longer than ``idle_s`` between two parts of its body."""

    def __init__(self, app, limit: int = limits.MAX_BODY_BYTES, idle_s: float = limits.BODY_IDLE_TIMEOUT_S):
        self.app, self.limit, self.idle_s = app, limit, idle_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        names = [k.lower() for k, _ in scope.get("headers") or []]
        headers = dict((k.lower(), v) for k, v in scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (b"transfer-encoding" in names or names.count(b"content-length") > 1):
            return await _send_json(send, 400, error_body("BadRequest", "a request must not give both "
                                    "Content-Length and Transfer-Encoding (or two Content-Lengths)"), _CLOSE)
        if length is not None and (not length.strip().isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except asyncio.TimeoutError:
                return await _send_json(send, 408, error_body("RequestTimeout", f"the request body stalled for "
                                        f"{self.idle_s:g} s"), _CLOSE)
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
                return await receive()  # after the body: http.disconnect when the client goes
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await _send_json(send, 413, error_body("PayloadTooLarge",
                                               f"the request body is over the limit of {self.limit} bytes"), _CLOSE)


_CLOSE = [(b"connection", b"close")]


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
        return JSONResponse(status_code=exc.status, content=error_body(exc.error, exc.detail),
                            headers=exc.headers or None)

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


def body_schema(model) -> dict:
    """The OpenAPI request body of a route that reads its JSON itself (``read_model``)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _validate(model, body: bytes):
    """The body parsed and checked by pydantic (its JSON parser bounds nesting); pydantic's errors become
    FastAPI's 422."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None


async def read_model(request: Request, model):
    """The request's JSON as ``model``, parsed on a worker thread: a 64 MiB body never holds the event loop."""
    return await run_in_threadpool(_validate, model, await request.body())


async def wait_disconnect(request: Request) -> None:
    """Returns once the client has gone (its body was read whole by BodyLimit; what comes next is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="tritonsd", docs_url="/docs", redoc_url=None)
    app.state.server = state
    install_error_handlers(app)

    async def run_job(job, request: Request | None = None):
        """The job's result; a job whose client goes away while it waits is cancelled (never run)."""
        future = state.worker.submit(job)
        if request is None:
            return await asyncio.wrap_future(future)
        result = asyncio.ensure_future(asyncio.wrap_future(future))
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done():
            if future.cancel():
                log.info("job %s dropped before it ran: its client went away", job.name)
            result.cancel()
            return Response(status_code=499)
        return result.result()

    async def generate(request: Request, model, mode: str):
        req = await read_model(request, model)
        plan = await run_in_threadpool(jobs.build_plan, req, mode, options=state.options, catalog=state.catalog,
                                       host=state.host, ignore_unsupported=state.ignore_unsupported)
        return await run_job(jobs.generation_job(plan, task_id_of(req.force_task_id)), request)

    @app.post("/sdapi/v1/txt2img", openapi_extra=body_schema(Txt2ImgRequest))
    async def txt2img(request: Request):
        return await generate(request, Txt2ImgRequest, "txt2img")

    @app.post("/sdapi/v1/img2img", openapi_extra=body_schema(Img2ImgRequest))
    async def img2img(request: Request):
        return await generate(request, Img2ImgRequest, "img2img")

    @app.post("/sdapi/v1/png-info", openapi_extra=body_schema(PNGInfoRequest))
    async def png_info(request: Request):
        req = await read_model(request, PNGInfoRequest)
        return await run_in_threadpool(png_info_sync, req)

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        snapshot = state.worker.snapshot()  # the oldest running job's (A1111's, with one worker)
        previews = getattr(state.worker, "previews", None)  # a worker without previews (another door's) has none
        if previews is not None and snapshot["state"]["job_count"] and not skip_current_image:
            snapshot["current_image"] = previews.image()  # base64 PNG, as A1111's
        snapshot["queued"] = state.worker.waiting()  # beside A1111's fields: jobs waiting behind the running one
        return snapshot

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request, id_task: str | None = None):
        """Every running job, or only task ``id_task`` (in the query or a JSON body: beside A1111's API)."""
        body = await request.body()
        if body.strip():
            id_task = json_object(body).get("id_task", id_task)
        if id_task is not None and not isinstance(id_task, str):
            raise BadRequest(f"id_task must be a string, got {printable(id_task)}")
        await run_in_threadpool(state.worker.interrupt, id_task)
        return {}

    @app.post("/internal/progress")
    async def internal_progress(request: Request):
        """A1111's progress of one task: ``{"id_task": ...}`` -> active / queued / completed, progress, eta."""
        req = await run_in_threadpool(json_object, await request.body())
        task = req.get("id_task")
        if not isinstance(task, str):
            raise BadRequest(f"id_task must be a string, got {printable(task)}")
        return await run_in_threadpool(state.worker.task_progress, task)

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

    @app.post("/sdapi/v1/extra-single-image", openapi_extra=body_schema(ExtrasSingleImageRequest))
    async def extra_single_image(request: Request):
        req = await read_model(request, ExtrasSingleImageRequest)
        return await run_job(extras_job(req), request)

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        state.catalog.refresh()
        return [c.item() for c in state.catalog.checkpoints]

    @app.post("/sdapi/v1/refresh-checkpoints")
    def refresh_checkpoints():
        state.catalog.refresh()
        state.catalog.start_hashing()  # one pass at a time: a call during a pass asks it for one more round
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
        # webui lists its scripts' names (titles, lower case); the one implemented here is the ControlNet
        # extension's alwayson script ("ControlNet")
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @app.get("/sdapi/v1/options")
    def get_options():
        return options_dict(state)

    @app.post("/sdapi/v1/options", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True}}}}})
    async def set_options(request: Request):
        req = await run_in_threadpool(json_object, await request.body())
        await run_in_threadpool(set_options_sync, state, req)
        await _maybe_switch(state, req, run_job)
        return None

    install_controlnet_routes(app, state)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC_FILES:
            raise StarletteHTTPException(404, "Not Found")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    inner = BodyLimit(app, idle_s=state.body_timeout_s)
    if state.credentials:
        inner = BasicAuth(inner, state.credentials)
    return HostGuard(inner, None if state.credentials else state.allowed_hosts)


def png_info_sync(req: PNGInfoRequest) -> dict:
    """A1111's png-info: the ``parameters`` text, the other text chunks, and the text parsed (in one pass, capped:
    ``infotext_parse``)."""
    image = decode_image("image", req.image)
    geninfo = image.info.get("parameters")
    geninfo = geninfo if isinstance(geninfo, str) else ""
    return {"info": geninfo, "items": text_items(image),
            "parameters": parse_infotext(geninfo) if geninfo.strip() else {}}


def options_dict(state: ServerState) -> dict:
    """A1111's options as far as they mean something here, plus whatever clients stored."""
    host, o = state.host, state.options
    ckpt = next((c for c in state.catalog.checkpoints if c.path == host.default.checkpoint), state.catalog.main)
    previews = getattr(state.worker, "previews", None)
    return {"control_net_no_detectmap": False, **o.other, "show_progress_every_n_steps": previews.every if previews is not None else 0,
            "live_previews_enable": previews is not None and getattr(previews, "enabled", True),
            "sd_model_checkpoint": ckpt.title, "sd_checkpoint_hash": ckpt.sha256,
            "sd_vae": o.sd_vae, "CLIP_stop_at_last_layers": o.clip_skip, "randn_source": o.randn_source,
            "eta_ddim": o.eta_ddim, "samples_format": "png"}


def set_options_sync(state: ServerState, req: dict) -> None:
    """Checks every value first, then sets them (nothing is set when one is bad); the model switch itself is
    queued (``_maybe_switch``). Keys the server does not use are kept and echoed, within MAX_OPTION_KEYS keys and
    MAX_OPTION_BYTES of JSON together (413 past them)."""
    o = state.options
    checked = jobs.check_options(req, o, state.catalog)
    every = check_every(req["show_progress_every_n_steps"]) if "show_progress_every_n_steps" in req else None
    enabled = check_enabled(req["live_previews_enable"]) if "live_previews_enable" in req else None
    handled = {*jobs.OVERRIDES_USED, "show_progress_every_n_steps", "live_previews_enable"}
    other = {**o.other, **{k: v for k, v in req.items() if k not in handled}}
    _check_stored_options(other)
    with state.lock:
        o.clip_skip, o.randn_source, o.eta_ddim = checked["clip_skip"], checked["randn_source"], checked["eta_ddim"]
        if "sd_vae" in req:
            o.sd_vae = req["sd_vae"] or "Automatic"
        o.other = other
        if every is not None and getattr(state.worker, "previews", None) is not None:
            state.worker.previews.every = every
        if enabled is not None and getattr(state.worker, "previews", None) is not None:
            state.worker.previews.enabled = enabled
    return None


def _check_stored_options(other: dict) -> None:
    if len(other) > limits.MAX_OPTION_KEYS:
        raise TooLarge(f"options: {len(other)} keys the server does not use would be stored; the limit is "
                       f"{limits.MAX_OPTION_KEYS}")
    size = len(json.dumps(other, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass"))
    if size > limits.MAX_OPTION_BYTES:
        raise TooLarge(f"options: the values the server does not use would take {size:,} bytes of JSON; the "
                       f"limit is {limits.MAX_OPTION_BYTES:,}")


async def _maybe_switch(state: ServerState, req: dict, run_job) -> None:
    """Queue a switch when the checkpoint or the VAE changes; answers once the new model is loaded."""
    if "sd_model_checkpoint" not in req and "sd_vae" not in req:
        return None

    ckpt = (state.catalog.find_checkpoint(req["sd_model_checkpoint"]).path if "sd_model_checkpoint" in req
            else state.host.default.checkpoint)
    vae = state.catalog.find_vae(req["sd_vae"]) if "sd_vae" in req else state.host.default.vae
    await run_job(jobs.switch_job(ModelKey(ckpt, vae)))
    return None
