"""The GPU run's fusion stage (benchmarks/gpu_fusions.py) on the CPU: its fused-GEMM checks run the kernel (Triton's
interpreter) against the float32 reference and time nothing real (do_bench replaced), its unfused launch sequences
equal the fused ones, its UNet step rows cover every fusion switched off; the dry run lists without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_fusions as GF
from tritonsd.compile.shapes import ModelShapes, VAE
from tritonsd.kernels import dispatch
from tritonsd.model.config import UNetConfig


@pytest.fixture
def on_cpu(monkeypatch):
    import triton.testing

    calls = []

    def bench(fn, **kwargs):
        fn()
        calls.append(kwargs)
        return 1.0

    monkeypatch.setattr(GF, "DEVICE", "cpu")
    monkeypatch.setattr(GF, "poison_free_memory", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return calls


SMALL = {"qkv+norm": (5, 16), "ff-proj+norm+geglu": (5, 16), "out+residual": (5, 16, 16),
         "ff-out+residual": (5, 16), "conv+groupnorm+silu": (32, 3), "conv+upsample": (16, 6),
         "conv+groupstats": (64, 3), "cat+groupstats": (32, 3), "skip-concat": (32, 3),
         "conv-split-k": (64, 3, 2), "cross-q-attention": (5, 16, 2)}
# (tokens, channels[, K]) / (channels, side[, SPLIT: forced for conv-split-k, as the CPU has no SMs to fill]) /
# (tokens, channels, heads) for cross-q-attention


def tiny_cases():
    """The script's kinds at a tiny shape (its make functions with the SD sizes swapped for small ones)."""
    kinds = {}
    for case in GF.cases():
        kinds.setdefault(case.kind, case)
    return [GF.FusionCase(c.kind, "tiny", c.name, {}, lambda dtype, f=c.make, s=SMALL[c.kind]: f(dtype, *s),
                          c.unfused, fused=c.fused, reference=c.reference) for c in kinds.values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cases_check_and_time_fused_against_unfused(on_cpu, dtype):
    cases = tiny_cases()
    assert {c.kind for c in cases} == set(SMALL)
    with dispatch.force("triton"):
        rows = [GF.run_case(c, dtype, time_it=True) for c in cases]
    for row in rows:
        assert "error" not in row, row
        assert row["rel_error"] <= 1e-2 and row["unfused_rel_error"] <= 1e-2
        assert row["fused_ms"] == row["unfused_ms"] == 1.0
    assert len(on_cpu) == 2 * len(cases)


def test_a_wrong_kernel_is_a_failed_row(on_cpu, monkeypatch):
    case = tiny_cases()[0]
    case.fused = lambda **kw: torch.zeros_like(GF.linear_reference(**kw))
    row = GF.run_case(case, torch.float32, time_it=True)
    assert row["error"].startswith("relative error") and "fused_ms" not in row


def test_step_rows_switch_each_fusion_off(on_cpu):
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, time_embed_dim=64,
                      channel_mult=(1, 2), transformer_depth=(1, 0), transformer_depth_middle=1, context_dim=24,
                      use_linear_in_transformer=True, num_heads=2)
    spec = ModelShapes("tiny", (32, 32), unet, VAE, ())
    rows = GF.step_rows(spec, torch.float32, seed=1)  # "auto" on the CPU: the torch ops, every switch exercised
    assert [r["config"] for r in rows] == list(GF.STEP_CONFIGS)
    assert all("error" not in r and r["finite"] and r["median_ms"] == 1.0 for r in rows)
    assert all(r["rel_diff_from_fused"] <= 1e-5 for r in rows)


def test_dry_run_lists_cases_without_a_gpu():
    proc = subprocess.run([sys.executable, str(GF.Path(GF.__file__)), "--dry-run", "--models", "sd15-512"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "42 fusion cases" in proc.stdout and "no-qkv" in proc.stdout and "no-group_norm" in proc.stdout
    assert proc.stdout.count("cross-q-attention") == 4 and "no-cross_q" in proc.stdout  # SD 1.5: 3 levels + middle
    assert "upsample-conv-8to16-C1280" in proc.stdout and "no-upsample" in proc.stdout
    assert "no-group_stats" in proc.stdout
    assert proc.stdout.count("conv+groupstats") == proc.stdout.count("cat+groupstats") == 4  # SD 1.5's 4 levels
    assert proc.stdout.count("skip-concat") == 4 and "no-skip_concat" in proc.stdout
    assert "no-split_k" in proc.stdout  # the UNet step with the autotuned conv tiles only, one program each
    split_rows = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("conv-split-k")]
    assert split_rows == ["resblock-conv-32x32-C640", "resblock-conv-16x16-C1280", "resblock-conv-8x8-C1280"]
