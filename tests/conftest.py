from __future__ import annotations

# Without a GPU the Triton kernels run under Triton's CPU interpreter. The variable is read when a kernel is
# decorated (at import), so it must be set before anything imports triton or tritonsd.kernels.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One CPU thread here and in every process the tests start (CLI runs, the server, Ray actors inherit the variable):
# on 2 cores, heavy processes side by side thrash with more; and torch's CPU kernels may sum in another order with
# another thread count, which would break the byte-for-byte comparisons between a test and the process it starts.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

import sys
from pathlib import Path

import pytest

# benchmarks/ (the GPU-run scripts, the README table) is not installed: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonsd.testing.reference import fixtures_dir, load_reference

FP32_BOUND = 1e-4  # the fixtures' README: relative error bound for float32 implementations


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The fixtures directory. Missing fixtures FAIL the test: a skipped parity test proves nothing."""
    d = fixtures_dir()
    if not (d / "sd1-tiny.safetensors").is_file():
        pytest.fail(f"parity fixtures not found at {d} (set TRITONSD_FIXTURES to their directory)")
    return d


@pytest.fixture(scope="session")
def reference(fixtures):
    """reference(name) -> (tensors, meta) for NAME.reference.safetensors, cached per session."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = fixtures / f"{name}.reference.safetensors"
            if not path.is_file():
                pytest.fail(f"reference file missing: {path}")
            cache[name] = load_reference(path)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def models(fixtures):
    """models(name) -> the fixture checkpoint NAME loaded bare (its YAML, 2 text heads), one per test module."""
    from tritonsd.model.load import load_model  # lazy: the kernels load after TRITON_INTERPRET is set above

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(fixtures / f"{name}.safetensors", fixtures / f"{name}.yaml", text_heads=2)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pipes(fixtures):
    """pipes(name) -> a Pipeline of the fixture checkpoint NAME (its YAML, 2 text heads), one per test module."""
    from tritonsd.model.load import load_model
    from tritonsd.pipeline import Pipeline

    cache: dict[str, Pipeline] = {}

    def get(name: str) -> Pipeline:
        if name not in cache:
            cache[name] = Pipeline(load_model(fixtures / f"{name}.safetensors", fixtures / f"{name}.yaml",
                                              text_heads=2))
        return cache[name]

    return get
