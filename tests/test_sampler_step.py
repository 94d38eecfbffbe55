"""The sampler loop's fused elementwise kernels (kernels/sampler_step.py) against their torch references, BIT FOR
BIT (the kernels do the reference's float32 operations in its order, each rounded): random data, odd sizes,
batch 1 and 2, strided operands (a channels_last UNet output, the CFG halves of one batch), NaN-poisoned
outputs; and the samplers give the same latents whichever implementation the dispatch picks."""

from __future__ import annotations

import pytest
import torch

from tritonsd.kernels import dispatch
from tritonsd.kernels import sampler_step as step
from tritonsd.sampler import samplers as K
from tritonsd.sampler import schedule as S

from kernel_checks import DEVICE, forbid_fallback

SHAPES = [(1, 4, 8, 8), (2, 4, 7, 9), (2, 3, 5), (13,)]
# the references, bound before ``no_fallback`` makes the launchers' own use of them an error
denoiser_output_ref, cfg_combine_ref = step.denoiser_output_reference, step.cfg_combine_reference
euler_step_ref, dpmpp_2m_step_ref = step.euler_step_reference, step.dpmpp_2m_step_reference


def rand(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE)


def poisoned(like):
    return torch.full(like.shape, float("nan"), device=like.device, dtype=like.dtype)


def assert_bitwise(got, ref):
    assert not torch.isnan(got).any(), "the kernel left elements unwritten"
    assert got.shape == ref.shape and torch.equal(got, ref)


@pytest.fixture
def no_fallback(monkeypatch):
    for name in ("denoiser_output_reference", "cfg_combine_reference", "euler_step_reference",
                 "dpmpp_2m_step_reference"):
        forbid_fallback(monkeypatch, step, name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("skip", [None, 0.4132], ids=["eps", "v"])
def test_denoiser_output(no_fallback, shape, skip):
    x, raw = rand(shape, 1), rand(shape, 2)
    ref = denoiser_output_ref(x, raw, -2.718, skip)
    out = poisoned(x)
    assert step.denoiser_output_triton(x, raw, -2.718, skip, out=out) is out
    assert_bitwise(out, ref)


def test_denoiser_output_reads_a_channels_last_unet_output(no_fallback):
    x = rand((2, 4, 6, 10), 3)
    raw = rand((2, 4, 6, 10), 4).contiguous(memory_format=torch.channels_last)
    for skip in (None, 0.91):
        assert_bitwise(step.denoiser_output_triton(x, raw, torch.tensor(-1.5), skip),
                       denoiser_output_ref(x, raw, torch.tensor(-1.5), skip))


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_combine_of_the_halves_of_one_batch(no_fallback, batch):
    pair = rand((2 * batch, 4, 7, 5), 5).contiguous(memory_format=torch.channels_last)
    uncond, cond = pair.chunk(2)
    out = poisoned(uncond)
    step.cfg_combine_triton(uncond, cond, 7.5, out=out)
    assert_bitwise(out, cfg_combine_ref(uncond, cond, 7.5))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_euler_step(no_fallback, shape):
    x, d, noise = rand(shape, 6), rand(shape, 7), rand(shape, 8, 1.0)
    sigma, dt = torch.tensor(1.3377), torch.tensor(-0.4211)  # 0-d CPU tensors, as the samplers pass them
    out = poisoned(x)
    step.euler_step_triton(x, d, sigma, dt, out=out)
    assert_bitwise(out, euler_step_ref(x, d, sigma, dt))
    out = poisoned(x)
    step.euler_step_triton(x, d, sigma, dt, noise, 1.0, torch.tensor(0.2718), out=out)
    assert_bitwise(out, euler_step_ref(x, d, sigma, dt, noise, 1.0, torch.tensor(0.2718)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dpmpp_2m_step(no_fallback, shape):
    x, d, old = rand(shape, 9), rand(shape, 10), rand(shape, 11)
    ratio, decay, w, w_old = (torch.tensor(v) for v in (0.61, -0.39, 1.83, 0.83))
    out = poisoned(x)
    step.dpmpp_2m_step_triton(x, ratio, decay, d, out=out)
    assert_bitwise(out, dpmpp_2m_step_ref(x, ratio, decay, d))
    out = poisoned(x)
    step.dpmpp_2m_step_triton(x, ratio, decay, d, old, w, w_old, out=out)
    assert_bitwise(out, dpmpp_2m_step_ref(x, ratio, decay, d, old, w, w_old))


def test_what_the_kernels_do_not_take_runs_the_reference():
    """float64, a broadcast operand, 5-D: the reference, and its result."""
    x = rand((2, 3, 4), 12).double()
    assert torch.equal(step.cfg_combine_triton(x, x * 2, 3.0), cfg_combine_ref(x, x * 2, 3.0))
    x, row = rand((2, 4, 3, 3), 13), rand((1, 4, 3, 3), 14)
    assert torch.equal(step.euler_step_triton(x, row, 2.0, -0.5), euler_step_ref(x, row, 2.0, -0.5))
    x = rand((1, 2, 2, 2, 2), 15)
    out = poisoned(x)
    step.denoiser_output_triton(x, x, -1.0, out=out)
    assert torch.equal(out, denoiser_output_ref(x, x, -1.0))


class ToyDenoiser:
    def __call__(self, x, sigma, context):
        shift = context.mean(dim=(1, 2))[:, None, None, None]  # [B, 77, C] -> [B, 1, 1, 1]
        return x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5 + shift


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_samplers_equal_under_either_implementation(sampler):
    """The whole loop (CFG combine and sampler updates through the dispatch) forced onto the Triton kernels
    gives the torch path's latents exactly."""
    from tritonsd.sampler.denoise import CFGDenoiser

    fn = {"euler": K.sample_euler, "euler_a": K.sample_euler_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}[sampler]
    sigmas = S.get_sigmas_karras(4, 0.03, 14.6)
    x = rand((2, 4, 8, 8), 16, 1.0) * sigmas[0]
    cond, uncond = rand((2, 77, 8), 17, 1.0), rand((2, 77, 8), 18, 1.0)
    extra = {"extra_args": {"cond": {"context": cond}, "uncond": {"context": uncond}}}
    if sampler == "euler_a":
        extra["seed"] = 3
    outs = {}
    for backend in ("torch", "triton"):
        with dispatch.force(backend):
            outs[backend] = fn(CFGDenoiser(ToyDenoiser(), 6.0), x, sigmas, **extra)
    assert torch.isfinite(outs["torch"]).all()
    assert torch.equal(outs["triton"], outs["torch"])
