"""A Triton error while a loop is warmed up or captured becomes a GraphCaptureError, and the failed entry is
dropped (runs on the CPU: the CUDA stream calls are stood in for)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton.runtime.errors import OutOfResources

from tritonsd.sampler import graph as G
from tritonsd.sampler import schedule as S

from test_graph import CFG, STEPS, ToyDenoiser


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())


@pytest.mark.parametrize("error", [OutOfResources(300000, 232448, "shared memory"), RuntimeError("boom")],
                         ids=["triton-out-of-resources", "runtime-error"])
def test_failed_capture_is_reported_and_dropped(monkeypatch, fake_cuda_streams, error):
    runner = G.GraphRunner(ToyDenoiser())
    runner.use_graphs = True  # as on a GPU

    def failing_body(self, sigmas=None, callback=None):
        raise error
    monkeypatch.setattr(G.CapturedLoop, "body", failing_body)
    x = torch.randn(1, 4, 8, 8)
    cond, uncond = torch.randn(2, 1, 77, 8)
    sigmas = S.get_sigmas_karras(STEPS, 0.03, 14.6)
    with pytest.raises(G.GraphCaptureError, match="capture"):
        runner.run(x * sigmas[0], {"context": cond}, {"context": uncond}, sigmas=sigmas, cfg_scale=CFG,
                   sampler="euler")
    assert not runner.entries  # not cached: the next call captures afresh
