"""The pipeline's CUDA-graph loop and guarded VAE decode.

CPU: ``use_graphs`` changes nothing (the eager path, no runner made); the pipeline's runner wiring (conditioning,
the ancestral noise pre-drawn from the pipeline's own stream, progress) run through the runner's EAGER path
gives the eager pipeline's images bit for bit; the decode goes through the pipeline's VAE guard (a VAE that
overflows in float16 still gives an image, with one warning). CUDA only (``*_cuda``): graph replay equals
the eager pipeline in float16 within 1e-2 and the captured loop is reused.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from tritonsd.model.load import load_model
from tritonsd.model.vae_guard import VAEDecodeNaNWarning
from tritonsd import pipeline as P
from tritonsd.sampler import registry
from tritonsd.sampler.preview import preview_pixels
from tritonsd.sampler.graph import GraphRunner, tables_on_device
from tritonsd.sampler.settings import GenerationSettings, SettingsError
from tritonsd.sampler.wiring import sigma_denoiser
from tritonsd.tools.cli import build_parser
from tritonsd.testing.reference import relative_error

GRAPH_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")
GRAPH_BOUND = 1e-2  # CUDA graph vs eager CUDA loop in float16: the runner keeps sigmas on the host (CPU scalars)


@pytest.fixture(scope="module")
def tiny(fixtures):
    return P.Pipeline(load_model(fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", text_heads=2))


def settings(sampler, **kw):
    base = dict(prompt="a red circle", negative_prompt="blue", sampler=sampler, steps=3, width=64, height=64,
                seed=11, batch_size=2)
    return GenerationSettings(**{**base, **kw})


def generate(pipe, s):
    steps = []
    image = pipe.generate(pipe.settings(s), callback=lambda d: steps.append((d["i"], d["total"])))
    return image, steps


def runner_of(pipe, s):
    return pipe._graph_runner(registry.get(s.sampler), s)


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("sampler", GRAPH_SAMPLERS)
def test_use_graphs_changes_nothing_on_cpu(tiny, sampler):
    on, steps_on = generate(tiny, settings(sampler, use_graphs=True))
    off, steps_off = generate(tiny, settings(sampler, use_graphs=False))
    assert torch.equal(on, off) and steps_on == steps_off == [(i, 3) for i in range(3)]
    assert runner_of(tiny, settings(sampler)) is None and tiny._runner is None


@pytest.mark.parametrize("sampler", GRAPH_SAMPLERS)
def test_runner_wiring_equals_eager_pipeline_bitwise(tiny, sampler, monkeypatch):
    """The CUDA branch of ``generate`` with a CPU runner (its eager loop over the static buffers): same images
    and progress as the eager pipeline, so the conditioning and euler_a's pre-drawn noise are wired right."""
    eager, eager_steps = generate(tiny, settings(sampler))
    runner = GraphRunner(tables_on_device(sigma_denoiser(tiny.unet, tiny.config), "cpu"), "cpu")
    monkeypatch.setattr(tiny, "_graph_runner", lambda spec, s: runner)
    through, steps = generate(tiny, settings(sampler))
    assert runner.captures == 1 and next(iter(runner.entries.values())).replays == 1
    assert torch.isfinite(eager).all() and torch.equal(through, eager)
    assert steps == eager_steps


def test_runner_wiring_img2img_euler_a_bitwise(tiny, monkeypatch):
    """img2img runs the tail of the schedule: fewer steps and fewer ancestral draws."""
    image = torch.linspace(-1, 1, 64 * 64 * 3).reshape(1, 3, 64, 64)
    s = settings("euler_a", steps=4, strength=0.5, init_image=image)
    eager, eager_steps = generate(tiny, s)
    runner = GraphRunner(tables_on_device(sigma_denoiser(tiny.unet, tiny.config), "cpu"), "cpu")
    monkeypatch.setattr(tiny, "_graph_runner", lambda spec, s: runner)
    through, steps = generate(tiny, s)
    # webui's img2img rule: t_enc = int(0.5 * 4) = 2, then t_enc + 1 = 3 steps from sigmas[4 - 2 - 1]
    assert torch.equal(through, eager) and steps == eager_steps == [(0, 3), (1, 3), (2, 3)]


def previewing(every):
    """A step callback as serve/jobs.py makes one: the eager loop's previews from its dicts (``denoised``), the
    runner's from the ``preview`` attribute (host copies made inside the loop)."""
    seen = []

    def step(d):
        if "denoised" in d and d["i"] % every == 0:
            seen.append((d["i"], d["denoised"].clone()))
    step.preview_every = every
    step.preview = lambda i, latent: seen.append((i, latent))
    return step, seen


@pytest.mark.parametrize("sampler", GRAPH_SAMPLERS)
def test_runner_previews_equal_eager_previews(tiny, sampler, monkeypatch):
    """Live previews of the runner's loop (its CPU twin of the captured code): the same steps and the same latents
    (so the same preview pixels) as the eager pipeline's step callback gives."""
    s = settings(sampler, steps=5)
    eager_step, eager = previewing(2)
    tiny.generate(tiny.settings(s), callback=eager_step)
    runner = GraphRunner(tables_on_device(sigma_denoiser(tiny.unet, tiny.config), "cpu"), "cpu")
    monkeypatch.setattr(tiny, "_graph_runner", lambda spec, s: runner)
    step, through = previewing(2)
    tiny.generate(tiny.settings(s), callback=step)
    assert [i for i, _ in through] == [i for i, _ in eager] == [0, 2, 4]
    for (i, got), (_, want) in zip(through, eager):
        assert torch.equal(got, want), i
        assert np.array_equal(preview_pixels(got[1], "sd1"), preview_pixels(want[1], "sd1"))
    assert next(iter(runner.entries)).preview_every == 2


