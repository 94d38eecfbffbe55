"""The generation pipeline: inpainting parity with runwayml's ``inpaint_st.py`` run (fixture), the SD1 / SD2
sampler wiring against the original runs, img2img against independent computations, ``generate`` end to end
(determinism, seeds, callbacks, modes) and every settings error. SDXL is in test_sdxl_sampling.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tritonsd import pipeline as P
from tritonsd.sampler import registry
from tritonsd.sampler import schedule as S
from tritonsd.sampler import wiring as W
from tritonsd.sampler.noise import ImageNoise, derived_seed
from tritonsd.sampler.rng import PhiloxGenerator
from tritonsd.sampler.settings import GenerationSettings, SettingsError
from tritonsd.sampler.vae_io import inpaint_conditioning, posterior_sample
from tritonsd.testing.groups import StoredNoise
from tritonsd.testing.reference import relative_error

from conftest import FP32_BOUND
from float_bounds import Reductions, reorder_bound

SMALL = dict(width=64, height=64)  # latent 8x8: the smallest size the tiny SD1 UNet takes


def check(actual, ref, what, bound=FP32_BOUND):
    err = relative_error(actual, ref)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound}"


@pytest.fixture(scope="module")
def models(pipes):
    return lambda name: pipes(name).model


def smooth_image(h=64, w=64):
    """A deterministic test picture in [-1, 1] (gradients and a disc)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.25).float()
    return torch.stack([x, y * 0.8, disc * 1.6 - 0.8])[None].clamp(-1, 1)


def run(pipe, **kw):
    return pipe.generate(pipe.settings(**{"prompt": "a red circle", "steps": 2, **SMALL, **kw}))


def spec(name):
    return registry.get(name)


# ---------------------------------------------------------------- inpainting parity (runwayml inpaint_st.py)


@pytest.fixture(scope="module")
def inpaint_run(pipes, reference):
    pipe = pipes("sd1-inpaint-tiny")
    ref, meta = reference("sd1-inpaint-tiny")
    ic = inpaint_conditioning(pipe.model, ref["inpaint.image"], ref["inpaint.mask"],
                              ref["inpaint.masked_image_noise"])
    settings = pipe.settings(prompt=meta["inpaint_prompt"], batch_size=2, cfg_scale=7.5, sampler="ddim", steps=10,
                             init_image=ref["inpaint.image"], mask=ref["inpaint.mask"], seed=0)
    cond = pipe.encode(settings)
    latents = pipe.prepare_latents(settings, StoredNoise(ref["inpaint.x_T"], vae=ref["inpaint.masked_image_noise"]))
    xs = []
    x = pipe.denoise(latents, cond, settings, callback=lambda d: xs.append(d["x"]))
    return {"model": pipe.model, "ref": ref, "ic": ic, "latents_ic": latents.inpaint, "cond": cond.cond,
            "uncond": cond.uncond, "schedule": latents.schedule, "latents": x, "x_inter": torch.stack(xs + [x]),
            "result": pipe.decode(x)}


def test_inpaint_conditioning(inpaint_run):
    r, ref, ic = inpaint_run, inpaint_run["ref"], inpaint_run["ic"]
    check(ic.masked_image, ref["inpaint.masked_image"], "inpaint.masked_image")
    check(ic.mask_latent, ref["inpaint.mask_latent"], "inpaint.mask_latent")
    check(ic.masked_image_latents, ref["inpaint.masked_image_latents"], "masked_image_latents (our VAE)")
    assert torch.equal(r["latents_ic"].c_concat, ic.c_concat)  # the Pipeline's stage computes the same
    from_stored = r["model"].config.scale_factor * posterior_sample(
        ref["inpaint.masked_image_posterior_mean"], 2 * ref["inpaint.masked_image_posterior_std"].log(),
        ref["inpaint.masked_image_noise"])
    check(from_stored, ref["inpaint.masked_image_latents"], "masked_image_latents (stored posterior)")
    check(ic.c_concat, ref["inpaint.c_concat"], "inpaint.c_concat")
    check(r["cond"]["context"], ref["inpaint.cond"], "inpaint.cond")
    check(r["uncond"]["context"], ref["inpaint.uncond"], "inpaint.uncond")


def test_inpaint_sampling(inpaint_run):
    r, ref = inpaint_run, inpaint_run["ref"]
    assert torch.equal(r["schedule"].timesteps, ref["ddim.timesteps"])
    for key in ("latents", "x_inter", "result"):
        check(r[key], ref[f"inpaint.{key}"], f"inpaint.{key}")


