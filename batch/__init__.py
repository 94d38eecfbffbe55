"""``tritonsd.batch``: many job lines to many images, in this process or across a Ray cluster.

    import tritonsd
    report = tritonsd.batch("jobs.jsonl", "out/", "v1-5-pruned-emaonly.safetensors", group_size=4)
    report = tritonsd.batch(jobs, "out/", "model.safetensors", ray="auto")   # one Pipeline actor per GPU

Modules: ``jobs`` (job lines: A1111 field names, checks, seeds from ids), ``worker`` (a Pipeline turning a group
of jobs into PNG bytes; per-worker and per-job costs), ``noise`` (per-job noise in a shared UNet batch),
``output`` (atomic PNGs, ``results.jsonl``, resume), ``run`` (the driver), ``ray_run`` (Ray Data).

The module itself is callable, so ``tritonsd.batch(...)`` works whether the name resolves to this module or to
its ``batch`` function (importing a subpackage binds its module to the package's attribute).
"""

from __future__ import annotations

import sys
import types

from .jobs import Job, JobError, Rejected, read_jobs, read_jobs_file, seed_from_id
from .run import BatchError, BatchReport, batch, make_units


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> BatchReport:
        return batch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["BatchError", "BatchReport", "Job", "JobError", "Rejected", "batch", "make_units", "read_jobs",
           "read_jobs_file", "seed_from_id"]