def test_pipeline_decodes_through_the_guard(tiny):
    """A float16 VAE whose decoder overflows: ``decode_first_stage`` gives NaN, the pipeline still returns the
    float32 decode of the same weights, warning once for the model."""
    model = copy.deepcopy(tiny.model)
    vae = model.first_stage_model.half()  # the fixture's weights are float16 values: an exact cast
    vae.decoder.conv_in.weight.data.mul_(4096)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / model.config.scale_factor
    with torch.no_grad():
        assert not torch.isfinite(model.decode_first_stage(z.half())).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = P.Pipeline(model)
        image, _ = generate(pipe, settings("euler", batch_size=1, steps=2))
        decoded = pipe.decode(z)
    assert torch.isfinite(image).all()
    assert len([w for w in caught if issubclass(w.category, VAEDecodeNaNWarning)]) == 1
    with torch.no_grad():
        expected = vae.float().decode((z / model.config.scale_factor).half().float())  # reaches the VAE in fp16
    assert torch.equal(decoded, torch.clamp((expected + 1) / 2, 0, 1))


def test_float32_decode_is_decode_first_stage(tiny):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.clamp((tiny.model.decode_first_stage(z) + 1) / 2, 0, 1)
    assert torch.equal(tiny.decode(z), expected)


def test_use_graphs_setting_and_flag(tiny):
    assert GenerationSettings().use_graphs is True
    with pytest.raises(SettingsError, match="use_graphs must be True or False"):
        tiny.settings(GenerationSettings(use_graphs=1))
    parser = build_parser()
    base = ["generate", "--checkpoint", "m.safetensors", "--prompt", "x"]
    assert parser.parse_args(base).cuda_graphs is True
    assert parser.parse_args(base + ["--no-cuda-graphs"]).cuda_graphs is False


# ---------------------------------------------------------------- CUDA only: graph replay == eager loop


def cuda(test):
    """Marked ``cuda`` (``-m "not cuda"`` leaves it out) and skipped without a GPU: CUDA graphs need one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")(test))


@cuda
@pytest.mark.parametrize("sampler", GRAPH_SAMPLERS)
def test_graph_loop_equals_eager_cuda(tiny, sampler):
    model = P.Pipeline(copy.deepcopy(tiny.model).to("cuda", torch.float16))
    for seed, prompt in ((11, "a red circle"), (12, "a blue square")):  # the second run replays the same graph
        s = settings(sampler, seed=seed, prompt=prompt)
        graphed, steps = generate(model, s)
        eager, eager_steps = generate(model, settings(sampler, seed=seed, prompt=prompt, use_graphs=False))
        err = relative_error(graphed, eager)
        assert torch.isfinite(graphed).all() and err <= GRAPH_BOUND, f"{sampler}: relative error {err:.3g}"
        assert steps == eager_steps
    runner = runner_of(model, settings(sampler))
    assert runner is model._runner and runner.captures == 1
    entry = next(iter(runner.entries.values()))
    assert entry.graph is not None and entry.replays == 2


@cuda
@pytest.mark.parametrize("sampler", GRAPH_SAMPLERS)
def test_graph_previews_equal_eager_previews_cuda(tiny, sampler):
    """Previews out of the replayed graph (the reader thread's host copies): the same steps as the uncaptured
    loop's and, as the replayed loop equals the eager one, the same latents within the graph bound."""
    import time

    model = P.Pipeline(copy.deepcopy(tiny.model).to("cuda", torch.float16))
    s = settings(sampler, steps=5)
    eager_step, eager = previewing(2)
    model.generate(model.settings(settings(sampler, steps=5, use_graphs=False)), callback=eager_step)
    for _ in range(2):  # the capture, then a replay of the captured loop
        step, through = previewing(2)
        model.generate(model.settings(s), callback=step)
        torch.cuda.synchronize()
        deadline = time.monotonic() + 10
        while len(through) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [i for i, _ in through] == [0, 2, 4]
        for (i, got), (_, want) in zip(through, eager):
            assert got.device.type == "cpu" and relative_error(got.float(), want.float().cpu()) <= GRAPH_BOUND, i
    assert runner_of(model, s).captures == 1


@cuda
def test_moved_weights_get_a_new_runner_cuda(tiny):
    model = P.Pipeline(copy.deepcopy(tiny.model).to("cuda", torch.float16))
    s = settings("dpmpp_2m", batch_size=1)
    first, _ = generate(model, s)
    runner = runner_of(model, s)
    old = [t.data for t in model.model.model.diffusion_model.parameters()]  # held: the copy cannot reuse this memory
    model.model.to("cpu").to("cuda")  # new weight memory: the old graphs would read the old tensors
    del old
    again, _ = generate(model, s)
    assert runner_of(model, s) is not runner
    assert relative_error(again, first) <= GRAPH_BOUND
    assert runner_of(model, settings("ddim")) is None
    assert runner_of(model, settings("euler", use_graphs=False)) is None