# ---------------------------------------------------------------- SD1 / SD2 sampler wiring vs the original runs


SD1_RUNS = {  # fixture run -> (sampler, karras, cfg)
    "ddim_cfg7p5": ("ddim", False, 7.5), "ddim_cfg1p0": ("ddim", False, 1.0), "plms_cfg7p5": ("plms", False, 7.5),
    "euler_cfg7p5": ("euler", False, 7.5), "euler_a_cfg7p5": ("euler_a", False, 7.5),
    "dpmpp_2m_karras_cfg7p5": ("dpmpp_2m", True, 7.5),
}


@pytest.mark.parametrize("name, run", [("sd1-tiny", r) for r in SD1_RUNS] +
                         [("sd2v-tiny", "ddim_cfg7p5"), ("sd2v-tiny", "euler_a_cfg7p5"),
                          ("sd2v-tiny", "dpmpp_2m_karras_cfg7p5")])
def test_sampler_wiring(pipes, reference, name, run):
    """prepare_latents + denoise from the stored x_T reproduce the original's latents."""
    pipe = pipes(name)
    ref, _ = reference(name)
    sampler, karras, cfg = SD1_RUNS[run]
    settings = pipe.settings(sampler=sampler, karras=karras, steps=10, cfg_scale=cfg, batch_size=2, width=128,
                             height=128, seed=0)
    noise = StoredNoise(ref["sample.x_T"], ancestral=ref.get("euler_a_cfg7p5.noise") if sampler == "euler_a" else None)
    latents = pipe.prepare_latents(settings, noise)
    if spec(sampler).space == "sigmas":
        assert torch.equal(latents.schedule, ref["kdiff.sigmas_karras" if karras else "kdiff.sigmas"])
    uncond = None if cfg == 1.0 else {"context": ref["sample.uncond"]}
    x = pipe.denoise(latents, P.Conditioning({"context": ref["sample.cond"]}, uncond), settings)
    assert not noise.left
    check(x, ref[f"{run}.latents"], f"{name} {run}.latents")


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2v-tiny"])
def test_encode_prompts(pipes, reference, name):
    ref, meta = reference(name)
    pipe = pipes(name)
    cond = pipe.encode(pipe.settings(prompt=meta["sample_prompt"], batch_size=2, width=128, height=128))
    check(cond.cond["context"], ref["sample.cond"], f"{name} sample.cond")
    check(cond.uncond["context"], ref["sample.uncond"], f"{name} sample.uncond")
    assert pipe.encode(pipe.settings(prompt="x", cfg_scale=1.0, **SMALL)).uncond is None  # cfg 1: cond only
    neg = pipe.encode(pipe.settings(prompt="x", negative_prompt="ugly", batch_size=2, **SMALL)).uncond
    assert torch.equal(neg["context"], pipe.model.get_learned_conditioning(["ugly", "ugly"]))


# ---------------------------------------------------------------- noise


def test_start_noise_is_per_image_seeded():
    x = ImageNoise((4, 8, 8), 41, 3, source="cpu").start((4, 8, 8))
    for i in range(3):
        assert torch.equal(x[i], torch.randn([4, 8, 8], generator=torch.Generator("cpu").manual_seed(41 + i)))
    x = ImageNoise((4, 8, 8), 41, 3).start((4, 8, 8))  # nv, the default: CUDA's randn of seed + i
    for i in range(3):
        assert torch.equal(x[i], torch.from_numpy(PhiloxGenerator(41 + i).randn((4, 8, 8))))


# ---------------------------------------------------------------- img2img


def vae_noise(seed, shape):
    """The documented VAE-sample stream of image 0."""
    return torch.randn(list(shape), generator=torch.Generator("cpu").manual_seed(derived_seed(seed, "vae")))[None]


@pytest.mark.parametrize("sampler", ["ddim"])
def test_img2img_strength0_is_vae_round_trip(pipes, sampler):
    model = pipes("sd1-tiny").model
    image = smooth_image()
    out = run(pipes("sd1-tiny"), sampler=sampler, init_image=image, strength=0.0, seed=5, cfg_scale=3.0, rng="cpu")
    vae, scale = model.first_stage_model, model.config.scale_factor
    with torch.no_grad():
        mean, logvar = vae.encode(image)
        z = scale * (mean + torch.exp(0.5 * logvar) * vae_noise(5, mean.shape[1:]))
        expected = torch.clamp((vae.decode(z / scale) + 1) / 2, 0, 1)
    check(out, expected, f"{sampler} strength 0", bound=1e-6)


