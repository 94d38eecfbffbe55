"""One settings type for a generation, checked once without a model and resolved once against it.

``GenerationSettings.check()`` needs no model: types, ranges, the sampler's name, images and their sizes; the
CLI calls it before loading anything, so a typo costs no model load. ``resolve(config)`` adds what needs the
model: the family's default size, the image-side rule, DDIM's step counts, the inpainting channels. Both return
a new object and raise ``SettingsError`` naming the field; the CLI turns the field into the flag the user typed
(``cfg_scale`` -> ``--cfg``).

Defaults are AUTOMATIC1111's UI defaults, the same for Python, the CLI, the page and batch: DPM++ 2M with the
"Automatic" schedule (Karras sigmas for DPM++ 2M, the uniform ones for Euler and Euler a: A1111's sampler
defaults), 20 steps, CFG 7, the family's default size, a random seed (``None`` or -1). The HTTP API keeps A1111's
API defaults for the fields a client omits (``serve/schema.py``).

Names: ``sampler`` takes ours ("dpmpp_2m"), A1111's ("DPM++ 2M", "DPM++ 2M Karras", "Euler a") or its aliases
("k_euler_a"); ``karras`` takes True / False / None or A1111's schedule type ("Automatic", "Uniform", "Karras").

Hires fix (``enable_hr``, AUTOMATIC1111's txt2img switch; ``sampler/upscale.py`` has its arithmetic): a second
pass at ``hr_scale`` times the size (or ``hr_resize_x`` x ``hr_resize_y``), from the first pass's latents upscaled
by ``hr_upscaler`` and noised to ``strength`` (the denoising strength). Defaults as webui's UI: scale 2, "Latent",
strength 0.7 (img2img's is 0.75), the first pass's steps, sampler, schedule and prompts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from tritonsd.sampler import control, inpaint as I, registry, schedule as S
from tritonsd.sampler.seeds import SEED_RANGE, random_seed
from tritonsd.sampler.upscale import DEFAULT_UPSCALER, HiresTarget, hires_steps, hires_target
from tritonsd.prompt.chunks import MAX_PROMPT_TOKENS, PromptTooLongError, tokenize_prompt
from tritonsd.prompt.parser import PromptSyntaxError, prompt_schedule
from tritonsd.prompt.tokenizer import get_tokenizer
from tritonsd.escape import escape
from tritonsd.formats.checkpoint_names import USE_SAME as USE_SAME_CHECKPOINT
from tritonsd.lora.apply import LoraError, parse_lora_tags
from tritonsd.sampler.infotext_parse import generation_settings

MAX_STEPS = 1000
DEFAULT_IMG2IMG_STRENGTH = 0.75  # webui's img2img default (its UI's and API's)
DEFAULT_HR_STRENGTH = 0.7  # webui's UI default for the hires pass (its API's is 0.75)
MAX_BATCH = 64
MAX_SIDE = 8192  # pixels per side of any image a generation makes (the hires pass's too)
MAX_HR_SCALE = 8.0
MAX_CLIP_SKIP = 12  # AUTOMATIC1111's slider; the model's own layer count is checked when the prompt is encoded
MAX_CFG_SCALE = 100.0  # AUTOMATIC1111's slider stops at 30; far past it the latents overflow (1e30: NaN images)
MAX_ETA = 1.0  # DDIM's eta: past 1 the step's noise term takes the square root of a negative number
RNG_SOURCES = ("nv", "gpu", "cpu")
PROMPT_SYNTAXES = ("a1111", "original")
VAE_FACTOR_MULTIPLE = 8  # every released VAE: pixels per latent cell
DEFAULT_CFG = 7.0  # AUTOMATIC1111's UI default (and its API's)
DEFAULT_STEPS = 20  # AUTOMATIC1111's UI default (its API's is 50: serve/schema.py)


class SettingsError(ValueError):
    """A setting the pipeline cannot honour; ``field`` names the setting (``cfg_scale``, ``width``, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.detail = message


@dataclass
class GenerationSettings:
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = registry.DEFAULT_SAMPLER
    karras: bool | None = None  # None: the sampler's default schedule (its registry spec's ``karras``)
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG
    seed: int | None = None  # None or -1: random, drawn once by check()
    eta: float = 0.0  # for the samplers that take it (``takes_eta``: DDIM); 0 for the others
    width: int | None = None  # None: the init image's, else the other side, else the family's default
    height: int | None = None
    batch_size: int = 1
    init_image: object = None  # PIL image or [1, 3, H, W] tensor in [-1, 1] (img2img, inpainting)
    mask: object = None  # PIL image or [1, 1, H, W] tensor in [0, 1], 1 = repaint (inpainting)
    strength: float | None = None  # denoising strength, img2img's or the hires pass's (None: 0.75 img2img,
    # 0.7 hires: webui's UI defaults)
    clip_skip: int = 1  # CLIP-L: final_layer_norm(hidden_states[-clip_skip]) (AUTOMATIC1111's; OpenCLIP ignores it)
    rng: str = "nv"  # noise source: "nv" (CUDA's torch.randn on any device), "gpu" (CUDA), "cpu"
    subseed: int | None = None  # variation seed (AUTOMATIC1111's); image i uses subseed + i
    subseed_strength: float = 0.0  # 0: no variation
    pad_cond_uncond: bool = False  # pad the shorter of cond / uncond with empty chunks: one batched UNet call
    prompt_syntax: str = "a1111"  # "a1111": weights, BREAK, long prompts, editing; "original": the original
    # scripts' encoding (one 77-token window, text taken literally)
    use_graphs: bool = True  # CUDA-graph the sigma samplers' loop (CUDA models only)
    # inpainting (an init image and a mask), AUTOMATIC1111's fields with its UI's defaults (sampler/inpaint.py):
    mask_blur: int | tuple = 4  # Gaussian sigma in pixels; (x, y) for A1111's mask_blur_x / mask_blur_y
    inpaint_full_res: bool = False  # "Inpaint area": False whole picture, True only masked
    inpaint_full_res_padding: int = 32  # "Only masked padding, pixels"
    inpainting_fill: int | str = 1  # "Masked content": 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpainting_mask_invert: bool = False  # "Mask mode": True inpaints what is NOT masked
    resize_mode: int = 0  # init image to width x height: 0 just resize, 1 crop and resize, 2 resize and fill,
    # 3 just resize (latent upscale): the image encoded at its own size, its latent resized (img2img without a mask)
    inpainting_mask_weight: float = 1.0  # "Conditional mask weight" of 9-channel inpainting models: how much of
    # the masked area the image conditioning keeps hidden (1: all, webui's default; 0: none)
    inpaint: object = None  # set by check() from a PIL init image and a mask: the prepared ``inpaint.Prepared``
    enable_hr: bool = False  # hires fix: a second pass at a larger size (txt2img only)
    hr_scale: float = 2.0  # the second pass's size: the first's times this (unless hr_resize_x / _y)
    hr_resize_x: int = 0  # the second pass's width (0: from the height and the aspect ratio, or hr_scale)
    hr_resize_y: int = 0
    hr_upscaler: str = DEFAULT_UPSCALER  # a latent mode ("Latent", ...), "Lanczos", "Nearest", "None" or a model
    hr_second_pass_steps: int = 0  # 0: ``steps``
    hr_sampler: str | None = None  # None: the first pass's
    hr_scheduler: str | None = None  # "Automatic", "Uniform", "Karras"; None: the first pass's
    hr_prompt: str = ""  # "": the prompt
    hr_negative_prompt: str = ""  # "": the negative prompt
    hr_checkpoint_name: str | None = None  # the second pass's checkpoint: a path, or a name in the models folder
    # (webui's lookup, ``formats/checkpoint_names.py``); None or "Use same checkpoint": this one
    tiling: bool = False  # seamless textures: every UNet and VAE convolution pads circularly (AUTOMATIC1111's)
    controls: tuple = ()  # ControlNet units (``sampler/control.py`` ControlUnit), applied together (residuals summed)
    control_init_image: object = None  # img2img's init image as given, before its resize to width x height:
    # ControlNet units without an image preprocess this one, as the extension takes webui's p.init_images[0]
    # (None: check() keeps a PIL init_image here; else init_image)

    # ------------------------------------------------------------ without a model

    def check(self) -> "GenerationSettings":
        """A checked copy: numbers typed and in range, images as tensors, a seed drawn when none was given."""
        if not isinstance(self.prompt, str):
            raise SettingsError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise SettingsError("negative_prompt", f"must be a string, got {type(self.negative_prompt).__name__}")
        spec, karras = _sampler(self.sampler, self.karras)
        _flag("use_graphs", self.use_graphs)
        _flag("tiling", self.tiling)
        _flag("pad_cond_uncond", self.pad_cond_uncond)
        _choice("rng", self.rng, RNG_SOURCES)
        _choice("prompt_syntax", self.prompt_syntax, PROMPT_SYNTAXES)
        clip_skip = _integer("clip_skip", self.clip_skip, 1, MAX_CLIP_SKIP)
        subseed = None if self.subseed is None else _integer("subseed", self.subseed, 0, SEED_RANGE - 1)
        subseed_strength = _real("subseed_strength", self.subseed_strength, 0.0, 1.0)
        steps = _integer("steps", self.steps, 1, MAX_STEPS)
        batch = _integer("batch_size", self.batch_size, 1, MAX_BATCH)
        seed = random_seed() if _is_random(self.seed) else _integer("seed", self.seed, 0, SEED_RANGE - batch)
        cfg_scale = _real("cfg_scale", self.cfg_scale, 0.0, MAX_CFG_SCALE)
        eta = _real("eta", self.eta, 0.0, MAX_ETA)
        if eta != 0 and not spec.takes_eta:
            raise SettingsError("eta", f"applies to {_names(lambda s: s.takes_eta)} only ({spec.name} needs 0; "
                                       f"{_names(lambda s: s.stochastic)} always uses ancestral eta 1), got {eta:g}")
        _flag("enable_hr", self.enable_hr)
        if self.strength is None:
            strength = DEFAULT_HR_STRENGTH if self.enable_hr else DEFAULT_IMG2IMG_STRENGTH
        else:
            strength = _real("strength", self.strength, 0.0, 1.0)
        hires = self._check_hires(steps) if self.enable_hr else {}
        try:
            controls = control.check_units(self.controls)
        except control.ControlUnitError as e:
            raise SettingsError("controls", str(e)) from None
        for name in ("prompt", "negative_prompt"):
            check_prompt(name, getattr(self, name), steps, self.prompt_syntax)
        fill = _inpaint_fields(self)
        mask_weight = _real("inpainting_mask_weight", self.inpainting_mask_weight, 0.0, 1.0)
        prepared, width, height = self._prepare_inpaint(fill)
        init_image = mask = None
        if self.init_image is not None:
            if self.enable_hr:
                raise SettingsError("enable_hr", "is txt2img's hires fix: it takes no init_image")
            init_image = image_tensor("init_image", self.init_image if prepared is None else prepared.image,
                                      3, -1.0, 1.0)
        if self.mask is not None:
            if init_image is None:
                raise SettingsError("mask", "needs an init_image to inpaint")
            if self.resize_mode == LATENT_RESIZE:
                raise SettingsError("resize_mode", "3 (latent upscale) with a mask is not implemented; use 0-2")
            if prepared is not None:
                mask = image_tensor("mask", prepared.mask, 1, 0.0, 1.0)
            else:
                mask = image_tensor("mask", self.mask, 1, 0.0, 1.0)
            if mask.shape[-2:] != init_image.shape[-2:]:
                raise SettingsError("mask", f"is {_size(mask)} but the init image is {_size(init_image)}")
        for name, value in (("width", width), ("height", height)):
            if value is not None and _integer(name, value, VAE_FACTOR_MULTIPLE, None) % VAE_FACTOR_MULTIPLE:
                raise SettingsError(name, f"{value} is not a multiple of {VAE_FACTOR_MULTIPLE} (the VAE's factor)")
        if init_image is not None and self.resize_mode == LATENT_RESIZE and mask is None:
            h, w = init_image.shape[-2:]  # any size: the latent is resized (Pipeline.prepare_latents)
            width, height = (int(w) if width is None else width), (int(h) if height is None else height)
        elif init_image is not None:
            h, w = init_image.shape[-2:]
            for name, value in (("width", width), ("height", height)):
                if value is not None and value != (w if name == "width" else h):
                    raise SettingsError(name, f"{value} does not match the init image, which is {w}x{h}; resize "
                                              "the image or leave width and height unset")
            width, height = int(w), int(h)
        elif any(unit.image is None for unit in controls):
            index = next(i for i, unit in enumerate(controls) if unit.image is None)
            raise SettingsError("controls", f"unit {index} has no image, and there is no init image to use instead")
        elif (width is None) != (height is None):
            width = height = width or height  # one side given: a square image
        return dataclasses.replace(self, karras=karras, steps=steps, batch_size=batch, seed=seed,
                                   cfg_scale=cfg_scale, eta=eta, strength=strength, init_image=init_image,
                                   mask=mask, width=width, height=height, clip_skip=clip_skip, subseed=subseed,
                                   subseed_strength=subseed_strength, sampler=spec.name, inpainting_fill=fill,
                                   inpaint=prepared, controls=controls, inpainting_mask_weight=mask_weight,
                                   control_init_image=self._control_init_image(controls), **hires)

    def _control_init_image(self, controls: tuple) -> object:
        """The image ControlNet units without one preprocess (HxWx3 uint8), or None (they use init_image):
        ``control_init_image``, else a PIL init image as given (the extension's ``p.init_images[0]``, before
        img2img's resize or inpainting's crop); kept only while a unit needs it."""
        if not any(unit.image is None for unit in controls):
            return None
        source = self.control_init_image
        if source is None and not isinstance(self.init_image, (torch.Tensor, type(None))):
            source = self.init_image
        try:
            return control.control_image(source)
        except control.ControlUnitError as e:
            raise SettingsError("control_init_image", str(e)) from None

    def _prepare_inpaint(self, fill: int) -> tuple:
        """(prepared, width, height): A1111's pixel-side inpainting (``inpaint.prepare``) of a PIL init image and
        a mask, at width x height (default: the init image's size); (None, width, height) for anything else
        (already prepared; a tensor init image is the model's input as is: no blur, no paste-back)."""
        from PIL import Image

        if self.inpaint is not None:
            return self.inpaint, self.width, self.height
        if self.mask is None or not isinstance(self.init_image, Image.Image):
            return None, self.width, self.height
        init = to_mode(self.init_image, "RGBA" if self.init_image.mode in ("RGBA", "LA", "P") else "RGB")
        mask = self.mask
        if isinstance(mask, torch.Tensor):
            mask = I.mask_image(image_tensor("mask", mask, 1, 0.0, 1.0))
        elif not isinstance(mask, Image.Image):
            raise SettingsError("mask", f"must be a PIL image or a [1, 1, H, W] tensor, got {type(mask).__name__}")
        elif mask.mode != "RGBA":
            mask = to_mode(mask, "L")
        if mask.size != init.size:
            raise SettingsError("mask", f"is {mask.width}x{mask.height} but the init image is "
                                        f"{init.width}x{init.height}")
        width = self.width if self.width is not None else (self.height or init.width)
        height = self.height if self.height is not None else (self.width or init.height)
        for name, value in (("width", width), ("height", height)):
            if _integer(name, value, VAE_FACTOR_MULTIPLE, None) % VAE_FACTOR_MULTIPLE:
                raise SettingsError(name, f"{value} is not a multiple of {VAE_FACTOR_MULTIPLE} (the VAE's factor)")
        blur_x, blur_y = self.mask_blur if isinstance(self.mask_blur, tuple) else (self.mask_blur, self.mask_blur)
        try:
            prepared = I.prepare(init, mask, width, height, resize_mode=self.resize_mode, blur_x=blur_x,
                                 blur_y=blur_y, invert=self.inpainting_mask_invert, full_res=self.inpaint_full_res,
                                 full_res_padding=self.inpaint_full_res_padding, inpainting_fill=fill)
        except I.InpaintError as e:
            raise SettingsError("mask", str(e)) from None
        return prepared, width, height

    def _check_hires(self, steps: int) -> dict:
        """The hires fields checked (without the model): a dict of their checked values."""
        hr_sampler = self.hr_sampler
        if hr_sampler is not None:
            try:
                hr_sampler = registry.resolve_name(hr_sampler)[0] if isinstance(hr_sampler, str) else \
                    registry.get(hr_sampler).name
            except registry.UnknownSamplerError:
                raise SettingsError("hr_sampler", f"{hr_sampler!r} is unknown; choose one of "
                                                  f"{', '.join(registry.SAMPLERS)}") from None
        if self.hr_scheduler is not None:
            _choice("hr_scheduler", self.hr_scheduler, HR_SCHEDULERS)
        if not isinstance(self.hr_upscaler, str) or not self.hr_upscaler:
            raise SettingsError("hr_upscaler", f"must be an upscaler's name, got {self.hr_upscaler!r}")
        for name in ("hr_prompt", "hr_negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise SettingsError(name, f"must be a string, got {type(value).__name__}")
            check_prompt(name, value, steps, self.prompt_syntax)
        hr_scale = _real("hr_scale", self.hr_scale, 0.0, MAX_HR_SCALE)
        if hr_scale == 0:
            raise SettingsError("hr_scale", "must be above 0")
        resize = [_integer(n, getattr(self, n), 0, MAX_SIDE) for n in ("hr_resize_x", "hr_resize_y")]
        checkpoint = self.hr_checkpoint_name
        if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
            raise SettingsError("hr_checkpoint_name", f"must be a checkpoint's name or path, got "
                                                      f"{type(checkpoint).__name__}")
        checkpoint = None if checkpoint is None else os.fspath(checkpoint).strip()
        return dict(hr_scale=hr_scale, hr_resize_x=resize[0], hr_resize_y=resize[1], hr_sampler=hr_sampler,
                    hr_checkpoint_name=None if checkpoint in (None, "", USE_SAME_CHECKPOINT) else checkpoint,
                    hr_second_pass_steps=_integer("hr_second_pass_steps", self.hr_second_pass_steps, 0, MAX_STEPS))

    def hires_target(self) -> HiresTarget:
        """The second pass's size (resolved settings with ``enable_hr``)."""
        return hires_target(self.width, self.height, self.hr_scale, self.hr_resize_x, self.hr_resize_y)

    def hires_pass(self) -> "GenerationSettings":
        """The second pass as settings of its own (resolved settings with ``enable_hr``): its prompts, sampler,
        schedule and steps, at the size it is encoded for (webui's ``hr_upscale_to``, before the crop: SDXL's
        size conditioning takes it)."""
        target = self.hires_target()
        hr_spec = registry.get(self.hr_sampler or self.sampler)
        karras = _SCHEDULE_KARRAS[self.hr_scheduler or "Automatic"]
        return dataclasses.replace(
            self, prompt=self.hr_prompt or self.prompt, negative_prompt=self.hr_negative_prompt or self.negative_prompt,
            sampler=hr_spec.name, karras=hr_spec.karras if karras is None else karras,
            steps=self.hr_second_pass_steps or self.steps, width=target.upscale_to_x, height=target.upscale_to_y,
            enable_hr=False)

    # ------------------------------------------------------------ against the model

    def resolve(self, config) -> "GenerationSettings":
        """A checked copy with everything filled in for the model of ``config`` (a ``ModelConfig``)."""
        s = self.check()
        spec = registry.get(s.sampler)
        in_channels = config.unet.in_channels
        if in_channels not in (4, 9):
            raise SettingsError("model", f"UNets with {in_channels} input channels are not supported (4, or 9 "
                                         "for inpainting)")
        if spec.space == "timesteps":
            check_ddim_steps(s.sampler, s.steps, config.timesteps)
        multiple = side_multiple(config)
        size = default_size(config)
        width = _side("width", s.width if s.width is not None else size, multiple, config)
        height = _side("height", s.height if s.height is not None else size, multiple, config)
        karras = spec.karras if s.karras is None else s.karras
        hires = {}
        if s.enable_hr:
            hires = _resolve_hires(s, width, height, config)
        return dataclasses.replace(s, width=width, height=height, karras=karras, **hires)

    @property
    def mode(self) -> str:
        """"txt2img", "img2img" or "inpaint"."""
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"


MAX_MASK_BLUR = 64  # A1111's slider maximum
RESIZE_MODES = 4  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale (see LATENT_RESIZE)
LATENT_RESIZE = 3  # webui's "Just resize (latent upscale)": img2img's init latent resized bilinearly, not the image


def _inpaint_fields(s: GenerationSettings) -> int:
    """The inpainting fields checked; returns ``inpainting_fill`` as 0..3."""
    blur = s.mask_blur if isinstance(s.mask_blur, tuple) else (s.mask_blur,)
    if len(blur) not in (1, 2):
        raise SettingsError("mask_blur", f"must be an integer or an (x, y) pair, got {s.mask_blur!r}")
    for value in blur:
        _integer("mask_blur", value, 0, MAX_MASK_BLUR)
    _flag("inpaint_full_res", s.inpaint_full_res)
    if s.inpainting_mask_invert not in (0, 1):  # True / False, or A1111's 0 / 1
        raise SettingsError("inpainting_mask_invert", f"must be True or False, got {s.inpainting_mask_invert!r}")
    _integer("inpaint_full_res_padding", s.inpaint_full_res_padding, 0, 256)
    _integer("resize_mode", s.resize_mode, 0, RESIZE_MODES - 1)
    try:
        return I.fill_mode(s.inpainting_fill)
    except I.InpaintError as e:
        raise SettingsError("inpainting_fill", str(e)) from None


HR_SCHEDULERS = ("Automatic", "Uniform", "Karras")  # AUTOMATIC1111's labels of the schedules we have
_SCHEDULE_KARRAS = {"Automatic": None, "Uniform": False, "Karras": True}


def _resolve_hires(s: GenerationSettings, width: int, height: int, config) -> dict:
    """The hires fields resolved for the model: the second pass's schedule named ("use same" is the first pass's
    schedule: its label, so that "Automatic" stays the hires sampler's own default) and its size checked."""
    if s.hr_scheduler is None:
        hr_scheduler = "Automatic" if s.karras is None else ("Karras" if s.karras else "Uniform")
    else:
        hr_scheduler = s.hr_scheduler
    target = hires_target(width, height, s.hr_scale, s.hr_resize_x, s.hr_resize_y)
    field = "hr_scale" if s.hr_resize_x == 0 and s.hr_resize_y == 0 else "hr_resize_x"
    if target.width < VAE_FACTOR_MULTIPLE or target.height < VAE_FACTOR_MULTIPLE:
        raise SettingsError(field, f"gives a {target.width}x{target.height} image: below one latent cell")
    if max(target.upscale_to_x, target.upscale_to_y) > MAX_SIDE:
        raise SettingsError(field, f"makes the second pass {target.upscale_to_x}x{target.upscale_to_y}, larger than "
                                   f"the limit of {MAX_SIDE} pixels per side")
    hr_spec = registry.get(s.hr_sampler or s.sampler)
    hr_steps = s.hr_second_pass_steps or s.steps
    if hr_spec.space == "timesteps":
        check_ddim_steps(hr_spec.name, hires_steps(hr_steps, s.strength)[0] or 1, config.timesteps)
    return {"hr_scheduler": hr_scheduler}


def _is_random(seed) -> bool:
    """None or -1 (AUTOMATIC1111's "random"), as every door reads a seed."""
    return seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed == -1)


def _sampler(name, karras) -> tuple[registry.SamplerSpec, bool | None]:
    """(spec, karras) from any sampler name (``registry.resolve_name``) and ``karras`` as a bool, None or an
    A1111 schedule type; a combined name's " Karras" applies unless ``karras`` says otherwise."""
    if not isinstance(name, str):
        raise SettingsError("sampler", f"must be a string, got {name!r}")
    if isinstance(karras, str):
        try:
            karras = registry.schedule_karras(karras)
        except registry.UnknownSamplerError as e:
            raise SettingsError("karras", str(e)) from None
    _flag("karras", karras, allow_none=True)
    try:
        ours, named_karras = registry.resolve_name(name)
    except registry.UnknownSamplerError:
        choices = ", ".join(f"{s.name} ({s.a1111_name})" for s in registry.SAMPLERS.values())
        raise SettingsError("sampler", f"{name!r} is unknown; choose one of {choices}") from None
    return registry.get(ours), named_karras if karras is None else karras


def _names(has) -> str:
    """The registry's samplers with a property, for messages: "a", "a and b"."""
    names = [spec.name for spec in registry.SAMPLERS.values() if has(spec)]
    return " and ".join(names)


# ---------------------------------------------------------------- prompts


MAX_PROMPT_CHARS = 10_000  # refused before tokenizing: 1,000 tokens of text are some 5,000 characters


def check_prompt(name: str, text: str, steps: int, syntax: str) -> None:
    """A prompt the encoders can take, checked without a model: UTF-8 text without NUL, at most the prompt limit
    (``MAX_PROMPT_TOKENS`` after parsing, for every text of its editing schedule; embedding names count as the
    tokens they spell) and valid syntax. Errors give the count and a short excerpt, never the prompt itself."""

    if "\x00" in text:
        raise SettingsError(name, f"holds a NUL character ({_excerpt(text)})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SettingsError(name, f"is not valid Unicode text (a lone surrogate) ({_excerpt(text)})") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise SettingsError(name, f"has {len(text):,} characters ({_excerpt(text)}); the limit is "
                                  f"{MAX_PROMPT_TOKENS:,} tokens")
    if syntax != "a1111" or not text:
        return
    _check_lora_tags(name, text)
    try:
        tokenizer = get_tokenizer("transformers")
        for _end, scheduled in prompt_schedule(text, steps):
            tokenize_prompt(scheduled, tokenizer)
    except (PromptTooLongError, PromptSyntaxError) as e:
        raise SettingsError(name, f"is not usable: {e} ({_excerpt(text)})") from None


def _check_lora_tags(name: str, text: str) -> None:
    """The prompt's ``<lora:name:w>`` tags well formed, their multipliers in range (the files are looked up when
    the model applies them)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown extra-network types: the pipeline warns when it runs
            parse_lora_tags(text)
    except LoraError as e:
        raise SettingsError(name, f"is not usable: {e}") from None


def _excerpt(text: str, limit: int = 40) -> str:
    """The first characters of untrusted text, control characters escaped."""

    return f'"{escape(text, limit)}"'


# ---------------------------------------------------------------- from an AUTOMATIC1111 infotext


INFOTEXT_FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "clip_skip", "rng",
                   "subseed", "subseed_strength", "tiling", "inpainting_mask_weight")
HIRES_INFOTEXT_FIELDS = ("strength", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
                         "hr_second_pass_steps", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
                         "hr_checkpoint_name")
# img2img's and inpainting's keys (``Denoising strength``, ``Mask blur``, ...): what a run with an init image (and a
# mask) takes from the text; absent keys are webui's paste defaults, which are ours
IMG2IMG_INFOTEXT_FIELDS = ("strength", "mask_blur", "inpainting_mask_invert", "inpaint_full_res",
                           "inpaint_full_res_padding", "inpainting_fill")


def fields_from_infotext(text: str) -> tuple[dict, list[str]]:
    """(GenerationSettings fields, notes) from an AUTOMATIC1111 ``parameters`` text: prompt, negative prompt,
    steps, sampler and schedule type, CFG scale, seed, size, clip skip, RNG, variation seed and tiling; hires fix's
    fields; img2img's denoising strength and the inpainting's mask blur, mask mode, inpaint area, masked area padding
    and masked content (``IMG2IMG_INFOTEXT_FIELDS``). Unknown keys are
    ignored; each malformed value is left out with one note line; an unknown sampler is a ``SettingsError``."""

    parsed = generation_settings(text)
    fields = {k: parsed[k] for k in INFOTEXT_FIELDS if k in parsed}
    if "sampler" in parsed:
        try:
            fields["sampler"], fields["karras"] = registry.from_a1111_name(parsed["sampler"],
                                                                            parsed.get("schedule_type"))
        except registry.UnknownSamplerError as e:
            raise SettingsError("sampler", f"from the infotext: {e}") from None
    if fields.get("subseed_strength", 0.0) == 0.0:
        fields.pop("subseed", None)
    if not parsed.get("enable_hr"):  # img2img / inpainting (a txt2img run ignores them)
        fields.update({k: parsed[k] for k in IMG2IMG_INFOTEXT_FIELDS if k in parsed})
    if parsed.get("controlnet"):  # no image: the PNG does not hold it (control.models.attach_images)
        try:
            fields["controls"] = tuple(control.ControlUnit(**unit) for unit in parsed["controlnet"])
        except TypeError as e:
            raise SettingsError("controls", f"from the infotext: {e}") from None
    if parsed.get("enable_hr"):  # webui's paste: "Denoising strength" and a "Hires ..." size or upscaler
        fields["enable_hr"] = True
        fields.update({k: parsed[k] for k in HIRES_INFOTEXT_FIELDS if k in parsed})
        if "hr_sampler" in parsed:
            try:
                fields["hr_sampler"] = registry.from_a1111_name(parsed["hr_sampler"])[0]
            except registry.UnknownSamplerError as e:
                raise SettingsError("hr_sampler", f"from the infotext: {e}") from None
    return fields, parsed["notes"]


# ---------------------------------------------------------------- the image-side rule (one place)


DEFAULT_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # SD2 v-prediction models: 768 (see default_size)


def default_size(config) -> int:
    """Training resolution of the family: SD1 512, SD2 768 for v-prediction (512 for the eps base), SDXL 1024."""
    if config.family == "sd2" and config.parameterization == "v":
        return 768
    return DEFAULT_SIZE[config.family]


def vae_factor(config) -> int:
    """Pixels per latent cell (8 for every released VAE)."""
    return 2 ** (len(config.vae.ch_mult) - 1)


def side_multiple(config) -> int:
    """Image sides must be multiples of this: the VAE factor (8 for every released VAE). The UNet takes any
    latent size: where an upsampled tensor and its skip connection differ, it resizes the upsampled one, as
    AUTOMATIC1111's ``sd_hijack_unet`` does."""
    return vae_factor(config)


SIDE_RULE = f"a multiple of {VAE_FACTOR_MULTIPLE}"  # side_multiple of every released VAE, for help texts


def _side(name: str, value: int, multiple: int, config) -> int:
    if value < multiple or value % multiple:
        raise SettingsError(name, f"{value} is not a positive multiple of {multiple} (this {config.family} model's "
                                  f"VAE maps {multiple} pixels to one latent cell)")
    return value


# ---------------------------------------------------------------- DDIM step counts


def _ddim_steps_ok(steps: int, num_timesteps: int) -> bool:
    return int(S.ddim_timesteps(steps, num_timesteps)[-1]) < num_timesteps


def check_ddim_steps(sampler: str, steps: int, num_timesteps: int) -> None:
    """The original's uniform DDIM timesteps ``range(0, T, T // steps) + 1`` reach T itself (past the schedule)
    when ``T // steps`` divides T - 1: e.g. 3, 9, 27, 37 or more than 500 steps of 1000. The original fails
    there too; name the nearest step counts that work."""
    if _ddim_steps_ok(steps, num_timesteps):
        return
    ok = [n for n in range(1, num_timesteps // 2 + 1) if _ddim_steps_ok(n, num_timesteps)]
    near = sorted(ok, key=lambda n: (abs(n - steps), n))[:2]
    raise SettingsError("steps", f"{steps} cannot be run by {sampler}: its uniform timesteps would reach "
                                 f"timestep {num_timesteps}, past the schedule (as in the original); try "
                                 f"{' or '.join(map(str, sorted(near)))} steps")


# ---------------------------------------------------------------- value checks


def _integer(name: str, value, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SettingsError(name, f"must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise SettingsError(name, f"must be {bound}, got {value}")
    return value


def _real(name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise SettingsError(name, f"must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise SettingsError(name, f"must be {bound}, got {value:g}")
    return value


def _flag(name: str, value, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise SettingsError(name, f"must be True or False, got {value!r}")


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(name, f"must be one of {', '.join(choices)}, got {value!r}")


def check_rng_device(rng: str, device) -> None:
    """``rng="gpu"`` draws with CUDA's generator: refused on a CPU device (``nv`` gives the same numbers)."""
    if rng == "gpu" and torch.device(device).type != "cuda":
        raise SettingsError("rng", "gpu draws noise on CUDA, and this model runs on the CPU; use nv (the same "
                                   "numbers, computed anywhere) or cpu")


def _size(t: torch.Tensor) -> str:
    return f"{t.shape[-1]}x{t.shape[-2]}"


def to_mode(image, mode: str):
    """``image`` as 8-bit ``mode`` ("RGB" or "L"): CMYK, palette (with transparency too) and 16-bit images
    converted without Pillow's warnings; 16-bit grey scaled to 8 bits (Pillow's own conversion would clip it)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    if image.mode == mode:
        return image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if image.mode == "P":
            image = image.convert("RGBA")
        return image.convert(mode)


def image_tensor(name: str, image, channels: int, low: float, high: float) -> torch.Tensor:
    """A PIL image (RGB for 3 channels, greyscale for 1) or a [1, C, H, W] tensor, checked, as a float32
    tensor in [low, high]: RGB pixels map to [-1, 1], mask pixels to [0, 1]. Sides must be multiples of 8."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.asarray(to_mode(image, "RGB" if channels == 3 else "L"), dtype=np.float32).copy())
        if channels == 3:
            image = (pixels / 127.5 - 1.0).permute(2, 0, 1)[None]  # [H, W, 3] -> [1, 3, H, W] in [-1, 1]
        else:
            image = (pixels / 255.0)[None, None]  # [H, W] -> [1, 1, H, W] in [0, 1]
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != channels:
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise SettingsError(name, f"must be a PIL image or a [1, {channels}, H, W] tensor, got {shape}")
    if not image.is_floating_point():
        raise SettingsError(name, f"must be a floating-point tensor, got {image.dtype}")
    if not torch.isfinite(image).all():
        raise SettingsError(name, "contains NaN or Inf")
    lo, hi = image.min().item(), image.max().item()
    if lo < low - 1e-3 or hi > high + 1e-3:
        raise SettingsError(name, f"values must be in [{low:g}, {high:g}], got [{lo:.4g}, {hi:.4g}]")
    h, w = image.shape[-2:]
    if h % VAE_FACTOR_MULTIPLE or w % VAE_FACTOR_MULTIPLE:
        raise SettingsError(name, f"is {w}x{h}; its sides must be multiples of {VAE_FACTOR_MULTIPLE}")
    return image.float()
