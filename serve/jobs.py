"""A1111 requests turned into generation plans (on the request's thread: decoding, checks) and plans run on the
worker (on the device): the same GenerationSettings ``pipe(...)`` would get, so the images are the same bytes.

Mapping (A1111 field -> GenerationSettings): sampler_name / sampler_index + scheduler -> sampler, karras
(``registry.from_a1111_name``: v1.10's names with "Automatic" / "Uniform" / "Karras" schedules, the older
combined "DPM++ 2M Karras", and A1111's ``k_`` aliases, ``registry.from_a1111_alias``); seed / subseed -1 ->
random; subseed_strength; steps, cfg_scale, width, height, batch_size; n_iter -> one generation per iteration
with the seeds counting on; denoising_strength -> strength (img2img's, or with enable_hr the hires pass's: A1111's
API default 0.75 when omitted); enable_hr, hr_scale, hr_resize_x / _y, hr_upscaler (None: "Latent"),
hr_second_pass_steps, hr_sampler_name, hr_scheduler ("Use same ..." and None: the first pass's), hr_prompt,
hr_negative_prompt -> the settings' hires fields; eta -> the eta of a sampler that takes one (DDIM;
an ancestral sampler, Euler a, always runs A1111's ancestral eta 1);
``infotext`` fills the fields the request did not send (A1111 v1.10's ``apply_infotext``);
override_settings / options: CLIP_stop_at_last_layers -> clip_skip, randn_source -> rng ("GPU" and "NV" -> nv,
the same numbers on any device; "CPU" -> cpu), sd_model_checkpoint and sd_vae -> the model the job runs on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from tritonsd.sampler.seeds import random_seed
from tritonsd.sampler import inpaint
from tritonsd.serve import controlnet, limits
from tritonsd.serve.errors import ApiError, BadRequest, NotFound, printable
from tritonsd.serve.host import ModelKey
from tritonsd.serve.images import decode_image, png_b64
from tritonsd.serve.schema import (API_DENOISING_STRENGTH, IMG2IMG_FIELDS, SAME, TXT2IMG_FIELDS, apply_infotext,
    ignored_fields, infotext_unsupported, parameters, unsupported_fields, value)
from tritonsd.serve.worker import Interrupted, Job
from tritonsd.sampler.registry import UnknownSamplerError, resolve_name
from tritonsd.sampler import registry
from tritonsd.sampler.settings import LATENT_RESIZE, MAX_BATCH, GenerationSettings
from tritonsd.sampler.upscale import DEFAULT_UPSCALER, hires_target

log = logging.getLogger("tritonsd.serve")

RNG_SOURCES = {"GPU": "nv", "NV": "nv", "CPU": "cpu"}
OVERRIDES_USED = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "randn_source", "eta_ddim")
MAX_MASK_BLUR = 64  # A1111's slider maximum (GenerationSettings checks it too)
_logged_ignored: set[str] = set()


@dataclass
class Options:
    """The server's A1111 options (``/sdapi/v1/options``); keys it does not use are kept and echoed."""

    clip_skip: int = 1
    randn_source: str = "GPU"
    eta_ddim: float = 0.0
    sd_vae: str = "Automatic"
    other: dict = field(default_factory=dict)


@dataclass
class Plan:
    mode: str  # "txt2img" | "img2img"
    settings: object  # GenerationSettings, checked (seed fixed)
    n_iter: int
    key: ModelKey
    restore: bool  # override_settings_restore_afterwards
    subseed: int  # drawn even when unused, as A1111 reports it
    prepared: inpaint.Prepared | None  # plain img2img's resized init image (a mask: settings.inpaint)
    send_images: bool
    ignored: list[str]
    notes: list[str]
    parameters: dict
    saved_maps: tuple = ()  # per ControlNet unit: its detected map joins the images (``serve/controlnet.py``)


# ---------------------------------------------------------------- request -> plan


def _fixed_seed(name: str, v) -> int:
    """A1111's ``get_fixed_seed``: -1 (or null) draws one (``random_seed``: A1111's range)."""
    if v is None or v == -1:
        return random_seed()
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadRequest(f"{name} must be -1 (random) or a non-negative integer, got {printable(v)}")
    return v


def _sampler(name, schedule) -> tuple[str, bool | None]:
    if not isinstance(name, str):
        raise BadRequest(f"sampler_name must be a string, got {printable(name)}")
    if schedule is not None and not isinstance(schedule, str):
        raise BadRequest(f"scheduler must be a string, got {printable(schedule)}")
    try:
        return resolve_name(name, schedule)  # the one reading of a sampler name, every door's
    except UnknownSamplerError as e:
        raise NotFound(f"Sampler not found: {printable(e)}", "SamplerNotFound") from None


