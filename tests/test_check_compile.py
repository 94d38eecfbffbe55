"""check-compile's rules (spills, wgmma, failures) and a CI-sized run of the command for sm_90 and sm_80."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tritonsd.compile import check_compile, precompile, variants


def result(kernel="conv", dtype="float16", arch="sm_90", error=None, **res):
    module = f"tritonsd.kernels.{kernel}"
    launch = variants.Launch(module, "_k", (variants.TensorArg(dtype, True), 4), (("BLOCK", 16),))
    resources = None if error else {"registers": 128, "spill_bytes": 0, "shared_bytes": 1024, "wgmma": True,
                                    "mma_sync": False, **res}
    return precompile.Result(precompile.Task(launch, 0, arch, True), 1.0, False, error, "c", resources)


def test_rules():
    assert check_compile.judge(result()).ok
    assert check_compile.judge(result(spill_bytes=40)).problems == ["spills 40 bytes"]
    assert check_compile.judge(result(dtype="float32", spill_bytes=40)).ok  # only half precision must not spill
    assert "mma.sync" in check_compile.judge(result(wgmma=False, mma_sync=True)).problems[0]
    assert check_compile.judge(result(wgmma=False, mma_sync=True, arch="sm_80")).ok  # no wgmma before Hopper
    assert check_compile.judge(result(kernel="group_norm", wgmma=False)).ok  # not a matmul kernel
    assert check_compile.judge(result(error="PTXASError: boom")).problems[0].startswith("compile failed")


@pytest.mark.slow  # `tritonsd check-compile` compiles in a subprocess
def test_ci_subset(tmp_path):
    """Every shipped layer_norm / geglu config at SD 1.5 shapes compiles for sm_90 and sm_80 without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "check-compile", "--arch", "sm_90,sm_80",
                           "--models", "sd15", "--dtypes", "fp16", "--kernels", "layer_norm,geglu", "--jobs", "1",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert table["failed"] == 0 and {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    assert {r["kernel"].split(".")[0] for r in rows} == {"layer_norm", "geglu"}
    assert all(r["registers"] and r["spill_bytes"] == 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "check-compile", "--arch", "sm_9x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not a CUDA architecture" in bad.stderr