def test_img2img_strength1_equals_txt2img_ddim(pipes):
    model = pipes("sd1-tiny")
    common = dict(sampler="ddim", steps=4, seed=9, cfg_scale=5.0, batch_size=2)
    img2img = run(model, init_image=smooth_image(), strength=1.0, **common)
    txt2img = run(model, **common)
    assert torch.equal(img2img, txt2img)


def test_img2img_start_ddim_matches_stochastic_encode(models):
    """strength 0.5 of 4 DDIM steps: noise to alphas_cumprod[ddim t[2]], then the steps at indices 1, 0."""
    model = models("sd1-tiny")
    schedule = W.make_schedule(model.config, spec("ddim"), 4)
    init, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x, rest = W.img2img_start(schedule, init, noise, 0.5)
    a = model.config.alphas_cumprod[501]  # DDIM timesteps 1, 251, 501, 751
    check(x, a.sqrt() * init + (1 - a).sqrt() * noise, "stochastic_encode", bound=1e-6)
    assert rest.timesteps.tolist() == [1, 251]
    assert torch.equal(rest.alphas_prev, schedule.alphas_prev[:2])
    x1, rest1 = W.img2img_start(schedule, init, noise, 1.0)
    assert x1 is noise and rest1 is schedule
    x0, rest0 = W.img2img_start(schedule, init, noise, 0.0)
    assert x0 is init and rest0 is None


def test_img2img_start_k_samplers(models):
    """webui v1.10's rule: t_enc = int(min(s, 0.999) * n) = 7 of 10, then t_enc + 1 = 8 steps from sigmas[2]; the
    original scripts' rule: t_enc = 7 steps from sigmas[3]."""
    model = models("sd1-tiny")
    sigmas = W.make_schedule(model.config, spec("euler"), 10)
    init, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x, rest = W.img2img_start(sigmas, init, noise, 0.75)
    assert torch.equal(rest, sigmas[2:])
    check(x, init + noise * sigmas[2], "k img2img start", bound=1e-7)
    x, rest = W.img2img_start(sigmas, init, noise, 0.75, rule="original")
    assert torch.equal(rest, sigmas[3:])
    check(x, init + noise * sigmas[3], "k img2img start (original)", bound=1e-7)
    x, rest = W.img2img_start(sigmas, init, noise, 1.0)  # min(1, 0.999): t_enc 9, the whole schedule
    assert torch.equal(rest, sigmas)
    x, rest = W.img2img_start(sigmas, init, noise, 0.0)  # webui still runs one step, from the smallest sigma
    assert torch.equal(rest, sigmas[9:])


def test_img2img_callback_counts_strength_steps(pipes):
    """4 steps at 0.5: t_enc = 2, webui's t_enc + 1 = 3 steps."""
    pipe = pipes("sd1-tiny")
    seen = []
    pipe.generate(pipe.settings(prompt="a", sampler="dpmpp_2m", steps=4, strength=0.5, init_image=smooth_image(),
                                **SMALL), callback=lambda d: seen.append((d["i"], d["total"])))
    assert seen == [(0, 3), (1, 3), (2, 3)]


# ---------------------------------------------------------------- generate end to end


@pytest.mark.parametrize("sampler", registry.SAMPLERS)
def test_generate_each_sampler(pipes, sampler):
    pipe = pipes("sd1-tiny")
    seen = []
    settings = pipe.settings(prompt="a red circle", negative_prompt="blue", sampler=sampler, steps=2, seed=3,
                             **SMALL)
    a = pipe.generate(settings, callback=lambda d: seen.append((d["i"], d["total"])))
    assert a.shape == (1, 3, 64, 64) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert seen == [(0, 2), (1, 2)]
    assert torch.equal(pipe.generate(settings), a)  # same seed: bitwise the same
    b = pipe.generate(dataclasses.replace(settings, seed=4))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("sampler, cfg, calls", [("euler", 7.5, [4, 4]), ("euler", 1.0, [2, 2]),
                                                 ("plms", 7.5, [4, 4, 4]), ("ddim", 0.0, [4, 4])])
