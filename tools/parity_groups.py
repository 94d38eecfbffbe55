"""Recomputing a reference file's tensors, one group (name prefix) at a time, from the file's STORED inputs.

Every group handler takes a ``Recompute`` (model, stored tensors, JSON) and the group's key names and returns
``{name: tensor}`` for what it recomputed; names it does not return and that are not inputs become failures in
``tools/parity.py``. Handlers use only the model's public API (``get_learned_conditioning``, ``apply_model``,
``decode_first_stage``, ``encode_first_stage``, the text modules' tokenizers) and the sampler modules
(``sampler.schedule``, ``sampler.denoise``, ``sampler.samplers``); no model math lives here.

Nothing is hard-wired to the public files: batch sizes and latent sizes come from the stored tensors' shapes,
prompts and step counts from the JSON (steps, when absent there, from the shapes), CFG scales from the group
name (``ddim_cfg7p5`` -> DDIM, scale 7.5).

Sampling groups read their conditioning from the stored ``sample.*`` / ``inpaint.*`` tensors, so a failure in
the text tower shows in the ``text`` / ``sample`` rows and not in every sampler's rows too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..sampler import denoise as D
from ..sampler import samplers as K
from ..sampler import schedule as S


class GroupError(ValueError):
    """A group cannot be recomputed from what the reference file holds (or is of a kind we do not know)."""


# ---------------------------------------------------------------- what is an input


_INPUT_NAMES = {"unet.x", "vae.z", "vae.image", "sample.x_T",
                "inpaint.image", "inpaint.mask", "inpaint.masked_image_noise", "inpaint.x_T"}
_INPUT_PATTERNS = [re.compile(p) for p in (
    r"unet\.t\d+$",  # timesteps of a UNet call
    r"unet\.(context|y)$",  # conditioning fed to the UNet call (rows of text.*; checked as "derived" when possible)
    r"[\w]+\.noise$",  # noise a stochastic sampler drew, stored so the run is reproducible
    r"text\.(original_size_as_tuple|crop_coords_top_left|target_size_as_tuple|aesthetic_score)$",
)]


def is_input(name: str, meta: dict) -> bool:
    """Whether ``name`` is an input of the reference run (stored, not produced by the model)."""
    if name in _INPUT_NAMES or any(p.match(name) for p in _INPUT_PATTERNS):
        return True
    produced_by = str(meta.get("tensors", {}).get(name, {}).get("produced_by", ""))
    return produced_by.startswith("input")


_ROWS_OF = re.compile(r"^rows \[([\d,\s]+)\] of ([\w.]+)$")


def derived_from(name: str, meta: dict) -> tuple[str, list[int]] | None:
    """``("text.context", [1, 2])`` for an input stored as "rows [1, 2] of text.context", else None."""
    produced_by = str(meta.get("tensors", {}).get(name, {}).get("produced_by", "")).strip()
    m = _ROWS_OF.match(produced_by)
    if m is None:
        return None
    return m.group(2), [int(r) for r in m.group(1).replace(",", " ").split()]


# ---------------------------------------------------------------- the run's inputs


@dataclass
class Recompute:
    """A loaded model and one reference file (tensors on the CPU as stored, the JSON as a dict)."""

    model: torch.nn.Module
    ref: dict[str, torch.Tensor]
    meta: dict
    device: torch.device

    @property
    def config(self):
        return self.model.config

    def get(self, name: str) -> torch.Tensor:
        """A stored tensor on the compute device; a clear error when the file lacks it."""
        if name not in self.ref:
            raise GroupError(f"needs the input {name!r}, which the reference file does not hold")
        return self.ref[name].to(self.device)

    def meta_value(self, key: str):
        if key not in self.meta:
            raise GroupError(f"needs {key!r} from the reference JSON, which does not give it")
        return self.meta[key]

    def prompts(self, tokens_key: str | None = None) -> list[str]:
        """The prompts of the tokens / text rows: the JSON's ``prompts`` (or the tokens entry's)."""
        prompts = self.meta.get("prompts")
        if prompts is None and tokens_key is not None:
            prompts = self.meta.get("tensors", {}).get(tokens_key, {}).get("prompts")
        if prompts is None:
            raise GroupError("needs the prompts, which the reference JSON does not give ('prompts')")
        return [str(p) for p in prompts]

    def steps(self, rows_hint: int | None = None, what: str = "") -> int:
        """The sampling steps: the JSON's ``steps``, else ``rows_hint`` (from a stored tensor's shape)."""
        steps = self.meta.get("steps")
        if steps is None:
            steps = rows_hint
        if steps is None:
            raise GroupError(f"the number of steps is unknown: the JSON has no 'steps' and no stored {what} "
                             "tensor shows it")
        return int(steps)

    def image(self, latents: torch.Tensor) -> torch.Tensor:
        """What the original scripts save: ``clamp((decode_first_stage(latents) + 1) / 2, 0, 1)``."""
        return torch.clamp((self.model.decode_first_stage(latents) + 1.0) / 2.0, 0.0, 1.0)

    def alphas_cumprod64(self) -> torch.Tensor:
        """The float64 schedule the original holds besides the float32 buffer (DDIM's v conversion, sgm).

        The linear schedule of the config; the checkpoint's own buffer when that differs from it.
        """
        cfg = self.config
        acp64 = S.linear_alphas_cumprod(cfg.linear_start, cfg.linear_end, cfg.timesteps)
        if cfg.alphas_cumprod_source == "file" and not torch.equal(acp64.float(), cfg.alphas_cumprod.float()):
            return cfg.alphas_cumprod.double()
        return acp64


def _wanted(keys, *names: str) -> bool:
    return any(n in keys for n in names)


# ---------------------------------------------------------------- tokens, text


def _text_embedders(ctx: Recompute) -> list[tuple[str, torch.nn.Module]]:
    """(short name, module) of each text tower: "clip_l" (transformers CLIP) or "open_clip"."""
    if ctx.config.family != "sdxl":
        return [("input_ids", ctx.model.cond_stage_model)]
    out = []
    for embedder in ctx.model.conditioner.text_embedders:
        kind = "clip_l" if type(embedder).__name__ == "FrozenCLIPEmbedder" else "open_clip"
        out.append((kind, embedder))
    return out


def tokens_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    prompts = ctx.prompts("tokens.input_ids")
    return {f"tokens.{kind}": embedder.tokenize(prompts) for kind, embedder in _text_embedders(ctx)}


_SIZE_ARGS = {"original_size_as_tuple": "original_size", "crop_coords_top_left": "crop_coords_top_left",
              "target_size_as_tuple": "target_size", "aesthetic_score": "aesthetic_score"}


def _size_conditions(ctx: Recompute, values: Callable[[str], object]) -> dict[str, object]:
    """``get_learned_conditioning`` keywords for the conditioner's non-text inputs, ``values(input_key)``."""
    return {_SIZE_ARGS.get(key, key): values(key) for key in ctx.model.conditioner.input_keys if key != "txt"}


def text_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    model = ctx.model
    if ctx.config.family != "sdxl":
        prompts = ctx.prompts("tokens.input_ids")
        return {"text.context": model.get_learned_conditioning(prompts)}
    prompts = ctx.prompts("tokens.clip_l")
    out: dict[str, torch.Tensor] = {}
    for kind, embedder in _text_embedders(ctx):
        if kind == "clip_l":
            out[f"text.clip_l_{embedder.layer}"] = embedder(prompts)
        else:
            features, pooled = embedder(prompts)
            out[f"text.open_clip_{embedder.layer}"] = features
            out["text.open_clip_pooled"] = pooled
    conditioner = model.conditioner
    for embedder, key in zip(conditioner.embedders, conditioner.input_keys):
        if key != "txt" and f"text.emb_{key}" in keys:
            out[f"text.emb_{key}"] = embedder(ctx.get(f"text.{key}"))
    if _wanted(keys, "text.crossattn", "text.vector"):
        sizes = _size_conditions(ctx, lambda key: ctx.get(f"text.{key}"))
        out["text.crossattn"], out["text.vector"] = model.get_learned_conditioning(prompts, **sizes)
    return out


# ---------------------------------------------------------------- UNet, VAE


def unet_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    """``unet.out<k>`` = ``apply_model(unet.x, unet.t<k>, unet.context, unet.y)`` for every stored pair."""
    out = {}
    x, context = ctx.get("unet.x"), ctx.get("unet.context")
    y = ctx.get("unet.y") if "unet.y" in ctx.ref else None
    for name in keys:
        m = re.fullmatch(r"unet\.out(\w+)", name)
        if m is not None:
            t = ctx.get(f"unet.t{m.group(1)}")
            out[name] = ctx.model.apply_model(x, t, context, y)
    return out


def vae_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    vae = ctx.model.first_stage_model
    if "vae.decoded" in keys:
        out["vae.decoded"] = vae.decode(ctx.get("vae.z"))
    if _wanted(keys, "vae.posterior_mean", "vae.posterior_logvar", "vae.posterior_std"):
        mean, logvar = ctx.model.encode_first_stage(ctx.get("vae.image"))
        out.update({"vae.posterior_mean": mean, "vae.posterior_logvar": logvar,
                    "vae.posterior_std": torch.exp(0.5 * logvar)})
    return out


# ---------------------------------------------------------------- schedules and sampling conditioning


def _ddim_steps(ctx: Recompute, x_inter_key: str | None) -> int:
    """DDIM steps: the JSON's, else the S whose ``make_ddim_timesteps`` gives x_inter's rows - 1 timesteps."""
    rows = None
    if x_inter_key is not None and x_inter_key in ctx.ref:
        count = ctx.ref[x_inter_key].shape[0] - 1
        candidates = [count] + [s for s in range(1, S.NUM_TRAIN_TIMESTEPS + 1) if s != count]
        rows = next((s for s in candidates if len(S.ddim_timesteps(s)) == count), None)
    if rows is None and "ddim.timesteps" in ctx.ref:
        count = ctx.ref["ddim.timesteps"].shape[0]
        rows = next((s for s in range(1, S.NUM_TRAIN_TIMESTEPS + 1) if len(S.ddim_timesteps(s)) == count), None)
    return ctx.steps(rows, "x_inter / ddim.timesteps")


def _sigma_steps(ctx: Recompute, group: str) -> int:
    """k-diffusion / sgm steps: the JSON's, else the rows of ``<group>.denoised`` or of the stored sigmas."""
    rows = None
    for key in (f"{group}.denoised", "kdiff.sigmas", "sample.sigmas"):
        if key in ctx.ref:
            rows = ctx.ref[key].shape[0] - (0 if key.endswith("denoised") else 1)
            break
    return ctx.steps(rows, f"{group}.denoised / sigmas")


def ddim_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    sched = S.ddim_schedule(ctx.config.alphas_cumprod, _ddim_steps(ctx, None))
    return {"ddim.timesteps": sched.timesteps, "ddim.alphas": sched.alphas, "ddim.alphas_prev": sched.alphas_prev}


def _kdiff_denoiser(ctx: Recompute):
    wrapper = D.VDenoiser if ctx.config.parameterization == "v" else D.EpsDenoiser
    return wrapper(ctx.model.apply_model, ctx.config.alphas_cumprod)


def kdiff_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    den = _kdiff_denoiser(ctx)
    steps = ctx.steps(ctx.ref["kdiff.sigmas"].shape[0] - 1 if "kdiff.sigmas" in ctx.ref else None, "kdiff.sigmas")
    return {"kdiff.sigmas": den.get_sigmas(steps),
            "kdiff.sigmas_karras": S.get_sigmas_karras(steps, den.sigma_min.item(), den.sigma_max.item(), rho=7.0)}


def _sgm_denoiser(ctx: Recompute) -> D.SGMEpsDenoiser:
    if ctx.config.parameterization != "eps":
        raise GroupError("sgm sampling of a v-prediction SDXL model is not supported")
    return D.SGMEpsDenoiser(ctx.model.apply_model, ctx.alphas_cumprod64())


def _sgm_sigmas(ctx: Recompute, group: str) -> torch.Tensor:
    return S.sgm_sigmas(ctx.alphas_cumprod64(), _sigma_steps(ctx, group)).to(ctx.device)


def sample_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    """The sampling runs' conditioning from the JSON's sample prompt (and SDXL's sigmas / timesteps)."""
    model = ctx.model
    prompt = str(ctx.meta_value("sample_prompt"))
    negative = str(ctx.meta.get("sample_negative_prompt", ""))
    x_T = ctx.get("sample.x_T")
    n = x_T.shape[0]
    if ctx.config.family != "sdxl":
        return {"sample.cond": model.get_learned_conditioning(n * [prompt]),
                "sample.uncond": model.get_learned_conditioning(n * [negative])}
    out = {}
    if _wanted(keys, "sample.crossattn", "sample.vector", "sample.uc_crossattn", "sample.uc_vector"):
        sizes = _size_conditions(ctx, lambda key: _sgm_sample_size(ctx, key, x_T))
        out["sample.crossattn"], out["sample.vector"] = model.get_learned_conditioning(n * [prompt], **sizes)
        out["sample.uc_crossattn"], out["sample.uc_vector"] = model.get_learned_conditioning(
            n * [negative], zero_text=True, **sizes)
    if _wanted(keys, "sample.sigmas", "sample.timesteps"):
        sigmas = _sgm_sigmas(ctx, "sample")
        out["sample.sigmas"] = sigmas
        out["sample.timesteps"] = _sgm_denoiser(ctx).sigma_to_idx(sigmas[:-1])
    return out


_SGM_SAMPLE_META = {"original_size_as_tuple": "sample_original_size",
                    "crop_coords_top_left": "sample_crop_coords_top_left",
                    "target_size_as_tuple": "sample_target_size", "aesthetic_score": "sample_aesthetic_score"}


def _sgm_sample_size(ctx: Recompute, key: str, x_T: torch.Tensor):
    """A size condition of the SDXL sampling runs: the JSON's ``sample_*``, else what txt2img uses by default
    (original = target = the image size, crop 0, 0)."""
    meta_key = _SGM_SAMPLE_META.get(key, f"sample_{key}")
    if meta_key in ctx.meta:
        return tuple(ctx.meta[meta_key]) if isinstance(ctx.meta[meta_key], list) else ctx.meta[meta_key]
    factor = 2 ** (len(ctx.config.vae.ch_mult) - 1)
    if key in ("original_size_as_tuple", "target_size_as_tuple"):
        return (x_T.shape[-2] * factor, x_T.shape[-1] * factor)
    if key == "crop_coords_top_left":
        return (0, 0)
    raise GroupError(f"needs {meta_key!r} from the reference JSON, which does not give it")


# ---------------------------------------------------------------- sampler groups: <sampler>_cfg<scale>


@dataclass(frozen=True)
class SamplerGroup:
    sampler: str  # ddim | plms | euler | euler_a | dpmpp_2m
    karras: bool
    scale: float


_SAMPLER_GROUP = re.compile(r"(?P<sampler>[a-z0-9_]+?)_cfg(?P<whole>\d+)(?:p(?P<frac>\d+))?")
_SAMPLER_ALIASES = {"dpmpp2m": "dpmpp_2m", "euler_ancestral": "euler_a", "k_euler": "euler",
                    "k_euler_a": "euler_a"}
SAMPLERS = ("ddim", "plms", "euler", "euler_a", "dpmpp_2m")


def parse_sampler_group(group: str) -> SamplerGroup | None:
    """``ddim_cfg7p5`` -> DDIM at CFG 7.5; ``dpmpp_2m_karras_cfg7p5`` -> DPM++ 2M, Karras sigmas; None if the
    name is not of that form or names a sampler we do not know."""
    m = _SAMPLER_GROUP.fullmatch(group)
    if m is None:
        return None
    name = m.group("sampler")
    karras = name.endswith("_karras")
    name = name.removesuffix("_karras")
    name = _SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        return None
    scale = float(f"{m.group('whole')}.{m.group('frac') or 0}")
    return SamplerGroup(name, karras, scale)


def _ddim_model(ctx: Recompute, scale: float):
    """CFG on the raw UNet output, then eps (and x0 for v), as the original DDIMSampler does."""
    raw = D.CFGDenoiser(D.UNetOutput(ctx.model.apply_model), scale)
    if ctx.config.parameterization == "v":
        return D.EpsFromV(raw, ctx.alphas_cumprod64())
    return D.EpsPrediction(raw)


def _ddim_outputs(ctx: Recompute, group: str, keys, latents, inter, image_name: str) -> dict[str, torch.Tensor]:
    out = {f"{group}.latents": latents, f"{group}.x_inter": torch.stack(inter["x_inter"]),
           f"{group}.pred_x0": torch.stack(inter["pred_x0"])}
    if image_name in keys:
        out[image_name] = ctx.image(latents)
    return out


def _stored_noise_sampler(ctx: Recompute, group: str) -> tuple[Callable, list[torch.Tensor]]:
    """Returns ``<group>.noise[i]`` on its i-th call (the list shows what is left unused)."""
    if f"{group}.noise" not in ctx.ref:
        raise GroupError(f"{group} is stochastic but the file stores no {group}.noise to replay")
    noises = list(ctx.get(f"{group}.noise").unbind(0))

    def sample(_a, _b):
        if not noises:
            raise GroupError(f"the sampler asked for more noise than {group}.noise holds")
        return noises.pop(0)

    return sample, noises


def sampler_group(ctx: Recompute, group: str, spec: SamplerGroup, keys: list[str]) -> dict[str, torch.Tensor]:
    if spec.sampler in ("ddim", "plms"):
        return _timestep_sampler_group(ctx, group, spec, keys)
    if ctx.config.family == "sdxl":
        return _sgm_sampler_group(ctx, group, spec, keys)
    return _kdiff_sampler_group(ctx, group, spec, keys)


def _timestep_sampler_group(ctx, group, spec, keys):
    if ctx.config.family == "sdxl":
        raise GroupError(f"{spec.sampler.upper()} is not an sgm sampler; SDXL references use Euler / DPM++ 2M")
    sched = S.ddim_schedule(ctx.config.alphas_cumprod, _ddim_steps(ctx, f"{group}.x_inter"))
    extra = {"cond": {"context": ctx.get("sample.cond")}, "uncond": {"context": ctx.get("sample.uncond")}}
    x_T = ctx.get("sample.x_T")
    sampler = K.sample_ddim if spec.sampler == "ddim" else K.sample_plms
    latents, inter = sampler(_ddim_model(ctx, spec.scale), x_T, sched, extra_args=extra)
    return _ddim_outputs(ctx, group, keys, latents, inter, f"{group}.image")


def _sigma_sampler_run(ctx, group, spec, model, x, sigmas, extra, keys):
    """Runs euler / euler_a / dpmpp_2m over ``sigmas`` collecting each step's denoised x0."""
    denoised: list[torch.Tensor] = []
    kwargs = {}
    unused: list = []
    if spec.sampler == "euler_a":
        kwargs["noise_sampler"], unused = _stored_noise_sampler(ctx, group)
        kwargs.update(eta=1.0, s_noise=1.0)
    sampler = {"euler": K.sample_euler, "euler_a": K.sample_euler_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}
    latents = sampler[spec.sampler](model, x, sigmas, extra_args=extra,
                                    callback=lambda d: denoised.append(d["denoised"]), **kwargs)
    if unused:
        raise GroupError(f"{group}.noise holds {len(unused)} more noise tensors than the sampler used")
    out = {f"{group}.latents": latents, f"{group}.denoised": torch.stack(denoised)}
    if f"{group}.image" in keys:
        out[f"{group}.image"] = ctx.image(latents)
    return out


def _kdiff_sampler_group(ctx, group, spec, keys):
    """k-diffusion 0.1.1 through the CFG wrapper of its README: one batch [uncond, cond]."""
    den = _kdiff_denoiser(ctx)
    steps = _sigma_steps(ctx, group)
    if spec.karras:
        sigmas = S.get_sigmas_karras(steps, den.sigma_min.item(), den.sigma_max.item(), rho=7.0)
    else:
        sigmas = den.get_sigmas(steps)
    sigmas = sigmas.to(ctx.device)
    extra = {"cond": {"context": ctx.get("sample.cond")}, "uncond": {"context": ctx.get("sample.uncond")}}
    x = ctx.get("sample.x_T") * sigmas[0]
    return _sigma_sampler_run(ctx, group, spec, D.CFGDenoiser(den, spec.scale), x, sigmas, extra, keys)


def _sgm_sampler_group(ctx, group, spec, keys):
    """sgm ``do_sample``: LegacyDDPMDiscretization sigmas, start ``x_T * sqrt(1 + sigma_max^2)``, quantised
    denoiser, VanillaCFG over [uc, c]. EulerEDMSampler (s_churn 0) / DPMPP2MSampler are our euler / dpmpp_2m."""
    if spec.karras:
        raise GroupError("sgm sampling with Karras sigmas is not supported")
    if spec.sampler not in ("euler", "dpmpp_2m"):
        raise GroupError(f"sgm sampler {spec.sampler!r} is not supported (Euler and DPM++ 2M are)")
    sigmas = _sgm_sigmas(ctx, group)
    cond = {"context": ctx.get("sample.crossattn"), "y": ctx.get("sample.vector")}
    uncond = {"context": ctx.get("sample.uc_crossattn"), "y": ctx.get("sample.uc_vector")}
    x = ctx.get("sample.x_T") * S.sgm_start_scale(sigmas)
    model = D.CFGDenoiser(_sgm_denoiser(ctx), spec.scale)
    return _sigma_sampler_run(ctx, group, spec, model, x, sigmas, {"cond": cond, "uncond": uncond}, keys)


# ---------------------------------------------------------------- inpainting


_GUIDANCE = re.compile(r"unconditional_guidance_scale=([\d.]+)")
_ETA = re.compile(r"\beta=([\d.]+)")


def _produced_by(ctx: Recompute, name: str) -> str:
    return str(ctx.meta.get("tensors", {}).get(name, {}).get("produced_by", ""))


def inpaint_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    """runwayml ``scripts/inpaint_st.py``: masked image, nearest-downsampled mask, SAMPLED masked-image latents
    (mean + std * the stored noise), DDIM with ``c_concat`` shared by both CFG halves, decoded result."""
    model = ctx.model
    out: dict[str, torch.Tensor] = {}
    x_T = ctx.get("inpaint.x_T")
    n, hw = x_T.shape[0], tuple(x_T.shape[-2:])

    def batch(t: torch.Tensor) -> torch.Tensor:  # [1, ...] -> [n, ...] (the script repeats per sample)
        return t.repeat(n, *([1] * (t.dim() - 1))) if t.shape[0] == 1 else t

    image, mask = ctx.get("inpaint.image"), ctx.get("inpaint.mask")
    masked_image = image * (mask < 0.5)
    out["inpaint.masked_image"] = masked_image
    out["inpaint.mask_latent"] = F.interpolate(batch(mask), size=hw)  # nearest
    mean, logvar = model.encode_first_stage(batch(masked_image))
    std = torch.exp(0.5 * logvar)
    out["inpaint.masked_image_posterior_mean"] = mean
    out["inpaint.masked_image_posterior_std"] = std
    out["inpaint.masked_image_posterior_logvar"] = logvar
    latents = model.config.scale_factor * (mean + std * ctx.get("inpaint.masked_image_noise"))
    out["inpaint.masked_image_latents"] = latents
    out["inpaint.c_concat"] = torch.cat([out["inpaint.mask_latent"], latents], dim=1)

    prompt = str(ctx.meta_value("inpaint_prompt"))
    negative = str(ctx.meta.get("inpaint_negative_prompt", ""))
    out["inpaint.cond"] = model.get_learned_conditioning(n * [prompt])
    out["inpaint.uncond"] = model.get_learned_conditioning(n * [negative])

    if _wanted(keys, "inpaint.latents", "inpaint.x_inter", "inpaint.pred_x0", "inpaint.result"):
        out.update(_inpaint_ddim(ctx, keys, x_T))
    return out


def _inpaint_ddim(ctx: Recompute, keys, x_T) -> dict[str, torch.Tensor]:
    call = _produced_by(ctx, "inpaint.latents")
    eta = float(_ETA.search(call).group(1)) if _ETA.search(call) else 0.0
    if eta != 0.0:
        raise GroupError(f"inpaint.latents was sampled with eta={eta}, whose noise the file does not store")
    guidance = _GUIDANCE.search(call)
    scale = float(ctx.meta.get("inpaint_cfg_scale", guidance.group(1) if guidance else 7.5))
    sched = S.ddim_schedule(ctx.config.alphas_cumprod, _ddim_steps(ctx, "inpaint.x_inter"))
    extra = {"cond": {"context": ctx.get("inpaint.cond")}, "uncond": {"context": ctx.get("inpaint.uncond")},
             "c_concat": ctx.get("inpaint.c_concat")}
    latents, inter = K.sample_ddim(_ddim_model(ctx, scale), x_T, sched, extra_args=extra)
    return _ddim_outputs(ctx, "inpaint", keys, latents, inter, "inpaint.result")


# ---------------------------------------------------------------- dispatch


FIXED_GROUPS: dict[str, Callable[[Recompute, list[str]], dict[str, torch.Tensor]]] = {
    "tokens": tokens_group, "text": text_group, "unet": unet_group, "vae": vae_group, "sample": sample_group,
    "ddim": ddim_group, "kdiff": kdiff_group, "inpaint": inpaint_group,
}


def recompute_group(ctx: Recompute, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Everything of ``group`` this runtime recomputes (may include names the file does not hold)."""
    handler = FIXED_GROUPS.get(group)
    if handler is not None:
        return handler(ctx, keys)
    spec = parse_sampler_group(group)
    if spec is None:
        raise GroupError(f"unknown group {group!r} (not one of {', '.join(FIXED_GROUPS)} nor <sampler>_cfg<scale> "
                         f"with a sampler of {', '.join(SAMPLERS)})")
    return sampler_group(ctx, group, spec, keys)
