"""Samplers and denoiser wrappers without a model: replay the original's per-step outputs.

A replay model returns the reference's stored per-step denoised x0 (or DDIM's pred_x0, as eps) on its i-th
call and checks the noise level / timestep it was given; the sampler's update rule must then land on the
reference latents. The full runs through the tiny models are in test_sampling_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tritonsd.sampler import denoise as D
from tritonsd.sampler import samplers as K
from tritonsd.sampler import schedule as S
from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND

SD_MODELS = ["sd1-tiny", "sd2v-tiny"]


def checkpoint_alphas_cumprod(fixtures, name):
    with safe_open(str(fixtures / f"{name}.safetensors"), "pt") as f:
        return f.get_tensor("alphas_cumprod")


class SigmaReplay:
    """model(x, sigma) -> stored denoised[i] on the i-th call; records the sigmas and inputs it saw."""

    def __init__(self, denoised, sigmas):
        self.denoised, self.sigmas, self.calls = denoised, sigmas, 0

    def __call__(self, x, sigma, **extra):
        i = self.calls
        assert sigma.shape == (x.shape[0],)
        assert torch.equal(sigma, self.sigmas[i].expand(x.shape[0])), f"step {i}: sigma {sigma} != {self.sigmas[i]}"
        self.calls += 1
        return self.denoised[i].clone()


# ---------------------------------------------------------------- k-diffusion samplers


@pytest.mark.parametrize("name", SD_MODELS)
def test_euler_replay(reference, name):
    ref, _ = reference(name)
    sigmas = ref["kdiff.sigmas"]
    model = SigmaReplay(ref["euler_cfg7p5.denoised"], sigmas)
    seen = []
    out = K.sample_euler(model, ref["sample.x_T"] * sigmas[0], sigmas, callback=seen.append)
    assert model.calls == 10 and [c["i"] for c in seen] == list(range(10))
    assert relative_error(out, ref["euler_cfg7p5.latents"]) <= FP32_BOUND
    assert torch.equal(seen[3]["denoised"], ref["euler_cfg7p5.denoised"][3])


@pytest.mark.parametrize("name", SD_MODELS)
def test_euler_ancestral_eta0_is_euler(reference, name):
    ref, _ = reference(name)
    sigmas = ref["kdiff.sigmas"]
    model = SigmaReplay(ref["euler_cfg7p5.denoised"], sigmas)
    out = K.sample_euler_ancestral(model, ref["sample.x_T"] * sigmas[0], sigmas, eta=0.0)
    assert relative_error(out, ref["euler_cfg7p5.latents"]) <= FP32_BOUND


@pytest.mark.parametrize("name", SD_MODELS)
def test_dpmpp_2m_karras_replay(reference, name):
    ref, _ = reference(name)
    sigmas = ref["kdiff.sigmas_karras"]
    model = SigmaReplay(ref["dpmpp_2m_karras_cfg7p5.denoised"], sigmas)
    out = K.sample_dpmpp_2m(model, ref["sample.x_T"] * sigmas[0], sigmas)
    assert model.calls == 10
    assert relative_error(out, ref["dpmpp_2m_karras_cfg7p5.latents"]) <= FP32_BOUND


def test_dpmpp_2m_last_step_returns_denoised():
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    model = SigmaReplay(torch.randn(2, 1, 3), sigmas)
    out = K.sample_dpmpp_2m(model, torch.randn(1, 3), sigmas)
    assert torch.equal(out, model.denoised[1])


# ---------------------------------------------------------------- sgm samplers (SDXL)


@pytest.mark.parametrize("run", ["euler_cfg7p5", "euler_cfg5p0", "dpmpp2m_cfg7p5"])
def test_sgm_replay(reference, run):
    """sgm's EulerEDMSampler (s_churn 0) and DPMPP2MSampler are our euler / dpmpp_2m over the sgm sigmas."""
    ref, _ = reference("sdxl-tiny")
    sigmas = S.sgm_sigmas(S.linear_alphas_cumprod(), 10)
    x = ref["sample.x_T"] * S.sgm_start_scale(sigmas)
    model = SigmaReplay(ref[f"{run}.denoised"], sigmas)
    sampler = K.sample_dpmpp_2m if run.startswith("dpmpp") else K.sample_euler
    out = sampler(model, x, sigmas)
    assert relative_error(out, ref[f"{run}.latents"]) <= FP32_BOUND


