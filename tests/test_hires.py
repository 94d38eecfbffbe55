"""Hires fix and img2img as webui v1.10.1 runs them (issue 24), against ``shared/fixtures/hires-*`` and
``img2img-*`` (README-hires.md): every public case recomputed through the Pipeline's stages (the noises exactly,
the sigma schedules to the last bit, every other tensor within 5e-4, the 8-bit images within one level, the
infotext equal to webui's but for ``Version``), the arithmetic against the JSON's own numbers, the settings'
defaults and their one-line errors. Expected values come from the reference files, never from the code under
test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tritonsd.sampler import upscale as U
from tritonsd.sampler.infotext_parse import generation_settings
from tritonsd.sampler.noise import derived_seed
from tritonsd.sampler.settings import GenerationSettings, SettingsError, fields_from_infotext
from tritonsd.testing import groups as G
from tritonsd.tools import parity

REFERENCES = ("hires-sd1-tiny", "img2img-sd1-tiny")


@pytest.fixture(scope="module")
def pipe(pipes):
    """The fixture model named as a load names it (the infotexts carry its name and hash)."""
    p = pipes("sd1-tiny")
    source = p.model.source
    p.name, p._model_hash = source.model_name, source.model_hash
    return p


def cases(reference, name: str) -> list[dict]:
    return reference(name)[1]["cases"]


# ---------------------------------------------------------------- parity of every public case


@pytest.mark.parametrize("name", REFERENCES)
def test_every_case_matches_webui(pipe, reference, fixtures, name):
    ref, meta = reference(name)
    groups = G.group_names(ref, meta)
    ctx = G.Recompute(pipe, ref, meta, pipe.device, reference=fixtures / f"{name}.reference.safetensors")
    computed, errors = {}, {}
    with torch.no_grad():
        for group, names in groups.items():
            try:
                out = G.recompute_group(ctx, group, names)
            except Exception as e:  # noqa: BLE001 - shown on the group's rows below
                errors[group] = f"{type(e).__name__}: {e}"
                continue
            computed.update({k: v.detach().cpu() for k, v in out.items() if not G.is_input(k, meta)})
    rows = parity.build_rows(ref, meta, groups, computed, errors) + parity.check_rows(ctx.checks)
    failed = [f"{r['name']}: {r.get('error')} ({r['note']})" for r in rows if not r["pass"]]
    assert not failed, "\n".join(failed)
    inputs = {r["name"] for r in rows if r["kind"] == "input"}
    assert inputs == {k for k in ref if k.endswith(("init_image_u8", "encode.posterior_noise"))}
    assert len(ctx.checks) == sum(len(c["infotexts"]) for c in meta["cases"])  # every infotext was compared
    bounds = {r["name"]: r["bound"] for r in rows}
    assert all(bounds[k] == 0.0 for k in ref if k.endswith((".x_T", ".noise")))  # exactly
    assert all(bounds[k] == 1 for k in ref if k.endswith("image_u8") and k not in inputs)  # one level


def test_upscale_of_the_reference_latent(reference):
    """``hr.upscaled_latent`` from the stored ``first_pass.latent`` alone, to ~1e-6 (README-hires.md)."""
    ref, meta = reference("hires-sd1-tiny")
    for case in meta["cases"]:
        name, i, fields = case["name"], case["inputs"], case["webui_fields_after_run"]
        target = U.hires_target(i["width"], i["height"], i.get("hr_scale", 2.0), i.get("hr_resize_x", 0),
                                i.get("hr_resize_y", 0))
        out = U.upscale_latent(ref[f"{name}.first_pass.latent"], target, i["hr_upscaler"])
        want = ref[f"{name}.hr.upscaled_latent"]
        assert (out - want).abs().max() <= 1e-6 * want.abs().max(), name
        assert (fields["latent_scale_mode"]["mode"], fields["latent_scale_mode"]["antialias"]) == \
            U.LATENT_UPSCALE_MODES[i["hr_upscaler"]]


def test_target_and_step_arithmetic_are_webuis(reference):
    """``calculate_target_resolution`` and the fixed-steps rule against the numbers webui recorded."""
    _ref, meta = reference("hires-sd1-tiny")
    for case in meta["cases"]:
        i, fields, hr = case["inputs"], case["webui_fields_after_run"], case["hr_pass"]
        target = U.hires_target(i["width"], i["height"], i.get("hr_scale", 2.0), i.get("hr_resize_x", 0),
                                i.get("hr_resize_y", 0))
        assert (target.upscale_to_x, target.upscale_to_y, target.truncate_x, target.truncate_y) == (
            fields["hr_upscale_to_x"], fields["hr_upscale_to_y"], fields["truncate_x"], fields["truncate_y"])
        assert [target.width, target.height] == hr["image_size_wh"]
        assert list(target.latent_size) == hr["interpolate"]["size"]
        length, t_enc = U.hires_steps(hr["requested_steps"], i["denoising_strength"])
        assert (length, t_enc, length - t_enc - 1) == (hr["steps_for_sigmas"], hr["t_enc"],
                                                       hr["sigma_sched_start_index"])


def test_crop_splits_an_odd_truncate_as_webui():
    """64x48 to hr_resize 128x72 covers 128x96: 3 latent rows cropped, 1 before and 2 after."""
    target = U.hires_target(64, 48, 2.0, 128, 72)
    assert (target.upscale_to_x, target.upscale_to_y, target.truncate_y, target.height) == (128, 96, 3, 72)
    x = torch.arange(12.0).view(1, 1, 12, 1).expand(1, 1, 12, 16)
    assert U.crop_latent(x, target)[0, 0, :, 0].tolist() == [float(r) for r in range(1, 10)]


def test_img2img_step_arithmetic_is_webuis(reference):
    _ref, meta = reference("img2img-sd1-tiny")
    for case in meta["cases"]:
        a = case["step_arithmetic"]
        t_enc = U.img2img_t_enc(a["steps"], case["inputs"]["denoising_strength"])
        assert (t_enc, a["steps"] - t_enc - 1, t_enc + 1) == (a["t_enc"], a["sigma_sched_start_index"],
                                                                a["n_sampler_steps"])


# ---------------------------------------------------------------- settings


def test_defaults_are_webuis_ui():
    s = GenerationSettings(prompt="a", enable_hr=True, seed=1).check()
    assert (s.hr_scale, s.hr_upscaler, s.strength, s.hr_second_pass_steps) == (2.0, "Latent", 0.7, 0)
    assert GenerationSettings(prompt="a", seed=1).check().strength == 0.75  # img2img's


def test_hires_pass_settings(pipe):
    s = pipe.settings(prompt="a", negative_prompt="b", sampler="euler", steps=6, width=64, height=48, seed=3,
                      enable_hr=True, hr_scale=1.5, hr_sampler="dpmpp_2m", hr_second_pass_steps=4,
                      hr_prompt="c")
    hr = s.hires_pass()
    assert (hr.prompt, hr.negative_prompt, hr.sampler, hr.karras, hr.steps, hr.width, hr.height) == \
        ("c", "b", "dpmpp_2m", True, 4, 96, 72)  # "Use same scheduler": Automatic, DPM++ 2M's Karras
    text = pipe.infotext(s)
    assert text.endswith("Denoising strength: 0.7, RNG: NV, Hires sampler: DPM++ 2M, Hires prompt: c, "
                         "Hires schedule type: Karras, Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Latent")


def test_infotext_reads_back_to_the_same_settings(pipe, reference):
    _ref, meta = reference("hires-sd1-tiny")
    for case in meta["cases"]:
        fields, notes = fields_from_infotext(case["infotexts"][0])
        assert not notes and fields["enable_hr"]
        s = pipe.settings(**{**fields, "rng": "cpu"})
        back = pipe.settings(**fields_from_infotext(pipe.infotext(s))[0])
        names = ("sampler", "karras", "steps", "strength", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
                 "hr_second_pass_steps", "hr_scheduler", "width", "height", "seed")
        assert {n: getattr(back, n) for n in names} == {n: getattr(s, n) for n in names}, case["name"]


def test_infotext_without_hires_keys_is_not_hires():
    parsed = generation_settings("a\nSteps: 6, Sampler: Euler, Seed: 1, Denoising strength: 0.5")
    assert parsed["strength"] == 0.5 and not parsed["enable_hr"]


@pytest.mark.parametrize("fields, flag, words", [
    (dict(hr_scale=200.0), "hr_scale", "between 0 and 8"),
    (dict(hr_scale=8.0, width=2048, height=2048), "hr_scale", "larger than the limit of 8192"),
    (dict(hr_resize_x=9000), "hr_resize_x", "between 0 and 8192"),
    (dict(strength=1.5), "strength", "between 0 and 1"),
    (dict(strength=-0.1), "strength", "between 0 and 1"),
    (dict(hr_upscaler="4x-Nonexistent"), "hr_upscaler", "is not an upscaler"),
    (dict(hr_sampler="nope"), "hr_sampler", "unknown"),
    (dict(hr_scheduler="Exponential"), "hr_scheduler", "Automatic, Uniform, Karras"),
    (dict(init_image=torch.zeros(1, 3, 64, 64)), "enable_hr", "takes no init_image"),
])
def test_bad_input_is_one_line(pipe, fields, flag, words):
    base = dict(prompt="a", seed=1, width=64, height=64, steps=2, enable_hr=True)
    with pytest.raises(SettingsError) as e:
        pipe.settings(**{**base, **fields})
    assert e.value.field == flag and words in str(e.value) and "\n" not in str(e.value)


def test_strength_zero_runs_no_second_step(pipe):
    """Fixed steps at strength 0: a schedule of 0 steps (webui's), the upscaled latent decoded as it is."""
    s = pipe.settings(prompt="a", seed=1, width=64, height=64, steps=2, sampler="euler", enable_hr=True,
                      strength=0.0)
    x = torch.randn(1, 4, 8, 8)
    noise = pipe.hires_noise(s)
    upscaled = pipe.upscale(x, s, noise)
    latents = pipe.prepare_hires_latents(upscaled, s, noise)
    assert latents.schedule is None and torch.equal(latents.x, upscaled)


def test_second_pass_noise_is_a_fresh_generator_at_the_new_shape(pipe, reference):
    """``hr.noise``: the same seed's generator started again at [4, 16, 16] (not the first pass's continued)."""
    ref, _meta = reference("hires-sd1-tiny")
    s = pipe.settings(prompt="a", seed=1234, width=64, height=64, steps=2, enable_hr=True, rng="cpu")
    noise = pipe.hires_noise(s)
    assert noise.shape == (4, 16, 16)
    assert torch.equal(noise.start(noise.shape), ref["euler_latent_64_x2.hr.noise"])


def test_image_upscaler_encodes_with_the_images_own_vae_stream(pipe):
    """"Lanczos": decode, 8-bit, resize, encode with the posterior noise of ``derived_seed(seed + i, "vae")``, so
    the same settings give the same latents every time (webui draws it from its global generator)."""
    s = pipe.settings(prompt="a", seed=7, width=64, height=64, steps=2, sampler="euler", enable_hr=True,
                      hr_upscaler="Lanczos", batch_size=2, rng="cpu")
    x = torch.randn(2, 4, 8, 8)
    first = pipe.upscale(x, s, pipe.hires_noise(s))
    again = pipe.upscale(x, s, pipe.hires_noise(s))
    assert first.shape == (2, 4, 16, 16) and torch.equal(first, again)
    drawn = pipe.hires_noise(s).vae((4, 16, 16))
    for i in range(2):  # image i's own stream: a CPU generator seeded from seed + i
        g = torch.Generator("cpu").manual_seed(derived_seed(7 + i, "vae"))
        assert torch.equal(drawn[i], torch.randn((4, 16, 16), generator=g))


def test_sdxl_second_pass_is_conditioned_on_its_own_size(pipes):
    """webui's ``calculate_hr_conds``: the hires prompts at ``hr_upscale_to`` (SDXL's original and target size);
    SD1's conditioning has no size, so the first pass's is reused there."""
    pipe = pipes("sdxl-tiny")
    s = pipe.settings(prompt="a lighthouse", seed=2, width=64, height=64, steps=2, sampler="euler", enable_hr=True,
                      hr_resize_x=128, hr_resize_y=96)
    cond = pipe.encode(s)
    hr = pipe.encode_hires(s, cond)
    at_size = pipe.encode(dataclasses.replace(s, width=128, height=128, enable_hr=False))
    assert torch.equal(hr.cond["y"], at_size.cond["y"]) and not torch.equal(hr.cond["y"], cond.cond["y"])
    image = pipe.generate(s)
    assert image.shape == (1, 3, 96, 128) and torch.isfinite(image).all()
