"""ControlNet inside the graph runner's loop (``sampler/graph.py``): the hint features and the per-step scale table
are the captured loop's own buffers, so another control image, weight or guidance range replays the same entry.
CPU: the runner's eager twin (the loop over the static buffers) gives the eager pipeline's images bit for bit;
CUDA (``*_cuda``): the graph replay equals a fresh eager run, captured once."""

from __future__ import annotations

import copy

import pytest
import torch

from tritonsd import pipeline as P
from tritonsd.sampler.control import ControlUnit
from tritonsd.sampler.graph import GraphRunner, tables_on_device
from tritonsd.sampler.wiring import sigma_denoiser
from tritonsd.testing.reference import relative_error

FILE = "controlnet-sd1-tiny.safetensors"
GRAPH_BOUND = 1e-2  # float16 graph replay vs the eager float16 loop (as tests/test_pipeline_graph.py)


def _runs(fixtures):
    g = torch.Generator().manual_seed(5)
    first, second = torch.rand(1, 3, 64, 128, generator=g), torch.rand(1, 3, 64, 128, generator=g)
    return [  # (units, sampler): one loop shape, other images / weights / ranges / modes
        (ControlUnit(fixtures / FILE, image=first, weight=1.0), "euler_a"),
        (ControlUnit(fixtures / FILE, image=second, weight=0.4, guidance_start=0.3), "euler_a"),
        (ControlUnit(fixtures / FILE, image=first, weight=0.8, guidance_end=0.5, control_mode="prompt"), "euler_a"),
    ]


def _cfg_injection_run(fixtures):
    """"ControlNet is more important" masks the uncond rows: another loop structure, a loop of its own."""
    return ControlUnit(fixtures / FILE, image=torch.ones(1, 3, 64, 128), weight=0.8, control_mode="control"), "euler_a"


def _settings(pipe, unit, sampler, **kw):
    return pipe.settings(prompt="a red circle", negative_prompt="blue", seed=3, steps=4, width=128, height=64,
                         sampler=sampler, controls=(unit,), **kw)


def test_runner_with_control_equals_the_eager_pipeline_and_captures_once(pipes, fixtures, monkeypatch):
    pipe = pipes("sd1-tiny")
    runner = GraphRunner(tables_on_device(sigma_denoiser(pipe.unet, pipe.config), "cpu"), "cpu")
    for unit, sampler in _runs(fixtures):
        eager = pipe.generate(_settings(pipe, unit, sampler))
        with monkeypatch.context() as m:
            m.setattr(pipe, "_graph_runner", lambda spec, s: runner)
            through = pipe.generate(_settings(pipe, unit, sampler))
        assert torch.equal(through, eager)
    assert runner.captures == 1 and next(iter(runner.entries.values())).replays == 3
    unit, sampler = _cfg_injection_run(fixtures)
    eager = pipe.generate(_settings(pipe, unit, sampler))
    with monkeypatch.context() as m:
        m.setattr(pipe, "_graph_runner", lambda spec, s: runner)
        assert torch.equal(pipe.generate(_settings(pipe, unit, sampler)), eager)
    assert runner.captures == 2
    plain = pipe.generate(pipe.settings(prompt="a red circle", negative_prompt="blue", seed=3, steps=4, width=128,
                                        height=64, sampler="euler_a"))
    assert (plain - eager).abs().max() > 0.01


def test_another_file_of_the_same_shape_replays_the_same_loop(pipes, fixtures, monkeypatch, tmp_path):
    """A second ControlNet file (other weights, same shape) is copied into the loop's own network copy."""
    from safetensors.torch import save_file

    from tritonsd.formats.controlnet_file import read_controlnet

    weights = {k: v.float() * 0.9 for k, v in read_controlnet(fixtures / FILE).weights.items()}
    save_file({f"control_model.{k}": v for k, v in weights.items()}, str(tmp_path / "other.safetensors"))
    pipe = pipes("sd1-tiny")
    runner = GraphRunner(tables_on_device(sigma_denoiser(pipe.unet, pipe.config), "cpu"), "cpu")
    image = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(9))
    results = []
    for path in (fixtures / FILE, tmp_path / "other.safetensors", fixtures / FILE):
        unit = ControlUnit(path, image=image, weight=0.9)
        eager = pipe.generate(_settings(pipe, unit, "dpmpp_2m"))
        with monkeypatch.context() as m:
            m.setattr(pipe, "_graph_runner", lambda spec, s: runner)
            through = pipe.generate(_settings(pipe, unit, "dpmpp_2m"))
        assert torch.equal(through, eager)
        results.append(through)
    assert runner.captures == 1 and not torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replay_with_control_equals_eager_cuda(pipes, fixtures):
    pipe = P.Pipeline(copy.deepcopy(pipes("sd1-tiny").model).to("cuda", torch.float16))
    for unit, sampler in _runs(fixtures):
        graphed = pipe.generate(_settings(pipe, unit, sampler))
        eager = pipe.generate(_settings(pipe, unit, sampler, use_graphs=False))
        assert torch.isfinite(graphed).all() and relative_error(graphed, eager) <= GRAPH_BOUND
    runner = pipe._runner
    assert runner.captures == 1
    entry = next(iter(runner.entries.values()))
    assert entry.graph is not None and entry.replays == 3
