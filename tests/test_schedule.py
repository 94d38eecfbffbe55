"""Schedules against the fixtures (made by the original code) and independent float64 computations."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tritonsd.sampler import pinned
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


# ---------------------------------------------------------------- the same schedule on every machine
# On the CPU, float32 sqrt / log / exp go through MKL's VML, whose last bit depends on the code path MKL picks for
# the processor (MKL_CBWR forces one), and torch.linspace through a vectorized or a scalar kernel
# (ATEN_CPU_CAPABILITY). The fixtures were made on MKL's compatible path.


def _run_in_fresh_process(code: str, env: dict, out) -> dict:
    """Run ``code`` (which saves tensors to sys.argv[1]) in a new Python with ``env`` added; its tensors."""
    subprocess.run([sys.executable, "-c", code, str(out)], env={**os.environ, **env}, check=True, timeout=300)
    return load_file(str(out))


ORIGINALS = """
import sys, numpy as np, torch
from safetensors.torch import save_file
# CompVis make_beta_schedule('linear') + register_schedule; sgm LegacyDDPMDiscretization.__init__
betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2).numpy()
acp = np.cumprod(1.0 - betas, axis=0)
acp32 = torch.tensor(acp, dtype=torch.float32)  # register_schedule's to_torch
sigmas = ((1 - acp32) / acp32) ** 0.5  # k-diffusion DiscreteEpsDDPMDenoiser
sgm = torch.tensor((1 - acp) / acp, dtype=torch.float32) ** 0.5  # LegacyDDPMDiscretization.get_sigmas
save_file({"acp": torch.from_numpy(acp), "sigmas": sigmas, "log_sigmas": sigmas.log(), "sgm": sgm}, sys.argv[1])
"""


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# MKL_CBWR=COMPATIBLE gives the fixtures' last bits on Intel processors only: on an AMD EPYC (AVX-512) the same
# process gave the correctly rounded float32 sqrt in 79 of the 1000 sigmas where the fixtures' path is 1 ulp off
@pytest.mark.skipif(not torch.backends.mkl.is_available() or platform.machine().lower() not in ("x86_64", "amd64")
                    or _cpu_vendor() != "GenuineIntel",
                    reason="MKL_CBWR=COMPATIBLE selects the fixtures' code path of MKL on Intel x86-64 processors")
def test_pinned_tables_are_the_originals_on_mkl_compatible_path(tmp_path):
    """The pinned tables are what the original formulas give on MKL's compatible path (the fixtures' path)."""
    orig = _run_in_fresh_process(ORIGINALS, {"MKL_CBWR": "COMPATIBLE"}, tmp_path / "orig.safetensors")
    table = pinned.pinned()
    assert torch.equal(table.alphas_cumprod64, orig["acp"])
    assert torch.equal(table.kdiff_sigmas, orig["sigmas"])
    assert torch.equal(table.kdiff_log_sigmas, orig["log_sigmas"])
    assert torch.equal(table.sgm_sigmas, orig["sgm"])


RUNTIME = """
import sys, torch
from safetensors.torch import save_file
from tritonsd.sampler import schedule as S
acp64 = S.linear_alphas_cumprod()
sig = S.discrete_sigmas(acp64.float())
out = {}
for n in (1, 5, 7, 10, 12, 20, 37, 50):
    out[f"kdiff{n}"] = S.get_sigmas(sig, n)
    out[f"sgm{n}"] = S.sgm_sigmas(acp64, n)
for n in KARRAS_STEPS:
    out[f"karras{n}"] = S.get_sigmas_karras(n, sig[0].item(), sig[-1].item())
save_file(out, sys.argv[1])
"""
# Karras's ``** rho`` is torch's pow: SLEEF's on AVX2 / AVX-512, the C library's without; they part from n = 34
KARRAS_STEPS = (1, 5, 7, 10, 12, 20, 33)

CPU_PATHS = [{"MKL_CBWR": "AUTO"}, {"MKL_CBWR": "COMPATIBLE"}, {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
             {"ATEN_CPU_CAPABILITY": "default"}]


@pytest.mark.parametrize("env", CPU_PATHS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_schedules_are_the_same_on_every_cpu_path(tmp_path, reference, env):
    """k-diffusion, Karras and sgm sigmas are bit-identical whichever MKL code path and torch kernel the CPU gets,
    and equal to the fixtures (which a plain float32 computation on an AVX2 / AVX-512 MKL path misses by 1 ulp)."""
    got = _run_in_fresh_process(f"KARRAS_STEPS = {KARRAS_STEPS}\n" + RUNTIME, env, tmp_path / "sigmas.safetensors")
    assert torch.equal(got["kdiff10"], reference("sd1-tiny")[0]["kdiff.sigmas"])
    assert torch.equal(got["karras10"], reference("sd1-tiny")[0]["kdiff.sigmas_karras"])
    assert torch.equal(got["sgm10"], reference("sdxl-tiny")[0]["sample.sigmas"])
    acp64 = S.linear_alphas_cumprod()
    sig = S.discrete_sigmas(acp64.float())
    for n in (1, 5, 7, 10, 12, 20, 37, 50):
        assert torch.equal(got[f"kdiff{n}"], S.get_sigmas(sig, n)), n
        assert torch.equal(got[f"sgm{n}"], S.sgm_sigmas(acp64, n)), n
    for n in KARRAS_STEPS:
        assert torch.equal(got[f"karras{n}"], S.get_sigmas_karras(n, sig[0].item(), sig[-1].item())), n


def test_other_schedules_are_computed():
    """The pinned tables apply to the linear 0.00085 -> 0.012 schedule only; any other is computed."""
    acp64 = S.linear_alphas_cumprod(0.0001, 0.02, 1000)
    acp = acp64.float()
    assert pinned.kdiff_sigmas(acp) is None and pinned.sgm_sigmas(acp64) is None
    sigmas = S.discrete_sigmas(acp)
    assert torch.equal(sigmas, ((1 - acp) / acp) ** 0.5)
    assert torch.equal(S.discrete_log_sigmas(sigmas), sigmas.log())
    assert torch.equal(S.sgm_training_sigmas(acp64), ((1 - acp64) / acp64).float() ** 0.5)
    # the float64 key, not just its float32 rounding, picks the sgm table
    assert pinned.sgm_sigmas(S.linear_alphas_cumprod().float().double()) is None


def test_pinned_tables_are_the_checkpoints_schedule(fixtures):
    """The key is the schedule the config derives and the buffer every fixture checkpoint holds."""
    table = pinned.pinned()
    assert torch.equal(table.alphas_cumprod64, S.linear_alphas_cumprod(0.00085, 0.012, 1000))
    for name in SD_MODELS + ["sd1-inpaint-tiny"]:
        acp = checkpoint_alphas_cumprod(fixtures, name)
        assert torch.equal(S.discrete_sigmas(acp), table.kdiff_sigmas)
        assert torch.equal(S.discrete_log_sigmas(S.discrete_sigmas(acp)), table.kdiff_log_sigmas)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="torch's scalar linspace kernel rounds twice")
def test_linspace32_is_torchs_vectorized_linspace():
    for n in range(1, 300):
        assert torch.equal(S.linspace32(999, 0, n), torch.linspace(999, 0, n)), n
        assert torch.equal(S.linspace32(0, 1, n), torch.linspace(0, 1, n)), n
