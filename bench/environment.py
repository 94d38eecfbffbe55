"""What every benchmark JSON records about where and from what it was measured: the commit, the command, the
device, its driver and clocks, and the library versions.

The commit comes from ``--git-commit``, else ``$TRITONSD_GIT_COMMIT``, else ``git rev-parse`` (a lent GPU
machine gets the tree without ``.git``: pass it in). Driver and clocks come from ``nvidia-smi`` when it is on
the PATH, else they are null.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository checkout (the package root)
COMMIT_ENV = "TRITONSD_GIT_COMMIT"
RESULTS_ENV = "TRITONSD_RESULTS"


def results_dir() -> Path:
    """Where measured JSON goes: ``$TRITONSD_RESULTS``, else the checkout's ``benchmarks/results/`` (an editable
    install, or a run from the checkout), else ``benchmarks/results/`` under the current directory (an installed
    package has no checkout beside it)."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    checkout = ROOT / "benchmarks"
    return (checkout if checkout.is_dir() else Path.cwd() / "benchmarks") / "results"

# nvidia-smi --query-gpu fields -> our names (clocks in MHz, power in W, temperature in C)
SMI_FIELDS = {
    "driver_version": "driver",
    "clocks.sm": "sm_clock_mhz",
    "clocks.mem": "mem_clock_mhz",
    "clocks.max.sm": "sm_clock_max_mhz",
    "clocks.max.mem": "mem_clock_max_mhz",
    "power.limit": "power_limit_w",
    "temperature.gpu": "temperature_c",
}


def git_commit(override: str | None = None, root: Path = ROOT) -> tuple[str | None, bool | None]:
    """(commit, whether the code directories differ from it); the dirty flag is None when not read from git."""
    override = override or os.environ.get(COMMIT_ENV) or None
    if override:
        return override.strip(), None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or None
        # the package's code: every folder and module of the checkout but the tests and benchmarks/ (results)
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)tests",
                                     ":(exclude)benchmarks"], cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _number(text: str):
    text = text.strip()
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return None if text in ("", "[N/A]", "N/A") else text


def parse_smi(csv_line: str) -> dict:
    """One ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` line -> our field names."""
    values = [v.strip() for v in csv_line.split(",")]
    if len(values) != len(SMI_FIELDS):
        return {name: None for name in SMI_FIELDS.values()}
    out = {name: _number(v) for name, v in zip(SMI_FIELDS.values(), values)}
    out["driver"] = values[0] or None  # a version string, never a number
    return out


def gpu_state(index: int = 0) -> dict:
    """Driver version and current / maximum clocks of GPU ``index`` from nvidia-smi; nulls without it."""
    empty = {name: None for name in SMI_FIELDS.values()}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return empty
    try:
        out = subprocess.run([smi, f"--id={index}", f"--query-gpu={','.join(SMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return empty
    lines = out.stdout.strip().splitlines()
    return parse_smi(lines[0]) if out.returncode == 0 and lines else empty


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    if argv and Path(argv[0]).name == "tritonsd":
        return " ".join(["tritonsd", *argv[1:]])
    return " ".join(argv)


def record(command: str | list[str] | None = None, git_commit_override: str | None = None) -> dict:
    """The environment block of a results file (call it on the device being measured)."""
    import torch
    import triton

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    cuda = torch.cuda.is_available()
    commit, dirty = git_commit(git_commit_override)
    if isinstance(command, list):
        command = " ".join(command)
    return {
        "command": command if command is not None else command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "gpu": gpu_state(torch.cuda.current_device() if cuda else 0),
        "torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers_version,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(), "git_commit": commit, "git_dirty_code": dirty,
    }
