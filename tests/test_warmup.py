"""Warm-up compiles into Triton's on-disk cache for sm_90 without a GPU; a second process finds every variant
there (zero misses), and a changed kernel source or key is a miss. Each step is its own process (compiled
kernels, not the interpreter), sharing one TRITON_CACHE_DIR."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # every test compiles kernels in subprocesses

WARMUP = ["-m", "tritonsd.tools.cli", "warmup", "--model", "sd15", "--size", "64x64", "--batch", "1",
          "--arch", "sm_90", "--kernels", "layer_norm,geglu", "--jobs", "1"]


def run(args, cache, extra_path=None, check=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def summary(proc) -> tuple[int, int]:
    """(compiles, misses) from warmup's summary line."""
    m = re.search(r"(\d+) compiles \((\d+) not in the cache\)", proc.stdout)
    assert m, proc.stdout + proc.stderr[-2000:]
    return int(m.group(1)), int(m.group(2))


def entries(cache) -> set[str]:
    return set(os.listdir(cache)) if cache.exists() else set()


def test_second_process_finds_every_variant(tmp_path):
    cache = tmp_path / "triton-cache"
    compiles, misses = summary(run(WARMUP, cache))
    assert compiles > 0 and misses == compiles  # a cold cache: everything compiled
    before = entries(cache)
    assert len(before) >= compiles
    compiles2, misses2 = summary(run(WARMUP, cache))
    assert (compiles2, misses2) == (compiles, 0)
    assert entries(cache) == before  # nothing new written
    _, misses3 = summary(run([*WARMUP, "--dtype", "bf16"], cache))  # another key (dtype): all misses
    assert misses3 == compiles


KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def add_one(X, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, tl.load(X + i, mask=i < N) + {value}, mask=i < N)
'''

COUNT = textwrap.dedent('''
    import sys
    from tritonsd.compile import precompile, variants
    n, block = int(sys.argv[1]), int(sys.argv[2])
    launch = variants.Launch("toy_kernel", "add_one", (variants.TensorArg("float32", True), n), (("BLOCK", block),))
    report = precompile.compile_all(precompile.tasks_for([launch], ["sm_90"]), jobs=1)
    assert not report.failures, report.failures
    print("misses", report.misses)
''')


@pytest.mark.parametrize("change", ["source", "constexpr", "specialisation"])
def test_changed_source_or_key_is_a_miss(tmp_path, change):
    cache, src = tmp_path / "triton-cache", tmp_path / "src"
    src.mkdir()
    (src / "toy_kernel.py").write_text(KERNEL.format(value="1.0"))

    def misses(n=100, block=128):
        out = run(["-c", COUNT, str(n), str(block)], cache, extra_path=src).stdout
        return int(re.search(r"misses (\d+)", out).group(1))
    assert misses() == 1
    assert misses() == 0
    if change == "source":
        (src / "toy_kernel.py").write_text(KERNEL.format(value="2.0"))
        assert misses() == 1
    elif change == "constexpr":
        assert misses(block=256) == 1
    else:
        assert misses(n=96) == 1  # N divisible by 16 now: another specialisation
        assert misses(n=101) == 0  # not divisible by 16, as 100: the first variant
