"""Generation pipelines: txt2img, img2img and inpainting for SD 1.x / 2.x and SDXL, as small functions.

``generate(model, settings)`` picks the mode from the settings:

* no init image: txt2img (``scripts/txt2img.py``; SDXL as sgm's ``SamplingPipeline.text_to_image``);
* init image: img2img (``scripts/img2img.py``);
* init image + mask: inpainting (runwayml ``scripts/inpaint_st.py``), which needs a 9-channel UNet.

A 9-channel (inpainting) model always gets the image conditioning ``c_concat``; without a mask it repaints
everything, i.e. mask all ones and masked image ``image * (mask < 0.5)`` all zeros, which is what
``inpaint_st.py`` computes for a full mask (txt2img or img2img with an inpainting checkpoint).

Randomness (all on the CPU, then moved to the model's device, so CPU and GPU start from the same numbers):
image ``i`` of a batch draws its start noise ``x_T`` as the FIRST ``randn`` of
``torch.Generator("cpu").manual_seed(seed + i)`` (img2img's forward-diffusion noise is that same x_T); the VAE
posterior samples and the ancestral / DDIM-eta noise come from two more per-image CPU generators seeded from
``seed + i`` (``_derived_seed``). So image ``i`` of a batch is image 0 of a batch of one with seed ``seed + i``.

img2img (``strength`` s, n sampler steps, ``t_enc = int(s * n)``):
* ddim / plms as the original: ``x = sqrt(a[t_enc]) x0 + sqrt(1 - a[t_enc]) x_T`` with the DDIM alphas ``a``,
  then the DDIM (PLMS) steps of indices ``t_enc - 1 .. 0``. ``a[n]`` (which the original lacks: it fails at
  strength 1) is defined as 0, so strength 1 is pure noise and exactly txt2img; strength 0 runs no step and
  returns the init latent itself (the original would still add ``sqrt(1 - a[0])`` noise). n counts the DDIM
  steps actually run (13 for 12 requested steps; the original uses the requested count).
* euler / euler_a / dpmpp_2m (AUTOMATIC1111-style): ``sigmas[n - t_enc:]`` of the full schedule and
  ``x = x0 + x_T * sigmas[n - t_enc]``; strength 0 is the init latent, strength 1 starts at sigma_max (plus x0).
Inpainting ignores ``strength`` (runwayml samples from pure noise).

SDXL: the unconditional conditioning is the original's zeroed text features (``force_uc_zero_embeddings``) when
the negative prompt is empty; a non-empty negative prompt is encoded and used (its pooled feature included).
Size conditioning: original size = target size = (height, width), crop (0, 0).

Samplers: ``eta`` is DDIM's (PLMS refuses eta != 0 as the original; euler_a always uses ancestral eta 1).
DDIM / PLMS on v models take eps and x0 from v (Stability's DDIMSampler; its PLMSSampler would misread v as
eps). The k samplers run over k-diffusion's ``CompVis(V)Denoiser`` sigmas (SD1/2) or sgm's quantising
``DiscreteDenoiser`` with ``LegacyDDPMDiscretization`` sigmas (SDXL; ``karras`` swaps in Karras sigmas between
the training sigma extremes). Image sides must be multiples of the VAE factor (8) times the UNet's
(2 ** (levels - 1)): 64 for SD 1.x / 2.x, 32 for SDXL.

CUDA graphs: on a CUDA model, ``use_graphs`` (the default) runs the euler / euler_a / dpmpp_2m loop through the
model's ``GraphRunner`` (``sampler/graph.py``), captured once per loop shape and replayed; euler_a's ancestral
noise is pre-drawn from the same per-image stream, so the results are the eager loop's (up to CUDA rounding:
the runner's sigmas stay on the host). DDIM / PLMS, and every run on the CPU, take the eager path.

The VAE decode goes through ``model.vae_guard``: a half-precision decode that overflows to NaN / Inf is redone
in float32 (one warning per model); float32 decodes are ``decode_first_stage`` itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..model.vae_guard import decode_first_stage_guarded
from . import denoise as D
from . import samplers as K
from . import schedule as S
from .graph import GRAPH_SAMPLERS, GraphCaptureError, GraphRunner, noise_draws, tables_on_device

SAMPLERS = ("ddim", "plms", "euler", "euler_a", "dpmpp_2m")
K_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")
MAX_STEPS = 1000
DEFAULT_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # SD2 v-prediction models: 768 (see default_size)
_SEED_RANGE = 2 ** 64  # torch.Generator.manual_seed takes [0, 2**64)
_STREAMS = {"start": 0, "vae": 1, "ancestral": 2}  # per-image noise streams


class PipelineError(ValueError):
    """Settings the pipeline cannot honour (sizes, steps, strength, mask, sampler, model kind...)."""


class NonFiniteError(RuntimeError):
    """NaN or Inf appeared in latents or in the image."""


@dataclass
class GenerationSettings:
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = "dpmpp_2m"
    karras: bool = True
    steps: int = 20
    cfg_scale: float = 7.5
    seed: int = 0
    eta: float = 0.0
    width: int | None = None  # None -> family default (SD1 512, SD2 768 (v) / 512 (eps), SDXL 1024)
    height: int | None = None  # ... or the init image's size
    batch: int = 1
    init_image: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1] (img2img / inpainting)
    strength: float = 0.75  # img2img
    mask: torch.Tensor | None = None  # [1, 1, H, W] in [0, 1], 1 = repaint (inpainting, 9-channel model)
    use_graphs: bool = True  # CUDA-graph the euler / euler_a / dpmpp_2m loop (CUDA models only; CPU: no effect)


# ---------------------------------------------------------------- settings


def default_size(model) -> int:
    """Training resolution of the family: SD1 512, SD2 768 for v-prediction (512 for the eps base), SDXL 1024."""
    cfg = model.config
    if cfg.family == "sd2" and cfg.parameterization == "v":
        return 768
    return DEFAULT_SIZE[cfg.family]


def vae_factor(model) -> int:
    """Pixels per latent cell (8 for every released VAE)."""
    return 2 ** (len(model.config.vae.ch_mult) - 1)


def size_multiple(model) -> int:
    """Image sides must be multiples of this: the VAE factor times the UNet's (the UNet's up path does no
    size matching): 64 for SD 1.x / 2.x, 32 for SDXL."""
    return vae_factor(model) * model.config.unet.downsample_factor


def resolve_settings(model, settings: GenerationSettings) -> GenerationSettings:
    """A validated copy of ``settings`` with the width / height filled in (init image size, else the family
    default). Raises ``PipelineError`` with a one-line reason."""
    s = settings
    in_channels = model.config.unet.in_channels
    if in_channels not in (4, 9):
        raise PipelineError(f"UNets with {in_channels} input channels are not supported (4, or 9 for inpainting)")
    if not isinstance(s.prompt, str) or not isinstance(s.negative_prompt, str):
        raise PipelineError("prompt and negative_prompt must be strings")
    if s.sampler not in SAMPLERS:
        raise PipelineError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = _integer("steps", s.steps)
    if not 1 <= steps <= MAX_STEPS:
        raise PipelineError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    if s.sampler in ("ddim", "plms"):
        _check_ddim_steps(s.sampler, steps, model.config.timesteps)
    batch = _integer("batch", s.batch)
    if batch < 1:
        raise PipelineError(f"batch must be at least 1, got {batch}")
    seed = _integer("seed", s.seed)
    if not 0 <= seed <= _SEED_RANGE - batch:
        raise PipelineError(f"seed must be between 0 and 2**64 - batch, got {seed}")
    cfg_scale = _real("cfg_scale", s.cfg_scale)
    if cfg_scale < 0:
        raise PipelineError(f"cfg_scale must be >= 0, got {cfg_scale}")
    eta = _real("eta", s.eta)
    if eta < 0:
        raise PipelineError(f"eta must be >= 0, got {eta}")
    if eta != 0 and s.sampler != "ddim":
        raise PipelineError(f"eta applies to ddim only ({s.sampler} needs eta 0; euler_a always uses "
                            f"ancestral eta 1), got {eta}")
    strength = _real("strength", s.strength)
    if not 0.0 <= strength <= 1.0:
        raise PipelineError(f"strength must be in [0, 1], got {strength}")
    if not isinstance(s.karras, bool):
        raise PipelineError(f"karras must be True or False, got {s.karras!r}")
    if not isinstance(s.use_graphs, bool):
        raise PipelineError(f"use_graphs must be True or False, got {s.use_graphs!r}")

    image_hw = None
    if s.init_image is not None:
        image_hw = _check_image("init_image", s.init_image, 3, -1.0, 1.0)
    if s.mask is not None:
        if s.init_image is None:
            raise PipelineError("a mask needs an init_image to inpaint")
        mask_hw = _check_image("mask", s.mask, 1, 0.0, 1.0)
        if mask_hw != image_hw:
            raise PipelineError(f"mask is {mask_hw[1]}x{mask_hw[0]} but init_image is {image_hw[1]}x{image_hw[0]}")
        if in_channels != 9:
            raise PipelineError("inpainting with a mask needs an inpainting model (9-channel UNet); this model's "
                                f"UNet takes {in_channels} channels")

    width = _side("width", s.width, image_hw[1] if image_hw else default_size(model), model)
    height = _side("height", s.height, image_hw[0] if image_hw else default_size(model), model)
    if image_hw is not None and image_hw != (height, width):
        raise PipelineError(f"init_image is {image_hw[1]}x{image_hw[0]} but width x height is {width}x{height}; "
                            "resize the image or leave width / height unset")
    return dataclasses.replace(s, steps=steps, batch=batch, seed=seed, cfg_scale=cfg_scale, eta=eta,
                               strength=strength, width=width, height=height)


def _ddim_steps_ok(steps: int, num_timesteps: int) -> bool:
    return int(S.ddim_timesteps(steps, num_timesteps)[-1]) < num_timesteps


def _check_ddim_steps(sampler: str, steps: int, num_timesteps: int) -> None:
    """The original's uniform DDIM timesteps ``range(0, T, T // steps) + 1`` reach T itself (past the schedule)
    when ``T // steps`` divides T - 1: e.g. 3, 9, 27, 37 or more than 500 steps of 1000. The original fails
    there too; name the nearest step counts that work."""
    if _ddim_steps_ok(steps, num_timesteps):
        return
    ok = [n for n in range(1, num_timesteps // 2 + 1) if _ddim_steps_ok(n, num_timesteps)]
    near = sorted(ok, key=lambda n: (abs(n - steps), n))[:2]
    raise PipelineError(f"{sampler} cannot run {steps} steps: its uniform timesteps would reach timestep "
                        f"{num_timesteps}, past the schedule (as in the original); try "
                        f"{' or '.join(map(str, sorted(near)))} steps")


def _integer(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PipelineError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PipelineError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _side(name, value, default, model) -> int:
    value = default if value is None else _integer(name, value)
    multiple = size_multiple(model)
    if value < multiple or value % multiple:
        raise PipelineError(f"{name} {value} is not a positive multiple of {multiple} (a {model.config.family} "
                            f"model needs image sides divisible by {multiple}: VAE x{vae_factor(model)}, UNet "
                            f"x{model.config.unet.downsample_factor})")
    return value


def _check_image(name, t, channels, low, high) -> tuple[int, int]:
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != channels:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise PipelineError(f"{name} must be a [1, {channels}, H, W] tensor, got {shape}")
    if not t.is_floating_point():
        raise PipelineError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise PipelineError(f"{name} contains NaN or Inf")
    lo, hi = t.min().item(), t.max().item()
    if lo < low - 1e-3 or hi > high + 1e-3:
        raise PipelineError(f"{name} values must be in [{low:g}, {high:g}], got [{lo:.4g}, {hi:.4g}]")
    return int(t.shape[2]), int(t.shape[3])


# ---------------------------------------------------------------- noise


def _derived_seed(seed: int, stream: str) -> int:
    """Seed of one per-image noise stream; "start" is the seed itself (x_T as documented)."""
    k = _STREAMS[stream]
    return (seed + k * 0x9E3779B97F4A7C15) % _SEED_RANGE


class NoiseStreams:
    """Per-image CPU generators for the start noise, VAE posterior samples and ancestral / eta noise."""

    def __init__(self, seed: int, batch: int, device: torch.device | str = "cpu"):
        self.device = device
        self.generators = {name: [torch.Generator("cpu").manual_seed(_derived_seed(seed + i, name))
                                  for i in range(batch)] for name in _STREAMS}

    def draw(self, stream: str, shape) -> torch.Tensor:
        """[batch, *shape] float32: one ``randn(shape)`` from each image's generator of ``stream``."""
        rows = [torch.randn(list(shape), generator=g, dtype=torch.float32) for g in self.generators[stream]]
        return torch.stack(rows).to(self.device)

    def noise_sampler(self, shape) -> K.NoiseSampler:
        """k-diffusion-style ``noise_sampler(sigma, sigma_next)`` drawing [batch, *shape] ancestral / eta noise."""
        return lambda _a, _b: self.draw("ancestral", shape)


