"""The command line in a child process whose peak memory is measured inside the child (for the hardening
tests' memory bounds)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# The command line run as ``python -m tritonsd.tools.cli``, which then writes its own peak RSS (``VmHWM`` of
# /proc/self/status: the high-water mark of this process's memory since its exec) to the file $HWM_FILE names.
# ``ru_maxrss`` from wait4 would not do: Linux carries the parent's peak across fork and exec, so a child
# started from a large pytest process reports at least the parent's size.
MEASURED_CLI = """
import atexit, os, runpy, sys

def _write_hwm():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["HWM_FILE"], "w") as f:
        f.write(str(kib * 1024))

atexit.register(_write_hwm)
sys.argv[0] = "tritonsd"
runpy.run_module("tritonsd.tools.cli", run_name="__main__")
"""


def run_measured(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """``tritonsd ARGS`` in a child (OMP_NUM_THREADS=1), with the child's own peak RSS in bytes, measured inside
    it (``MEASURED_CLI``)."""
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        proc = subprocess.run([sys.executable, "-c", MEASURED_CLI, *map(str, args)], capture_output=True, text=True,
                              errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1", "HWM_FILE": str(hwm)},
                              timeout=timeout)
        return proc, int(hwm.read_text())
