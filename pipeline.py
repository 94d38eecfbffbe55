"""The Pipeline: a loaded model and everything that turns settings into images. It is the product; the command
line, ``tritonsd parity`` and ``tritonsd bench e2e`` all run its stages.

    pipe = tritonsd.load("v1-5-pruned-emaonly.safetensors")
    images = pipe("a red fox in snow", seed=42)          # PIL images; info["parameters"] is the infotext
    pipe.save(images, "outputs/")

The stages, public so a caller can stop at conditioning or at latents:

    settings = pipe.settings(prompt=..., ...)       GenerationSettings, checked and resolved for this model
    cond     = pipe.encode(settings)                Conditioning: cond / uncond keyword dicts for the UNet
    latents  = pipe.prepare_latents(settings)       Latents: the first latent, the schedule left to run,
                                                    inpainting's c_concat, the noise source
    x        = pipe.denoise(latents, cond, settings, callback)   the sampler loop (CUDA graph where it can)
    images   = pipe.decode(x, tiling=settings.tiling)   [B, 3, H, W] float32 in [0, 1]

Hires fix (``enable_hr``, AUTOMATIC1111 v1.10's txt2img second pass) adds stages between ``denoise`` and
``decode``, each made of the ones above:

    x2       = pipe.upscale(x, settings, noise2)    the first pass's latents upscaled (a latent mode, or decoded,
                                                    resized by an image upscaler and encoded again) and cropped
    latents2 = pipe.prepare_hires_latents(x2, settings, noise2)   noised by webui's fixed-steps rule
    x        = pipe.denoise(latents2, pipe.encode_hires(settings, cond), settings.hires_pass())

(``hires`` runs the three.) ``noise2`` is a fresh ``ImageNoise`` of the same seeds at the second pass's latent
shape (webui's new ``ImageRNG``); an image upscaler's VAE encode samples its posterior with that source's
per-image VAE stream (``derived_seed(seed + i, "vae")``), where webui draws from its global generator, so the
same settings give the same bytes through every door. On CUDA the second pass is its own captured loop: the
graph runner keeps both loops.

Modes follow the settings: no init image is txt2img (``scripts/txt2img.py``; SDXL as sgm's
``SamplingPipeline.text_to_image``), an init image img2img (``scripts/img2img.py``; see ``sampler/wiring.py``),
an init image and a mask inpainting as AUTOMATIC1111 does it (``sampler/inpaint.py``: mask blur, only masked,
masked content, paste-back outside the mask; for a PIL init image, prepared by ``GenerationSettings.check``).
A 4-channel model inpaints by img2img of the init latent (``strength``) with A1111's per-step latent masking; a
9-channel model (runwayml ``scripts/inpaint_st.py``) repaints from noise with the image conditioning
``c_concat`` and ignores ``strength``. A 9-channel model always gets ``c_concat``: without a mask it repaints
everything (mask all ones, masked image all zeros), which is what ``inpaint_st.py`` computes for a full mask.

SDXL: the unconditional side is the original's zeroed text features (``force_uc_zero_embeddings``) when the
negative prompt is empty, else the encoded negative prompt; size conditioning: original size = target size =
(height, width), crop (0, 0).

ControlNet (``settings.controls``, ``ControlUnit``s as sd-webui-controlnet defines them): ``denoise`` makes each
unit's control map at the loop's size (``control/preprocess.detect``; an img2img init image, as given before any
resize, serves a unit without an image; "only masked" inpainting cuts every unit's image to the masked region),
loads each ControlNet file once (``controlnet``), and runs the UNet with the units' residuals added,
step by step as the extension's hook does (``control/apply.py``); a unit of weight 0 is left out. Hires fix's
second pass gets its own control maps at its size. Units name their model by file, or by name (``name [hash]``)
in the pipeline's ``controlnet_dir``.

Tiling (``settings.tiling``, seamless textures): every convolution of the UNet and the VAE pads circularly, as
AUTOMATIC1111's ``apply_circular`` sets it for a generation: the VAE encode of an init image, the sampler loop
and the decode. Each stage switches it on for its own length (``model.layers.circular_padding``) and leaves the
model as it found it; a captured CUDA graph of the loop is keyed by it.

The Pipeline owns the model, its CUDA-graph runner (``sampler/graph.py``: the sigma samplers' loop captured
once per loop shape and replayed, on CUDA) and its VAE decode guard (a non-finite half-precision decode is
redone in float32). Nothing is hung on the ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tritonsd.control import apply as C
from tritonsd.control.models import attach_images, resolve_units
from tritonsd.control.preprocess import detect, sources
from tritonsd.kernels import dispatch
from tritonsd.load_spec import CheckedSpec, LoadSpec
from tritonsd.model import hoist
from tritonsd.model.controlnet import ControlNet, ControlNetError, load_controlnet
from tritonsd.model.layers import circular_padding
from tritonsd.model.load import load_model
from tritonsd.model.vae_guard import VAEDecodeGuard
from tritonsd.sampler import denoise as D, inpaint as I, registry
from tritonsd.sampler.graph import GraphCaptureError, GraphRunner, tables_on_device
from tritonsd.sampler.infotext import generation_infotext, save_numbered, to_pil
from tritonsd.sampler.control import ControlUnitError, acts_in_pass, module_of
from tritonsd.sampler.infotext_parse import parse_infotext
from tritonsd.sampler.noise import ImageNoise, NoiseSource
from tritonsd.sampler.reproduce import check_networks, with_lora_tags
from tritonsd.sampler.memory import memory_shortfall
from tritonsd.sampler.settings import (check_rng_device, default_size, fields_from_infotext, GenerationSettings,
    LATENT_RESIZE, SettingsError, vae_factor)
from tritonsd.sampler.upscale import crop_latent, hires_steps, is_latent_mode, upscale_latent
from tritonsd.sampler.vae_io import (InpaintConditioning, NonFiniteError, check_finite, decode_clamped, encode_image,
    inpaint_conditioning)
from tritonsd.sampler.wiring import (build_denoiser, img2img_start, make_schedule, num_steps, sigma_denoiser,
    start_at, txt2img_start)
from tritonsd.lora.apply import find_lora, LoraError, LoraSpec, LoraState, parse_lora_tags
from tritonsd.prompt.encode import (call_rows, encode_schedule, load_model_embeddings, pad_to_same_length,
                                     unet_keywords)
from tritonsd.formats.checkpoint_names import CheckpointNotFound, find_checkpoint, short_title
from tritonsd.formats.embeddings import ti_hashes
from tritonsd.upscalers import UnknownUpscalerError, Upscalers

StepCallback = Callable[[dict], None]


@dataclass
class Conditioning:
    """The UNet's conditioning keywords for both sides of the guidance: ``{"context"}`` (SD1/2) or
    ``{"context", "y"}`` (SDXL), float32, one row per image; ``uncond`` is None when CFG is off (scale 1). The two
    sides may differ in token length (77 * chunks): the guidance then makes two UNet calls. With prompt editing
    (``per_step``) every tensor is a table [calls, B, ...] whose row k serves the k-th model call."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None
    per_step: bool = False
    ti_hashes: str | None = None  # AUTOMATIC1111's "TI hashes" of the embeddings the prompts used
    rows: tuple | None = None  # per_step: each side's row per call (prompt/encode.call_rows; equal entries share)