def start_noise(seed: int, batch: int, shape) -> torch.Tensor:
    """x_T: image i is ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))``."""
    return torch.stack([torch.randn(list(shape), generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(batch)])


# ---------------------------------------------------------------- conditioning


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.model.diffusion_model.parameters()).dtype


def sdxl_conditioning(model, prompts: list[str], height: int, width: int, zero_text: bool = False):
    """(crossattn, vector) with original size = target size = (height, width) and crop (0, 0), as sgm's
    txt2img; ``zero_text`` zeroes the text features (the unconditional side)."""
    return model.get_learned_conditioning(prompts, original_size=(height, width), crop_coords_top_left=(0, 0),
                                          target_size=(height, width), zero_text=zero_text)


def encode_prompts(model, prompt: str, negative_prompt: str, batch: int, cfg_scale: float,
                   height: int, width: int) -> tuple[dict, dict | None]:
    """(cond, uncond) keyword dicts for the denoiser: ``{"context"}`` (SD1/2) or ``{"context", "y"}`` (SDXL),
    float32. ``uncond`` is None at cfg 1 (cond only, as the original). SD1/2: uncond is the negative prompt's
    features; SDXL: zeroed text features when the negative prompt is empty (sgm), else the negative prompt."""
    with torch.no_grad():
        if model.config.family == "sdxl":
            context, y = sdxl_conditioning(model, batch * [prompt], height, width)
            cond = {"context": context.float(), "y": y.float()}
            if cfg_scale == 1.0:
                return cond, None
            if negative_prompt:
                uc_context, uc_y = sdxl_conditioning(model, batch * [negative_prompt], height, width)
            else:
                uc_context, uc_y = sdxl_conditioning(model, batch * [""], height, width, zero_text=True)
            return cond, {"context": uc_context.float(), "y": uc_y.float()}
        cond = {"context": model.get_learned_conditioning(batch * [prompt]).float()}
        if cfg_scale == 1.0:
            return cond, None
        return cond, {"context": model.get_learned_conditioning(batch * [negative_prompt]).float()}


