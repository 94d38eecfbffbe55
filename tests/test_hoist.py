"""What depends only on the run leaves the step (``model/hoist.py``, ``StepTables`` step embeddings): the
cross-attention keys and values once per distinct conditioning, the time MLP and the ResBlocks' projections once
per step index, both bit for bit what the unhoisted loop computes, and both following a weight change (LoRA)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tritonsd.model import hoist
from tritonsd.model.unet import BasicTransformerBlock, ResBlock
from tritonsd.sampler import denoise as D
from tritonsd.sampler import samplers as S
from tritonsd.sampler import schedule
from tritonsd.sampler import wiring as W
from tritonsd.sampler.graph import GraphRunner, tables_on_device

STEPS = 4


@pytest.fixture(scope="module")
def tiny(models):
    return models("sd1-tiny")


def _inputs(model, seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    dim = model.config.unet.context_dim
    x = torch.randn(1, 4, 8, 8, generator=g)
    shape = (1, 77, dim) if rows is None else (rows, 1, 77, dim)
    cond = {"context": torch.randn(shape, generator=g)}
    uncond = {"context": torch.randn(shape, generator=g)}
    return x, cond, uncond


def _sigmas(model):
    den = W.sigma_denoiser(None, model.config)
    return schedule.get_sigmas_karras(STEPS, den.sigma_min.item(), den.sigma_max.item())


def _loop(model, x, cond, uncond, hoisted: bool, per_step: bool = False, rows=None):
    """dpmpp_2m with CFG 7 over the prepared denoiser, with the hoists (a step embedder and a scope) or without."""
    sigmas = _sigmas(model)
    den = W.sigma_denoiser(model.apply_model, model.config, model.step_embedder() if hoisted else None)
    cfg = D.prepare(D.CFGDenoiser(tables_on_device(den, x.device), 7.0), sigmas, x.device)
    outer = D.PerCallConditioning(cfg, rows) if per_step else cfg
    with hoist.scope() if hoisted else contextlib.nullcontext():
        return S.sample_dpmpp_2m(outer, x * sigmas[0], sigmas, extra_args={"cond": cond, "uncond": uncond})


class Calls:
    """Counts the forward calls of the cross-attention key projections (``attn2.to_k``; self-attention's keys come
    from the q/k/v GEMM, made every step) and of the time-embedding layers."""

    def __init__(self, model):
        unet = model.model.diffusion_model
        self.kv = self.time = 0
        self.handles = []
        self.cross = [m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
        for m in self.cross:
            self.handles.append(m.to_k.register_forward_hook(self._kv))
        for m in unet.modules():
            if isinstance(m, ResBlock):
                self.handles.append(m.emb_layers[1].register_forward_hook(self._time))
        self.handles.append(unet.time_embed[0].register_forward_hook(self._time))

    def _kv(self, module, args, out):
        self.kv += 1

    def _time(self, module, args, out):
        self.time += 1

    def close(self):
        for h in self.handles:
            h.remove()


def test_hoisted_loop_is_bit_for_bit_the_unhoisted_one(tiny):
    x, cond, uncond = _inputs(tiny)
    with torch.no_grad():
        plain = _loop(tiny, x, cond, uncond, hoisted=False)
        calls = Calls(tiny)
        try:
            hoisted = _loop(tiny, x, cond, uncond, hoisted=True)
        finally:
            calls.close()
    assert torch.equal(hoisted, plain)
    unet = tiny.model.diffusion_model
    blocks = 1 + len(unet.res_blocks())  # time_embed[0] and every ResBlock's projection
    assert calls.kv == len(calls.cross)  # the cross-attention keys once per run
    assert calls.time == blocks * STEPS  # every step index once (the tables made at the first step)


def test_a_captured_loop_runner_embeds_the_steps_once_and_the_conditioning_once_per_run(tiny):
    """The graph runner's loop body (eager on the CPU, the code the GPU captures): a second run of the same loop
    key reuses the step embeddings made by the first, and computes the cross-attention keys once per run, for
    the new prompt it was given; each run equals the unhoisted loop bit for bit."""
    sigmas = _sigmas(tiny)
    runner = GraphRunner(tables_on_device(W.sigma_denoiser(tiny.apply_model, tiny.config, tiny.step_embedder()),
                                          "cpu"), device="cpu")
    calls = Calls(tiny)
    try:
        with torch.no_grad():
            outs = []
            for seed in (0, 1):
                x, cond, uncond = _inputs(tiny, seed)
                before = (calls.kv, calls.time)
                out = runner.run(x * sigmas[0], cond, uncond, sigmas=sigmas, cfg_scale=7.0, sampler="dpmpp_2m")
                outs.append((out, calls.kv - before[0], calls.time - before[1]))
                assert torch.equal(out, _loop(tiny, x, cond, uncond, hoisted=False))
    finally:
        calls.close()
    assert runner.captures == 1
    assert outs[0][1] == outs[1][1] == len(calls.cross)
    assert outs[0][2] > 0 and outs[1][2] == 0  # the second run embeds no step


def test_a_weight_change_reaches_the_step_embeddings_and_the_keys(tiny):
    """A LoRA switch writes into the weights in place (``lora/apply.py``): the next run of a kept loop recomputes
    its step embeddings (``refresh``) and keys, and equals the unhoisted loop with the new weights."""
    sigmas = _sigmas(tiny)
    unet = tiny.model.diffusion_model
    runner = GraphRunner(tables_on_device(W.sigma_denoiser(tiny.apply_model, tiny.config, tiny.step_embedder()),
                                          "cpu"), device="cpu")
    x, cond, uncond = _inputs(tiny)
    touched = [unet.res_blocks()[0].emb_layers[1].weight, unet.time_embed[2].bias,
               next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock)).attn2.to_k.weight]
    pristine = [t.detach().clone() for t in touched]
    try:
        with torch.no_grad():
            first = runner.run(x * sigmas[0], cond, uncond, sigmas=sigmas, cfg_scale=7.0, sampler="dpmpp_2m")
            for t in touched:
                t.copy_(t * 1.5 + 0.01)
            second = runner.run(x * sigmas[0], cond, uncond, sigmas=sigmas, cfg_scale=7.0, sampler="dpmpp_2m")
            expected = _loop(tiny, x, cond, uncond, hoisted=False)
    finally:
        with torch.no_grad():
            for t, p in zip(touched, pristine):
                t.copy_(p)
    assert not torch.equal(first, second)
    assert torch.equal(second, expected)


def test_prompt_editing_computes_the_keys_once_per_distinct_entry(tiny):
    """Per-call conditioning tables (prompt editing, ``unet_keywords``: one row per call, rows of one entry equal):
    with ``call_rows``' map the calls of one entry read one row, so the keys are computed once per distinct
    (uncond, cond) pair; the loop equals the unhoisted one bit for bit."""
    x, cond, uncond = _inputs(tiny, rows=STEPS)
    cond["context"][2:] = cond["context"][1]  # entry 0 at call 0, entry 1 from call 1 on
    uncond["context"][:] = uncond["context"][0]  # one negative prompt
    rows = ((0, 1, 1, 1), (0, 0, 0, 0))
    with torch.no_grad():
        plain = _loop(tiny, x, cond, uncond, hoisted=False, per_step=True)
        calls = Calls(tiny)
        try:
            hoisted = _loop(tiny, x, cond, uncond, hoisted=True, per_step=True, rows=rows)
            unmapped = _loop(tiny, x, cond, uncond, hoisted=True, per_step=True)
        finally:
            calls.close()
    assert torch.equal(hoisted, plain) and torch.equal(unmapped, plain)
    layers = len(calls.cross)
    assert calls.kv == layers * 2 + layers * STEPS  # mapped: 2 distinct pairs; unmapped: one per call


def test_call_rows_maps_each_call_to_the_first_call_of_its_entry():
    from tritonsd.prompt.encode import call_rows

    class Side:
        def __init__(self, ends):
            self.ends = ends

        def index_at(self, k):
            return next(i for i, end in enumerate(self.ends) if k < end or i == len(self.ends) - 1)

    assert call_rows(Side([2, 5, 99]), Side([99]), 7) == ((0, 0, 2, 2, 2, 5, 5), (0,) * 7)
    assert call_rows(Side([3, 99]), None, 4) == ((0, 0, 0, 3), None)


def test_once_computes_again_when_an_input_is_written_and_never_outside_a_scope():
    w = torch.ones(3)
    calls = []

    def compute():
        calls.append(1)
        return w * 2

    assert hoist.once("k", (w,), compute) is not hoist.once("k", (w,), compute)  # no scope: every time
    with hoist.scope() as memo:
        a = hoist.once("k", (w,), compute)
        assert hoist.once("k", (w,), compute) is a
        assert hoist.once("k", (w[:],), compute) is a  # the same memory viewed the same way
        assert hoist.once("other", (w,), compute) is not a
        w.add_(1)  # an in-place write (a static buffer's new prompt, a LoRA's delta)
        b = hoist.once("k", (w,), compute)
        assert b is not a and torch.equal(b, torch.full((3,), 4.0))
        assert memo.computed == 3
    assert len(calls) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_loop_with_hoists_follows_a_prompt_and_a_weight_change_cuda(tiny):
    """Under CUDA-graph capture: the keys are recomputed inside the graph from the static buffers (a new prompt
    reaches them), the step embeddings made before the capture are refreshed before a replay after a weight
    change; each replay equals the eager loop on the same device."""
    model = tiny.to("cuda")
    try:
        sigmas = _sigmas(model)
        runner = GraphRunner(tables_on_device(W.sigma_denoiser(model.apply_model, model.config,
                                                               model.step_embedder()), "cuda"), device="cuda")
        weight = model.model.diffusion_model.res_blocks()[0].emb_layers[1].weight
        pristine = weight.detach().clone()
        with torch.no_grad():
            for seed, scale in ((0, 1.0), (1, 1.0), (1, 1.5)):
                weight.copy_(pristine * scale)
                x, cond, uncond = (t.cuda() if isinstance(t, torch.Tensor) else {k: v.cuda() for k, v in t.items()}
                                   for t in _inputs(model, seed))
                out = runner.run(x * sigmas[0], cond, uncond, sigmas=sigmas, cfg_scale=7.0, sampler="dpmpp_2m")
                eager = _loop(model, x, cond, uncond, hoisted=False)
                assert torch.allclose(out, eager, rtol=1e-5, atol=1e-5), (seed, scale)
            weight.copy_(pristine)
        assert runner.captures == 1
    finally:
        tiny.to("cpu")


@pytest.mark.slow
def test_hoisted_loop_is_bit_for_bit_the_unhoisted_one_with_the_triton_kernels(tiny):
    """The same with every op on its Triton kernel (the interpreter on the CPU), two steps."""
    from tritonsd.kernels import dispatch

    x, cond, uncond = _inputs(tiny)
    sigmas = schedule.get_sigmas_karras(2, 0.1, 10.0)
    outs = []
    with torch.no_grad(), dispatch.force("triton"):
        for hoisted in (False, True):
            den = W.sigma_denoiser(tiny.apply_model, tiny.config, tiny.step_embedder() if hoisted else None)
            cfg = D.prepare(D.CFGDenoiser(den, 7.0), sigmas, "cpu")
            with hoist.scope() if hoisted else contextlib.nullcontext():
                outs.append(S.sample_dpmpp_2m(cfg, x * sigmas[0], sigmas,
                                              extra_args={"cond": cond, "uncond": uncond}))
    assert torch.equal(outs[1], outs[0])


def test_a_controlnet_run_makes_its_cross_attention_keys_once(pipes, fixtures):
    """The ControlNet's encoder reads the same conditioning as the UNet: its keys and values are made once per
    run too (and the image is the one the unhoisted run makes)."""
    from tritonsd.model.controlnet import ControlNet
    from tritonsd.sampler.control import ControlUnit

    pipe = pipes("sd1-tiny")
    fields = dict(prompt="a red circle", seed=5, steps=3, width=64, height=64, sampler="euler",
                  controls=(ControlUnit(fixtures / "controlnet-sd1-tiny.safetensors",
                                        image=torch.full((1, 3, 64, 64), 0.5)),))
    with hoist.suspended():
        plain = pipe.generate(pipe.settings(**fields))
    net = next(n for n in pipe._controlnets.values() if isinstance(n, ControlNet))
    cross = [m.attn2 for m in net.modules() if isinstance(m, BasicTransformerBlock)]
    calls = []
    handles = [m.to_k.register_forward_hook(lambda *_: calls.append(1)) for m in cross]
    try:
        hoisted = pipe.generate(pipe.settings(**fields))
    finally:
        for h in handles:
            h.remove()
    assert cross and len(calls) == len(cross)  # once per run, not once per step
    assert torch.equal(hoisted, plain)


def test_sdxl_makes_its_time_mlp_before_the_loop_bit_for_bit(models):
    """SDXL's embedding adds the conditioning's label embedding: the tables hold the time MLP per step index, the
    label embedding is made once per run, and the loop equals the unhoisted one bit for bit."""
    model = models("sdxl-tiny")
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    cfg_unet = model.config.unet
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(1, 77, cfg_unet.context_dim, generator=g),
            "y": torch.randn(1, cfg_unet.adm_in_channels, generator=g)}
    uncond = {k: torch.randn(v.shape, generator=g) for k, v in cond.items()}
    den = W.sigma_denoiser(None, model.config)
    sigmas = schedule.get_sigmas_karras(STEPS, float(den.sigmas[0]), float(den.sigmas[-1]))
    outs, counts = [], []
    for hoisted in (False, True):
        calls = []
        handles = [unet.time_embed[0].register_forward_hook(lambda *_: calls.append("time")),
                   unet.label_emb[0][0].register_forward_hook(lambda *_: calls.append("label"))]
        try:
            d = W.sigma_denoiser(model.apply_model, model.config, model.step_embedder() if hoisted else None)
            cfg = D.prepare(D.CFGDenoiser(d, 7.0), sigmas, "cpu")
            with torch.no_grad(), hoist.scope() if hoisted else contextlib.nullcontext():
                outs.append(S.sample_euler(cfg, x * sigmas[0], sigmas, extra_args={"cond": cond, "uncond": uncond}))
        finally:
            for h in handles:
                h.remove()
        counts.append((calls.count("time"), calls.count("label")))
    assert torch.equal(outs[1], outs[0])
    assert counts == [(STEPS, STEPS), (STEPS, 1)]
