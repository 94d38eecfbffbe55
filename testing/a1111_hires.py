"""Recomputing AUTOMATIC1111's hires fix and img2img reference files (``shared/fixtures/README-hires.md``:
``hires-*`` and ``img2img-*``, made by webui v1.10.1's own ``process_images``) through the Pipeline's stages.

Every input comes from the JSON's ``cases[*].inputs`` (prompts, seeds, sizes, sampler and schedule, the hires
fields, the denoising strength, ``override_settings``) and its ``opts`` (``randn_source``), except what webui drew
from its global generator: img2img's VAE posterior noise (``CASE.encode.posterior_noise``), and its init image
(``CASE.init_image_u8``), both stored. Each case is one group; its tensors are recomputed as the stages produce
them: the first pass (``prepare_latents``, ``denoise``), the upscale, the second pass (``prepare_hires_latents``,
``encode_hires``, ``denoise``), the decode.

The noise source: webui's "GPU" source on the CPU device the references were made on draws from a CPU
``torch.Generator`` (our ``cpu`` source), its "NV" is our ``nv``, its "CPU" our ``cpu``. The settings say ``nv``
for "GPU" and "NV" (the same numbers on any device) and ``cpu`` for "CPU"; the infotext is written for webui's
source by its name (``gpu``, ``nv``, ``cpu``: ``RNG`` absent, ``NV``, ``CPU``).

Bounds (README-hires.md and issue 24): the noises exactly, the sigma schedules to the last bit (``ulps_for``: one
unit in the last place: the reference machine's exp / log rounding), the 8-bit images within 1 level,
every other float tensor within 5e-4 of its largest value; the infotext equal to webui's except its ``Version``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch
from PIL import Image

from tritonsd.sampler import registry
from tritonsd.sampler.noise import ImageNoise
from tritonsd.sampler.upscale import hires_steps, interpolate_latent, is_latent_mode
from tritonsd.sampler.vae_io import encode_image
from tritonsd.sampler.wiring import make_schedule
from tritonsd.testing.reference import GroupError

BOUND = 5e-4  # issue 24: webui ran InvokeAI attention on the CPU, 1.3e-4 from plain attention
U8_LEVELS = 1  # 8-bit images within one level
EXACT_SUFFIXES = ("x_T", "noise")
# The sigma schedules: float32-identical but for the last bit. The references were made with torch 2.14.1 on their
# machine's CPU, whose exp / log round a few values of the uniform schedules (2 of 16 schedules' entries in the
# public set) one unit in the last place away from what sampler/schedule.py computes (which matches the original
# code's own references, sd1-tiny's kdiff sigmas, bit for bit); every other value is identical.
SCHEDULE_SUFFIXES = ("sigmas", "sigmas_full", "sigma_sched")
SCHEDULE_ULPS = 1
INPUT_SUFFIXES = ("init_image_u8", "encode.posterior_noise")
KINDS = {"txt2img+hires": "hires", "img2img": "img2img"}
_VERSION = re.compile(r", Version: [^,\n]*")


class HiresGroupError(GroupError):
    """A hires / img2img case that cannot be recomputed from what the file and its JSON hold."""


def kind_of(cases: list[dict]) -> str | None:
    """"hires" / "img2img" when every case says that kind, else None."""
    kinds = {KINDS.get(c.get("kind")) for c in cases}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def is_input(name: str) -> bool:
    return name.endswith(INPUT_SUFFIXES)


def ulps_for(name: str) -> int:
    """Units in the last place a float32 tensor may differ by, elementwise (the schedules' ``SCHEDULE_ULPS``);
    0: compared by ``bound_for``."""
    return SCHEDULE_ULPS if name.endswith(SCHEDULE_SUFFIXES) else 0


def bound_for(name: str) -> float:
    """0 (exactly) for the noises, ``U8_LEVELS`` for 8-bit tensors (compared in levels), else ``BOUND``."""
    if name.endswith(EXACT_SUFFIXES):
        return 0.0
    if name.endswith("_u8"):
        return float(U8_LEVELS)
    return BOUND


def infotext_matches(ours: str, webui: str) -> bool:
    """Equal but for webui's ``Version`` field (the ``RNG`` field included)."""
    return ours == _VERSION.sub("", webui)


class RecordingNoise:
    """A ``NoiseSource`` that keeps the start noise it handed out; ``vae`` may be a stored tensor."""

    def __init__(self, inner, vae: torch.Tensor | None = None):
        self.inner, self._vae, self.x_T = inner, vae, None

    def start(self, shape) -> torch.Tensor:
        self.x_T = self.inner.start(shape)
        return self.x_T

    def vae(self, shape) -> torch.Tensor:
        if self._vae is None:
            return self.inner.vae(shape)
        if tuple(self._vae.shape[1:]) != tuple(shape):
            raise HiresGroupError(f"the stored posterior noise is {list(self._vae.shape)}, the run needs [B, "
                                  f"{', '.join(map(str, shape))}]")
        return self._vae

    def ancestral(self, shape) -> torch.Tensor:
        return self.inner.ancestral(shape)


# ---------------------------------------------------------------- a case's settings


def _case(ctx, group: str) -> dict:
    for case in ctx.meta.get("cases", []):
        if str(case.get("name")) == group:
            return case
    raise HiresGroupError(f"no case {group!r} in the reference JSON's 'cases'")


def _randn_source(ctx, inputs: dict) -> str:
    """webui's ``randn_source`` for the case: its ``override_settings``, else the JSON's ``opts``."""
    over = inputs.get("override_settings") or {}
    source = over.get("randn_source", (ctx.meta.get("opts") or {}).get("randn_source", "GPU"))
    if source not in ("GPU", "NV", "CPU"):
        raise HiresGroupError(f"randn_source {source!r} is not one of GPU, NV, CPU")
    return source


def _noise_source(ctx, webui_source: str) -> str:
    """Our source that draws webui's numbers on the device the reference was made on."""
    devices = str(ctx.meta.get("devices", "cpu")).lower()
    if webui_source == "GPU" and "cuda" not in devices:
        return "cpu"  # webui's "GPU" source on a CPU device is torch.randn with a CPU generator
    return {"GPU": "gpu", "NV": "nv", "CPU": "cpu"}[webui_source]


def case_settings(ctx, case: dict) -> tuple[dict, str]:
    """(GenerationSettings fields, our noise source) of a case's inputs."""
    i = case.get("inputs")
    if not isinstance(i, dict):
        raise HiresGroupError(f"case {case.get('name')!r} gives no inputs")
    try:
        sampler, karras = registry.from_a1111_name(i["sampler_name"], i.get("scheduler"))
        fields = dict(prompt=i["prompt"], negative_prompt=i.get("negative_prompt", ""), seed=i["seed"],
                      batch_size=i.get("batch_size", 1), sampler=sampler, karras=karras, steps=i["steps"],
                      cfg_scale=float(i["cfg_scale"]), width=i["width"], height=i["height"],
                      strength=float(i["denoising_strength"]), use_graphs=False)
    except KeyError as e:
        raise HiresGroupError(f"case {case.get('name')!r}: its inputs give no {e.args[0]!r}") from None
    except registry.UnknownSamplerError as e:
        raise HiresGroupError(f"case {case.get('name')!r}: {e}") from None
    webui_source = _randn_source(ctx, i)
    fields["rng"] = "cpu" if webui_source == "CPU" else "nv"
    if case.get("kind") == "txt2img+hires":
        fields.update(enable_hr=True, hr_scale=float(i.get("hr_scale", 2.0)), hr_resize_x=int(i.get("hr_resize_x", 0)),
                      hr_resize_y=int(i.get("hr_resize_y", 0)), hr_upscaler=i.get("hr_upscaler") or "Latent",
                      hr_second_pass_steps=int(i.get("hr_second_pass_steps", 0)),
                      hr_prompt=i.get("hr_prompt", ""), hr_negative_prompt=i.get("hr_negative_prompt", ""))
        if i.get("hr_sampler_name") not in (None, "Use same sampler"):
            fields["hr_sampler"] = registry.from_a1111_name(i["hr_sampler_name"])[0]
        if i.get("hr_scheduler") not in (None, "Use same scheduler"):
            fields["hr_scheduler"] = i["hr_scheduler"]
    return fields, _noise_source(ctx, webui_source)


def _noise(ctx, s, shape, source: str) -> ImageNoise:
    return ImageNoise(shape, s.seed, s.batch_size, source, s.subseed, s.subseed_strength, ctx.device)


WEBUI_SOURCES = {"GPU": "gpu", "NV": "nv", "CPU": "cpu"}  # webui's randn_source -> ours of the same name


def _check_infotexts(ctx, group: str, case: dict, s) -> None:
    """Our infotext of the settings with webui's noise source by its own name (its "GPU": our ``gpu``, which
    the settings cannot hold on a machine without CUDA, but an infotext can name) against webui's."""
    s = dataclasses.replace(s, rng=WEBUI_SOURCES[_randn_source(ctx, case["inputs"])])
    for index, webui in enumerate(case.get("infotexts") or []):
        ours = ctx.pipe.infotext(s, index)
        ok = infotext_matches(ours, webui)
        ctx.checks.append({"name": f"{group}.infotext[{index}]", "group": group, "pass": ok,
                           "note": None if ok else f"ours: {ours!r}; webui's: {webui!r}"})


def _sampled(ctx, latents, cond, s) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents after the loop, each step's denoised stacked [steps, B, ...])."""
    steps: list[dict] = []
    x = ctx.pipe.denoise(latents, cond, s, callback=steps.append)
    if not steps:
        raise HiresGroupError("the sampler ran no step")
    return x, torch.stack([d["denoised"] for d in steps])


def _decoded(ctx, latents: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """``decoded`` (raw), ``image`` (the pipeline's clamped decode) and ``image_u8`` (webui's truncation)."""
    model = ctx.model
    decoded = model.first_stage_model.decode(latents / model.config.scale_factor)
    image = ctx.pipe.decode(latents)
    u8 = (255.0 * image).to(torch.uint8).permute(0, 2, 3, 1)  # [B, 3, H, W] -> [B, H, W, 3], truncated
    return {f"{prefix}.decoded": decoded, f"{prefix}.image": image, f"{prefix}.image_u8": u8}


# ---------------------------------------------------------------- hires


def hires_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    case = _case(ctx, group)
    fields, source = case_settings(ctx, case)
    pipe = ctx.pipe
    s = pipe.settings(**fields)
    first_noise = RecordingNoise(_noise(ctx, s, pipe.latent_shape(s), source))
    cond = pipe.encode(s)
    latents = pipe.prepare_latents(s, first_noise)
    x, denoised = _sampled(ctx, latents, cond, s)
    target = s.hires_target()
    hr_noise = RecordingNoise(_noise(ctx, s, pipe.hires_noise(s).shape, source))  # webui's second ImageRNG
    upscaled = pipe.upscale(x, s, hr_noise)
    hr_latents = pipe.prepare_hires_latents(upscaled, s, hr_noise)
    hr = s.hires_pass()
    x2, hr_denoised = _sampled(ctx, hr_latents, pipe.encode_hires(s, cond), hr)
    spec = registry.get(hr.sampler)
    out = {f"{group}.x_T": first_noise.x_T, f"{group}.cond": cond.cond["context"],
           f"{group}.first_pass.sigmas": latents.schedule, f"{group}.first_pass.x_init": latents.x,
           f"{group}.first_pass.denoised": denoised, f"{group}.first_pass.latent": x,
           f"{group}.hr.upscaled_latent": upscaled, f"{group}.hr.noise": hr_noise.x_T,
           f"{group}.hr.sigma_sched": hr_latents.schedule, f"{group}.hr.x_init": hr_latents.x,
           f"{group}.hr.denoised": hr_denoised, f"{group}.hr.latent": x2}
    if cond.uncond is not None:
        out[f"{group}.uncond"] = cond.uncond["context"]
    if f"{group}.hr.sigmas_full" in keys:
        length = hires_steps(hr.steps, s.strength)[0]
        out[f"{group}.hr.sigmas_full"] = make_schedule(ctx.config, spec, length, hr.karras)
    if f"{group}.hr.upscaled_latent_precrop" in keys and is_latent_mode(s.hr_upscaler):
        out[f"{group}.hr.upscaled_latent_precrop"] = interpolate_latent(x, target, s.hr_upscaler)
    out.update(_decoded(ctx, x2, group))
    _check_infotexts(ctx, group, case, s)
    return out


# ---------------------------------------------------------------- img2img


def img2img_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    case = _case(ctx, group)
    fields, source = case_settings(ctx, case)
    pipe = ctx.pipe
    u8 = ctx.ref.get(f"{group}.init_image_u8")
    if u8 is None:
        raise HiresGroupError(f"needs the input {group}.init_image_u8, which the reference file does not hold")
    init = Image.fromarray(np.ascontiguousarray(u8.numpy()), "RGB")
    s = pipe.settings(**fields, init_image=init)
    posterior_noise = ctx.get(f"{group}.encode.posterior_noise")
    noise = RecordingNoise(_noise(ctx, s, pipe.latent_shape(s), source), vae=posterior_noise)
    cond = pipe.encode(s)
    latents = pipe.prepare_latents(s, noise)
    x, denoised = _sampled(ctx, latents, cond, s)
    image = s.init_image.to(ctx.device)
    mean, logvar = ctx.model.encode_first_stage(image)
    spec = registry.get(s.sampler)
    out = {f"{group}.init_image": (image + 1.0) / 2.0, f"{group}.encode.posterior_mean": mean,
           f"{group}.encode.posterior_std": torch.exp(0.5 * logvar),
           f"{group}.init_latent": encode_image(ctx.model, image, posterior_noise),
           f"{group}.noise": noise.x_T, f"{group}.cond": cond.cond["context"],
           f"{group}.sigmas_full": make_schedule(ctx.config, spec, s.steps, s.karras),
           f"{group}.sigma_sched": latents.schedule, f"{group}.x_init": latents.x,
           f"{group}.denoised": denoised, f"{group}.latent": x}
    if cond.uncond is not None:
        out[f"{group}.uncond"] = cond.uncond["context"]
    out.update(_decoded(ctx, x, group))
    _check_infotexts(ctx, group, case, s)
    return out


def misfit(model, ref: dict[str, torch.Tensor]) -> str | None:
    """Why the reference cannot belong to ``model`` (one line), or None."""
    cfg = model.config
    for name, t in ref.items():
        if name.endswith((".cond", ".uncond")) and t.shape[-1] != cfg.unet.context_dim:
            return f"{name} is {t.shape[-1]} wide, the checkpoint's context width is {cfg.unet.context_dim}"
        if name.endswith(".x_T") and (t.dim() != 4 or t.shape[1] != cfg.vae.embed_dim):
            return f"{name} has shape {list(t.shape)}, the checkpoint's latents have {cfg.vae.embed_dim} channels"
    return None


HANDLERS = {"hires": hires_group, "img2img": img2img_group}

__all__ = ["BOUND", "HANDLERS", "bound_for", "ulps_for", "case_settings", "infotext_matches", "is_input", "kind_of", "misfit"]