# ---------------------------------------------------------------- VAE


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``DiagonalGaussianDistribution.sample()`` with the given noise: ``mean + exp(logvar / 2) * noise``."""
    return mean + torch.exp(0.5 * logvar) * noise


def encode_latents(model, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``get_first_stage_encoding(encode_first_stage(image))``: scale_factor * a SAMPLE of the posterior.

    image [1 or B, 3, H, W] in [-1, 1]; noise [B, C, H/8, W/8] -> [B, C, H/8, W/8] float32."""
    with torch.no_grad():
        mean, logvar = model.encode_first_stage(image.to(model_device(model), _vae_dtype(model)))
    mean, logvar = mean.float(), logvar.float()
    z = model.config.scale_factor * posterior_sample(mean, logvar, noise.to(mean.device))
    return check_finite(z, "VAE encoding of the init image")


def decode_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """``clamp((decode_first_stage(latents) + 1) / 2, 0, 1)`` as float32 (a non-finite half-precision decode
    is redone in float32, see ``model.vae_guard``)."""
    with torch.no_grad():
        image = decode_first_stage_guarded(model, latents.to(_vae_dtype(model))).float()
    check_finite(image, "VAE decoding")
    return torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)


def _vae_dtype(model) -> torch.dtype:
    return next(model.first_stage_model.parameters()).dtype