def _prompt(name: str, v) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string")
    return v  # its length and tokens: GenerationSettings.check (the project's prompt limits)


def check_options(values: dict, options: Options, catalog) -> dict:
    """The options the server uses, from ``values`` (``/sdapi/v1/options``' body or a request's
    ``override_settings``) over ``options``, each checked: ``{"clip_skip", "randn_source", "eta_ddim"}``; the
    checkpoint and VAE names must be in the catalog. BadRequest / NotFound (one line) otherwise."""
    if "sd_model_checkpoint" in values:
        catalog.find_checkpoint(values["sd_model_checkpoint"])
    if "sd_vae" in values:
        catalog.find_vae(values["sd_vae"])
    clip_skip = values.get("CLIP_stop_at_last_layers", options.clip_skip)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
        raise BadRequest(f"CLIP_stop_at_last_layers must be an integer from 1 to 12, got {printable(clip_skip)}")
    randn = values.get("randn_source", options.randn_source)
    if not isinstance(randn, str) or randn not in RNG_SOURCES:
        raise BadRequest(f"randn_source must be one of {', '.join(RNG_SOURCES)}, got {printable(randn)}")
    eta = values.get("eta_ddim", options.eta_ddim)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise BadRequest(f"eta_ddim must be a number from 0 to 1, got {printable(eta)}")
    return {"clip_skip": clip_skip, "randn_source": randn, "eta_ddim": float(eta)}


def _overrides(req, options: Options, catalog, host) -> tuple[ModelKey, int, str, float, list[str]]:
    """(model key, clip_skip, rng, ddim eta, override keys not used) from ``override_settings`` over the
    server's options, checked as ``/sdapi/v1/options`` checks them."""
    over = req.override_settings or {}
    checked = check_options(over, options, catalog)
    ckpt_name = over.get("sd_model_checkpoint")
    ckpt = catalog.find_checkpoint(ckpt_name) if ckpt_name is not None else None
    vae = catalog.find_vae(over["sd_vae"]) if "sd_vae" in over else host.default.vae
    key = ModelKey(ckpt.path if ckpt is not None else host.default.checkpoint, vae)
    unused = [f"override_settings.{k}" for k in over if k not in OVERRIDES_USED]
    return key, checked["clip_skip"], RNG_SOURCES[checked["randn_source"]], checked["eta_ddim"], unused