# ---------------------------------------------------------------- DDIM


class DDIMReplay:
    """model(x, t) -> eps consistent with the stored pred_x0 of step i (x0 too for the v path)."""

    def __init__(self, ref, run, schedule, give_x0):
        self.x_inter, self.pred_x0 = ref[f"{run}.x_inter"], ref[f"{run}.pred_x0"]
        self.schedule, self.give_x0, self.calls = schedule, give_x0, 0

    def __call__(self, x, t, **extra):
        i = self.calls
        index = len(self.schedule.timesteps) - 1 - i
        assert t.dtype == torch.long and torch.equal(t, self.schedule.timesteps[index].expand(x.shape[0]))
        assert relative_error(x, self.x_inter[i]) <= FP32_BOUND
        a = self.schedule.alphas[index]
        x0 = self.pred_x0[i + 1]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        self.calls += 1
        return eps, (x0 if self.give_x0 else None)


@pytest.mark.parametrize("name", SD_MODELS)
@pytest.mark.parametrize("run", ["ddim_cfg7p5", "ddim_cfg1p0"])
@pytest.mark.parametrize("give_x0", [False, True])
def test_ddim_replay(fixtures, reference, name, run, give_x0):
    ref, _ = reference(name)
    sched = S.ddim_schedule(checkpoint_alphas_cumprod(fixtures, name), 10)
    model = DDIMReplay(ref, run, sched, give_x0)
    out, inter = K.sample_ddim(model, ref["sample.x_T"], sched)
    assert model.calls == 10
    assert relative_error(out, ref[f"{run}.latents"]) <= FP32_BOUND
    assert relative_error(torch.stack(inter["x_inter"]), ref[f"{run}.x_inter"]) <= FP32_BOUND
    assert relative_error(torch.stack(inter["pred_x0"]), ref[f"{run}.pred_x0"]) <= FP32_BOUND


def test_ddim_eta_uses_noise_sampler_and_seed():
    sched = S.ddim_schedule(S.linear_alphas_cumprod().float(), 5, eta=1.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return 0.1 * x, None

    calls = []

    def zeros(a, b):
        calls.append((a, b))
        return torch.zeros_like(x)

    det, _ = K.sample_ddim(model, x, sched._replace(sigmas=torch.zeros_like(sched.sigmas)))
    with_zero_noise, _ = K.sample_ddim(model, x, sched, noise_sampler=zeros)
    assert len(calls) == 5 and calls[0][0] == int(sched.timesteps[-1])
    assert not torch.equal(det, with_zero_noise)  # sigma_t also shrinks the eps direction
    a, _ = K.sample_ddim(model, x, sched, seed=3)
    torch.manual_seed(123)
    b, _ = K.sample_ddim(model, x, sched, seed=3)
    c, _ = K.sample_ddim(model, x, sched, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_plms_rejects_eta():
    sched = S.ddim_schedule(S.linear_alphas_cumprod().float(), 5, eta=0.5)
    with pytest.raises(K.SamplerError):
        K.sample_plms(lambda x, t: (x, None), torch.zeros(1, 4, 8, 8), sched)


def test_plms_call_pattern():
    """First step evaluates twice (second at the next timestep), then once per step; t descends."""
    sched = S.ddim_schedule(S.linear_alphas_cumprod().float(), 10)
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return 0.01 * x, None

    K.sample_plms(model, torch.ones(1, 4, 8, 8), sched)
    ts = sched.timesteps.tolist()[::-1]
    assert seen == [ts[0], ts[1]] + ts[1:]


# ---------------------------------------------------------------- noise


def test_seeded_noise_is_reproducible_and_independent_of_global_rng():
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.0])

    def model(x, sigma):
        return 0.5 * x

    x = torch.ones(2, 4, 8, 8)
    torch.manual_seed(0)
    a = K.sample_euler_ancestral(model, x, sigmas, seed=7)
    torch.manual_seed(99)
    torch.randn(10)
    b = K.sample_euler_ancestral(model, x, sigmas, seed=7)
    c = K.sample_euler_ancestral(model, x, sigmas, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_euler_ancestral_noise_calls():
    """Called once per step whose next sigma is > 0, with (sigma, sigma_next), as k-diffusion."""
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.0])
    calls = []

    def noise(s, s_next):
        calls.append((float(s), float(s_next)))
        return torch.zeros(1, 2)

    K.sample_euler_ancestral(lambda x, s: 0 * x, torch.ones(1, 2), sigmas, noise_sampler=noise)
    assert calls == [(3.0, 2.0), (2.0, 1.0)]