def check_finite(t: torch.Tensor, stage: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"NaN or Inf in the {stage} output")
    return t


# ---------------------------------------------------------------- inpainting


class InpaintConditioning(NamedTuple):
    mask: torch.Tensor  # [1, 1, H, W] binarised, 1 = repaint
    masked_image: torch.Tensor  # [1, 3, H, W] = image * (mask < 0.5)
    mask_latent: torch.Tensor  # [B, 1, h, w]
    masked_image_latents: torch.Tensor  # [B, 4, h, w]
    c_concat: torch.Tensor  # [B, 5, h, w] = cat([mask_latent, masked_image_latents], 1)


def prepare_inpaint_conditioning(model, image: torch.Tensor, mask: torch.Tensor,
                                 noise: torch.Tensor) -> InpaintConditioning:
    """runwayml ``inpaint_st.py``: the mask thresholded at 0.5 (``make_batch_sd``), ``masked_image = image *
    (mask < 0.5)``, the mask nearest-resized to the latent size, the masked image VAE-encoded with a SAMPLED
    posterior (``noise`` [B, 4, h, w]); the UNet sees ``cat([x, mask_latent, masked_image_latents], 1)``."""
    device = noise.device
    image, mask = image.to(device, torch.float32), mask.to(device, torch.float32)
    mask = (mask >= 0.5).to(torch.float32)
    masked_image = image * (mask < 0.5)
    batch, latent_hw = noise.shape[0], tuple(noise.shape[-2:])
    mask_latent = F.interpolate(mask, size=latent_hw).expand(batch, -1, -1, -1)  # nearest
    masked_latents = encode_latents(model, masked_image, noise)  # one encode, broadcast over the batch
    c_concat = torch.cat([mask_latent, masked_latents], dim=1)  # [B, 1 + 4, h, w]
    return InpaintConditioning(mask, masked_image, mask_latent, masked_latents, c_concat)