@dataclass
class Latents:
    """What the sampler loop starts from."""

    x: torch.Tensor  # [B, C, h, w] float32 on the model's device: the first latent, scaled for the schedule
    schedule: object  # sigmas (descending, ending in 0) or a DDIMSchedule left to run; None: no step
    spec: registry.SamplerSpec  # the sampler the schedule was made for (the settings' sampler, resolved once)
    shared: dict[str, torch.Tensor]  # conditioning both guidance halves share (inpainting's c_concat)
    noise: NoiseSource  # the ancestral / eta noise of the loop comes from here
    inpaint: InpaintConditioning | None = None
    blend: I.LatentBlend | None = None  # a 4-channel model's inpainting: the latents kept outside the mask
    hires: bool = False  # hires fix's second pass (a canny ControlNet unit is soft-injected there, as webui's)

    @property
    def steps(self) -> int:
        return 0 if self.schedule is None else num_steps(self.schedule)


DIFFUSERS_ALIASES = {"num_inference_steps": "steps", "guidance_scale": "cfg_scale",
                     "num_images_per_prompt": "batch_size", "image": "init_image", "mask_image": "mask"}


def from_diffusers_names(fields: dict) -> dict:
    """``fields`` with diffusers' keyword names (``DIFFUSERS_ALIASES``) turned into ``GenerationSettings``' own;
    a setting given under both names is a ``SettingsError``."""
    out = {k: v for k, v in fields.items() if k not in DIFFUSERS_ALIASES}
    for alias, name in DIFFUSERS_ALIASES.items():
        if alias in fields:
            if name in fields:
                raise SettingsError(name, f"is given twice: as {name} and as diffusers' {alias}")
            out[name] = fields[alias]
    return out


class Images(list):
    """A list of PIL images that also answers diffusers' ``.images``."""

    @property
    def images(self) -> list:
        return self


