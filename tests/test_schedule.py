"""Schedules against the fixtures (made by the original code) and independent float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tritonsd.sampler import schedule as S
from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND

SD_MODELS = ["sd1-tiny", "sd2v-tiny"]


def checkpoint_alphas_cumprod(fixtures, name):
    """The float32 ``alphas_cumprod`` buffer the original model holds (stored in the checkpoint)."""
    with safe_open(str(fixtures / f"{name}.safetensors"), "pt") as f:
        return f.get_tensor("alphas_cumprod")


@pytest.mark.parametrize("name", SD_MODELS + ["sd1-inpaint-tiny"])
def test_linear_schedule_matches_checkpoint_buffer(fixtures, name):
    acp = S.linear_alphas_cumprod(0.00085, 0.012, 1000)
    assert acp.dtype == torch.float64
    assert torch.equal(acp.float(), checkpoint_alphas_cumprod(fixtures, name))


def test_linear_betas_independent():
    b = S.linear_betas(0.00085, 0.012, 1000).numpy()
    expect = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert np.abs(b - expect).max() < 1e-15
    acp = S.alphas_cumprod_from_betas(torch.from_numpy(b)).numpy()
    assert np.abs(acp - np.cumprod(1 - expect)).max() < 1e-13


@pytest.mark.parametrize("name", SD_MODELS + ["sd1-inpaint-tiny"])
def test_ddim_schedule(fixtures, reference, name):
    ref, _ = reference(name)
    d = S.ddim_schedule(checkpoint_alphas_cumprod(fixtures, name), 10)
    assert torch.equal(d.timesteps, ref["ddim.timesteps"])
    if "ddim.alphas" in ref:
        assert relative_error(d.alphas, ref["ddim.alphas"]) <= FP32_BOUND
        assert relative_error(d.alphas_prev, ref["ddim.alphas_prev"]) <= FP32_BOUND
        assert d.alphas_prev.dtype == torch.float64
    assert torch.count_nonzero(d.sigmas) == 0


def test_ddim_timesteps_uneven_step_count():
    # README: S=12 -> 13 steps, 1 ... 997 (c = 1000 // 12 = 83)
    t = S.ddim_timesteps(12)
    assert len(t) == 13 and int(t[0]) == 1 and int(t[-1]) == 997
    assert set(torch.diff(t).tolist()) == {83}
    assert S.ddim_timesteps(1).tolist() == [1]


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_ddim_timesteps_bad_steps(steps):
    with pytest.raises(S.ScheduleError):
        S.ddim_timesteps(steps)


def test_ddim_schedule_beyond_training_steps_is_an_error():
    acp = S.linear_alphas_cumprod().float()
    S.ddim_schedule(acp, 500)
    with pytest.raises(S.ScheduleError, match="beyond"):
        S.ddim_schedule(acp, 501)


def test_ddim_sigmas_eta_independent():
    acp = S.linear_alphas_cumprod().float()
    d = S.ddim_schedule(acp, 25, eta=0.7)
    a = acp.double().numpy()[d.timesteps.numpy()]
    a_prev = np.concatenate([[acp.double()[0].item()], a[:-1]])
    expect = 0.7 * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    assert np.abs(d.sigmas.numpy() - expect).max() < 1e-12


@pytest.mark.parametrize("name", SD_MODELS)
def test_kdiffusion_sigmas(fixtures, reference, name):
    ref, _ = reference(name)
    sigmas = S.discrete_sigmas(checkpoint_alphas_cumprod(fixtures, name))
    assert relative_error(S.get_sigmas(sigmas, 10), ref["kdiff.sigmas"]) <= FP32_BOUND
    karras = S.get_sigmas_karras(10, sigmas[0].item(), sigmas[-1].item(), rho=7.0)
    assert relative_error(karras, ref["kdiff.sigmas_karras"]) <= FP32_BOUND


def test_sigma_to_t_matches_float64_log_interpolation():
    sigmas = S.discrete_sigmas(S.linear_alphas_cumprod().float())
    log_s = sigmas.double().log().numpy()
    probe = torch.tensor([0.03, 0.0292, 0.1, 1.0, 3.3, 14.6, 20.0, 0.01])
    t = S.sigma_to_t(probe, sigmas)
    expect = np.interp(np.log(probe.double().numpy()), log_s, np.arange(1000.0))  # clamps at both ends
    assert np.abs(t.double().numpy() - expect).max() < 1e-3
    # integer t round-trips to the training sigma and back
    k = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.allclose(S.sigma_to_t(sigmas[k], sigmas), k.float(), atol=1e-3)
    frac = torch.tensor([0.5, 10.25, 600.75, 998.5])
    assert torch.allclose(S.sigma_to_t(S.t_to_sigma(frac, sigmas), sigmas), frac, atol=2e-3)


def test_karras_bad_range():
    with pytest.raises(S.ScheduleError):
        S.get_sigmas_karras(10, 0.0, 14.6)
    with pytest.raises(S.ScheduleError):
        S.get_sigmas_karras(10, 15.0, 14.6)


def test_sgm_sigmas_and_timesteps(reference):
    ref, _ = reference("sdxl-tiny")
    acp = S.linear_alphas_cumprod(0.00085, 0.012, 1000)
    sigmas = S.sgm_sigmas(acp, 10)
    assert relative_error(sigmas, ref["sample.sigmas"]) <= FP32_BOUND
    assert torch.equal(S.sgm_timesteps(10), ref["sample.timesteps"])
    idx = S.sigma_to_idx(sigmas[:-1], S.sgm_training_sigmas(acp))
    assert torch.equal(idx, ref["sample.timesteps"])


def test_sgm_timesteps_twelve_steps():
    # README-sdxl: 12 steps = 999, 915, 832, ..., 83 (truncation of linspace(999, 0, 12, endpoint=False))
    t = S.sgm_timesteps(12)
    expect = [int(v) for v in np.linspace(999, 0, 12, endpoint=False)]
    assert t.tolist() == expect and t.tolist()[:3] == [999, 915, 832] and t.tolist()[-1] == 83
    assert S.sgm_timesteps(1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(S.ScheduleError):
        S.sgm_timesteps(1001)


def test_sigma_to_idx_nearest():
    train = S.sgm_training_sigmas(S.linear_alphas_cumprod())
    probe = torch.tensor([0.0, 1.0, 5.0, 100.0])
    idx = S.sigma_to_idx(probe, train)
    expect = (probe[None, :] - train[:, None]).abs().argmin(0)
    assert torch.equal(idx, expect)
    assert int(idx[0]) == 0 and int(idx[-1]) == 999
