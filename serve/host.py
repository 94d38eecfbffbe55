"""The resident model: one Pipeline, loaded once and kept warm (its CUDA graphs stay captured between jobs),
switched to another checkpoint or VAE only when a job asks for one. Used only from the worker thread."""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass

from tritonsd.load_spec import LoadSpec
from tritonsd.pipeline import load_spec
from tritonsd.serve.catalog import Catalog, Checkpoint
from tritonsd.serve.errors import NotFound

log = logging.getLogger("tritonsd.serve")


@dataclass(frozen=True)
class ModelKey:
    checkpoint: str  # Checkpoint.path
    vae: str | None = None


class ModelHost:
    """The loaded Pipeline. ``spec``: the server's ``LoadSpec`` (the main checkpoint's); every checkpoint it
    switches to is loaded with the same device, dtype, kernels, text heads, parameterization, LoRA and embeddings
    folders, its own YAML and the job's VAE."""

    def __init__(self, catalog: Catalog, spec: LoadSpec, pipe=None):
        self.catalog = catalog
        self.spec = spec
        self.pipe = pipe  # a Pipeline given ready (tests, benchmarks) stands for the main checkpoint
        self.key: ModelKey | None = ModelKey(catalog.main.path) if pipe is not None else None
        self.default = ModelKey(catalog.main.path)  # what jobs without an override run on (POST /options)

    @property
    def checkpoint(self) -> Checkpoint:
        key = self.key or self.default
        return next((c for c in self.catalog.checkpoints if c.path == key.checkpoint), self.catalog.main)

    def ensure(self, key: ModelKey):
        """The Pipeline for ``key``, loading it (and dropping the previous one first) when another is loaded."""
        if self.pipe is not None and self.key == key:
            return self.pipe
        ckpt = next((c for c in self.catalog.checkpoints if c.path == key.checkpoint), None)
        if ckpt is None:
            raise NotFound("the requested model is no longer in the models folder")
        self.pipe, self.key = None, None
        gc.collect()
        _empty_cuda_cache()
        log.info("loading %s%s", ckpt.name, f" with VAE {key.vae}" if key.vae else "")
        self.pipe = load_pipeline(ckpt, key.vae, self.spec)
        self.key = key
        return self.pipe


def load_pipeline(ckpt: Checkpoint, vae: str | None, spec: LoadSpec):
    """``ckpt`` (with its YAML) and ``vae`` loaded as ``spec`` says for the rest."""
    return load_spec(dataclasses.replace(spec, path=ckpt.path, config=ckpt.config, vae=vae))


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
