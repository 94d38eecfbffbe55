"""The tuner: each autotune key is timed once per GPU, triton version and kernel source, and the winner stored
in the user's tuning file, which ``kernels/_triton.py`` reads (it also documents the files' layout and holds the
lookup: a launch never imports this module).

:class:`Tuner` is what ``compile/warmup.py``'s ``tune_model`` plugs into the launch path with
``_triton.tuning(tuner)`` while it runs the model eagerly: a key found in no table is timed there, once, and
stored; the Triton autotuner's in-memory cache is filled with the winner, so it never benchmarks that key itself.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
import triton
import triton.testing

from tritonsd.kernels._triton import (TuningTables, config_to_dict, kernel_name, key_repr, match_config, read_entries,
                                      source_hash)


class TuningCache(TuningTables):
    """The tables of one GPU name and triton version, plus storing winners into the user's file."""

    def store(self, kernel: str, source: str, key: tuple, config: dict, timings_ms: dict[str, float]) -> None:
        """Record a winner (merged into the file as it is now on disk, written atomically)."""
        self._data = read_entries(self.path)
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


def time_on_gpu(autotuner, grid, args: tuple, kwargs: dict, config: triton.Config) -> float:
    """Milliseconds of one launch with ``config`` (median of Triton's ``do_bench``)."""
    def call():
        autotuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())
    return triton.testing.do_bench(call, warmup=5, rep=20, return_mode="median")


def time_call_on_gpu(call: Callable[[], object]) -> float:
    """Milliseconds of ``call`` (median of Triton's ``do_bench``), after one call that may tune its own launches."""
    call()
    torch.cuda.synchronize()
    return triton.testing.do_bench(call, warmup=5, rep=20, return_mode="median")


class Tuner:
    """The ``_triton.tuning`` hook: a key missing from the tables is timed (``time_config``, default: on the
    current GPU) and its winner stored in ``cache_for(gpu)`` (default: the user's file for this GPU). The same for
    a fused launch's way, fused or apart (:meth:`choose_way`, timed with ``time_call``).

    ``tuned`` counts the keys timed; ``found`` the keys already in this tuner's cache (stored by another process
    after the launch path read the tables, or earlier by this tuner for a kernel whose in-memory cache was reset)."""

    def __init__(self, time_config: Callable[..., float] = time_on_gpu, root: Path | None = None,
                 gpu: Callable[[], str] | None = None,
                 time_call: Callable[[Callable[[], object]], float] = time_call_on_gpu):
        self.time_config = time_config
        self.time_call = time_call
        self.root = root
        self.gpu = gpu or _current_gpu
        self.tuned = 0
        self.found = 0
        self._caches: dict[str, TuningCache] = {}

    def cache(self) -> TuningCache:
        gpu = self.gpu()
        if gpu not in self._caches:
            self._caches[gpu] = TuningCache(gpu, root=self.root)
        return self._caches[gpu]

    def __call__(self, autotuner, grid, args: tuple, kwargs: dict, key: tuple) -> triton.Config:
        config, tuned = choose(self.cache(), kernel_name(autotuner), source_hash(autotuner), key, autotuner.configs,
                               lambda c: self.time_config(autotuner, grid, args, kwargs, c))
        if tuned:
            self.tuned += 1
        else:
            self.found += 1
        return config

    def choose_way(self, choice: str, source: str, key: tuple, ways: dict[str, Callable[[], object]]) -> str:
        """The faster of ``ways`` (``_triton.runs_apart``'s {"fused": call, "apart": call}) for this key: the
        stored one, else each timed once and the faster stored with both timings."""
        cache = self.cache()
        hit = cache.lookup(choice, source, key)
        if hit is not None and hit["config"].get("way") in ways:
            self.found += 1
            return hit["config"]["way"]
        timings = {way: float(self.time_call(call)) for way, call in ways.items()}
        best = min(timings, key=timings.get)
        cache.store(choice, source, key, {"way": best}, timings)
        self.tuned += 1
        return best


def _current_gpu() -> str:
    return torch.cuda.get_device_name()
