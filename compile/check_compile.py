"""Compile every kernel x shipped config x representative SD shape for GPU targets, without a GPU, and judge it.

Shapes: one UNet step (batch 1 and 2), the VAE decode and one text layer of SD 1.5 (512), SD 2.1 (768) and
SDXL (1024) from the shapes table (:mod:`.shapes`), as :mod:`.variants` records them, in fp16 and bf16
(``dtypes``); the launches are recorded for an H100's 132 SMs, so the convolutions that split K there come as the
split kernel's variants (``conv._conv2d_split_kernel``, one per SPLIT_K). For each distinct compiled variant and
config: shared memory, registers, spills (ptxas -v) and whether the PTX uses ``wgmma`` or ``mma.sync``. A row
fails on a compile error, on a register spill (fp16/bf16), or, for sm_90 and up, on a tensor-core kernel
(attention, conv) that falls back to ``mma.sync``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from tritonsd.compile import precompile, shapes, variants
from tritonsd.compile.warmup import select
from tritonsd.devices import DTYPE_NAMES, DTYPES, dtype_name

MATMUL_KERNELS = ("attention", "conv", "linear")  # the kernels whose inner loop is tl.dot


@dataclass
class Row:
    arch: str
    kernel: str
    dtype: str
    variant: str
    config: str
    seconds: float
    error: str | None
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    wgmma: bool | None
    mma_sync: bool | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def representative_launches(models: Iterable[str] = shapes.RELEASED, dtypes: Iterable[str] = ("fp16", "bf16"),
                            kernels: Sequence[str] | None = None, sizes: dict | None = None) -> list[variants.Launch]:
    """Unique variants over the released models at their native sizes (or ``sizes[name]``), batch 1 and 2, with
    zero and circular (tiling) padding."""
    out = []
    for name in models:
        model = shapes.released(name)
        size = (sizes or {}).get(name, model.size)
        for dt in dtypes:
            out += variants.model_launches(model, [size], (1, 2), DTYPE_NAMES[dt], tiling=True)
    return variants.unique(select(out, kernels))


def _dtype_of(launch: variants.Launch) -> str:
    for a in launch.args:
        if isinstance(a, variants.TensorArg):
            return dtype_name(a.dtype) if a.dtype in DTYPES else a.dtype  # variants record torch's names
    return "?"


def judge(result: precompile.Result) -> Row:
    launch, arch = result.task.launch, result.task.arch
    kernel = launch.module.rsplit(".", 1)[-1]
    dtype = _dtype_of(launch)
    res = result.resources or {}
    problems = []
    if result.error:
        problems.append(f"compile failed: {result.error}")
    else:
        half = dtype in ("fp16", "bf16")
        if half and (res.get("spill_bytes") or 0) > 0:
            problems.append(f"spills {res['spill_bytes']} bytes")
        capability = int(arch.removeprefix("sm_").rstrip("a"))
        if capability >= 90 and half and kernel in MATMUL_KERNELS and not res.get("wgmma"):
            problems.append("no wgmma (mma.sync fallback)" if res.get("mma_sync") else "no wgmma")
    kw = dict(launch.kwargs)
    variant = ",".join(f"{k}={v}" for k, v in kw.items() if k not in ("PRECISION", "DOT_DTYPE"))
    return Row(arch, f"{kernel}.{launch.kernel}", dtype, variant, result.config, round(result.seconds, 3),
               result.error, res.get("registers"), res.get("spill_bytes"), res.get("shared_bytes"),
               res.get("wgmma"), res.get("mma_sync"), problems)


def check(archs: Sequence[str], launches: list[variants.Launch], jobs: int | None = None,
          progress: Callable[[int, int], None] | None = None) -> tuple[list[Row], precompile.CompileReport]:
    tasks = precompile.tasks_for(launches, archs, resources=True)
    report = precompile.compile_all(tasks, jobs=jobs, progress=progress)
    rows = [judge(r) for r in report.results]
    rows.sort(key=lambda r: (r.arch, r.kernel, r.dtype, r.variant, r.config))
    return rows, report


def format_table(rows: list[Row]) -> str:
    lines = [f"{'arch':<6} {'kernel':<40} {'dt':<4} {'config':<34} {'regs':>4} {'spill':>5} {'smem':>6} "
             f"{'mma':<6} {'s':>5}  result"]
    for r in rows:
        mma = "wgmma" if r.wgmma else "sync" if r.mma_sync else "-"
        lines.append(f"{r.arch:<6} {r.kernel:<40} {r.dtype:<4} {r.config:<34} {_n(r.registers):>4} "
                     f"{_n(r.spill_bytes):>5} {_n(r.shared_bytes):>6} {mma:<6} {r.seconds:5.1f}  "
                     f"{'ok' if r.ok else '; '.join(r.problems)}")
    return "\n".join(lines)


def _n(v) -> str:
    return "-" if v is None else str(v)
