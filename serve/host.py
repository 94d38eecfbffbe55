"""The resident model: one Pipeline, loaded once and kept warm (its CUDA graphs stay captured between jobs),
switched to another checkpoint or VAE only when a job asks for one. Used only from the worker thread."""

from __future__ import annotations

import gc
import inspect
import logging
from dataclasses import dataclass, field

from tritonsd.serve.catalog import Catalog, Checkpoint

log = logging.getLogger("tritonsd.serve")


@dataclass
class LoadOptions:
    """What ``tritonsd.load`` gets for every checkpoint the server loads."""

    device: str | None = None
    dtype: str | None = None
    kernels: str = "auto"
    text_heads: int | None = None
    parameterization: str | None = None
    extra: dict = field(default_factory=dict)  # lora_dir, embeddings_dir (when the Pipeline takes them)


@dataclass(frozen=True)
class ModelKey:
    checkpoint: str  # Checkpoint.path
    vae: str | None = None


class ModelHost:
    def __init__(self, catalog: Catalog, options: LoadOptions, pipe=None):
        self.catalog = catalog
        self.options = options
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
            from tritonsd.serve.errors import NotFound

            raise NotFound("the requested model is no longer in the models folder")
        self.pipe, self.key = None, None
        gc.collect()
        _empty_cuda_cache()
        log.info("loading %s%s", ckpt.name, f" with VAE {key.vae}" if key.vae else "")
        self.pipe = load_pipeline(ckpt, key.vae, self.options)
        self.key = key
        return self.pipe


def load_pipeline(ckpt: Checkpoint, vae: str | None, options: LoadOptions):
    import tritonsd

    kwargs = dict(config=ckpt.config, device=options.device, dtype=options.dtype, kernels=options.kernels,
                  vae=vae, text_heads=options.text_heads, parameterization=options.parameterization)
    accepted = inspect.signature(tritonsd.load).parameters
    kwargs.update({k: v for k, v in options.extra.items() if k in accepted and v is not None})
    return tritonsd.load(ckpt.path, **kwargs)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