# ---------------------------------------------------------------- denoiser wrappers


class FakeUNet:
    """A deterministic stand-in for apply_model: output depends on x, t, context, y; records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, y=None):
        self.calls.append({"x": x, "t": t, "context": context, "y": y})
        tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        out = torch.tanh(x[:, :4]) * (1 + tt / 1000) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        if x.shape[1] > 4:
            out = out + x[:, 4:].mean(dim=1, keepdim=True)
        if y is not None:
            out = out + y.mean(dim=1).reshape(-1, 1, 1, 1)
        return out


def test_eps_denoiser_formula_and_fractional_t():
    acp = S.linear_alphas_cumprod().float()
    unet = FakeUNet()
    den = D.EpsDenoiser(unet, acp)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, 32)
    sigmas = den.get_sigmas(10)
    out = den(x, sigmas[3].expand(2), context=ctx)
    s = sigmas[3].double()
    t = unet.calls[0]["t"]
    assert t.dtype == torch.float32 and abs(float(t[0]) - 999 * 6 / 9) < 1e-3
    eps = unet(x * (1 / (s ** 2 + 1).sqrt()).float(), t, ctx)
    assert torch.allclose(out, x - s.float() * eps, rtol=1e-5, atol=1e-5)


def test_v_denoiser_agrees_with_ddim_v_conversion():
    """Same v model two ways: VDenoiser(x_t / sqrt(a), sigma_t) == EpsFromV(x_t, t)'s x0."""
    acp64 = S.linear_alphas_cumprod()
    acp = acp64.float()
    unet = FakeUNet()
    den = D.VDenoiser(unet, acp)
    ddim = D.EpsFromV(D.UNetOutput(unet), acp64)
    t = torch.tensor([601, 601])
    x_t = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, 32)
    eps, x0 = ddim(x_t, t, context=ctx)
    sigma = den.sigmas[t]
    x0_k = den(x_t / acp[t].sqrt().reshape(-1, 1, 1, 1), sigma, context=ctx)
    assert torch.allclose(x0_k, x0, rtol=1e-4, atol=1e-4)
    a = acp64[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(eps.double(), (x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt(), atol=1e-4)


def test_sgm_denoiser_quantises(reference):
    ref, _ = reference("sdxl-tiny")
    acp64 = S.linear_alphas_cumprod()
    unet = FakeUNet()
    den = D.SGMEpsDenoiser(unet, acp64)
    sigmas = S.sgm_sigmas(acp64, 10)
    x = torch.randn(2, 4, 8, 8)
    ctx, y = torch.randn(2, 77, 64), torch.randn(2, 1568)
    for k in range(10):
        den(x, sigmas[k].expand(2) * (1 + 1e-4), context=ctx, y=y)  # off-grid: snaps to the nearest
    ts = torch.stack([c["t"][0] for c in unet.calls])
    assert ts.dtype == torch.long and torch.equal(ts, ref["sample.timesteps"])
    assert unet.calls[0]["y"] is y
    out = den(x, sigmas[2].expand(2), context=ctx, y=y)
    s = den.sigmas[ts[2]]
    eps = unet(x * (1 / (s ** 2 + 1) ** 0.5), ts[2].expand(2), ctx, y=y)
    assert torch.allclose(out, x - s * eps, rtol=1e-6, atol=1e-5)


def test_cfg_one_batched_call_uncond_first():
    unet = FakeUNet()
    inner = D.UNetOutput(unet)
    cfg = D.CFGDenoiser(inner, 7.5)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    cond, uncond = {"context": torch.randn(2, 77, 32)}, {"context": torch.randn(2, 77, 32)}
    out = cfg(x, t, cond=cond, uncond=uncond)
    assert len(unet.calls) == 1 and unet.calls[0]["x"].shape[0] == 4
    assert torch.equal(unet.calls[0]["context"][:2], uncond["context"])
    u = inner(x, t, **uncond)
    c = inner(x, t, **cond)
    assert torch.allclose(out, u + (c - u) * 7.5, rtol=1e-6, atol=1e-5)


def test_cfg_scale_one_calls_cond_only():
    unet = FakeUNet()
    cfg = D.CFGDenoiser(D.UNetOutput(unet), 1.0)
    x = torch.randn(2, 4, 8, 8)
    cond, uncond = {"context": torch.randn(2, 77, 32)}, {"context": torch.randn(2, 77, 32)}
    out = cfg(x, torch.tensor([10, 10]), cond=cond, uncond=uncond)
    assert len(unet.calls) == 1 and unet.calls[0]["context"] is cond["context"]
    assert torch.equal(out, unet(x, torch.tensor([10, 10]), cond["context"]))


def test_cfg_shared_concat_and_vector():
    """Inpainting's c_concat is shared by both halves and concatenated after the scaled latent."""
    unet = FakeUNet()
    cfg = D.CFGDenoiser(D.EpsDenoiser(unet, S.linear_alphas_cumprod().float()), 5.0)
    x = torch.randn(2, 4, 8, 8)
    c_concat = torch.randn(2, 5, 8, 8)
    cond = {"context": torch.randn(2, 77, 32), "y": torch.randn(2, 16)}
    uncond = {"context": torch.zeros(2, 77, 32), "y": torch.randn(2, 16)}
    cfg(x, torch.tensor([3.0, 3.0]), cond=cond, uncond=uncond, c_concat=c_concat)
    seen = unet.calls[0]["x"]
    assert seen.shape == (4, 9, 8, 8)
    assert torch.equal(seen[:2, 4:], c_concat) and torch.equal(seen[2:, 4:], c_concat)
    assert torch.equal(unet.calls[0]["y"], torch.cat([uncond["y"], cond["y"]]))


def test_cfg_mismatched_keys():
    cfg = D.CFGDenoiser(D.UNetOutput(FakeUNet()), 7.5)
    with pytest.raises(D.CFGError):
        cfg(torch.zeros(1, 4, 8, 8), torch.tensor([1]), cond={"context": torch.zeros(1, 77, 32)},
            uncond={"context": torch.zeros(1, 77, 32), "y": torch.zeros(1, 4)})


def test_ddim_eps_and_v_wrappers_compose_with_cfg_inside():
    """For DDIM the guidance combines the RAW model output, then converts (Stability's order for v)."""
    acp64 = S.linear_alphas_cumprod()
    unet = FakeUNet()
    raw = D.CFGDenoiser(D.UNetOutput(unet), 7.5)
    model = D.EpsFromV(raw, acp64)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([901, 901])
    cond, uncond = {"context": torch.randn(2, 77, 32)}, {"context": torch.randn(2, 77, 32)}
    eps, x0 = model(x, t, cond=cond, uncond=uncond)
    v = raw(x, t, cond=cond, uncond=uncond)
    a, b = acp64[901].sqrt().float(), (1 - acp64[901]).sqrt().float()
    assert torch.equal(eps, a * v + b * x) and torch.equal(x0, a * x - b * v)
    eps_only, none = D.EpsPrediction(raw)(x, t, cond=cond, uncond=uncond)
    assert none is None and torch.equal(eps_only, v)


def test_ddim_eta_step_against_float64_formula():
    """One stochastic step: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise."""
    acp = S.linear_alphas_cumprod().float()
    sched = S.ddim_schedule(acp, 4, eta=0.7)
    g = torch.Generator().manual_seed(5)
    x, eps, noise = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    out, inter = K.sample_ddim(lambda x, t: (eps, None), x, sched._replace(timesteps=sched.timesteps[-1:],
                               alphas=sched.alphas[-1:], alphas_prev=sched.alphas_prev[-1:],
                               sigmas=sched.sigmas[-1:]), noise_sampler=lambda a, b: noise)
    a, a_prev, sigma = sched.alphas[-1].double(), sched.alphas_prev[-1], sched.sigmas[-1]
    x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    expect = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * eps.double() + sigma * noise.double()
    assert sigma > 0.1
    assert relative_error(out, expect) < 1e-6 and relative_error(inter["pred_x0"][1], x0) < 1e-6
