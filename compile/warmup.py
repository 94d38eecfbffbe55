"""Warm-up before the first image: compile every kernel variant the shapes need (in parallel, into Triton's
on-disk cache), then, on a GPU, tune each autotune key once into the persistent tuning cache.

``warmup(config, sizes=[(512, 512)], batches=(1, 2))`` is what ``tritonsd warmup`` and the Pipeline's first
use both call. The second process finds every variant in the cache (no compile) and every key tuned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from tritonsd.compile import precompile, shapes, tuning, variants
from tritonsd.kernels import _triton

KERNEL_NAMES = ("attention", "conv", "concat", "group_norm", "layer_norm", "geglu", "linear")


class WarmupError(ValueError):
    """Warm-up cannot run as asked (no target architecture, an unknown kernel name, ...)."""


@dataclass
class WarmupReport:
    arch: str
    launches: int = 0  # kernel launches of one pass over the shapes
    variants: int = 0  # distinct compiled variants (before configs)
    tuning_keys: int = 0  # distinct autotune keys
    compile: precompile.CompileReport = field(default_factory=precompile.CompileReport)
    tuned: int = 0  # keys timed in this run
    tuning_seconds: float = 0.0

    @property
    def tasks(self) -> int:
        return len(self.compile.results)

    @property
    def misses(self) -> int:
        return self.compile.misses

    def summary(self) -> str:
        c = self.compile
        text = (f"{self.arch}: {self.launches} launches, {self.variants} variants, {self.tasks} compiles "
                f"({self.misses} not in the cache) in {c.wall_seconds:.1f} s on {c.jobs} worker(s), "
                f"{self.tuning_keys} autotune keys")
        if self.tuned:
            text += f", {self.tuned} tuned in {self.tuning_seconds:.1f} s"
        if c.failures:
            text += f"; {len(c.failures)} FAILED"
        return text


def current_arch() -> str | None:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    return None


def select(launches: Iterable[variants.Launch], kernels: Sequence[str] | None) -> list[variants.Launch]:
    """Only the launches of these kernel modules (``conv``, ``attention``, ...); all when None."""
    if not kernels:
        return list(launches)
    unknown = set(kernels) - set(KERNEL_NAMES)
    if unknown:
        raise WarmupError(f"unknown kernel(s) {', '.join(sorted(unknown))}; expected {', '.join(KERNEL_NAMES)}")
    return [la for la in launches if la.module.rsplit(".", 1)[-1] in kernels]


def needed_launches(config, sizes: Iterable[tuple[int, int]], batches: Iterable[int], dtype: torch.dtype,
                    kernels: Sequence[str] | None = None, vae: bool = True) -> list[variants.Launch]:
    return select(variants.model_launches(config, list(sizes), list(batches), dtype, vae=vae), kernels)


def warmup(config, sizes: Sequence[tuple[int, int]] | None = None, batches: Sequence[int] = (1, 2),
           dtype: torch.dtype = torch.float16, device: str | torch.device | None = None, arch: str | None = None,
           jobs: int | None = None, kernels: Sequence[str] | None = None, model: torch.nn.Module | None = None,
           progress: Callable[[int, int], None] | None = None, vae: bool = True) -> WarmupReport:
    """Compile, then (with ``model`` on a CUDA ``device`` of the same ``arch``) tune.

    config: a ``ModelConfig`` (or ``shapes.released(name)``); sizes: (height, width) in pixels (default: the
    config's native size, else 512x512); arch: ``sm_90``... (default: the current GPU's; required without one);
    vae: the VAE decode's kernels too.
    """
    arch = arch or current_arch()
    if arch is None:
        raise WarmupError("no GPU here: name the target architecture (e.g. --arch sm_90)")
    if sizes is None:
        sizes = [getattr(config, "size", (512, 512))]
    for h, w in sizes:
        if h <= 0 or w <= 0 or h % 8 or w % 8:
            raise WarmupError(f"image size {h}x{w}: sides must be positive multiples of 8")
    launches = needed_launches(config, sizes, batches, dtype, kernels, vae)
    unique = variants.unique(launches)
    report = WarmupReport(arch=arch, launches=len(launches), variants=len(unique),
                          tuning_keys=len(variants.unique(launches, lambda la: (la.name, la.tuning_key()))))
    report.compile = precompile.compile_all(precompile.tasks_for(unique, [arch]), jobs=jobs, progress=progress)
    if model is not None and device is not None and torch.device(device).type == "cuda" and arch == current_arch():
        report.tuned, report.tuning_seconds = tune_model(model, sizes, batches, dtype, torch.device(device))
    return report


def tune_model(model: torch.nn.Module, sizes: Sequence[tuple[int, int]], batches: Sequence[int],
               dtype: torch.dtype, device: torch.device, tuner: tuning.Tuner | None = None) -> tuple[int, float]:
    """One UNet step per (size, batch) and one VAE decode per size on random inputs, inside
    ``_triton.tuning(tuner)``: every autotuned launch looks its key up in the tuning tables and has it timed
    once, and stored, when absent. Returns (keys tuned, seconds)."""
    tuner = tuner or tuning.Tuner()
    before = tuner.tuned
    start = time.perf_counter()
    unet = model.model.diffusion_model
    cfg = unet.cfg
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), _triton.tuning(tuner):
        for h, w in sizes:
            for b in batches:
                x = torch.randn(b, cfg.in_channels, h // 8, w // 8, generator=g, device=device, dtype=dtype)
                ctx = torch.randn(b, shapes.TEXT_TOKENS, cfg.context_dim, generator=g, device=device, dtype=dtype)
                y = (torch.randn(b, cfg.adm_in_channels, generator=g, device=device, dtype=dtype)
                     if cfg.adm_in_channels is not None else None)
                unet(x, torch.full((b,), 500.0, device=device), ctx, y)
            z = torch.randn(1, 4, h // 8, w // 8, generator=g, device=device, dtype=dtype)
            model.first_stage_model.decode(z)
    torch.cuda.synchronize(device)
    return tuner.tuned - before, time.perf_counter() - start
