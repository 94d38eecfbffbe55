"""The kernel benchmarks' wiring (the timings themselves need a GPU)."""

from __future__ import annotations

import pytest
import torch

from tritonsd.tools import bench, cli


@pytest.mark.parametrize("op", bench.KERNEL_OPS)
def test_bench_cases_are_well_formed(op):
    module = bench._load(f"bench_{op}")
    cases = module.cases()
    assert cases and all(c.work > 0 and c.unit in ("TFLOP/s", "GB/s") for c in cases)
    assert len({(c.model, c.name) for c in cases}) == len(cases), "case names must be unique per model"
    assert {"sd15-512", "sd21-768", "sdxl-1024"} <= {c.model for c in cases}  # compile/shapes.py's models
    assert callable(module.bench)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_bench_kernels_without_cuda_is_a_clear_error(capsys):
    assert cli.main(["bench", "kernels", "--op", "geglu"]) == 1
    err = capsys.readouterr().err
    assert "no CUDA device" in err and len(err.strip().splitlines()) == 1


def test_bench_needs_a_subcommand():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"])
    assert e.value.code == 2