def test_cfg_is_one_batched_unet_call(pipes, monkeypatch, sampler, cfg, calls):
    """[uncond, cond] in one UNet call per model evaluation; cond only at cfg 1 (PLMS's first step evaluates
    twice)."""
    pipe = pipes("sd1-tiny")
    model = pipe.model
    seen = []
    apply_model = model.apply_model

    def counting(x, t, context, y=None, t_emb=None):
        seen.append(x.shape[0])
        assert context.shape[0] == x.shape[0]
        return apply_model(x, t, context, y, t_emb=t_emb)

    monkeypatch.setattr(model, "apply_model", counting)
    run(pipe, sampler=sampler, cfg_scale=cfg, batch_size=2)
    assert seen == calls


def test_batch_image_i_is_seed_plus_i(pipes):
    """Start noise and ancestral noise are per image: image 1 of seed 7 is image 0 of seed 8, within the float32
    reordering bound of the whole run (text towers, UNet steps, VAE decode) since the batches differ."""
    pipe = pipes("sd1-tiny")
    pair = run(pipe, sampler="euler_a", seed=7, batch_size=2)
    with Reductions(pipe.model).record() as reductions:
        single = run(pipe, sampler="euler_a", seed=8, batch_size=1)
    cfg = pipe.settings(prompt="x").cfg_scale  # run()'s: the default
    check(pair[1:], single, "batch image 1 vs seed + 1", bound=reorder_bound(reductions.lengths, cfg))
    assert (pair[0] - pair[1]).abs().max() > 1e-3


def test_ddim_eta_is_seeded(pipes):
    model = pipes("sd1-tiny")
    a = run(model, sampler="ddim", eta=1.0, seed=2)
    assert torch.equal(a, run(model, sampler="ddim", eta=1.0, seed=2))
    assert (a - run(model, sampler="ddim", eta=0.0, seed=2)).abs().max() > 1e-4


def test_generate_v_model_plms(pipes):
    model = pipes("sd2v-tiny")
    out = run(model, sampler="plms", seed=1)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_inpainting_generate(pipes):
    model = pipes("sd1-inpaint-tiny")
    image = smooth_image()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    out = run(model, sampler="ddim", init_image=image, mask=mask, batch_size=2, seed=1)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    # no mask, no image: a full repaint (mask 1, masked image 0) -- what inpaint_st.py computes for a full mask
    full = run(model, sampler="euler", seed=1)
    explicit = run(model, sampler="euler", seed=1, init_image=image, mask=torch.ones(1, 1, 64, 64))
    assert torch.equal(full, explicit)
    # an init image without a mask: img2img with the full-repaint conditioning
    assert torch.isfinite(run(model, sampler="ddim", init_image=image, strength=0.5)).all()


def test_nonfinite_latents_and_image(pipes):
    pipe = pipes("sd1-tiny")
    model = pipe.model
    out_bias = model.model.diffusion_model.out[-1].bias
    saved = out_bias.clone()
    try:
        out_bias.fill_(float("nan"))
        with pytest.raises(P.NonFiniteError, match="sampling"):
            run(pipe, sampler="euler")
    finally:
        out_bias.copy_(saved)
    conv_out = model.first_stage_model.decoder.conv_out.bias
    saved = conv_out.clone()
    try:
        conv_out.fill_(float("inf"))
        with pytest.raises(P.NonFiniteError, match="VAE decoding"):
            run(pipe, sampler="ddim", init_image=smooth_image(), strength=0.0)
    finally:
        conv_out.copy_(saved)


# ---------------------------------------------------------------- settings


def test_defaults(pipes):
    s = pipes("sd1-tiny").settings()
    assert (s.width, s.height, s.steps, s.cfg_scale, s.sampler, s.karras) == (512, 512, 20, 7.0, "dpmpp_2m", True)
    assert 0 <= s.seed < 2 ** 32
    s = pipes("sd2v-tiny").settings()
    assert (s.width, s.height) == (768, 768)
    s = pipes("sd1-tiny").settings(init_image=torch.zeros(1, 3, 128, 192))
    assert (s.width, s.height) == (192, 128)
    assert pipes("sd1-tiny").settings(width=128).height == 128  # one side given: a square
    s = pipes("sd1-tiny").settings(width=72, height=56)  # any multiple of 8, as AUTOMATIC1111
    assert (s.width, s.height) == (72, 56)
    assert pipes("sd1-tiny").settings(sampler="euler").karras is False  # A1111's "Euler": uniform sigmas
    assert pipes("sd1-tiny").settings(sampler="euler_a", karras=True).karras is True


