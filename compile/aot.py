"""Ahead-of-time compilation of recorded launches for a GPU target, without a GPU.

A recorded launch (see :mod:`.variants`) is replayed through the kernel's own ``warmup`` path (the JIT's own
binder, specialisation and option parsing, so the compiled variant and its on-disk cache key are exactly those
a launch on the real GPU computes) under a stand-in driver that only answers "which target". Nothing touches
CUDA: this runs on machines without a GPU, and in worker processes of a machine that has one.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import triton
from triton.backends.compiler import GPUTarget

WARP_SIZE = 32  # what the CUDA driver reports, and so part of the runtime's target (and cache key)


class AotError(RuntimeError):
    """An architecture name we cannot compile for."""


def parse_arch(arch: str | int) -> int:
    """``sm_90`` / ``sm90`` / ``90`` -> 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", str(arch).strip())
    if not m:
        raise AotError(f"not a CUDA architecture: {arch!r} (expected e.g. sm_90, sm_80, sm_86, sm_89)")
    return int(m.group(1))


class _TargetOnlyDriver:
    """The part of Triton's driver a warmup (compile-only) call reads: device, stream and target."""

    def __init__(self, capability: int):
        self.capability = capability

    def is_active(self) -> bool:
        return True

    def get_current_device(self):
        return f"aot-sm{self.capability}"  # also the key of the JIT's per-device caches

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, WARP_SIZE)


@contextlib.contextmanager
def target(arch: str | int) -> Iterator[GPUTarget]:
    """Compile (``kernel.warmup``) for ``arch`` inside the block, whatever GPU this machine has or lacks."""
    from triton.runtime.driver import driver

    capability = parse_arch(arch)
    fake = _TargetOnlyDriver(capability)
    previous = driver._active  # the lazily created real driver, or None
    driver.set_active(fake)
    try:
        yield fake.get_current_target()
    finally:
        driver._active = previous


def compile_config(kernel, args: tuple, kwargs: dict, config: triton.Config | None):
    """Compile one launch for one autotune config (``None``: a kernel that is not autotuned); returns the
    ``CompiledKernel`` (from Triton's on-disk cache when it is there). Call inside :func:`target`."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    extra = config.all_kwargs() if config is not None else {}
    return fn.warmup(*args, grid=(1,), **kwargs, **extra)


@dataclass
class Resources:
    """What ptxas made of a compiled kernel."""

    registers: int | None
    spill_bytes: int | None  # spill stores + loads
    stack_bytes: int | None
    shared_bytes: int
    wgmma: bool
    mma_sync: bool


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_path(capability: int) -> str | None:
    """The ptxas Triton uses for this target (its bundled one unless configured otherwise)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, AttributeError, TypeError, RuntimeError):  # pragma: no cover - other triton layouts
        return None


def resources(compiled, arch: str | int) -> Resources:
    """Registers, spills and stack from ``ptxas -v`` on the kernel's PTX (the compile itself keeps no log),
    shared memory from its metadata, and which tensor-core instructions its PTX uses."""
    ptx = compiled.asm["ptx"]
    md = compiled.metadata
    shared = md.shared if hasattr(md, "shared") else md["shared"]
    regs = spill = stack = None
    capability = parse_arch(arch)
    ptxas = ptxas_path(capability)
    if ptxas:
        suffix = "a" if capability >= 90 else ""
        src = Path(_tmpdir()) / f"k{abs(hash(ptx))}.ptx"
        src.write_text(ptx)
        try:
            log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{capability}{suffix}", str(src), "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=300)
            text = log.stdout + log.stderr
            if m := _PTXAS_USED.search(text):
                regs = int(m.group(1))
            if m := _PTXAS_SPILL.search(text):
                spill = int(m.group(1)) + int(m.group(2))
            if m := _PTXAS_STACK.search(text):
                stack = int(m.group(1))
        finally:
            src.unlink(missing_ok=True)
    return Resources(regs, spill, stack, int(shared), "wgmma" in ptx, "mma.sync" in ptx)


def _tmpdir() -> str:
    import tempfile

    return tempfile.gettempdir()