class Pipeline:
    """A loaded model made into an image generator; see the module docstring. ``kernels``: "auto" (Triton on
    CUDA, the torch references on the CPU), "torch" or "triton" for every stage this pipeline runs."""

    def __init__(self, model, *, name: str = "model", model_hash: str | Callable[[], str] | None = None,
                 kernels: str = "auto", lora_dir: str | os.PathLike | None = None,
                 embeddings_dir: str | os.PathLike | None = None, upscaler_dir: str | os.PathLike | None = None,
                 controlnet_dir: str | os.PathLike | None = None):
        if kernels not in dispatch.BACKENDS:
            raise ValueError(f"unknown kernels {kernels!r}; expected one of {', '.join(dispatch.BACKENDS)}")
        self.model = model
        self.name = name
        self.kernels = kernels
        self._model_hash = model_hash
        self._vae_hash: str | None = None
        self.vae_guard = VAEDecodeGuard(model.first_stage_model)
        self.unet = self._model_unet  # peers (the benchmarks) may swap in another callable of the same protocol
        self._runner: GraphRunner | None = None
        self._runner_key: tuple = ()
        self.lora_dir = lora_dir  # where <lora:name:w> in a prompt is looked up
        self._loras: list = []  # set_loras' LoraSpecs (a prompt's own LoRAs come on top, per generation)
        self._lora_state = None  # model.lora.LoraState, made on first use: the pristine copies of touched weights
        self.lora_report = None  # the last apply's ApplyReport (its Lora hashes go into the infotext)
        self.embeddings, self.embedding_messages = None, []  # textual inversion, found by file name in prompts
        self._embeddings_dir = embeddings_dir
        if embeddings_dir is not None:
            self.load_embeddings(embeddings_dir)
        self._ti_hashes: str | None = None  # of the last encode, for the infotext
        self.upscalers = Upscalers(upscaler_dir, self.device)  # hires fix's image upscalers (built-in and files)
        self.auto_warmup = True  # on CUDA with the Triton kernels: compile and tune new shapes before their run
        self._warmed: set[tuple] = set()
        self._controlnets: dict[str, ControlNet] = {}  # ControlNet files loaded once, by resolved path
        self.spec: LoadSpec | None = None  # how it was loaded (``load_spec``): a hires checkpoint is loaded alike
        self._hires_pipe: tuple[Path, "Pipeline"] | None = None  # the last hires checkpoint's pipeline, kept
        self.controlnet_dir = controlnet_dir  # where a unit's model given by name ("name [hash]") is found

    # ------------------------------------------------------------ facts

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.model.diffusion_model.parameters()).dtype

    @property
    def model_hash(self) -> str | None:
        """AUTOMATIC1111's short model hash (computed once, in the background since ``load``)."""
        if callable(self._model_hash):
            self._model_hash = self._model_hash()
        return self._model_hash

    @property
    def vae_hash(self) -> str | None:
        """AUTOMATIC1111's "VAE hash" of an external VAE file (None for the checkpoint's own VAE)."""
        source = getattr(self.model, "source", None)
        if self._vae_hash is None and source is not None and source.vae is not None:
            self._vae_hash = source.vae_hash()
        return self._vae_hash

    def _kernels(self):
        """The kernel choice for a stage: this pipeline's, or (for "auto") whatever the caller's
        ``dispatch.force`` block says."""
        return contextlib.nullcontext() if self.kernels == "auto" else dispatch.force(self.kernels)

    def _padding(self, tiling: bool):
        """A stage's convolution padding: circular for a tiling run, zeros otherwise (restored after it)."""
        return circular_padding(self.model, tiling)

    def _model_unet(self, x, t, context, y=None, t_emb=None, step_emb=None, control=None, only_mid_control=False):
        """``apply_model`` returning float32: the sampler state stays float32 whatever the weights' dtype;
        ``step_emb``: the step's time MLP and projections (``StepTables``); ``control``: scaled ControlNet
        residuals (``control/apply.py``)."""
        extra = {} if step_emb is None else {"step_emb": step_emb}
        if control is not None:
            extra.update(control=control, only_mid_control=only_mid_control)
        return self.model.apply_model(x, t, context, y, t_emb=t_emb, **extra).float()

    def _step_embedder(self):
        """The model's step embedder for the per-step tables, when ``unet`` is the model's own (and its
        ``apply_model`` takes ``step_emb``). A ControlNet run's wrapper (``control/apply.ControlledUNet``) hands
        ``step_emb`` on to the UNet."""
        if self.unet != self._model_unet or not D.takes_step_embedding(self.model.apply_model):
            return None
        return self.model.step_embedder()

    # ------------------------------------------------------------ settings

    def settings(self, settings: GenerationSettings | None = None, **fields) -> GenerationSettings:
        """``settings`` (or ``GenerationSettings(**fields)``, or the first with ``fields`` replaced) checked and
        resolved for this model; raises ``SettingsError`` naming the field."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GenerationSettings)})
        if unknown:
            raise SettingsError(unknown[0], "is not a setting (GenerationSettings' fields, or diffusers' "
                                            f"{', '.join(DIFFUSERS_ALIASES)} in pipe(...))")
        if settings is None:
            settings = GenerationSettings(**fields)
        elif fields:
            settings = dataclasses.replace(settings, **fields)
        resolved = settings.resolve(self.config)
        check_rng_device(resolved.rng, self.device)
        short = memory_shortfall(resolved.batch_size, resolved.width, resolved.height, self.device, self.dtype,
                                 self.config.vae.ch)
        if short is not None:
            raise SettingsError("width", f"x height: {short}")
        if resolved.resize_mode == LATENT_RESIZE and resolved.mode == "img2img" and \
                self.config.unet.in_channels == 9 and \
                tuple(resolved.init_image.shape[-2:]) != (resolved.height, resolved.width):
            raise SettingsError("resize_mode", "3 (latent upscale) needs the init image at the output size with a "
                                               "9-channel model (webui's image conditioning would not fit)")
        if resolved.enable_hr:
            self._check_hires(resolved)
            try:
                self.hires_checkpoint(resolved)
            except CheckpointNotFound as e:
                raise SettingsError("hr_checkpoint_name", str(e)) from None
        return self._resolve_controls(resolved)

    def _resolve_controls(self, s: GenerationSettings) -> GenerationSettings:
        """Units whose model is a name (``name [hash]``, a name, part of one) with their file in
        ``controlnet_dir``, as the server and the command line find them (``control/models.resolve_units``); an
        existing file or folder, or a loaded ControlNet, is kept. Without a ControlNet folder nothing changes."""
        if not s.controls or self.controlnet_dir is None:
            return s
        try:
            return dataclasses.replace(s, controls=resolve_units(s.controls, self.controlnet_dir))
        except ControlUnitError as e:
            raise SettingsError("controls", str(e)) from None

    def _check_hires(self, s: GenerationSettings) -> None:
        """What the hires pass needs of this pipeline: a known upscaler (its file readable comes at the run) and
        the memory for the second pass's size."""
        if not is_latent_mode(s.hr_upscaler):
            try:
                self.upscalers.check(s.hr_upscaler)
            except UnknownUpscalerError as e:
                raise SettingsError("hr_upscaler", f"{e}; or a latent mode (Latent, Latent (antialiased), ...)") \
                    from None
        if self.config.unet.in_channels == 9 and s.inpainting_mask_weight != 1.0:
            raise SettingsError("inpainting_mask_weight", "below 1 with hires fix (webui re-encodes the first pass "
                                "for the second's conditioning then) is not implemented")
        target = s.hires_target()
        short = memory_shortfall(s.batch_size, target.upscale_to_x, target.upscale_to_y, self.device, self.dtype,
                                 self.config.vae.ch)
        if short is not None:
            raise SettingsError("hr_scale", f"makes the second pass too large: {short}")

    def from_infotext(self, text: str, *, control_images=None, controlnet_dir=None, **fields) -> GenerationSettings:
        """Settings from an AUTOMATIC1111 ``parameters`` text (a PNG's infotext), ``fields`` overriding it:
        a round trip gives the same image. Malformed values are left out (see ``settings.fields_from_infotext``).
        ControlNet units (``ControlNet 0: ...``) need their images, which the PNG does not hold: ``control_images``,
        one per unit; their models (``name [hash]``) are found in ``controlnet_dir`` (default: the pipeline's)."""
        parsed, _notes = fields_from_infotext(text)
        if parsed.get("controls") and "controls" not in fields:
            try:
                folder = self.controlnet_dir if controlnet_dir is None else controlnet_dir
                parsed["controls"] = resolve_units(attach_images(parsed["controls"], control_images), folder)
            except ControlUnitError as e:
                raise SettingsError("controls", str(e)) from None
        check_networks(parse_infotext(text), self.lora_dir, self._embeddings_dir)
        return self.settings(**{**parsed, **fields})

    def latent_shape(self, settings: GenerationSettings) -> tuple[int, int, int]:
        f = vae_factor(self.config)
        return self.config.vae.embed_dim, settings.height // f, settings.width // f

    # ------------------------------------------------------------ LoRA

    def set_loras(self, loras) -> object:
        """Apply ``loras`` in place (``LoraSpec``s, or ``(path, weight)`` / ``(path, te_weight, unet_weight)``),
        replacing the previous set; ``[]`` restores the checkpoint's weights. The weights keep their storage, so
        captured CUDA graphs stay valid. A failed switch (``LoraError``) leaves the weights as they were.
        Returns the ``ApplyReport`` (matched modules, warnings, bytes of pristine copies held)."""

        specs = [s if isinstance(s, LoraSpec) else LoraSpec(*s) for s in loras]
        report = self._apply_loras(specs)
        self._loras = specs
        return report

    def _apply_loras(self, specs: list):
        if self._lora_state is None:
            if not specs:
                return None

            self._lora_state = LoraState(self.model)
        self.lora_report = self._lora_state.apply(specs)
        return self.lora_report

    def _activate_prompt_loras(self, prompt: str) -> str:
        """Apply ``set_loras``' LoRAs plus the prompt's ``<lora:name:w>`` tags (found in ``lora_dir``), as
        AUTOMATIC1111 does per generation; returns the prompt without its tags."""
        if "<" not in prompt and self._lora_state is None:
            return prompt

        text, tags = parse_lora_tags(prompt)
        if tags and self.lora_dir is None:
            raise LoraError(f"the prompt names <lora:{tags[0][0]}> but no LoRA folder was given (lora_dir, "
                            "--lora-dir)")
        specs = self._loras + [LoraSpec(find_lora(name, self.lora_dir), te, unet) for name, te, unet in tags]
        self._apply_loras(specs)
        return text

    # ------------------------------------------------------------ kernels: compile and tune before the run

    def warmup(self, sizes: list[tuple[int, int]] | None = None, batches=(1, 2), jobs: int | None = None):
        """Compile every Triton kernel variant the UNet, VAE and text towers need at ``sizes`` ((height, width)
        pixels; default: the family's size) and UNet ``batches``, in parallel across the CPU's cores into
        Triton's on-disk cache, then time each autotune key once into the persistent tuning cache
        (``kernels/warmup.py``). On CUDA with the Triton kernels only; returns its ``WarmupReport`` or None.
        ``generate`` does this by itself for each new shape (``auto_warmup``)."""
        if self.device.type != "cuda" or self.kernels == "torch" or dispatch.current_backend() == "torch":
            return None

        size = default_size(self.config)
        from tritonsd.compile.warmup import warmup  # lazy: the compile tools import triton, which a load does not need
        return warmup(self.config, sizes=sizes or [(size, size)], batches=batches, dtype=self.dtype,
                      device=self.device, model=self.model, jobs=jobs)

    def _warm(self, settings: GenerationSettings) -> None:
        batches = (settings.batch_size, 2 * settings.batch_size)  # CFG runs both halves in one batch
        key = (settings.height, settings.width, batches)
        if self.auto_warmup and key not in self._warmed:
            self.warmup([(settings.height, settings.width)], batches)
            self._warmed.add(key)

    # ------------------------------------------------------------ stage 1: text

    @torch.no_grad()
    def encode_text(self, prompts: list[str], *, size: tuple[int, int] | None = None, zero: bool = False,
                    original_size=None, crop_coords_top_left=(0, 0), target_size=None) -> dict[str, torch.Tensor]:
        """One side's UNet keywords for ``prompts`` as the original scripts encode them (one 77-token window, the
        text taken literally): ``{"context"}`` (SD1/2) or ``{"context", "y"}`` (SDXL, with
        its size conditioning: original and target size default to ``size`` = (height, width); ``zero``
        zeroes the text features, sgm's unconditional side)."""
        with self._kernels():
            if self.config.family != "sdxl":
                return {"context": self.model.get_learned_conditioning(prompts).float()}
            context, y = self.model.get_learned_conditioning(
                prompts, original_size=size if original_size is None else original_size,
                crop_coords_top_left=crop_coords_top_left, target_size=size if target_size is None else target_size,
                zero_text=zero)
        return {"context": context.float(), "y": y.float()}

    def load_embeddings(self, directory: str | os.PathLike) -> list[str]:
        """Textual-inversion embeddings from ``directory`` (triggered by their file names in prompts, as
        AUTOMATIC1111); returns one line per file skipped (wrong width, unreadable), also kept in
        ``embedding_messages``."""

        self.embeddings, self.embedding_messages = load_model_embeddings(self.model, directory)
        self._embeddings_dir = directory
        return self.embedding_messages

    def encode(self, settings: GenerationSettings, hires_of: GenerationSettings | None = None,
               **size_conditions) -> Conditioning:
        """The prompt (and, with CFG, the negative prompt) for every image of the batch, as AUTOMATIC1111 reads
        them (``prompt_syntax="a1111"``: weights, BREAK, prompts beyond 75 tokens, ``[from:to:when]`` editing,
        textual inversion, clip skip; cond and uncond encoded apart) or as the original scripts do
        (``"original"``: one 77-token window, text taken literally; SDXL's size conditions ``original_size``,
        ``crop_coords_top_left``, ``target_size`` may be given). The LoRAs of ``set_loras`` and of the prompt's
        ``<lora:...>`` tags are applied first. ``hires_of``: ``settings`` is the hires pass of these first-pass
        settings (``hires_pass()``): prompt editing counts its steps after the first pass's, as webui's."""
        s = settings
        prompt = self._activate_prompt_loras(s.prompt)
        if s.prompt_syntax == "original":
            return self._encode_original(s, prompt, **size_conditions)
        if size_conditions:
            raise ValueError("size conditions are taken from the settings with prompt_syntax='a1111'")
        with self._kernels():
            cond = self._encode_side(prompt, s, False, hires_of)
            uncond = None if s.cfg_scale == 1.0 else self._encode_side(s.negative_prompt, s, True, hires_of)
        used = cond.cond.used_embeddings + (uncond.cond.used_embeddings if uncond is not None else [])

        self._ti_hashes = ti_hashes(used) or None
        return self._conditioning(s, cond, uncond)

    def _encode_side(self, prompt: str, s: GenerationSettings, is_negative: bool,
                     hires_of: GenerationSettings | None = None):
        """One prompt's editing schedule, encoded in one batch (``ScheduledConditioning``)."""

        steps, hires = (s.steps, None) if hires_of is None else (hires_of.steps, s.steps)
        return encode_schedule(self.model, prompt, steps, hires_steps=hires, clip_skip=s.clip_skip,
                               embeddings=self.embeddings, width=s.width, height=s.height, is_negative=is_negative)

    def _conditioning(self, s: GenerationSettings, cond, uncond) -> Conditioning:
        """The UNet keywords of both sides (``prompt.encode.unet_keywords``), padded to one length when the
        settings ask for AUTOMATIC1111's ``pad_cond_uncond``."""
        c, u, per_step = unet_keywords(cond, uncond, calls=s.steps + 1, batch=s.batch_size)  # PLMS: steps + 1 calls
        if u is not None and s.pad_cond_uncond:
            with self._kernels():
                c, u = pad_to_same_length(self.model, c, u, per_step, clip_skip=s.clip_skip, width=s.width,
                                          height=s.height)
        rows = call_rows(cond, uncond, calls=s.steps + 1) if per_step else None
        return Conditioning(c, u, per_step=per_step, ti_hashes=self._ti_hashes, rows=rows)

    def _encode_original(self, s: GenerationSettings, prompt: str, **size_conditions) -> Conditioning:
        rows, size = s.batch_size, (s.height, s.width)
        cond = self.encode_text(rows * [prompt], size=size, **size_conditions)
        if s.cfg_scale == 1.0:
            return Conditioning(cond, None)
        zero = self.config.family == "sdxl" and not s.negative_prompt
        uncond = self.encode_text(rows * [s.negative_prompt], size=size, zero=zero, **size_conditions)
        return Conditioning(cond, uncond)

    # ------------------------------------------------------------ stage 2: latents

    def prepare_latents(self, settings: GenerationSettings, noise: NoiseSource | None = None) -> Latents:
        """The first latent and the schedule left to run, from ``noise`` (default: AUTOMATIC1111's per-image
        ``ImageNoise`` of the settings' seed, source and variation seed):
        txt2img from x_T, img2img from the encoded init image, inpainting with its image conditioning. The
        settings' sampler is resolved to its registry spec here, once: ``denoise`` runs ``latents.spec``."""
        s = settings
        device = self.device
        shape = self.latent_shape(s)
        if noise is None:
            noise = ImageNoise(shape, s.seed, s.batch_size, s.rng, s.subseed, s.subseed_strength, device)
        spec = registry.get(s.sampler)
        x_T = noise.start(shape).to(device)
        shared, inpaint, blend = {}, None, None
        with self._kernels(), self._padding(s.tiling):
            if self.config.unet.in_channels == 9:
                image = s.init_image if s.init_image is not None else torch.zeros(1, 3, s.height, s.width)
                mask = s.mask if s.mask is not None else torch.ones(1, 1, s.height, s.width)
                inpaint = inpaint_conditioning(self.model, image, mask, noise.vae(shape).to(device),
                                               s.inpainting_mask_weight)
                shared["c_concat"] = inpaint.c_concat
            schedule = make_schedule(self.config, spec, s.steps, s.karras, s.eta)
            if s.mode == "img2img":
                x, schedule = img2img_start(schedule, self._init_latent(s, noise, shape), x_T, s.strength)
            elif s.mode == "inpaint" and inpaint is None:  # a 4-channel model
                blend = self._latent_blend(s, encode_image(self.model, s.init_image, noise.vae(shape)), shape)
                x, schedule = img2img_start(schedule, blend.init_latent, x_T, s.strength)
            else:
                x = txt2img_start(self.config, schedule, x_T)
        return Latents(x=x, schedule=schedule, spec=spec, shared=shared, noise=noise, inpaint=inpaint, blend=blend)

    def _init_latent(self, s: GenerationSettings, noise: NoiseSource, shape) -> torch.Tensor:
        """img2img's init latent: the init image encoded (its posterior sampled with ``noise.vae``); with
        ``resize_mode`` 3 ("Just resize (latent upscale)") encoded at its own size and the latent resized
        bilinearly to ``shape`` (webui's img2img ``init``: ``interpolate(init_latent, (h // 8, w // 8),
        mode="bilinear")``)."""
        f = vae_factor(self.config)
        own = (shape[0], s.init_image.shape[-2] // f, s.init_image.shape[-1] // f)
        if s.resize_mode != LATENT_RESIZE or own == tuple(shape):
            return encode_image(self.model, s.init_image, noise.vae(shape))
        latent = encode_image(self.model, s.init_image, noise.vae(own))
        return torch.nn.functional.interpolate(latent, size=tuple(shape[1:]), mode="bilinear")

    def _latent_blend(self, s: GenerationSettings, init_latent: torch.Tensor, shape) -> I.LatentBlend:
        """A1111's latent masks of the settings' processed mask, and the init latent after ``inpainting_fill``
        2 / 3 (latent noise: the seeds' own unit noise, without variation, as A1111's ``create_random_tensors``
        of the seeds)."""
        device = init_latent.device
        source = s.inpaint.latent_mask if s.inpaint is not None else I.mask_image(s.mask)
        mask, nmask = (m.to(device) for m in I.latent_masks(source, *shape))
        noise = None
        if s.inpainting_fill == 2:
            noise = ImageNoise(shape, s.seed, s.batch_size, s.rng, None, 0.0, device).start(shape).to(device)
        return I.LatentBlend(I.fill_latent(init_latent, s.inpainting_fill, mask, nmask, noise), mask, nmask)

    # ------------------------------------------------------------ stage 3: the sampler loop

    def denoise(self, latents: Latents, cond: Conditioning, settings: GenerationSettings,
                callback: StepCallback | None = None) -> torch.Tensor:
        """Latents after the sampler loop of ``latents.spec``, float32. ``callback(step)`` after each step with
        the sampler's dict (``i``, ``x``, ``denoised``, ...) plus ``total``; after a CUDA-graph replay it gets
        ``i`` and ``total`` only, for every step at once, and a callback with ``preview_every`` (int) and
        ``preview(i, latents)`` attributes gets host copies of the loop's ``denoised`` on those steps while it runs
        (``sampler/graph_preview.py``)."""
        s = settings
        if latents.schedule is None:  # img2img at strength 0
            return latents.x
        spec = latents.spec
        total = latents.steps
        x = latents.x
        with self._kernels(), self._padding(s.tiling):
            runner = self._graph_runner(spec, s) if latents.blend is None else None
            run = self.control_run(s, latents, static=runner is not None) if s.controls else None
            if run is not None:
                cond = C.with_cond_mark(cond)
            if runner is not None:
                out = self._denoise_graphed(runner, spec, latents, cond, s, callback, run)
            else:
                schedule = latents.schedule  # sigmas stay on the host: the prepared denoiser reads its tables by them
                unet = self.unet if run is None else C.ControlledUNet(self.unet, run)
                den = build_denoiser(unet, self.config, spec, s.cfg_scale, schedule, x.device,
                                     self._step_embedder())
                if cond.per_step:
                    den = D.PerCallConditioning(den, cond.rows)
                if latents.blend is not None:  # A1111's per-step latent masking: of the output, or for DDIM / PLMS
                    # of the model's input (``mask_before_denoising``)
                    den = (I.BlendedTimestepDenoiser if spec.space == "timesteps" else I.BlendedDenoiser)(
                        den, latents.blend)
                kwargs = {}
                if spec.takes_noise:
                    kwargs["noise_sampler"] = lambda _a, _b: latents.noise.ancestral(x.shape[1:]).to(x.device)
                step = None if callback is None else (lambda d: callback({**d, "total": total}))
                step = C.with_step_callback(run, step)
                extra = {"cond": cond.cond, "uncond": cond.uncond, **latents.shared}
                with hoist.scope():  # the conditioning's per-run values once per loop (model/hoist.py)
                    out = spec.fn(den, x, schedule, extra_args=extra, callback=step, **kwargs)
                if spec.space == "timesteps":
                    out = out[0]  # (x, intermediates)
            if latents.blend is not None:
                out = latents.blend(out)  # A1111's sample(): the kept latents once more after the loop
        return check_finite(out, f"{s.sampler} sampling")

    # ------------------------------------------------------------ ControlNet

    def controlnet(self, source) -> ControlNet:
        """The ControlNet of ``source`` (a file or diffusers folder, loaded once per pipeline on the model's device
        and dtype, checked against its UNet; or a loaded ``ControlNet``)."""
        unet = self.model.model.diffusion_model
        if isinstance(source, ControlNet):
            where = next(source.parameters())
            if where.device != self.device or where.dtype != self.dtype:
                raise ControlNetError(f"the ControlNet given is on {where.device} in {where.dtype}, the model on "
                                      f"{self.device} in {self.dtype}: move it (.to) or give its file")
            return load_controlnet(source, unet)
        key = str(Path(source).resolve())
        if key not in self._controlnets:
            prefix = "model.diffusion_model."  # a difference file adds the checkpoint's weights, not a LoRA's
            pristine = {} if self._lora_state is None else {
                k[len(prefix):]: v for k, v in self._lora_state.pristine.items() if k.startswith(prefix)}
            self._controlnets[key] = load_controlnet(source, unet, dtype=self.dtype, device=self.device,
                                                     pristine=pristine)
        return self._controlnets[key]

    def control_run(self, settings: GenerationSettings, latents: Latents, static: bool = False) -> C.ControlRun | None:
        """The ControlNet side of one loop: each unit of ``settings.controls`` with a non-zero weight (a zero
        weight adds nothing: the unit is left out), its control map at the loop's size (``control/preprocess``)
        and hint features, and the per-step scales over the loop's steps; None when no unit is left."""
        s = settings
        f = vae_factor(self.config)
        height, width = latents.x.shape[-2] * f, latents.x.shape[-1] * f
        # the hires pass fits the map made at the first pass's size (pixel perfect computes with that size)
        first_size = (s.width, s.height) if latents.hires else None
        prepared = []
        for unit in s.controls:
            if unit.weight == 0.0 or not acts_in_pass(unit, s.enable_hr, latents.hires):
                continue
            net = self.controlnet(unit.model)
            hint = detect(unit, width, height, preprocess_size=first_size, **sources(s)).to(self.device)
            with torch.no_grad():
                guided = net.hint_features(hint)
            soft = None
            if latents.hires and module_of(unit.module).soft_in_hr_fix:
                soft = True  # the extension's high_res_fix_forced_soft_injection
            prepared.append(C.PreparedUnit(net, guided, unit, cfg_injection=unit.control_mode == C.CONTROL_MODES[2],
                                           soft=soft))
        if not prepared:
            return None
        # webui's state.sampling_steps: the steps the loop runs, but the settings' steps for a DDIM / PLMS txt2img
        # loop (launch_sampling(steps), where the original spacing may run one timestep more)
        full = latents.spec.space == "timesteps" and s.mode == "txt2img" and not latents.hires
        return C.ControlRun(prepared, s.steps if full else latents.steps, self.device, static=static)

    def _graph_runner(self, spec: registry.SamplerSpec, s: GenerationSettings) -> GraphRunner | None:
        """The pipeline's runner when this loop is CUDA-graphed (CUDA model, ``use_graphs``, a capturable
        sampler); made anew when the UNet's weights moved (``.to``, ``.half``) or the UNet callable changed."""
        device = self.device
        if not s.use_graphs or device.type != "cuda" or not spec.graphable:
            return None
        unet = self.model.model.diffusion_model
        key = (id(self.unet), *(t.data_ptr() for t in (*unet.parameters(), *unet.buffers())))
        if self._runner is None or self._runner_key != key:
            self._runner = GraphRunner(tables_on_device(sigma_denoiser(self.unet, self.config, self._step_embedder()),
                                                        device), device)
            self._runner_key = key
        return self._runner

    @staticmethod
    def _denoise_graphed(runner, spec, latents, cond, s, callback, control=None) -> torch.Tensor:
        """The loop through the runner, which gets the spec; an ancestral sampler's noise is pre-drawn from the
        same per-image stream, in the order the eager loop draws it."""
        sigmas, x = latents.schedule, latents.x
        count = spec.noise_draws(sigmas)
        noise = torch.stack([latents.noise.ancestral(x.shape[1:]) for _ in range(count)]) if count else None
        progress = None if callback is None else (lambda i, n: callback({"i": i, "total": n}))
        # live previews of the captured loop: a callback may carry ``preview_every`` and ``preview(i, latents)``
        preview = getattr(callback, "preview", None)
        try:
            return runner.run(x, cond.cond, cond.uncond, noise, sigmas=sigmas, cfg_scale=s.cfg_scale,
                              sampler=spec, shared=latents.shared, progress=progress, per_step=cond.per_step,
                              rows=cond.rows, tiling=s.tiling, control=control, preview=preview,
                              preview_every=getattr(callback, "preview_every", 0))
        except GraphCaptureError as e:
            raise GraphCaptureError(f"{e}; run without CUDA graphs (use_graphs=False, tritonsd generate "
                                    "--no-cuda-graphs)") from e

    def clear_graphs(self) -> None:
        """Drop every captured loop (and the memory pools they hold)."""
        if self._runner is not None:
            self._runner.clear()

    # ------------------------------------------------------------ stage 3b: hires fix's second pass

    def hires_noise(self, settings: GenerationSettings) -> ImageNoise:
        """webui's second ``ImageRNG``: the same seeds (and variation seeds), fresh, at the second pass's latent
        shape."""
        s = settings
        target = s.hires_target()
        shape = (self.config.vae.embed_dim, target.height // vae_factor(self.config),
                 target.width // vae_factor(self.config))
        return ImageNoise(shape, s.seed, s.batch_size, s.rng, s.subseed, s.subseed_strength, self.device)

    def upscale(self, latents: torch.Tensor, settings: GenerationSettings, noise: NoiseSource,
                encoder: "Pipeline | None" = None) -> torch.Tensor:
        """The first pass's latents [B, C, h, w] as the second pass's start [B, C, H/8, W/8] (``sample_hr_pass``):
        a latent mode interpolates them; an image upscaler gets each image decoded to 8 bits, resizes it to
        ``hr_upscale_to`` and the VAE encodes it again (its posterior sampled with ``noise.vae``); then the
        truncate crop. ``encoder``: the pipeline whose VAE encodes (the hires checkpoint's, as webui encodes after
        switching to it; default this one)."""
        s = settings
        target = s.hires_target()
        if is_latent_mode(s.hr_upscaler):
            return upscale_latent(latents, target, s.hr_upscaler)
        images = [self.upscalers.resize(to_pil(image), target.upscale_to_x, target.upscale_to_y, s.hr_upscaler)
                  for image in self.decode(latents).cpu()]
        # [H, W, 3] uint8 -> [B, 3, H, W] in [0, 1], as webui's np.array(image) / 255
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
                              for im in images])
        f = vae_factor(self.config)
        shape = (self.config.vae.embed_dim, target.upscale_to_y // f, target.upscale_to_x // f)
        encoder = self if encoder is None else encoder
        with encoder._kernels():
            encoded = encode_image(encoder.model, pixels * 2.0 - 1.0, noise.vae(shape).to(encoder.device))
        return crop_latent(encoded, target)

    def prepare_hires_latents(self, upscaled: torch.Tensor, settings: GenerationSettings,
                              noise: NoiseSource) -> Latents:
        """The second pass's first latent and schedule by webui's fixed-steps rule: ``hr_steps`` steps of a
        ``int(hr_steps / min(strength, 0.999))``-step schedule (``sampler/upscale.py``); at strength 0 none."""
        s, hr = settings, settings.hires_pass()
        spec = registry.get(hr.sampler)
        device = self.device
        shape = tuple(upscaled.shape[1:])
        x_noise = noise.start(shape).to(device)
        shared, inpaint = {}, None
        with self._kernels():
            if self.config.unet.in_channels == 9:  # the first pass's image conditioning, at the new size
                h, w = shape[1] * vae_factor(self.config), shape[2] * vae_factor(self.config)
                inpaint = inpaint_conditioning(self.model, torch.zeros(1, 3, h, w), torch.ones(1, 1, h, w),
                                               noise.vae(shape).to(device))
                shared["c_concat"] = inpaint.c_concat
        length, t_enc = hires_steps(hr.steps, s.strength)
        if length == 0:
            return Latents(x=upscaled, schedule=None, spec=spec, shared=shared, noise=noise, inpaint=inpaint)
        schedule = make_schedule(self.config, spec, length, hr.karras, hr.eta)
        x, schedule = start_at(schedule, upscaled.to(device), x_noise, t_enc)
        return Latents(x=x, schedule=schedule, spec=spec, shared=shared, noise=noise, inpaint=inpaint, hires=True)

    def encode_hires(self, settings: GenerationSettings, first: Conditioning | None = None) -> Conditioning:
        """The second pass's conditioning: ``first`` (the first pass's) where webui's would be the same tensors
        (the same prompts, no editing, not SDXL, whose size conditioning is the second pass's size), else the
        hires prompts encoded at ``hr_upscale_to``."""
        hr = settings.hires_pass()
        same = hr.prompt == settings.prompt and hr.negative_prompt == settings.negative_prompt
        if first is not None and same and not first.per_step and self.config.family != "sdxl":
            return first
        return self.encode(hr, hires_of=settings)

    def hires(self, latents: torch.Tensor, settings: GenerationSettings, cond: Conditioning | None = None,
              callback: StepCallback | None = None, noise: NoiseSource | None = None) -> torch.Tensor:
        """The second pass over the first pass's ``latents``: its latents, float32 (see the module docstring).
        With ``hr_checkpoint_name`` it runs on that checkpoint's pipeline (``hires_pipeline``): decode this
        pipeline's, encode, conditioning and UNet the other's; decode the result with ``hires_pipeline(s)``."""
        hr = settings.hires_pass()
        target = settings.hires_target()
        second = self.hires_pipeline(settings)
        second._warm(dataclasses.replace(hr, width=target.width, height=target.height))
        noise = self.hires_noise(settings) if noise is None else noise
        upscaled = self.upscale(latents, settings, noise, encoder=second)
        hr_latents = second.prepare_hires_latents(upscaled, settings, noise)
        return second.denoise(hr_latents, second.encode_hires(settings, cond if second is self else None), hr,
                              callback)

    def hires_checkpoint(self, settings: GenerationSettings) -> Path | None:
        """The file of the settings' ``hr_checkpoint_name`` (webui's "Hires checkpoint"): a path, or a name looked
        up in the models folder (``LoadSpec.models_dir``, default this checkpoint's folder) as webui looks it up;
        None for this checkpoint. ``CheckpointNotFound`` (one line) when nothing answers to the name."""
        name = settings.hr_checkpoint_name if settings.enable_hr else None
        if name is None:
            return None
        source = getattr(self.model, "source", None)
        own = source.checkpoint if source is not None and source.checkpoint is not None else None
        folder = self.spec.models_dir if self.spec is not None and self.spec.models_dir is not None else \
            (own.parent if own is not None and own.is_file() else None)
        path = find_checkpoint(name, folder)
        return None if own is not None and own.is_file() and path == own.resolve() else path

    def hires_pipeline(self, settings: GenerationSettings) -> "Pipeline":
        """The pipeline of the second pass: this one, or the hires checkpoint's, loaded as this one was (device,
        dtype, kernels, VAE, LoRA / embeddings / upscaler folders; its own YAML) and kept for the next image;
        this pipeline's ``set_loras`` LoRAs are applied to it too."""
        path = self.hires_checkpoint(settings)
        if path is None:
            return self
        if self._hires_pipe is None or self._hires_pipe[0] != path:
            self._hires_pipe = None  # one extra model at a time: the old one goes before the new one loads
            base = self.spec if self.spec is not None else LoadSpec(str(path))
            spec = dataclasses.replace(base, path=str(path), config=None, parameterization=None,
                                       device=self.device, dtype=self.dtype, kernels=self.kernels,
                                       lora_dir=self.lora_dir, embeddings_dir=self._embeddings_dir,
                                       upscaler_dir=self.upscalers.directory)
            self._hires_pipe = (path, load_spec(spec))
        second = self._hires_pipe[1]
        second.lora_dir = self.lora_dir
        if second._loras != self._loras:
            second.set_loras(self._loras)
        return second

    # ------------------------------------------------------------ stage 4: pixels

    def decode(self, latents: torch.Tensor, *, tiling: bool = False) -> torch.Tensor:
        """``clamp((decode_first_stage(latents) + 1) / 2, 0, 1)`` [B, 3, H, W] float32 on the model's device;
        ``tiling``: the VAE's convolutions pad circularly (pass the settings' ``tiling``)."""
        with self._kernels(), self._padding(tiling):
            return decode_clamped(self.vae_guard, self.config.scale_factor, latents)

    # ------------------------------------------------------------ all of it

    def generate(self, settings: GenerationSettings, callback: StepCallback | None = None,
                 noise: NoiseSource | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1], float32 on the CPU, for resolved ``settings`` (on CUDA, a new shape's
        kernels are compiled and tuned first: ``warmup``)."""
        self._warm(settings)
        cond = self.encode(settings)
        latents = self.prepare_latents(settings, noise)
        x = self.denoise(latents, cond, settings, callback)
        decoder = self
        if settings.enable_hr:
            x = self.hires(x, settings, cond, callback)
            decoder = self.hires_pipeline(settings)
        return decoder.decode(x, tiling=settings.tiling).cpu()

    def __call__(self, prompt: str = "", negative_prompt: str = "", *, callback: StepCallback | None = None,
                 **fields) -> "Images":
        """PIL images for ``prompt``; ``fields`` are ``GenerationSettings``'s (seed, steps, cfg_scale, sampler,
        karras, width, height, batch_size, init_image, mask, strength, eta, tiling, use_graphs, enable_hr and the hr_*
        fields), or diffusers' names for them (``DIFFUSERS_ALIASES``: num_inference_steps, guidance_scale,
        num_images_per_prompt, image, mask_image). The result is a list that also has ``.images`` (diffusers'
        output). Each image's
        ``info["parameters"]`` is its AUTOMATIC1111 infotext and ``info["seed"]`` its seed."""
        settings = self.settings(prompt=prompt, negative_prompt=negative_prompt, **from_diffusers_names(fields))
        return Images(self.to_pil(self.generate(settings, callback), settings))

    # ------------------------------------------------------------ images out

    def infotext(self, settings: GenerationSettings, index: int = 0, conditioning: Conditioning | None = None) -> str:
        """AUTOMATIC1111's ``parameters`` text of image ``index`` (its TI hashes from ``conditioning``, else from
        this pipeline's last ``encode``)."""
        source = getattr(self.model, "source", None)
        vae = source.vae if source is not None else None
        ti = conditioning.ti_hashes if conditioning is not None else self._ti_hashes
        if self._loras:  # set_loras' LoRAs are recorded as A1111 records every LoRA: a tag in the prompt
            settings = dataclasses.replace(settings, prompt=with_lora_tags(settings.prompt, self._loras))
        hr_path = self.hires_checkpoint(settings)
        return generation_infotext(settings, index, model=self.name, model_hash=self.model_hash,
                                   hr_checkpoint=short_title(hr_path) if hr_path is not None else None,
                                   inpainting_model=self.config.unet.in_channels == 9,
                                   vae=source.vae_name if vae is not None else None,
                                   vae_hash=self.vae_hash if vae is not None else None, ti_hashes=ti,
                                   lora_hashes=self.lora_report.lora_hashes if self.lora_report is not None else None)

    def to_pil(self, images: torch.Tensor, settings: GenerationSettings,
               conditioning: Conditioning | None = None) -> list:
        """PIL images with ``info["parameters"]`` (the infotext) and ``info["seed"]``; an inpainting's are pasted
        back into the original (``inpaint.paste_back``: A1111's ``apply_overlay``)."""

        out = []
        for i, image in enumerate(images):
            pil = to_pil(image)
            if settings.inpaint is not None:  # the original outside the mask, in the original's frame
                pil = I.paste_back(pil, settings.inpaint)
            pil.info["parameters"] = self.infotext(settings, i, conditioning)
            pil.info["seed"] = settings.seed + i
            out.append(pil)
        return out

    @staticmethod
    def save(images: list, out_dir: str | os.PathLike) -> list[Path]:
        """``out_dir/NNNNN-<seed>.png`` for each image, numbered after the files already there (as
        AUTOMATIC1111 numbers them); never overwrites, nothing half-written."""

        return [save_numbered(Path(out_dir), image, image.info.get("parameters", ""), image.info.get("seed"))
                for image in images]