BAD = [  # (model, settings overrides, message fragment)
    ("sd1-tiny", dict(width=100), "multiple of 8"),
    ("sd1-tiny", dict(height=60), "multiple of 8"),
    ("sd1-tiny", dict(width=0), "at least 8"),
    ("sd1-tiny", dict(width=64.0), "integer"),
    ("sd1-tiny", dict(steps=0), "steps"),
    ("sd1-tiny", dict(steps=1001, sampler="euler"), "steps"),
    ("sd1-tiny", dict(steps=600, sampler="ddim"), "try 499 or 500 steps"),
    ("sd1-tiny", dict(steps=9, sampler="plms"), "try 8 or 10 steps"),
    ("sd1-tiny", dict(steps=3, sampler="ddim"), "try 2 or 4 steps"),
    ("sd1-tiny", dict(strength=1.5, init_image=torch.zeros(1, 3, 64, 64)), "strength"),
    ("sd1-tiny", dict(strength=-0.1), "strength"),
    ("sd1-tiny", dict(cfg_scale=-1.0), "cfg_scale"),
    ("sd1-tiny", dict(cfg_scale=math.nan), "cfg_scale"),
    ("sd1-tiny", dict(batch_size=0), "batch"),
    ("sd1-tiny", dict(seed=-2), "seed"),  # -1 is random, as in every door
    ("sd1-tiny", dict(sampler="heun"), "sampler 'heun' is unknown"),
    ("sd1-tiny", dict(sampler="plms", eta=0.5), "eta"),
    ("sd1-tiny", dict(sampler="euler_a", eta=0.5), "eta"),
    ("sd1-tiny", dict(sampler="ddim", eta=-1.0), "eta"),
    ("sd1-tiny", dict(mask=torch.ones(1, 1, 64, 64)), "needs an init_image"),
    ("sd1-tiny", dict(init_image=torch.zeros(1, 3, 64, 64), mask=torch.ones(1, 1, 64, 64), inpainting_fill=7),
     "inpainting_fill must be 0..3"),  # a mask on a 4-channel model inpaints as A1111 does (test_inpaint_a1111)
    ("sd1-inpaint-tiny", dict(init_image=torch.zeros(1, 3, 64, 64), mask=torch.ones(1, 1, 64, 128)), "mask is 128x64"),
    ("sd1-tiny", dict(init_image=torch.zeros(1, 3, 64, 128)), "the init image, which is 128x64"),
    ("sd1-tiny", dict(init_image=torch.zeros(3, 64, 64), width=None, height=None), "[1, 3, H, W]"),
    ("sd1-tiny", dict(init_image=torch.full((1, 3, 64, 64), 200.0)), "[-1, 1]"),
    ("sd1-tiny", dict(init_image=torch.full((1, 3, 64, 64), math.nan)), "NaN"),
    ("sd1-inpaint-tiny", dict(init_image=torch.zeros(1, 3, 64, 64), mask=torch.full((1, 1, 64, 64), 2.0)), "[0, 1]"),
    ("sd1-tiny", dict(init_image=torch.zeros(1, 3, 100, 64), width=None, height=None), "multiples of 8"),
    ("sd1-tiny", dict(prompt=None), "string"),
]


@pytest.mark.parametrize("name, overrides, fragment", BAD, ids=[f"{b[0]}-{'-'.join(b[1])}-{i}" for i, b in
                                                                 enumerate(BAD)])
def test_settings_errors(pipes, name, overrides, fragment):
    settings = GenerationSettings(**{**SMALL, **overrides})
    with pytest.raises(SettingsError) as e:
        pipes(name).settings(settings)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_call_validates(pipes):
    with pytest.raises(SettingsError, match="strength"):
        pipes("sd1-tiny")("x", strength=2.0, **SMALL)


def test_schedule_steps_not_dividing_1000(models):
    """12 DDIM steps run 13 (as the original); img2img strength 1 then still equals pure noise."""
    model = models("sd1-tiny")
    schedule = W.make_schedule(model.config, spec("ddim"), 12)
    assert W.num_steps(schedule) == len(S.ddim_timesteps(12)) == 13
    noise = torch.randn(1, 4, 8, 8)
    assert W.img2img_start(schedule, torch.zeros(1, 4, 8, 8), noise, 1.0)[0] is noise