def _check_size_first(v, host) -> None:
    """Sides and batch checked, and the memory they need, before any image is decoded or resized (img2img
    resizes the init image to the requested size: a 69-byte PNG asked to become 8192x8192 must cost nothing)."""
    sides = {"width": v("width"), "height": v("height")}
    for name, side in sides.items():
        if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= limits.MAX_SIDE:
            raise BadRequest(f"{name} must be an integer between 8 and {limits.MAX_SIDE}, got {printable(side)}")
    batch = v("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise BadRequest(f"batch_size must be an integer between 1 and {MAX_BATCH}, got {printable(batch)}")
    _check_memory(batch, sides["width"], sides["height"], host)


def _check_memory(batch: int, width: int, height: int, host) -> None:
    pipe = host.pipe
    device = pipe.device if pipe is not None else (host.spec.device or "cpu")
    dtype_bytes = pipe.dtype.itemsize if pipe is not None else 2
    limits.check_memory(batch, width, height, device, dtype_bytes)


def _log_ignored(names: list[str], table: dict) -> None:
    """Each ignored A1111 field is logged once; unknown keys (any text a client makes up) are not remembered,
    so the set stays as small as the field table."""
    unknown = 0
    for name in names:
        known = name in table
        if known and name not in _logged_ignored:
            _logged_ignored.add(name)
            log.warning("request field %s is accepted and ignored (not implemented by tritonsd)", printable(name))
        unknown += not known
    if unknown:
        log.info("a request sent %d keys that are not A1111 fields (ignored)", unknown)


def build_plan(req, mode: str, *, options: Options, catalog, host, ignore_unsupported: bool = False) -> Plan:
    """Everything checked that can be checked without the device; raises ApiError / SettingsError. Fields that ask
    for what is not implemented are a 422 naming them, unless ``ignore_unsupported`` (then they are listed in the
    response's ``ignored_fields`` and the log)."""

    table = TXT2IMG_FIELDS if mode == "txt2img" else IMG2IMG_FIELDS
    unsupported = unsupported_fields(req, table) + infotext_unsupported(req)
    req, infotext_notes = apply_infotext(req)
    v = lambda name: value(req, name, table)  # noqa: E731
    sampler, karras = _sampler(req.sampler_name or v("sampler_index"), req.scheduler)
    key, clip_skip, rng, eta_ddim, unused = _overrides(req, options, catalog, host)
    notes: list[str] = list(infotext_notes)
    eta, spec = req.eta, registry.get(sampler)
    if spec.takes_eta:
        eta = eta_ddim if eta is None else eta
    else:
        if spec.stochastic and eta not in (None, 1, 1.0):  # its ancestral eta is A1111's fixed 1
            unsupported.append("eta")
        eta = 0.0
    if unsupported and not ignore_unsupported:
        raise BadRequest(f"not implemented by tritonsd, and the image would differ from A1111's: "
                         f"{', '.join(printable(n) for n in unsupported)} (leave them out, or start the server "
                         "with --ignore-unsupported)", "UnsupportedFields")
    ignored = ignored_fields(req, table) + unused + unsupported
    seed = _fixed_seed("seed", req.seed)
    subseed = _fixed_seed("subseed", req.subseed)
    strength = v("subseed_strength")
    n_iter = v("n_iter")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 1 <= n_iter <= limits.MAX_N_ITER:
        raise BadRequest(f"n_iter must be between 1 and {limits.MAX_N_ITER}, got {printable(n_iter)}")
    fields = dict(prompt=_prompt("prompt", req.prompt), negative_prompt=_prompt("negative_prompt", req.negative_prompt),
                  sampler=sampler, karras=karras, steps=v("steps"), cfg_scale=v("cfg_scale"), seed=seed,
                  eta=eta, width=v("width"), height=v("height"), batch_size=v("batch_size"), clip_skip=clip_skip,
                  rng=rng, subseed=subseed if strength else None, subseed_strength=strength,
                  tiling=bool(req.tiling))  # null: A1111's opts.tiling, off
    prepared = None
    if mode == "txt2img" and v("enable_hr"):
        fields.update(_hires_fields(req, v, catalog))
    if mode == "img2img":
        _check_size_first(v, host)
        prepared, inpainting = _prepare_images(req, v, fields["width"], fields["height"], notes)
        fields.update(init_image=prepared.image, strength=v("denoising_strength"), **inpainting)
    fields["controls"] = controlnet.units_from_request(req.alwayson_scripts, getattr(catalog, "controlnet_dir", None))
    settings = GenerationSettings(**fields).check()  # a mask: A1111's inpainting prepared here (sampler/inpaint)
    if settings.inpaint is not None:
        notes.extend(settings.inpaint.notes)
    _check_memory(settings.batch_size, settings.width or 512, settings.height or 512, host)
    if settings.enable_hr:
        target = hires_target(settings.width or 512, settings.height or 512, settings.hr_scale, settings.hr_resize_x,
                              settings.hr_resize_y)
        _check_memory(settings.batch_size, target.upscale_to_x, target.upscale_to_y, host)
    _log_ignored(ignored, table)
    no_map = (req.override_settings or {}).get("control_net_no_detectmap",
                                                options.other.get("control_net_no_detectmap", False))
    return Plan(mode, settings, n_iter, key, bool(v("override_settings_restore_afterwards")), subseed, prepared,
                bool(v("send_images")), sorted(set(ignored)), notes, parameters(req, mode == "img2img"),
                controlnet.saved_maps(req.alwayson_scripts, bool(no_map)))


def _hires_fields(req, v, catalog) -> dict:
    """GenerationSettings' hires fields of a txt2img request with ``enable_hr`` (A1111's "Use same ..." and None
    are the first pass's; an omitted denoising strength is the API's 0.75; ``hr_checkpoint_name`` is found in the
    catalog by A1111's names, and given to the settings as its file)."""
    strength = req.denoising_strength
    fields = dict(enable_hr=True, strength=API_DENOISING_STRENGTH if strength is None else strength,
                  hr_scale=v("hr_scale"), hr_resize_x=v("hr_resize_x"), hr_resize_y=v("hr_resize_y"),
                  hr_upscaler=req.hr_upscaler or DEFAULT_UPSCALER, hr_second_pass_steps=v("hr_second_pass_steps"),
                  hr_prompt=_prompt("hr_prompt", req.hr_prompt), hr_negative_prompt=_prompt("hr_negative_prompt",
                                                                                            req.hr_negative_prompt))
    checkpoint = req.hr_checkpoint_name
    if checkpoint not in (None, "", SAME["hr_checkpoint_name"]):
        fields["hr_checkpoint_name"] = catalog.find_checkpoint(checkpoint).path
    name = req.hr_sampler_name
    if name not in (None, "", SAME["hr_sampler_name"]):
        fields["hr_sampler"] = _sampler(name, None)[0]
    schedule = req.hr_scheduler
    if schedule not in (None, "", SAME["hr_scheduler"]):
        if not isinstance(schedule, str) or schedule.strip().lower() not in _SCHEDULE_LABELS:
            raise BadRequest(f"hr_scheduler must be one of {', '.join(_SCHEDULE_LABELS.values())} or "
                             f"{SAME['hr_scheduler']!r}, got {printable(schedule)}")
        fields["hr_scheduler"] = _SCHEDULE_LABELS[schedule.strip().lower()]
    return fields


_SCHEDULE_LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}


