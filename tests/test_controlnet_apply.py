"""sd-webui-controlnet's unit semantics (``control/apply.py``), each expected value written out from the extension's
``scripts/hook.py`` formulas in the test: the control modes' scales (SDXL: the first 10 of the 13), guidance start
/ end with both ends inclusive, webui's sampling step as the model calls see it, several units summed, and
"ControlNet is more important" reaching the conditional rows only."""

from __future__ import annotations

import pytest
import numpy as np
import torch

from tritonsd.control import apply as C
from tritonsd.model.controlnet import load_controlnet
from tritonsd.sampler.control import ControlUnit

FILE = "controlnet-sd1-tiny.safetensors"
BALANCED, PROMPT, CONTROL = "Balanced", "My prompt is more important", "ControlNet is more important"


def test_scales_of_each_mode():
    assert C.control_scales(0.8, BALANCED, 13) == [0.8] * 13
    soft = [0.8 * (0.825 ** float(12 - i)) for i in range(13)]  # hook.py, soft_injection
    assert C.control_scales(0.8, PROMPT, 13) == soft
    assert C.control_scales(0.8, CONTROL, 13) == soft
    assert C.control_scales(0.8, PROMPT, 10) == soft[:10]  # SDXL: control_scales[:10]
    assert C.control_scales(0.8, BALANCED, 10, soft=True) == soft[:10]  # hires fix's forced soft injection
    assert C.guess_mode_scales(0.9) == [0.9 * (0.825 ** float(12 - i)) for i in range(13)]  # gradio guess mode


@pytest.mark.parametrize("start,end,total", [(0.2, 0.7, 10), (0.0, 1.0, 4), (0.5, 0.5, 2), (0.25, 0.75, 8),
                                             (0.3, 0.3, 10)])
def test_guidance_start_and_end_are_inclusive(start, end, total):
    for step in range(total + 1):
        percent = step / total  # guidance_schedule_handler
        expected = percent < start or percent > end
        assert C.guidance_stopped(step, total, start, end) == expected



def test_both_boundaries_are_active():
    assert not C.guidance_stopped(2, 10, 0.2, 0.7) and not C.guidance_stopped(7, 10, 0.2, 0.7)
    assert C.guidance_stopped(1, 10, 0.2, 0.7) and C.guidance_stopped(8, 10, 0.2, 0.7)
    assert not C.guidance_stopped(1, 2, 0.5, 0.5) and C.guidance_stopped(0, 2, 0.5, 0.5)


def test_the_reference_schedule(reference):
    _, meta = reference("webui-controlnet-sd1-tiny")
    g = meta["guidance"]
    for row in g["schedule"]:
        assert C.guidance_stopped(row["sampling_step"], g["total"], g["start"], g["end"]) == row["guidance_stopped"]


def _unit_run(net, guided, units, total):
    prepared = [C.PreparedUnit(net, guided, u, cfg_injection=u.control_mode == CONTROL) for u in units]
    return C.ControlRun(prepared, total, "cpu")


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 16, generator=g)
    x_in = torch.cat([x, x])  # A1111: cond rows, then uncond rows
    return (x_in, torch.full((4,), 617.375), torch.randn(4, 77, 32, generator=g), torch.rand(1, 3, 64, 128,
                                                                                             generator=g))


def test_several_units_summed_with_their_modes_and_marks(models, fixtures):
    """Two units (Balanced at 0.6, "ControlNet is more important" at 0.9, another hint): the hooked UNet's sum,
    written out from hook.py: control * cond_mark (cfg injection), * scale, then item + total."""
    unet = models("sd1-tiny").model.diffusion_model
    net = load_controlnet(fixtures / FILE, unet)
    x, t, context, hint = _inputs()
    hint2 = hint.flip(-1)
    cond_mark = torch.tensor([1.0, 1.0, 0.0, 0.0])
    units = [ControlUnit(net, weight=0.6), ControlUnit(net, weight=0.9, control_mode=CONTROL)]
    with torch.no_grad():
        run = C.ControlRun([C.PreparedUnit(net, net.hint_features(hint), units[0], cfg_injection=False),
                            C.PreparedUnit(net, net.hint_features(hint2), units[1], cfg_injection=True)], 1, "cpu")
        got = C.ControlledUNet(unet, run)(x, t, context, cond_mark=cond_mark)

        total = [0.0] * 13
        for h, weight, cfg in ((hint, 0.6, False), (hint2, 0.9, True)):
            control = net(x, t, context, hint=h)
            scales = [weight] * 13
            if cfg:
                control = [c * cond_mark[:, None, None, None] for c in control]
                scales = [weight * (0.825 ** float(12 - i)) for i in range(13)]
            control = [c * s for c, s in zip(control, scales)]
            total = [item + prev for item, prev in zip(control, total)]
        want = unet(x, t, context, control=total)
    assert torch.equal(got, want)


def test_controlnet_is_more_important_leaves_the_uncond_rows_plain(models, fixtures):
    unet = models("sd1-tiny").model.diffusion_model
    net = load_controlnet(fixtures / FILE, unet)
    x, t, context, hint = _inputs(4)
    with torch.no_grad():
        run = _unit_run(net, net.hint_features(hint), [ControlUnit(net, weight=1.0, control_mode=CONTROL)], 1)
        got = C.ControlledUNet(unet, run)(x, t, context, cond_mark=torch.tensor([1.0, 1.0, 0.0, 0.0]))
        plain = unet(x, t, context)
    assert torch.allclose(got[2:], plain[2:], rtol=0, atol=1e-6)
    assert (got[:2] - plain[:2]).abs().max() > 1e-2


