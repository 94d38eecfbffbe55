"""GraphRunner: its eager path (CPU) is the sampler called directly, bit for bit; its cache captures once per
loop shape; ancestral noise through the static buffer is the seeded noise stream. The CUDA tests (graph replay
against the eager loop) run only where a GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch

from tritonsd.model.load import load_model
from tritonsd.sampler import denoise as D
from tritonsd.sampler import samplers as K
from tritonsd.sampler import schedule as S
from tritonsd.sampler.graph import (GraphRunner, GraphRunnerError, StaticNoise, noise_draws, predraw_noise,
    tables_on_device)

STEPS = 3
CFG = 7.5
SAMPLER_FNS = {"euler": K.sample_euler, "euler_a": K.sample_euler_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}


@pytest.fixture(scope="module")
def tiny(fixtures):
    return load_model(fixtures / "sd1-tiny.safetensors", fixtures / "sd1-tiny.yaml", text_heads=2)


def make_denoiser(model, device="cpu"):
    return D.EpsDenoiser(model.apply_model, model.config.alphas_cumprod.to(device))


class ToyDenoiser:
    """A cheap stand-in for the cache tests: depends on x, sigma and the context values."""

    def __call__(self, x, sigma, context):
        shift = context.mean(dim=(1, 2))[:, None, None, None]  # [B, 77, C] -> [B, 1, 1, 1]
        return x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5 + shift


def inputs(model, batch=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = model.config.unet.context_dim
    x = torch.randn(batch, 4, size, size, generator=g)
    cond = torch.randn(batch, 77, ctx, generator=g)
    uncond = torch.randn(batch, 77, ctx, generator=g)
    return x, cond, uncond


def karras(model, steps=STEPS):
    den = make_denoiser(model)
    return S.get_sigmas_karras(steps, float(den.sigma_min), float(den.sigma_max))


def direct(model, sampler, x, sigmas, cond, uncond, seed=0):
    """The sampler called as the pipeline would, without the runner; euler_a draws its own seeded noise."""
    cfg = D.CFGDenoiser(make_denoiser(model), CFG)
    extra = {"cond": {"context": cond}, "uncond": {"context": uncond}}
    kwargs = {"seed": seed} if sampler == "euler_a" else {}
    return SAMPLER_FNS[sampler](cfg, x * sigmas[0], sigmas, extra_args=extra, **kwargs)


def run(runner, sampler, x, sigmas, cond, uncond, seed=0, **kw):
    n = noise_draws(sampler, sigmas)
    noise = predraw_noise(x.shape, n, seed) if n else None
    return runner.run(x * sigmas[0], cond, uncond, noise, sigmas=sigmas, cfg_scale=CFG, sampler=sampler, **kw)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_eager_path_is_the_sampler_bitwise(tiny, sampler):
    x, cond, uncond = inputs(tiny)
    sigmas = karras(tiny)
    runner = GraphRunner(make_denoiser(tiny))
    assert not runner.use_graphs
    out = run(runner, sampler, x, sigmas, cond, uncond, seed=123)
    ref = direct(tiny, sampler, x, sigmas, cond, uncond, seed=123)
    assert torch.isfinite(ref).all()
    assert torch.equal(out, ref)


def test_static_noise_is_the_seeded_stream():
    x = torch.empty(2, 4, 8, 8)
    seeded = K.seeded_noise_sampler(x, 7)
    pre = predraw_noise(x.shape, 3, 7)
    static = StaticNoise(pre.clone())
    for i in range(3):
        expected = seeded(None, None)
        assert torch.equal(pre[i], expected) and torch.equal(static(None, None), expected)
    with pytest.raises(GraphRunnerError, match="pre-drawn"):
        static(None, None)


def test_noise_draws_counts_the_ancestral_calls(tiny):
    sigmas = karras(tiny, 5)
    counted = []
    x, cond, uncond = inputs(tiny)

    def noise(a, b):
        counted.append((a, b))
        return torch.zeros_like(x)

    K.sample_euler_ancestral(lambda x, s, **_: x * 0, x, sigmas, noise_sampler=noise)
    assert noise_draws("euler_a", sigmas) == len(counted) == 4
    assert noise_draws("euler_a", sigmas, eta=0.0) == 0
    assert noise_draws("dpmpp_2m", sigmas) == noise_draws("euler", sigmas) == 0


def test_prompt_change_reuses_the_entry_with_new_inputs(tiny):
    sigmas = karras(tiny)
    runner = GraphRunner(make_denoiser(tiny))
    x, cond, uncond = inputs(tiny, seed=0)
    first = run(runner, "dpmpp_2m", x, sigmas, cond, uncond)
    entry = next(iter(runner.entries.values()))
    x2, cond2, uncond2 = inputs(tiny, seed=1)  # same shapes, new prompt and start noise
    second = run(runner, "dpmpp_2m", x2, sigmas, cond2, uncond2)
    assert runner.captures == 1 and len(runner.entries) == 1 and entry.replays == 2
    assert torch.equal(second, direct(tiny, "dpmpp_2m", x2, sigmas, cond2, uncond2))
    assert not torch.equal(first, second)


def toy_run(runner, batch=1, size=8, steps=STEPS, cfg=CFG, seed=0, sampler="dpmpp_2m"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    cond, uncond = torch.randn(2, batch, 77, 8, generator=g)
    sigmas = S.get_sigmas_karras(steps, 0.03, 14.6)
    n = noise_draws(sampler, sigmas)
    noise = predraw_noise(x.shape, n, seed) if n else None
    out = runner.run(x * sigmas[0], cond, uncond, noise, sigmas=sigmas, cfg_scale=cfg, sampler=sampler)
    kwargs = {"seed": seed} if sampler == "euler_a" else {}  # euler_a draws its own seeded noise
    ref = SAMPLER_FNS[sampler](D.CFGDenoiser(ToyDenoiser(), cfg), x * sigmas[0], sigmas,
                               extra_args={"cond": {"context": cond}, "uncond": {"context": uncond}}, **kwargs)
    return out, ref


def test_cache_one_entry_per_loop_shape():
    runner = GraphRunner(ToyDenoiser())
    out, ref = toy_run(runner)
    entry = next(iter(runner.entries.values()))
    for seed in (1, 2):  # new prompts and noise, same shapes: the same entry
        out2, ref2 = toy_run(runner, seed=seed)
        assert torch.equal(out2, ref2)
    assert runner.captures == 1 and entry.replays == 3
    assert torch.equal(out, ref)  # the first result is the caller's own tensor, not a static buffer
    toy_run(runner, batch=2)
    toy_run(runner, size=16)
    toy_run(runner, steps=STEPS + 1)
    toy_run(runner, cfg=3.0)
    toy_run(runner, sampler="euler")
    assert runner.captures == 6 and len(runner.entries) == 4  # max_entries 4
    keys = list(runner.entries)
    assert [k.batch for k in keys] == [1, 1, 1, 1] and keys[-1].sampler == "euler"
    toy_run(runner, cfg=3.0)  # still cached: found again
    assert runner.captures == 6 and list(runner.entries)[-1].cfg_scale == 3.0


def test_cache_evicts_least_recently_used():
    runner = GraphRunner(ToyDenoiser(), max_entries=2)
    for steps in (1, 2, 1, 3):
        toy_run(runner, steps=steps)
    assert runner.captures == 3
    assert sorted(k.steps for k in runner.entries) == [1, 3]
    runner.clear()
    assert not runner.entries


def test_euler_a_through_the_static_noise_buffer():
    runner = GraphRunner(ToyDenoiser())
    for seed in (0, 5):
        out, ref = toy_run(runner, sampler="euler_a", seed=seed, steps=5)
        assert torch.equal(out, ref)
    assert runner.captures == 1


def test_progress_and_inputs_untouched():
    runner = GraphRunner(ToyDenoiser())
    x = torch.randn(1, 4, 8, 8)
    cond, uncond = torch.randn(2, 1, 77, 8)
    sigmas = S.get_sigmas_karras(STEPS, 0.03, 14.6)
    x_T, before = x * sigmas[0], (x * sigmas[0]).clone()
    seen = []
    runner.run(x_T, {"context": cond}, {"context": uncond}, sigmas=sigmas, cfg_scale=CFG, sampler="euler",
               progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, STEPS) for i in range(STEPS)]
    assert torch.equal(x_T, before)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_previews_of_the_loop_are_the_samplers_denoised(tiny, sampler):
    """The preview copies taken inside the loop (the captured code, run by the CPU twin): on the due steps
    (0, 2, 4 of 5 at every 2), each the sampler's own ``denoised`` of that step, bit for bit, as host copies."""
    steps, every = 5, 2
    x, cond, uncond = inputs(tiny, batch=2)
    sigmas = karras(tiny, steps)
    want = {}
    cfg = D.CFGDenoiser(make_denoiser(tiny), CFG)
    kwargs = {"seed": 7} if sampler == "euler_a" else {}
    SAMPLER_FNS[sampler](cfg, x * sigmas[0], sigmas, extra_args={"cond": {"context": cond},
                         "uncond": {"context": uncond}},
                         callback=lambda d: want.setdefault(d["i"], d["denoised"].clone()), **kwargs)
    runner = GraphRunner(make_denoiser(tiny))
    got = []
    out = run(runner, sampler, x, sigmas, cond, uncond, seed=7, preview_every=every,
              preview=lambda i, latent: got.append((i, latent)))
    assert [i for i, _ in got] == [0, 2, 4]
    for i, latent in got:
        assert latent.device.type == "cpu" and torch.equal(latent, want[i]), i
    assert torch.equal(out, direct(tiny, sampler, x, sigmas, cond, uncond, seed=7))  # previews change nothing
    got.clear()
    run(runner, sampler, x, sigmas, cond, uncond, seed=7, preview_every=every,
        preview=lambda i, latent: got.append((i, latent)))
    assert runner.captures == 1 and [i for i, _ in got] == [0, 2, 4]  # the same loop again, previews again