def _prepare_images(req, v, width, height, notes: list[str]) -> tuple[inpaint.Prepared, dict]:
    """(the init image, flattened and resized as A1111 does for img2img; the GenerationSettings fields of the
    inpainting). With a mask the init image stays as sent: the settings prepare it (``sampler/inpaint.py``)."""
    images = req.init_images
    if not images:
        raise NotFound("Init image not found", "InitImageNotFound")
    if len(images) > 1:
        raise BadRequest(f"init_images holds {len(images)} images; this server takes one per request")
    init = decode_image("init_images[0]", images[0])
    mask = decode_image("mask", req.mask) if req.mask else None
    blur = req.mask_blur
    blur_x, blur_y = (blur, blur) if isinstance(blur, int) else (v("mask_blur_x"), v("mask_blur_y"))
    ints = {"resize_mode": v("resize_mode"), "mask_blur_x": blur_x, "mask_blur_y": blur_y,
            "inpaint_full_res_padding": v("inpaint_full_res_padding"),
            "inpainting_mask_invert": v("inpainting_mask_invert"), "inpainting_fill": v("inpainting_fill")}
    for name, x in ints.items():
        high = MAX_MASK_BLUR if name.startswith("mask_blur") else limits.MAX_SIDE
        if isinstance(x, bool) or not isinstance(x, int) or x < 0 or x > high:
            raise BadRequest(f"{name} must be an integer between 0 and {high}, got {printable(x)}")
    if ints["resize_mode"] > 3 or ints["inpainting_fill"] > 3 or ints["inpainting_mask_invert"] > 1:
        raise BadRequest("resize_mode and inpainting_fill must be 0..3, inpainting_mask_invert 0 or 1")
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= limits.MAX_SIDE:
            raise BadRequest(f"{name} must be an integer between 8 and {limits.MAX_SIDE}, got {printable(side)}")
    if mask is None and ints["resize_mode"] == LATENT_RESIZE:  # the image as sent, its latent resized
        return inpaint.Prepared(inpaint.flatten(init), None, None, None, []), dict(resize_mode=LATENT_RESIZE)
    if mask is None:
        # ControlNet units without an image preprocess the image as sent (the extension's p.init_images[0]) with
        # img2img's resize mode (3, latent upscale, is Just Resize there too)
        return inpaint.prepare(init, None, width, height, resize_mode=ints["resize_mode"]), \
            {"control_init_image": init, "resize_mode": ints["resize_mode"] % 3}
    fields = dict(mask=mask, mask_blur=(blur_x, blur_y), inpaint_full_res=bool(v("inpaint_full_res")),
                  inpaint_full_res_padding=ints["inpaint_full_res_padding"],
                  inpainting_fill=ints["inpainting_fill"], inpainting_mask_invert=bool(ints["inpainting_mask_invert"]),
                  resize_mode=ints["resize_mode"], width=width, height=height)
    return inpaint.Prepared(init, None, None, None, []), fields


# ---------------------------------------------------------------- plan -> images (on the worker)


def generation_job(plan: Plan, task_id: str | None = None) -> Job:
    return Job(f"scripts_{plan.mode}", lambda worker: run_plan(plan, worker), job_count=plan.n_iter,
               task_id=task_id, key=plan.key)