# ---------------------------------------------------------------- loading


def load(path: str | os.PathLike, config: str | os.PathLike | None = None, *, device=None, dtype=None,
         kernels: str = "auto", vae: str | os.PathLike | None = None, text_heads: int | None = None,
         parameterization: str | None = None, lora_dir: str | os.PathLike | None = None,
         embeddings_dir: str | os.PathLike | None = None, upscaler_dir: str | os.PathLike | None = None,
         models_dir: str | os.PathLike | None = None,
         controlnet_dir: str | os.PathLike | None = None) -> Pipeline:
    """A Pipeline for an original single-file checkpoint (``.safetensors`` or ``.ckpt``), or the built-in demo
    model ``"demo:sd1"`` (tiny, random weights: its images are noise; no file needed).

    ``config``: the original inference YAML (default: the checkpoint's stem + ``.yaml`` beside it, when there);
    ``device``: "cpu", "cuda", "cuda:N" (default: CUDA when available); ``dtype``: "fp32", "fp16", "bf16" or a
    torch dtype (default: fp16 on CUDA, fp32 on the CPU); ``kernels``: "auto", "torch" or "triton"; ``vae``: an
    external VAE file (``.safetensors`` / ``.pt``); ``text_heads`` / ``parameterization``: what the weights cannot
    tell, when no YAML does; ``lora_dir``: where ``<lora:name:w>`` in a prompt is looked up;
    ``embeddings_dir``: textual-inversion embeddings, used where their file name appears in a prompt;
    ``upscaler_dir``: upscaler model files (ESRGAN, ...) for hires fix's ``hr_upscaler``; ``models_dir``: where
    hires fix's ``hr_checkpoint_name`` is looked up (default: the checkpoint's folder); ``controlnet_dir``:
    ControlNet files, found by name for ``ControlUnit(model="name [hash]")`` as the server lists them. The model
    hash for the infotext is computed when the first infotext needs it, and cached on disk
    (``formats.hashes.cached_sha256``).

    The same as ``load_spec(LoadSpec(path, config, ...))``: the keywords are ``LoadSpec``'s fields."""
    return load_spec(LoadSpec(path, config, device=device, dtype=dtype, kernels=kernels, vae=vae,
                              text_heads=text_heads, parameterization=parameterization, lora_dir=lora_dir,
                              embeddings_dir=embeddings_dir, upscaler_dir=upscaler_dir, models_dir=models_dir,
                              controlnet_dir=controlnet_dir))


def load_spec(spec: LoadSpec | CheckedSpec) -> Pipeline:
    """The Pipeline ``spec`` describes: its prechecks (``LoadSpec.check``, skipped for a ``CheckedSpec``), then
    the weights, the model hash computed alongside them."""
    checked = spec.check()
    spec = checked.spec
    with dispatch.force(spec.kernels):
        model = load_model(spec.path, config=spec.config, parameterization=spec.parameterization,
                           text_heads=spec.text_heads, vae=spec.vae, dtype=checked.dtype, device=checked.device)
    source = model.source
    pipe = Pipeline(model, name=source.model_name, kernels=spec.kernels, lora_dir=spec.lora_dir,
                    embeddings_dir=spec.embeddings_dir, upscaler_dir=spec.upscaler_dir,
                    controlnet_dir=spec.controlnet_dir,
                    model_hash=source.model_hash)  # computed (or read from the disk cache) when a PNG needs it
    pipe.spec = spec
    return pipe


__all__ = ["CheckedSpec", "Conditioning", "GenerationSettings", "Images", "Latents", "LoadSpec", "NonFiniteError", "Pipeline",
           "load", "load_spec"]
