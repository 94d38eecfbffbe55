"""Fused or apart (issue 22): where the tuning found cuBLAS's GEMM with the LayerNorm, GEGLU and add as their own
launches faster than the fused Triton GEMM for a shape, that linear call runs apart, and ``tritonsd bench plan``
shows it. No GPU here: a pretend GPU (``_triton.assume_gpu``), the kernels under the interpreter, a fake timer."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tritonsd.bench import plan as P
from tritonsd.compile import tuning
from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels import linear as L

GPU = "NVIDIA H200"
H100 = "NVIDIA H100 80GB HBM3"  # bench/data/gpus.json's device name of --gpu h100


@pytest.fixture
def triton_calls(monkeypatch, tmp_path):
    """The user's cache under tmp_path (no committed tables), and a count of the fused GEMM's calls."""
    monkeypatch.setenv("TRITONSD_CACHE", str(tmp_path / "user"))
    monkeypatch.setattr(_triton, "_tables", {})
    calls = {"fused": 0}
    real = L.linear_triton

    def counted(*args, **kwargs):
        calls["fused"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(L, "linear_triton", counted)
    return calls


class Stopwatch:
    """A fake ``time_call``: runs the call, tells the fused way (the fused GEMM ran) from the apart one, and says
    the milliseconds it was given for that way."""

    def __init__(self, calls, fused_ms, apart_ms):
        self.calls, self.ms, self.timed = calls, {"fused": fused_ms, "apart": apart_ms}, []

    def __call__(self, call):
        before = self.calls["fused"]
        call()
        way = "fused" if self.calls["fused"] > before else "apart"
        self.timed.append(way)
        return self.ms[way]


def ff_call(rows=10, seed=0):
    """A feed-forward projection at odd sizes: LayerNorm prologue, bias, GEGLU; float32, batch 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, 24, generator=g)
    w, b = torch.randn(2 * 20, 24, generator=g) * 0.2, torch.randn(2 * 20, generator=g)
    norm = L.Norm(torch.randn(24, generator=g), torch.randn(24, generator=g))
    return lambda: dispatch.linear(x, w, b, geglu=True, norm=norm)


def unfused(call):
    with dispatch.unfused("norm", "geglu", "residual"):
        return call()


def test_a_shape_the_tuner_found_faster_apart_runs_apart_from_then_on(triton_calls, tmp_path):
    call = ff_call()
    clock = Stopwatch(triton_calls, fused_ms=2.0, apart_ms=1.0)
    tuner = tuning.Tuner(time_call=clock, root=tmp_path / "user", gpu=lambda: GPU)
    with _triton.assume_gpu(132, GPU), dispatch.force("triton"), _triton.tuning(tuner):
        first = call()
        assert sorted(clock.timed) == ["apart", "fused"] and tuner.tuned == 1
        ran = triton_calls["fused"]
        again = call()
    assert len(clock.timed) == 2  # timed once, not again for the second call
    assert triton_calls["fused"] == ran  # the second call ran apart: no fused GEMM
    with dispatch.force("triton"):
        expected = unfused(call)
    assert torch.equal(first, expected) and torch.equal(again, expected)
    (table,) = (tmp_path / "user" / "tuning").iterdir()
    entries = json.loads(table.read_text())["entries"]
    (choice,) = entries
    assert choice == "tritonsd.kernels.linear._linear_geglu_kernel.fused_or_apart"
    (stored,) = [e for keys in entries[choice].values() for e in keys.values()]
    assert stored == {"config": {"way": "apart"}, "ms": {"fused": 2.0, "apart": 1.0}}


def test_a_later_process_reads_the_choice_per_key_without_a_tuner(triton_calls, tmp_path):
    tuner = tuning.Tuner(time_call=Stopwatch(triton_calls, 2.0, 1.0), root=tmp_path / "user", gpu=lambda: GPU)
    with _triton.assume_gpu(132, GPU), dispatch.force("triton"):
        with _triton.tuning(tuner):
            ff_call(rows=10)()
        _triton._tables.clear()  # a new process reads the file
        before = triton_calls["fused"]
        ff_call(rows=10, seed=1)()  # the same key (shapes, flags, dtype), other values: apart
        assert triton_calls["fused"] == before
        ff_call(rows=11)()  # another key, never tuned: fused
        assert triton_calls["fused"] == before + 1