# ---------------------------------------------------------------- schedules and denoisers


def _unet(model) -> Callable:
    """``apply_model`` returning float32 (the sampler state stays float32 whatever the weights' dtype)."""
    def unet(x, t, context, y=None):
        return model.apply_model(x, t, context, y).float()
    return unet


def sgm_alphas_cumprod(model) -> torch.Tensor:
    """The float64 schedule sgm rebuilds from the config (it never sees a float32 buffer)."""
    cfg = model.config
    return S.linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps)


def sigma_denoiser(model):
    """The sigma-space wrapper: sgm's quantising eps denoiser (SDXL) or k-diffusion's CompVis(V)Denoiser."""
    cfg = model.config
    if cfg.family == "sdxl":
        if cfg.parameterization != "eps":
            raise PipelineError("SDXL v-prediction models are not supported")
        return D.SGMEpsDenoiser(_unet(model), sgm_alphas_cumprod(model))
    wrapper = D.VDenoiser if cfg.parameterization == "v" else D.EpsDenoiser
    return wrapper(_unet(model), cfg.alphas_cumprod)


def make_schedule(model, sampler: str, steps: int, karras: bool = False, eta: float = 0.0):
    """A ``DDIMSchedule`` (ddim, plms) or descending sigmas ending in 0 (k samplers): k-diffusion's
    ``get_sigmas`` / Karras for SD1/2, sgm's ``LegacyDDPMDiscretization`` / Karras for SDXL."""
    if sampler in ("ddim", "plms"):
        return S.ddim_schedule(model.config.alphas_cumprod, steps, eta)
    if model.config.family == "sdxl":
        training = S.sgm_training_sigmas(sgm_alphas_cumprod(model))
        if karras:
            return S.get_sigmas_karras(steps, training[0].item(), training[-1].item())
        return S.sgm_sigmas(sgm_alphas_cumprod(model), steps)
    den = sigma_denoiser(model)
    if karras:
        return S.get_sigmas_karras(steps, den.sigma_min.item(), den.sigma_max.item())
    return den.get_sigmas(steps)


def num_steps(schedule) -> int:
    """Sampler steps a schedule runs."""
    if isinstance(schedule, S.DDIMSchedule):
        return len(schedule.timesteps)
    return len(schedule) - 1