def run_plan(plan: Plan, worker) -> dict:
    host = worker.host
    worker.progress.update(textinfo="Loading model" if host.key != plan.key else None)
    pipe = host.ensure(plan.key)
    if not plan.restore:
        host.default = plan.key  # A1111 keeps an override when told not to restore
    base, notes = _for_model(plan, pipe)
    batch = base.batch_size
    images, infotexts = [], []
    for it in range(plan.n_iter):
        s = dataclasses.replace(base, seed=base.seed + it * batch,
                                subseed=None if base.subseed is None else base.subseed + it * batch)
        s = pipe.settings(s)
        worker.progress.update(job_no=it, sampling_step=0, sampling_steps=0, textinfo=None)
        pils = _generate(pipe, s, worker)
        for pil in pils:  # an inpainting's are pasted back by the Pipeline (to_pil)
            images.append(pil)
            infotexts.append(pil.info.get("parameters", ""))
        if worker.interrupted:
            break
    return respond(plan, pipe, base, images, infotexts, notes)


def _for_model(plan: Plan, pipe):
    """The plan's settings for the loaded model, and the notes on what differs from A1111 there."""
    s, notes = plan.settings, list(plan.notes)
    inpainting_model = pipe.config.unet.in_channels == 9
    if s.mask is not None and inpainting_model and s.strength != 1.0:
        notes.append("inpainting models repaint the masked area from noise here: denoising_strength is not used")
    return s, notes


def _generate(pipe, s, worker) -> list:
    """PIL images of one iteration; interrupted mid-loop, the last step's denoised latents are decoded (as A1111
    returns what it has)."""
    last: dict = {}

    def step(d: dict) -> None:
        worker.progress.update(sampling_step=d["i"] + 1, sampling_steps=d["total"])
        latent = d.get("denoised", d.get("x"))
        if latent is not None:
            last["latent"] = latent
            worker.previews.offer(d["i"], latent, pipe.config.family)  # a copy started; made on its own thread
            worker.check_interrupt()  # a CUDA-graph replay reports after the loop: nothing left to stop there

    # a CUDA-graph replay: previews copied inside the loop reach the page from a thread of the runner's
    previews_on = getattr(worker.previews, "enabled", True)  # live_previews_enable
    step.preview_every = getattr(worker.previews, "every", 0) if previews_on else 0  # NoPreviews: none
    step.preview = lambda i, latent: worker.previews.offer(i, latent, pipe.config.family)
    try:
        out = pipe.generate(s, callback=step)
    except Interrupted:
        out = pipe.decode(last["latent"], tiling=s.tiling).cpu()
    return pipe.to_pil(out, s)


def respond(plan: Plan, pipe, s, images: list, infotexts: list[str], notes: list[str]) -> dict:
    """A1111's ``TextToImageResponse`` / ``ImageToImageResponse``."""

    spec = registry.get(s.sampler)
    n = len(images)
    all_seeds = [s.seed + i for i in range(n)] or [s.seed]
    all_subseeds = [plan.subseed + i for i in range(n)] or [plan.subseed]
    source = getattr(pipe.model, "source", None)
    info = {
        "prompt": s.prompt, "all_prompts": [s.prompt] * max(n, 1),
        "negative_prompt": s.negative_prompt, "all_negative_prompts": [s.negative_prompt] * max(n, 1),
        "seed": s.seed, "all_seeds": all_seeds, "subseed": plan.subseed, "all_subseeds": all_subseeds,
        "subseed_strength": s.subseed_strength, "width": s.width, "height": s.height,
        "sampler_name": spec.a1111_name, "scheduler": spec.a1111_schedule(bool(s.karras)) or "Automatic",
        "cfg_scale": s.cfg_scale, "steps": s.steps, "batch_size": s.batch_size,
        "restore_faces": None, "face_restoration_model": None,
        "sd_model_name": pipe.name, "sd_model_hash": pipe.model_hash,
        "sd_vae_name": source.vae_name if source is not None else None, "sd_vae_hash": pipe.vae_hash,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": s.strength if plan.mode == "img2img" or s.enable_hr else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": "", "clip_skip": s.clip_skip,
        "is_using_inpainting_conditioning": pipe.config.unet.in_channels == 9,
        "version": "tritonsd", "ignored_fields": plan.ignored, "notes": notes,
    }
    maps = controlnet.detected_maps(s, plan.saved_maps) if plan.send_images and any(plan.saved_maps) else []
    return {"images": [png_b64(im) for im in images] + maps if plan.send_images else [],
            "parameters": plan.parameters, "info": json.dumps(info)}


def switch_job(key: ModelKey) -> Job:
    """POST /options' model switch, queued behind the jobs already waiting (they run on the model they
    asked for)."""

    def run(worker):
        worker.progress.update(textinfo="Loading model")
        worker.host.ensure(key)
        worker.host.default = key
        return None

    return Job("switch_model", run, key=key)


__all__ = ["ApiError", "Options", "Plan", "build_plan", "check_options", "generation_job", "switch_job"]
