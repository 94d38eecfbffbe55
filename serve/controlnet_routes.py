"""The extension's ``/controlnet/*`` routes (``serve/controlnet.py`` holds what they do)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from tritonsd.serve import controlnet
from tritonsd.serve.errors import json_object


def install_routes(app: FastAPI, state) -> None:
    """``/controlnet/*`` on ``app`` (the ControlNet folder: ``state.catalog.controlnet_dir``)."""

    def folder():
        return getattr(state.catalog, "controlnet_dir", None)

    @app.get("/controlnet/version")
    def version():
        return {"version": controlnet.API_VERSION}

    @app.get("/controlnet/model_list")
    def model_list(update: bool = True):
        return controlnet.model_list(folder())

    @app.get("/controlnet/module_list")
    def module_list(alias_names: bool = False):
        return controlnet.module_list(alias_names)

    @app.post("/controlnet/detect")
    async def detect(request: Request):
        body = await request.body()
        return await run_in_threadpool(lambda: controlnet.detect(json_object(body)))