def txt2img_start(model, schedule, x_T: torch.Tensor) -> torch.Tensor:
    """The first latent from unit noise: x_T (DDIM / PLMS), ``x_T * sigmas[0]`` (k-diffusion),
    ``x_T * sqrt(1 + sigmas[0]**2)`` (sgm, SDXL)."""
    if isinstance(schedule, S.DDIMSchedule):
        return x_T
    if model.config.family == "sdxl":
        return x_T * S.sgm_start_scale(schedule)
    return x_T * schedule[0]


def img2img_start(schedule, init_latent: torch.Tensor, noise: torch.Tensor, strength: float):
    """(first latent, remaining schedule) for img2img; see the module docstring. With strength 0 the schedule
    is empty (no step) and the first latent is ``init_latent`` itself."""
    n = num_steps(schedule)
    t_enc = int(strength * n)
    if isinstance(schedule, S.DDIMSchedule):
        if t_enc == 0:
            return init_latent, None
        if t_enc == n:  # a[n] = 0: pure noise
            return noise, schedule
        a = schedule.alphas[t_enc].to(torch.float32)
        x = a.sqrt() * init_latent + (1.0 - a).sqrt() * noise  # stochastic_encode
        return x, S.DDIMSchedule(*(field[:t_enc] for field in schedule))
    if t_enc == 0:
        return init_latent, None
    sigmas = schedule[n - t_enc:]
    return init_latent + noise * sigmas[0], sigmas


def sample_latents(model, sampler: str, schedule, x: torch.Tensor, cfg_scale: float, cond: dict,
                   uncond: dict | None = None, shared: dict | None = None,
                   noise_sampler: K.NoiseSampler | None = None, callback: Callable | None = None) -> torch.Tensor:
    """Run ``sampler`` from ``x`` over ``schedule`` with CFG ``uncond + (cond - uncond) * scale`` in one
    batched UNet call (cond only when ``uncond`` is None or the scale is 1). ``shared`` conditioning (inpainting's
    ``c_concat``) serves both halves. ``callback`` gets the sampler's per-step dict."""
    extra = {"cond": cond, "uncond": uncond, **(shared or {})}
    if sampler in ("ddim", "plms"):
        raw = D.CFGDenoiser(D.UNetOutput(_unet(model)), cfg_scale)
        if model.config.parameterization == "v":
            # PLMS too: the original PLMSSampler treats any output as eps; converting v is the sound extension
            den = D.EpsFromV(raw, model.config.alphas_cumprod)
        else:
            den = D.EpsPrediction(raw)
        if sampler == "ddim":
            latents, _ = K.sample_ddim(den, x, schedule, extra_args=extra, callback=callback,
                                       noise_sampler=noise_sampler)
        else:
            latents, _ = K.sample_plms(den, x, schedule, extra_args=extra, callback=callback)
        return latents
    den = D.CFGDenoiser(sigma_denoiser(model), cfg_scale)
    schedule = schedule.to(x.device)  # the samplers broadcast sigmas against x (not only as 0-dim scalars)
    if sampler == "euler":
        return K.sample_euler(den, x, schedule, extra_args=extra, callback=callback)
    if sampler == "euler_a":
        return K.sample_euler_ancestral(den, x, schedule, extra_args=extra, callback=callback,
                                        noise_sampler=noise_sampler)
    if sampler == "dpmpp_2m":
        return K.sample_dpmpp_2m(den, x, schedule, extra_args=extra, callback=callback)
    raise PipelineError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------- CUDA-graph loop


class _HeldRunner:
    """A model's ``GraphRunner`` and the weights it was made for (the captured graphs read their memory).

    A copy of the model gets an empty holder: its weights live elsewhere (and graphs cannot be copied)."""

    def __init__(self, runner: GraphRunner | None = None, weights: tuple = ()):
        self.runner, self.weights = runner, weights

    def __deepcopy__(self, memo):
        return _HeldRunner()


def _unet_weights(model) -> tuple:
    """Where the UNet's tensors live: it changes when the model moves or changes dtype (``.to``, ``.half``)."""
    unet = model.model.diffusion_model
    return tuple(t.data_ptr() for t in (*unet.parameters(), *unet.buffers()))