def test_preview_period_is_part_of_the_loop_key():
    runner = GraphRunner(ToyDenoiser())
    x = torch.randn(1, 4, 8, 8)
    cond, uncond = torch.randn(2, 1, 77, 8)
    sigmas = S.get_sigmas_karras(STEPS, 0.03, 14.6)
    seen = []
    for every in (0, 1, 2, 2):
        runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=CFG, preview_every=every,
                   preview=lambda i, latent: seen.append((every, i)))
    runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=CFG, preview_every=5)  # no sink: the period-0 loop
    assert runner.captures == 3
    assert sorted(k.preview_every for k in runner.entries) == [0, 1, 2]
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 2), (2, 0), (2, 2)]
    assert [e.tap is None for k, e in runner.entries.items() if k.preview_every == 0] == [True]


def test_bad_inputs_are_refused():
    runner = GraphRunner(ToyDenoiser())
    x = torch.randn(1, 4, 8, 8)
    cond, uncond = torch.randn(2, 1, 77, 8)
    sigmas = S.get_sigmas_karras(STEPS, 0.03, 14.6)
    with pytest.raises(GraphRunnerError, match="ddim"):
        runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=CFG, sampler="ddim")
    with pytest.raises(GraphRunnerError, match="pre-drawn noise"):
        runner.run(x, cond, uncond, sigmas=sigmas, cfg_scale=CFG, sampler="euler_a")
    with pytest.raises(GraphRunnerError, match="batch"):
        runner.run(x, torch.cat([cond, cond]), uncond, sigmas=sigmas, cfg_scale=CFG)
    with pytest.raises(GraphRunnerError, match="CUDA"):
        GraphRunner(ToyDenoiser(), device="cpu", use_graphs=True)
    assert runner.captures == 0