def test_a_shape_faster_fused_stays_fused(triton_calls, tmp_path):
    clock = Stopwatch(triton_calls, fused_ms=1.0, apart_ms=2.0)
    tuner = tuning.Tuner(time_call=clock, root=tmp_path / "user", gpu=lambda: GPU)
    with _triton.assume_gpu(132, GPU), dispatch.force("triton"), _triton.tuning(tuner):
        ff_call()()
        before = triton_calls["fused"]
        ff_call()()
    assert sorted(clock.timed) == ["apart", "fused"] and triton_calls["fused"] == before + 1


def test_nothing_is_timed_without_a_gpu_or_while_recording(triton_calls, tmp_path):
    clock = Stopwatch(triton_calls, 2.0, 1.0)
    tuner = tuning.Tuner(time_call=clock, root=tmp_path / "user", gpu=lambda: GPU)
    with dispatch.force("triton"), _triton.tuning(tuner):
        ff_call()()  # the CPU, no GPU assumed: no tables to ask, fused
        with _triton.assume_gpu(132, GPU), _triton.recording() as launches:
            ff_call()()  # launches are being recorded (plan, check-compile): never timed
    assert clock.timed == [] and tuner.tuned == 0 and triton_calls["fused"] == 2
    assert [L._linear_geglu_kernel] == [k for k, _, _ in launches]


def _ff_geglu_rows(plan: P.Plan):
    """The step's launches of SD 1.5's 64x64-level feed-forward projection (x [8192, 320] @ W [2560, 320]^T at
    batch 2) by implementation: the fused GEGLU GEMM, or a cuBLAS GEMM."""
    flops = 2 * 8192 * 2560 * 320  # the 32x32 and 16x16 levels' projections cost as much: told apart by W's shape
    rows = [c for c in plan.step if c.flops == flops and ("[2560,320]" in c.shapes or "[320,2560]" in c.shapes)]
    return sorted((c.impl, c.kernel) for c in rows)


def test_the_plan_shows_the_named_gpus_choice(triton_calls, tmp_path):
    """An H100 table that holds "apart" for the 64x64 level's feed-forward projection: the plan for --gpu h100 runs
    the five transformer blocks of that level (2 down, 3 up) as LayerNorm kernel, cuBLAS GEMM and GEGLU kernel
    (two more launches each); the plan for --gpu h200, whose table holds nothing, stays fused."""
    base = P.make_plan("sd15", steps=1)
    assert _ff_geglu_rows(base) == [("triton", "linear._linear_geglu_kernel")] * 5
    key = (8192, 1280, 320, True, False, True, "torch.float16")
    kernel = L._linear_geglu_kernel
    cache = tuning.TuningCache(H100, root=tmp_path / "user")
    cache.store(f"{_triton.kernel_name(kernel)}.fused_or_apart", _triton.source_hash(kernel), key, {"way": "apart"},
                {"fused": 2.0, "apart": 1.0})
    _triton._tables.clear()
    apart = P.make_plan("sd15", steps=1)
    assert [impl for impl, _ in _ff_geglu_rows(apart)] == ["cuBLAS"] * 5
    launches = lambda plan: Counter((c.impl, c.kernel) for c in plan.step if c.op != "zeros")  # noqa: E731
    # (the first plan of a process also counts its one-time allocation of the kernels' counters, at steps=1)
    assert launches(apart) - launches(base) == Counter({("triton", "layer_norm._layer_norm_kernel"): 5,
                                                        ("cuBLAS", "aten.addmm.default"): 5,
                                                        ("triton", "geglu._geglu_kernel"): 5})
    assert launches(base) - launches(apart) == Counter({("triton", "linear._linear_geglu_kernel"): 5})
    other = P.make_plan("sd15", steps=1, gpu="h200")
    assert _ff_geglu_rows(other) == [("triton", "linear._linear_geglu_kernel")] * 5