def loop_runner(model, settings: GenerationSettings) -> GraphRunner | None:
    """The model's ``GraphRunner`` when this run's loop is CUDA-graphed (CUDA model, ``use_graphs``, a sigma
    sampler), else None (the eager ``sample_latents``). One runner per model, held on the model as
    ``model.graph_runner`` so its captured loops serve every later image; made anew when the weights moved."""
    device = model_device(model)
    if not settings.use_graphs or device.type != "cuda" or settings.sampler not in GRAPH_SAMPLERS:
        return None
    held = getattr(model, "graph_runner", None)
    weights = _unet_weights(model)
    if not isinstance(held, _HeldRunner) or held.runner is None or held.weights != weights:
        held = _HeldRunner(GraphRunner(tables_on_device(sigma_denoiser(model), device), device), weights)
        model.graph_runner = held
    return held.runner


def sample_latents_graphed(runner: GraphRunner, sampler: str, sigmas: torch.Tensor, x: torch.Tensor,
                           cfg_scale: float, cond: dict, uncond: dict | None = None, shared: dict | None = None,
                           draw_noise: Callable[[], torch.Tensor] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``sample_latents`` for a sigma sampler through ``runner``. euler_a's noise is pre-drawn with
    ``draw_noise()`` (the pipeline's ancestral stream, in the order the eager loop draws it);
    ``progress(i, n)`` after each step (all at once after a graph replay)."""
    count = noise_draws(sampler, sigmas)
    noise = torch.stack([draw_noise() for _ in range(count)]) if count else None  # [N, B, C, h, w]
    try:
        return runner.run(x, cond, uncond, noise, sigmas=sigmas, cfg_scale=cfg_scale, sampler=sampler,
                          shared=shared, progress=progress)
    except GraphCaptureError as e:
        raise GraphCaptureError(f"{e}; run without CUDA graphs (use_graphs=False, tritonsd generate "
                                "--no-cuda-graphs)") from e


# ---------------------------------------------------------------- the whole run


def generate(model, settings: GenerationSettings, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], float32 on the CPU. ``callback(step_index, total_steps)`` after each
    sampler step (``step_index`` counts from 0; img2img runs fewer steps than ``settings.steps``)."""
    s = resolve_settings(model, settings)
    device = model_device(model)
    f = vae_factor(model)
    latent_shape = (model.config.vae.embed_dim, s.height // f, s.width // f)
    streams = NoiseStreams(s.seed, s.batch, device)
    x_T = streams.draw("start", latent_shape)  # == start_noise(seed, batch, shape)

    cond, uncond = encode_prompts(model, s.prompt, s.negative_prompt, s.batch, s.cfg_scale, s.height, s.width)
    shared = {}
    if model.config.unet.in_channels == 9:
        image = s.init_image if s.init_image is not None else torch.zeros(1, 3, s.height, s.width)
        mask = s.mask if s.mask is not None else torch.ones(1, 1, s.height, s.width)
        shared["c_concat"] = prepare_inpaint_conditioning(model, image, mask, streams.draw("vae", latent_shape)).c_concat

    schedule = make_schedule(model, s.sampler, s.steps, s.karras, s.eta)
    if s.init_image is not None and s.mask is None:
        init_latent = encode_latents(model, s.init_image, streams.draw("vae", latent_shape))
        x, schedule = img2img_start(schedule, init_latent, x_T, s.strength)
    else:
        x = txt2img_start(model, schedule, x_T)

    if schedule is None:  # img2img at strength 0
        latents = x
    else:
        runner = loop_runner(model, s)
        if runner is not None:
            latents = sample_latents_graphed(runner, s.sampler, schedule, x, s.cfg_scale, cond, uncond, shared,
                                             draw_noise=lambda: streams.draw("ancestral", latent_shape),
                                             progress=callback)
        else:
            total = num_steps(schedule)
            step_callback = None if callback is None else (lambda d: callback(d["i"], total))
            latents = sample_latents(model, s.sampler, schedule, x, s.cfg_scale, cond, uncond, shared,
                                     noise_sampler=streams.noise_sampler(latent_shape), callback=step_callback)
    check_finite(latents, f"{s.sampler} sampling")
    return decode_latents(model, latents).cpu()
