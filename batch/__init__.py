"""``tritonsd.batch``: many job lines to many images, in this process or across a Ray cluster.

    import tritonsd
    report = tritonsd.batch("jobs.jsonl", "out/", "v1-5-pruned-emaonly.safetensors", group_size=4)
    report = tritonsd.batch(jobs, "out/", "model.safetensors", ray="auto")   # one Pipeline actor per GPU

Modules: ``jobs`` (job lines: A1111 field names, checks, seeds from ids), ``worker`` (a Pipeline turning a group
of jobs into PNG bytes; per-worker and per-job costs), ``noise`` (per-job noise in a shared UNet batch),
``output`` (atomic PNGs, ``results.jsonl``, resume), ``run`` (the driver), ``ray_run`` (Ray Data).

The module itself is callable (``tritonsd.batch(...)`` is ``run_batch(...)``): importing a subpackage binds its
module to the package's attribute, so a plain function of that name would be shadowed after first use.
"""

from __future__ import annotations

import sys
import types

from tritonsd.batch.jobs import Job, JobError, Rejected, read_jobs, read_jobs_file, seed_from_id
from tritonsd.batch.run import BatchError, BatchReport, make_units
from tritonsd.batch.run import batch as run_batch


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> BatchReport:
        return run_batch(*args, **kwargs)

    __call__.__doc__ = run_batch.__doc__


sys.modules[__name__].__class__ = _CallableModule
batch = sys.modules[__name__]  # what ``tritonsd.batch`` resolves to on first use: this (callable) module

__all__ = ["BatchError", "BatchReport", "Job", "JobError", "Rejected", "make_units", "read_jobs", "read_jobs_file",
           "run_batch", "seed_from_id"]
