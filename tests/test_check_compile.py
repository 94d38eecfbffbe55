"""check-compile's rules (spills, wgmma, failures), a CI-sized run of the command for sm_90 and sm_80, and the
VAE attention's D=512 configs (the ones whose spills differ between triton releases) for sm_90 with the installed
triton."""

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
    """Every shipped layer_norm / linear (GEMM) config at SD 1.5 shapes compiles for sm_90 and sm_80 without spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "check-compile", "--arch", "sm_90,sm_80",
                           "--models", "sd15", "--dtypes", "fp16", "--kernels", "layer_norm,linear", "--jobs", "1",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    table = json.loads(out.read_text())
    rows = table["rows"]
    assert table["failed"] == 0 and {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    assert {r["kernel"].split(".")[0] for r in rows} == {"layer_norm", "linear"}
    assert all(r["registers"] and r["spill_bytes"] == 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "tritonsd.tools.cli", "check-compile", "--arch", "sm_9x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not a CUDA architecture" in bad.stderr


def test_configs_are_pruned_per_triton_version():
    """Triton 3.6 (the GPU image's) spills with (64, 32, 8 warps, 1 stage) at D=512, 3.9 does not: the row is
    shipped from 3.9 on, and the others, in order, everywhere."""
    from tritonsd.kernels import _triton, attention

    assert _triton.shipped(attention.LARGE_D, attention.LARGE_D_SINCE_TRITON, (3, 6, 0)) == [(64, 16, 8, 2),
                                                                                            (64, 16, 8, 1)]
    assert _triton.shipped(attention.LARGE_D, attention.LARGE_D_SINCE_TRITON, (3, 9, 0)) == attention.LARGE_D
    assert _triton._version("3.9.0+git1a2b3c") == (3, 9, 0) and _triton._version("3.10.1") == (3, 10, 1)


VAE_ATTENTION = """
import json
from tritonsd.compile import check_compile, precompile
from tritonsd.kernels import attention

launches = [la for la in check_compile.representative_launches(["sd15"], ["fp16"], ["attention"])
            if la.kernel == "_KERNEL_LARGE_D"]
rows, _ = check_compile.check(["sm_90"], launches, jobs=2)
print(json.dumps({"head_d": [dict(la.kwargs)["HEAD_D"] for la in launches],
                  "shipped": [precompile._short(c) for c in attention._KERNEL_LARGE_D.configs],
                  "rows": [[r.config, r.ok, r.spill_bytes, r.wgmma] for r in rows],
                  "table": check_compile.format_table(rows)}))
"""


@pytest.mark.slow
def test_vae_attention_configs_do_not_spill_with_this_triton(tmp_path):
    """Every config shipped for the installed triton of the D=512 attention (the SD VAE's mid-block) compiles for
    sm_90 in fp16 with wgmma and no spill: (64, 32, 8 warps, 1 stage) spilled 880 bytes under triton 3.6 and is
    shipped only from 3.9 (kernels/attention.py). In a process without the interpreter (which ships one config)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", VAE_ATTENTION], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["head_d"] == [512]
    assert sorted(r[0] for r in got["rows"]) == sorted(got["shipped"]) and len(got["shipped"]) >= 2
    assert all(ok and spill == 0 and wgmma for _, ok, spill, wgmma in got["rows"]), got["table"]
