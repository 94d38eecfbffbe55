"""The persistent tuning cache: each autotune key is timed once per GPU, triton version and kernel source.

Entries live in ``$TRITONSD_CACHE`` (else ``$XDG_CACHE_HOME/tritonsd``, else ``~/.cache/tritonsd``), one JSON
file per (GPU name, triton version) under ``tuning/``; inside it, per kernel, per source hash (the JIT's
``cache_key``: a changed kernel is a new entry), per autotune key, the winning config and the timings. Tables
measured on known GPUs are committed under ``kernels/data/tuned/`` and consulted after the user's cache. A
stored config that is no longer shipped is a miss (so pruning the config list invalidates it).

:func:`tuned_launch` is what ``_triton.launch`` calls on a GPU: it fills the Triton autotuner's in-memory cache
from here before the launch (so the autotuner never benchmarks a known key), or tunes the key itself, once,
and stores the winner.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import triton

TABLES_DIR = Path(__file__).resolve().parent / "data" / "tuned"


def cache_dir() -> Path:
    if os.environ.get("TRITONSD_CACHE"):
        return Path(os.environ["TRITONSD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tritonsd"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def config_to_dict(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def match_config(configs: Sequence[triton.Config], stored: dict) -> triton.Config | None:
    """The shipped config equal to a stored one, or None (no longer shipped)."""
    for c in configs:
        if config_to_dict(c) == stored:
            return c
    return None


def key_repr(key: tuple) -> str:
    return json.dumps([str(k) if not isinstance(k, (int, float, bool)) or k is None else k for k in key])


class TuningCache:
    """Winners per (kernel, source hash, key) for one GPU name and triton version."""

    def __init__(self, gpu: str, triton_version: str | None = None, root: Path | None = None,
                 tables_dir: Path | None = TABLES_DIR):
        self.gpu = gpu
        self.triton_version = triton_version or triton.__version__
        name = f"{_slug(gpu)}-triton{_slug(self.triton_version)}.json"
        self.path = (root or cache_dir()) / "tuning" / name
        self.table = tables_dir / name if tables_dir is not None else None
        self._data = self._read(self.path)
        self._committed = self._read(self.table) if self.table is not None else {}

    @staticmethod
    def _read(path: Path | None) -> dict:
        try:
            data = json.loads(path.read_text())
            return data.get("entries", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError, AttributeError):
            return {}  # absent or unreadable: an empty cache (it is only ever a speed-up)

    def lookup(self, kernel: str, source: str, key: tuple) -> dict | None:
        k = key_repr(key)
        for entries in (self._data, self._committed):
            hit = entries.get(kernel, {}).get(source, {}).get(k)
            if hit is not None:
                return hit
        return None

    def store(self, kernel: str, source: str, key: tuple, config: dict, timings_ms: dict[str, float]) -> None:
        """Record a winner (merged into the file as it is now on disk, written atomically)."""
        self._data = self._read(self.path)
        self._data.setdefault(kernel, {}).setdefault(source, {})[key_repr(key)] = {"config": config,
                                                                                    "ms": timings_ms}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"gpu": self.gpu, "triton": self.triton_version, "entries": self._data}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.path)


def choose(cache: TuningCache, kernel: str, source: str, key: tuple, configs: Sequence[triton.Config],
           time_config: Callable[[triton.Config], float]) -> tuple[triton.Config, bool]:
    """(config, tuned now): the stored winner when there is one still shipped, else each config timed once
    with ``time_config`` (milliseconds; inf for a config that fails) and the fastest stored."""
    hit = cache.lookup(kernel, source, key)
    if hit is not None:
        config = match_config(configs, hit["config"])
        if config is not None:
            return config, False
    timings = {}
    for c in configs:
        try:
            timings[c] = float(time_config(c))
        except Exception:  # noqa: BLE001 - a config that cannot run here (out of resources, ...) just loses
            timings[c] = math.inf
    best = min(timings, key=timings.get)
    if math.isinf(timings[best]):
        raise RuntimeError(f"no autotune config of {kernel} runs for key {key}")
    cache.store(kernel, source, key, config_to_dict(best), {str(c): t for c, t in timings.items()})
    return best, True


# ---- the launch path ---------------------------------------------------------------------------------------------

def source_hash(kernel) -> str:
    """The JIT's hash of the kernel's source and what it calls: a changed kernel is a new entry."""
    from tritonsd.compile.variants import innermost

    return innermost(kernel).cache_key


def kernel_name(kernel) -> str:
    from tritonsd.compile.variants import innermost

    fn = innermost(kernel)
    return f"{fn.module}.{fn.__name__}"


def autotune_key(autotuner, args: tuple, kwargs: dict) -> tuple:
    """The key ``triton.runtime.Autotuner.run`` computes (key arguments' values, then tensors' dtypes)."""
    named = {**dict(zip(autotuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in autotuner.arg_names}
    key = [named[k] for k in autotuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


_caches: dict[str, TuningCache] = {}
STATS = {"hits": 0, "tuned": 0}  # keys found in the persistent cache / timed, in this process


def _cache_for_current_gpu() -> TuningCache:
    import torch

    gpu = torch.cuda.get_device_name()
    if gpu not in _caches:
        _caches[gpu] = TuningCache(gpu)
    return _caches[gpu]


def _time_config(autotuner, grid, args, kwargs, config: triton.Config) -> float:
    import triton.testing

    def call():
        autotuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())
    return triton.testing.do_bench(call, warmup=5, rep=20, return_mode="median")


def tuned_launch(autotuner, grid, args: tuple, kwargs: dict) -> None:
    """Launch an autotuned kernel, its key's config taken from (or tuned into) the persistent cache."""
    key = autotune_key(autotuner, args, kwargs)
    if len(autotuner.configs) > 1 and key not in autotuner.cache:
        import torch

        if not torch.cuda.is_current_stream_capturing():
            config, tuned = choose(_cache_for_current_gpu(), kernel_name(autotuner), source_hash(autotuner), key,
                                   autotuner.configs,
                                   lambda c: _time_config(autotuner, grid, args, kwargs, c))
            autotuner.cache[key] = config
            STATS["tuned" if tuned else "hits"] += 1
    autotuner[grid](*args, **kwargs)