def test_a_stopped_unit_is_skipped_and_a_static_run_adds_zeros(models, fixtures):
    unet = models("sd1-tiny").model.diffusion_model
    net = load_controlnet(fixtures / FILE, unet)
    x, t, context, hint = _inputs(5)
    unit = ControlUnit(net, weight=1.0, guidance_start=0.5, guidance_end=1.0)
    with torch.no_grad():
        plain = unet(x, t, context)
        for static in (False, True):
            run = C.ControlRun([C.PreparedUnit(net, net.hint_features(hint), unit, False)], 4, "cpu", static=static)
            run.step = 1  # 1 / 4 < 0.5: stopped
            out = C.ControlledUNet(unet, run)(x, t, context)
            assert torch.allclose(out, plain, rtol=0, atol=0)
            run.step = 2  # 2 / 4 = 0.5: active (inclusive)
            assert (C.ControlledUNet(unet, run)(x, t, context) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("sampler,steps,calls", [
    ("euler", 5, lambda n: [0] + list(range(n - 1))),  # one call per step, before its callback
    ("dpmpp_2m", 4, lambda n: [0] + list(range(n - 1))),
    ("plms", 4, lambda n: [0, 0] + list(range(n - 1))),  # PLMS's first step calls twice before its callback
])
def test_the_sampling_step_each_model_call_sees(pipes, fixtures, monkeypatch, sampler, steps, calls):
    """webui's ``state.sampling_step``: 0 when the loop starts, then the ``i`` of the sampler's last callback."""
    pipe = pipes("sd1-tiny")
    seen = []
    original = C.ControlRun.residuals

    def spy(self, *args, **kwargs):
        seen.append((self.step, self.total))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(C.ControlRun, "residuals", spy)
    unit = ControlUnit(fixtures / FILE, image=torch.rand(1, 3, 64, 128), guidance_start=0.0, guidance_end=1.0)
    settings = pipe.settings(prompt="x", seed=1, steps=steps, width=128, height=64, sampler=sampler,
                             controls=(unit,))
    pipe.generate(settings)
    total = seen[0][1]
    assert {t for _, t in seen} == {total} == {steps}  # webui's state.sampling_steps: the steps asked for
    assert [s for s, _ in seen] == calls(len(seen) - (sampler == "plms"))


def test_ddim_with_one_timestep_more_than_its_steps_counts_the_steps(pipes, fixtures, monkeypatch):
    """6 DDIM steps run 7 timesteps (the original spacing); webui's sampling_steps stays 6 (launch_sampling)."""
    pipe = pipes("sd1-tiny")
    seen = []
    original = C.ControlRun.residuals
    monkeypatch.setattr(C.ControlRun, "residuals",
                        lambda self, *a, **k: seen.append((self.step, self.total)) or original(self, *a, **k))
    unit = ControlUnit(fixtures / FILE, image=torch.rand(1, 3, 64, 128))
    pipe.generate(pipe.settings(prompt="x", seed=1, steps=6, width=128, height=64, sampler="ddim", controls=(unit,)))
    assert [s for s, _ in seen] == [0, 0, 1, 2, 3, 4, 5] and {t for _, t in seen} == {6}


def test_hires_pass_soft_injects_canny_units(pipes, fixtures, monkeypatch):
    """hook.py's ``high_res_fix_forced_soft_injection``: in hires fix's second pass a canny unit takes the soft
    scales even when Balanced; other modules keep theirs, and the first pass is unchanged."""
    import dataclasses

    from tritonsd import pipeline as P

    pipe = pipes("sd1-tiny")
    monkeypatch.setattr(P, "detect", lambda unit, w, h, init=None, **kw: torch.rand(1, 3, h, w))
    image = np.zeros((64, 128, 3), np.uint8)
    s = pipe.settings(prompt="x", steps=4, width=128, height=64, sampler="euler",
                      controls=(ControlUnit(fixtures / FILE, image=image, module="canny", weight=0.5),
                                ControlUnit(fixtures / FILE, image=image, module="none", weight=0.5)))
    latents = pipe.prepare_latents(s)
    soft = [0.5 * (0.825 ** float(12 - i)) for i in range(13)]
    for hires, canny_scales in ((False, [0.5] * 13), (True, soft)):
        run = pipe.control_run(s, dataclasses.replace(latents, hires=hires))
        assert run.host_scales[0, 0].tolist() == canny_scales
        assert run.host_scales[0, 1].tolist() == [0.5] * 13


def test_half_residuals_are_scaled_as_by_a_python_float(models, fixtures):
    """hook.py multiplies each residual by a Python float (one rounding, in float opmath); the table's float32
    scale does the same for half residuals."""
    unet = models("sd1-tiny").model.diffusion_model
    net = load_controlnet(fixtures / FILE, unet, dtype=torch.float16)
    x, t, context, hint = _inputs(6)
    unit = ControlUnit(net, weight=0.7, control_mode=PROMPT)
    with torch.no_grad():
        run = _unit_run(net, net.hint_features(hint), [unit], 1)
        got = run.residuals(x.half(), t, context.half())
        raw = net(x.half(), t, context.half(), hint=hint)
    scales = [0.7 * (0.825 ** float(12 - i)) for i in range(13)]
    assert all(g.dtype == torch.float16 and torch.equal(g, r * s) for g, r, s in zip(got, raw, scales))