def meta_tiny_model(fixtures):
    """The sd1-tiny model on the meta device (shapes only), built from its file's header."""
    from safetensors import safe_open

    from tritonsd.model.config import detect_config
    from tritonsd.model.sd import build_model

    with safe_open(str(fixtures / "sd1-tiny.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k != "alphas_cumprod"}
    weights = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    with torch.device("meta"):
        return build_model(detect_config(weights, text_heads=2))


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_loop_never_reads_device_values(fixtures, sampler):
    """Capturability without a GPU: the loop runs on the META device (no values), so any host read of a
    device value (``.item()``, ``bool(t)``, a Python ``if`` on a device tensor: a sync that would break the
    capture) raises. Only the CPU sigmas may steer it."""
    model = meta_tiny_model(fixtures)
    runner = GraphRunner(tables_on_device(D.EpsDenoiser(model.apply_model, torch.ones(1000) * 0.5), "meta"),
                         device="meta", use_graphs=False)
    sigmas = S.get_sigmas_karras(STEPS, 0.03, 14.6)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    n = noise_draws(sampler, sigmas)
    out = runner.run(x, ctx, ctx, predraw_noise(x.shape, n, 0) if n else None, sigmas=sigmas, cfg_scale=CFG,
                     sampler=sampler)
    assert out.device.type == "meta" and out.shape == x.shape
    with pytest.raises(RuntimeError, match="meta"):  # the same loop over device sigmas does read them
        SAMPLER_FNS[sampler](D.CFGDenoiser(runner.denoiser, CFG), x.to("meta"), sigmas.to("meta"),
                             extra_args={"cond": {"context": ctx.to("meta")}, "uncond": {"context": ctx.to("meta")}})


# ---------------------------------------------------------------- CUDA only: graph replay == eager loop


def cuda(test):
    """Marked ``cuda`` (``-m "not cuda"`` leaves it out) and skipped without a GPU: CUDA graphs need one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")(test))


@cuda
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_graph_replay_equals_eager_loop_cuda(tiny, sampler):
    model = copy.deepcopy(tiny).to("cuda", torch.float16)  # half precision: no fp32 compile storm on the GPU
    den = make_denoiser(model, "cuda")
    graphed = GraphRunner(den, device="cuda")
    eager = GraphRunner(den, device="cuda", use_graphs=False)
    sigmas = karras(model)
    for seed in (0, 1):  # the second prompt replays the same graph with new buffers
        x, cond, uncond = inputs(model, batch=2, seed=seed)
        g = run(graphed, sampler, x, sigmas, cond.cuda(), uncond.cuda(), seed=seed)
        e = run(eager, sampler, x, sigmas, cond.cuda(), uncond.cuda(), seed=seed)
        assert torch.equal(g, e)
        ref = direct(model, sampler, x.cuda(), sigmas.cuda(), cond.cuda(), uncond.cuda(), seed=seed)
        # CUDA sigmas (division, not the CPU-scalar reciprocal) through a float16 UNet: the half-precision bound
        assert (g - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert graphed.captures == 1 and next(iter(graphed.entries.values())).graph is not None
