"""A batch run: jobs in, ``DIR/<id>.png`` and ``DIR/results.jsonl`` out, on this process or on Ray."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from tritonsd.batch.jobs import Job, Rejected, read_jobs, read_jobs_file
from tritonsd.batch.output import OutputDir, OutputError
from tritonsd.batch.worker import BatchWorker, Result
from tritonsd.devices import default_dtype, resolve_device, resolve_dtype
from tritonsd.load_spec import CheckedSpec, LoadSpec
from tritonsd.pipeline import load_spec
from tritonsd.batch.ray_run import run_on_ray
from tritonsd.sampler.memory import memory_shortfall


DEFAULT_SIDE = 512  # a job without a size gets the model's default: 512 for SD 1.x (the estimate's floor)


class BatchError(RuntimeError):
    """The run as a whole cannot go on (one line); a bad job line is never one."""


@dataclass
class BatchReport:
    """What a run did: ``written`` ids (in completion order), ``skipped`` ids (already done), ``errors`` rows
    (``line``, ``id``, ``error``), and the results file."""

    out: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def results(self) -> Path:
        return self.out / "results.jsonl"


def make_units(jobs: list[Job], group_size: int) -> list[list[Job]]:
    """Jobs cut into units of at most ``group_size`` jobs with one ``group_key``, in order of their first line."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group_key(), []).append(job)
    units = [same[i: i + group_size] for same in groups.values() for i in range(0, len(same), group_size)]
    return sorted(units, key=lambda u: u[0].line)


def local_results(units: list[list[Job]], spec: LoadSpec | CheckedSpec | None, group_size: int,
                  pipe=None) -> Iterator[Result]:
    worker = BatchWorker(pipe if pipe is not None else load_spec(spec), group_size)
    for unit in units:
        yield from worker.run(unit)


def batch(jobs, out, checkpoint: str | os.PathLike | None = None, *, config=None, vae=None, text_heads=None,
          parameterization=None, lora_dir=None, embeddings_dir=None, device=None, dtype=None,
          kernels: str = "auto", spec: LoadSpec | CheckedSpec | None = None,
          group_size: int = 1, ray: str | None = None, workers: int | None = None, pipe=None,
          progress: bool = False, on_result: Callable[[Result | Rejected], None] | None = None,
          controlnet_dir=None) -> BatchReport:
    """Run ``jobs`` (a JSONL file's path, or an iterable of JSON lines / dicts) into ``out``.

    The model: ``checkpoint`` and ``tritonsd.load``'s other arguments, or the same as one ``spec`` (a
    ``LoadSpec``, or a ``CheckedSpec`` whose prechecks this process already ran), or an already loaded ``pipe``
    (this process only); Ray actors check the spec again on their own node. ``group_size``: up to that many
    jobs of one size and sampler settings share a UNet batch. ``ray``: None runs here; "local", "auto" or a
    cluster address runs on Ray Data with ``workers`` actors (default: one per GPU). ``progress``: a bar of the
    jobs on stderr, with an ETA. ``on_result`` is called with each finished job (and each bad line).
    ``controlnet_dir``: where the lines' ``controlnet`` units find models named without a path."""
    t0 = time.perf_counter()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise BatchError(f"group size must be a positive integer, got {group_size!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise BatchError(f"workers must be a positive integer, got {workers!r}")
    if pipe is None and checkpoint is None and spec is None:
        raise BatchError("give a checkpoint (or a loaded pipe)")
    if spec is not None and (checkpoint is not None or pipe is not None):
        raise BatchError("give one of checkpoint, spec and pipe")
    if pipe is not None and ray is not None:
        raise BatchError("a loaded pipe runs in this process only; give checkpoint=... for Ray")
    if pipe is None:
        spec = _for_workers(spec if spec is not None else LoadSpec(
            checkpoint, config, device=device, dtype=dtype, kernels=kernels, vae=vae, text_heads=text_heads,
            parameterization=parameterization, lora_dir=lora_dir, embeddings_dir=embeddings_dir))
        lora_dir = _unchecked(spec).lora_dir
    lora_dir_path = Path(lora_dir).resolve() if lora_dir is not None else None
    if isinstance(jobs, (str, os.PathLike)):
        try:
            job_list, rejected = read_jobs_file(jobs, lora_dir=lora_dir_path, controlnet_dir=controlnet_dir)
        except OSError as e:
            raise BatchError(f"cannot read jobs file {jobs}: {e.strerror or e}") from None
    else:
        job_list, rejected = read_jobs(jobs, lora_dir=lora_dir_path, controlnet_dir=controlnet_dir)
    report = BatchReport(Path(out))
    with OutputDir(out) as output:
        done = output.done_ids(j.id for j in job_list)
        previous = output.previous_rows()
        kept = [{"line": j.line, "id": j.id, "file": j.file, "seed": j.seed,
                 "seconds": previous.get(j.id, {}).get("seconds")} for j in job_list if j.id in done]
        output.start_results(kept)
        if output.results_error is not None:  # the run goes on; the missing results file is one error row
            rejected = [Rejected(0, output.results_error)] + list(rejected)
        report.skipped = [j.id for j in job_list if j.id in done]
        for bad in rejected:
            output.add_row(bad.row())
            report.errors.append(bad.row())
            if on_result:
                on_result(bad)
        units = make_units([j for j in job_list if j.id not in done], group_size)
        if units and ray is None:
            check_group_memory(units, group_size, pipe, spec)
        if not units:
            results = iter(())  # nothing left: no model load, no cluster
        elif ray is None:
            results = local_results(units, spec, group_size, pipe)
        else:
            results = run_on_ray(units, _unchecked(spec), group_size, ray, workers)
        bar = tqdm(total=sum(map(len, units)), desc="batch", unit="image", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        for result in results:
            bar.update()
            if result.png is not None:
                try:
                    output.write_png(result.id, result.png)  # the image first: a row always has its file
                except OutputError as e:
                    result = dataclasses.replace(result, png=None, error=str(e))
            if result.png is not None:
                report.written.append(result.id)
            else:
                report.errors.append(result.row())
            output.add_row(result.row())
            if on_result:
                on_result(result)
        bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def check_group_memory(units: list[list[Job]], group_size: int, pipe, spec) -> None:
    """BatchError (one line, before the model loads) when a UNet batch of ``group_size`` rows (short groups are
    padded to it) at the largest job's size cannot fit in the device's free memory (``sampler.memory``)."""
    if pipe is not None:
        device, dtype = pipe.device, pipe.dtype
    elif isinstance(spec, CheckedSpec):
        device, dtype = spec.device, spec.dtype
    else:
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype if spec.dtype is not None else default_dtype(device))
    jobs = [j for unit in units for j in unit]
    width = max(j.settings.width or DEFAULT_SIDE for j in jobs)
    height = max(j.settings.height or DEFAULT_SIDE for j in jobs)
    short = memory_shortfall(group_size, width, height, device, dtype)
    if short is not None:
        raise BatchError(f"--group-size {group_size}: {short}; use a smaller group size")


def _for_workers(spec: LoadSpec | CheckedSpec) -> LoadSpec | CheckedSpec:
    """``spec`` with its paths made absolute here (workers may run elsewhere); a checked spec stays checked."""
    if isinstance(spec, CheckedSpec):
        return dataclasses.replace(spec, spec=spec.spec.absolute())
    return spec.absolute()


def _unchecked(spec: LoadSpec | CheckedSpec) -> LoadSpec:
    return spec.spec if isinstance(spec, CheckedSpec) else spec


__all__ = ["BatchError", "BatchReport", "batch", "make_units"]
