"""Recomputing a reference file's tensors, one group (name prefix) at a time, from the file's STORED inputs.

Every group handler takes a ``Recompute`` (a Pipeline, stored tensors, JSON) and the group's key names and
returns ``{name: tensor}`` for what it recomputed; names it does not return and that are not inputs become
failures in ``tools/parity.py``. Conditioning, schedules, sampling and decoding go through the Pipeline's stages
(``encode`` / ``encode_text``, ``prepare_latents``, ``denoise``, ``decode``) and ``sampler.wiring``, so what is
checked is what users run; the module-level groups (tokens, the text towers as the original scripts call them,
one UNet call, the VAE) call the model's own modules. No model math and no sampler wiring lives here: the stored inputs enter the stages as a
``StoredNoise`` source and stored conditioning.

Nothing is hard-wired to the public files: batch sizes and latent sizes come from the stored tensors' shapes,
prompts and step counts from the JSON (steps, when absent there, from the shapes), CFG scales from the group
name (``ddim_cfg7p5`` -> DDIM, scale 7.5).

Sampling groups read their conditioning from the stored ``sample.*`` / ``inpaint.*`` tensors, so a failure in
the text tower shows in the ``text`` / ``sample`` rows and not in every sampler's rows too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tritonsd.sampler import registry
from tritonsd.sampler import schedule as S
from tritonsd.sampler import wiring as W
from tritonsd.pipeline import Conditioning, Pipeline
from tritonsd.testing import a1111_groups as A
from tritonsd.testing.controlnet_canny import INPUTS as CANNY_INPUTS, canny_group
from tritonsd.testing.reference import GroupError


# ---------------------------------------------------------------- what is an input


_INPUT_NAMES = {"unet.x", "vae.z", "vae.image", "sample.x_T",
                "inpaint.image", "inpaint.mask", "inpaint.masked_image_noise", "inpaint.x_T"} | CANNY_INPUTS
_INPUT_PATTERNS = [re.compile(p) for p in (
    r"unet\.t\d+$",  # timesteps of a UNet call
    r"unet\.(context|y)$",  # conditioning fed to the UNet call (rows of text.*; checked as "derived" when possible)
    r"[\w]+\.noise$",  # noise a stochastic sampler drew, stored so the run is reproducible
    r"text\.(original_size_as_tuple|crop_coords_top_left|target_size_as_tuple|aesthetic_score)$",
)]


def is_input(name: str, meta: dict) -> bool:
    """Whether ``name`` is an input of the reference run (stored, not produced by the model)."""
    kind = reference_kind(meta)
    if kind is not None:
        return A.is_input(name, meta, kind)
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


def reference_kind(meta: dict) -> str | None:
    """The A1111 reference kind (``testing/a1111_groups.py``), or None for an original-code reference."""
    return A.reference_kind(meta)


def group_names(ref: dict[str, torch.Tensor], meta: dict) -> dict[str, list[str]]:
    """{group: names}, in the JSON's order (then any names it does not list, sorted): the name prefix, or for
    the A1111 case references the case."""
    kind = reference_kind(meta)
    listed = [k for k in meta.get("tensors", {}) if k in ref]
    order = listed + sorted(k for k in ref if k not in set(listed))
    groups: dict[str, list[str]] = {}
    for name in order:
        group = name.split(".", 1)[0] if kind is None else A.group_of(name, meta, kind)
        groups.setdefault(group, []).append(name)
    return groups


@dataclass
class Recompute:
    """A Pipeline (None for a reference that needs no model) and one reference file (tensors on the CPU as
    stored, the JSON as a dict); where the file is (for what lies beside it) and notes for the user."""

    pipe: Pipeline | None
    ref: dict[str, torch.Tensor]
    meta: dict
    device: torch.device
    reference: Path | None = None
    embeddings_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # checks of what is not a tensor (an infotext): name, group,
    # pass, note

    @property
    def model(self):
        return self.pipe.model

    @property
    def config(self):
        return self.pipe.config

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

    def image_size(self, latent: torch.Tensor) -> tuple[int, int]:
        """(height, width) in pixels of a stored latent [B, C, h, w]."""
        factor = 2 ** (len(self.config.vae.ch_mult) - 1)
        return latent.shape[-2] * factor, latent.shape[-1] * factor

    def settings(self, x_T: torch.Tensor, **fields):
        """Pipeline settings for a reference run of the original scripts from ``x_T`` [B, C, h, w] (batch and size)
        and ``fields``: their prompt encoding (one 77-token window, the text taken literally)."""
        height, width = self.image_size(x_T)
        return self.pipe.settings(batch_size=x_T.shape[0], width=width, height=height, seed=0,
                                  prompt_syntax="original", **fields)


class StoredNoise:
    """A ``NoiseSource`` (``sampler/noise.py``) replaying a reference run's stored noise: x_T, the VAE
    posterior noise, and per-step ancestral noise in the order the sampler draws it."""

    def __init__(self, start: torch.Tensor, vae: torch.Tensor | None = None,
                 ancestral: torch.Tensor | None = None, group: str = ""):
        self._start, self._vae, self.group = start, vae, group
        self.left = [] if ancestral is None else list(ancestral.unbind(0))

    def start(self, shape) -> torch.Tensor:
        return _fits(self._start, shape, "x_T")

    def vae(self, shape) -> torch.Tensor:
        if self._vae is None:
            raise GroupError("the run needs VAE posterior noise, which the file does not store")
        return _fits(self._vae, shape, "VAE noise")

    def ancestral(self, shape) -> torch.Tensor:
        if not self.left:
            raise GroupError(f"the sampler asked for more noise than {self.group}.noise holds")
        return self.left.pop(0)


def _fits(t: torch.Tensor, shape, what: str) -> torch.Tensor:
    if tuple(t.shape[1:]) != tuple(shape):
        raise GroupError(f"the stored {what} is {list(t.shape)}, the run needs [B, {', '.join(map(str, shape))}]")
    return t


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
    """``encode_text`` keywords for the conditioner's non-text inputs, ``values(input_key)``."""
    return {_SIZE_ARGS.get(key, key): values(key) for key in ctx.model.conditioner.input_keys if key != "txt"}


def text_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    if ctx.config.family != "sdxl":
        prompts = ctx.prompts("tokens.input_ids")
        return {"text.context": ctx.model.get_learned_conditioning(prompts)}
    prompts = ctx.prompts("tokens.clip_l")
    out: dict[str, torch.Tensor] = {}
    for kind, embedder in _text_embedders(ctx):
        if kind == "clip_l":
            out[f"text.clip_l_{embedder.layer}"] = embedder(prompts)
        else:
            features, pooled = embedder(prompts)
            out[f"text.open_clip_{embedder.layer}"] = features
            out["text.open_clip_pooled"] = pooled
    conditioner = ctx.model.conditioner
    for embedder, key in zip(conditioner.embedders, conditioner.input_keys):
        if key != "txt" and f"text.emb_{key}" in keys:
            out[f"text.emb_{key}"] = embedder(ctx.get(f"text.{key}"))
    if _wanted(keys, "text.crossattn", "text.vector"):
        sizes = _size_conditions(ctx, lambda key: ctx.get(f"text.{key}"))
        out["text.crossattn"], out["text.vector"] = ctx.model.get_learned_conditioning(prompts, **sizes)
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
    sched = W.make_schedule(ctx.config, registry.get(registry.ORIGINAL_SAMPLER), _ddim_steps(ctx, None))
    return {"ddim.timesteps": sched.timesteps, "ddim.alphas": sched.alphas, "ddim.alphas_prev": sched.alphas_prev}


def kdiff_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    steps = ctx.steps(ctx.ref["kdiff.sigmas"].shape[0] - 1 if "kdiff.sigmas" in ctx.ref else None, "kdiff.sigmas")
    spec = registry.get(registry.REFERENCE_SIGMA_SAMPLER)
    return {"kdiff.sigmas": W.make_schedule(ctx.config, spec, steps, karras=False),
            "kdiff.sigmas_karras": W.make_schedule(ctx.config, spec, steps, karras=True)}


def sample_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    """The sampling runs' conditioning from the JSON's sample prompt through ``Pipeline.encode`` (and SDXL's
    sigmas / timesteps through the wiring)."""
    x_T = ctx.get("sample.x_T")
    settings = ctx.settings(x_T, prompt=str(ctx.meta_value("sample_prompt")),
                            negative_prompt=str(ctx.meta.get("sample_negative_prompt", "")),
                            sampler=registry.REFERENCE_SIGMA_SAMPLER,
                            steps=_sigma_steps(ctx, "sample") if ctx.config.family == "sdxl" else 1)
    if ctx.config.family != "sdxl":
        cond = ctx.pipe.encode(settings)
        return {"sample.cond": cond.cond["context"], "sample.uncond": cond.uncond["context"]}
    out = {}
    if _wanted(keys, "sample.crossattn", "sample.vector", "sample.uc_crossattn", "sample.uc_vector"):
        sizes = _size_conditions(ctx, lambda key: _sgm_sample_size(ctx, key, x_T))
        sizes.pop("aesthetic_score", None)
        cond = ctx.pipe.encode(settings, **sizes)
        out["sample.crossattn"], out["sample.vector"] = cond.cond["context"], cond.cond["y"]
        out["sample.uc_crossattn"], out["sample.uc_vector"] = cond.uncond["context"], cond.uncond["y"]
    if _wanted(keys, "sample.sigmas", "sample.timesteps"):
        sigmas = W.make_schedule(ctx.config, registry.get(settings.sampler), settings.steps)
        out["sample.sigmas"] = sigmas
        out["sample.timesteps"] = W.sigma_denoiser(None, ctx.config).sigma_to_idx(sigmas[:-1])
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
    if key in ("original_size_as_tuple", "target_size_as_tuple"):
        return ctx.image_size(x_T)
    if key == "crop_coords_top_left":
        return (0, 0)
    raise GroupError(f"needs {meta_key!r} from the reference JSON, which does not give it")


# ---------------------------------------------------------------- sampler groups: <sampler>_cfg<scale>


@dataclass(frozen=True)
class SamplerGroup:
    sampler: str  # a registry name
    karras: bool
    scale: float


_SAMPLER_GROUP = re.compile(r"(?P<sampler>[a-z0-9_]+?)_cfg(?P<whole>\d+)(?:p(?P<frac>\d+))?")


def parse_sampler_group(group: str) -> SamplerGroup | None:
    """``ddim_cfg7p5`` -> DDIM at CFG 7.5; ``dpmpp_2m_karras_cfg7p5`` -> DPM++ 2M, Karras sigmas; None if the
    name is not of that form or names a sampler the registry does not know (by our name or one of its
    ``reference_names``)."""
    m = _SAMPLER_GROUP.fullmatch(group)
    if m is None:
        return None
    name = m.group("sampler")
    karras = name.endswith("_karras")
    spec = registry.from_reference_name(name.removesuffix("_karras"))
    if spec is None:
        return None
    scale = float(f"{m.group('whole')}.{m.group('frac') or 0}")
    return SamplerGroup(spec.name, karras, scale)


def run_stages(ctx: Recompute, settings, cond: Conditioning, noise: StoredNoise) -> tuple:
    """``prepare_latents`` and ``denoise`` from the stored noise: (latents, the Latents, the step dicts)."""
    latents = ctx.pipe.prepare_latents(settings, noise)
    steps: list[dict] = []
    x = ctx.pipe.denoise(latents, cond, settings, callback=steps.append)
    if noise.left:
        raise GroupError(f"{noise.group}.noise holds {len(noise.left)} more noise tensors than the sampler used")
    return x, latents, steps


def _stepped_outputs(ctx: Recompute, group: str, keys, x, steps, start, image_name: str) -> dict:
    """``<group>.latents`` and, from the step dicts, DDIM's ``x_inter`` / ``pred_x0`` (both lists start with
    the first latent, as the original's) or the sigma samplers' ``denoised``; the decoded image when wanted."""
    out = {f"{group}.latents": x}
    if "t" in steps[0]:  # timestep space
        out[f"{group}.x_inter"] = torch.stack([start, *(d["x"] for d in steps[1:]), x])
        out[f"{group}.pred_x0"] = torch.stack([start, *(d["denoised"] for d in steps)])
    else:
        out[f"{group}.denoised"] = torch.stack([d["denoised"] for d in steps])
    if image_name in keys:
        out[image_name] = ctx.pipe.decode(x)
    return out


def sampler_group(ctx: Recompute, group: str, spec: SamplerGroup, keys: list[str]) -> dict[str, torch.Tensor]:
    """A sampling run from the stored x_T (and noise) and the stored conditioning (``sample.*``), so a failure in
    the text tower shows in the text / sample rows only."""
    sampler = registry.get(spec.sampler)
    space = sampler.space
    sdxl = ctx.config.family == "sdxl"
    sgm = [s.a1111_name for s in registry.SAMPLERS.values() if s.sgm]
    if sdxl and space == "timesteps":
        raise GroupError(f"{spec.sampler.upper()} is not an sgm sampler; SDXL references use {' / '.join(sgm)}")
    if sdxl and spec.karras:
        raise GroupError("sgm sampling with Karras sigmas is not supported")
    if sdxl and not sampler.sgm:
        raise GroupError(f"sgm sampler {spec.sampler!r} is not supported ({' and '.join(sgm)} are)")
    x_T = ctx.get("sample.x_T")
    steps = _ddim_steps(ctx, f"{group}.x_inter") if space == "timesteps" else _sigma_steps(ctx, group)
    settings = ctx.settings(x_T, sampler=spec.sampler, karras=spec.karras, steps=steps, cfg_scale=spec.scale)
    if sdxl:
        cond = Conditioning({"context": ctx.get("sample.crossattn"), "y": ctx.get("sample.vector")},
                            {"context": ctx.get("sample.uc_crossattn"), "y": ctx.get("sample.uc_vector")})
    else:
        cond = Conditioning({"context": ctx.get("sample.cond")}, {"context": ctx.get("sample.uncond")})
    if spec.scale == 1.0:
        cond.uncond = None
    ancestral = None
    if sampler.stochastic:
        if f"{group}.noise" not in ctx.ref:
            raise GroupError(f"{group} is stochastic but the file stores no {group}.noise to replay")
        ancestral = ctx.get(f"{group}.noise")
    noise = StoredNoise(x_T, ancestral=ancestral, group=group)
    x, latents, step_dicts = run_stages(ctx, settings, cond, noise)
    return _stepped_outputs(ctx, group, keys, x, step_dicts, latents.x, f"{group}.image")


# ---------------------------------------------------------------- inpainting


_GUIDANCE = re.compile(r"unconditional_guidance_scale=([\d.]+)")
_ETA = re.compile(r"\beta=([\d.]+)")


def _produced_by(ctx: Recompute, name: str) -> str:
    return str(ctx.meta.get("tensors", {}).get(name, {}).get("produced_by", ""))


def inpaint_group(ctx: Recompute, keys: list[str]) -> dict[str, torch.Tensor]:
    """runwayml ``scripts/inpaint_st.py`` through the stages: ``encode`` for cond / uncond, ``prepare_latents``
    for the masked image, the nearest-downsampled mask and the SAMPLED masked-image latents (the stored noise),
    then DDIM with ``c_concat`` shared by both CFG halves and ``decode``."""
    call = _produced_by(ctx, "inpaint.latents")
    eta = float(_ETA.search(call).group(1)) if _ETA.search(call) else 0.0
    if eta != 0.0:
        raise GroupError(f"inpaint.latents was sampled with eta={eta}, whose noise the file does not store")
    guidance = _GUIDANCE.search(call)
    scale = float(ctx.meta.get("inpaint_cfg_scale", guidance.group(1) if guidance else 7.5))
    x_T = ctx.get("inpaint.x_T")
    image, mask = ctx.get("inpaint.image"), ctx.get("inpaint.mask")
    settings = ctx.settings(x_T, prompt=str(ctx.meta_value("inpaint_prompt")),
                            negative_prompt=str(ctx.meta.get("inpaint_negative_prompt", "")),
                            sampler=registry.ORIGINAL_SAMPLER,
                            steps=_ddim_steps(ctx, "inpaint.x_inter"), cfg_scale=scale, init_image=image,
                            mask=mask)
    cond = ctx.pipe.encode(settings)
    out: dict[str, torch.Tensor] = {"inpaint.cond": cond.cond["context"], "inpaint.uncond": cond.uncond["context"]}
    noise = StoredNoise(x_T, vae=ctx.get("inpaint.masked_image_noise"), group="inpaint")
    if _wanted(keys, "inpaint.latents", "inpaint.x_inter", "inpaint.pred_x0", "inpaint.result"):
        x, latents, steps = run_stages(ctx, settings, cond, noise)
        out.update(_stepped_outputs(ctx, "inpaint", keys, x, steps, latents.x, "inpaint.result"))
    else:
        latents = ctx.pipe.prepare_latents(settings, noise)
    ic = latents.inpaint
    out.update({"inpaint.masked_image": ic.masked_image, "inpaint.mask_latent": ic.mask_latent,
                "inpaint.masked_image_latents": ic.masked_image_latents, "inpaint.c_concat": ic.c_concat})
    # the posterior of the masked image, one row per image as the script encodes it
    masked = ic.masked_image.expand(x_T.shape[0], -1, -1, -1)
    mean, logvar = ctx.model.encode_first_stage(masked)
    out.update({"inpaint.masked_image_posterior_mean": mean, "inpaint.masked_image_posterior_logvar": logvar,
                "inpaint.masked_image_posterior_std": torch.exp(0.5 * logvar)})
    return out


# ---------------------------------------------------------------- dispatch


# the reference files' group names (``ddim``: the original's DDIM schedule tensors, a file group, not a sampler)
FIXED_GROUPS: dict[str, Callable[[Recompute, list[str]], dict[str, torch.Tensor]]] = {
    "tokens": tokens_group, "text": text_group, "unet": unet_group, "vae": vae_group, "sample": sample_group,
    "ddim": ddim_group, "kdiff": kdiff_group, "inpaint": inpaint_group, "canny": canny_group,
}


def recompute_group(ctx: Recompute, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Everything of ``group`` this runtime recomputes (may include names the file does not hold)."""
    kind = reference_kind(ctx.meta)
    if kind is not None:
        return A.recompute(ctx, kind, group, keys)
    handler = FIXED_GROUPS.get(group)
    if handler is not None:
        return handler(ctx, keys)
    spec = parse_sampler_group(group)
    if spec is None:
        raise GroupError(f"unknown group {group!r} (not one of {', '.join(FIXED_GROUPS)} nor <sampler>_cfg<scale> "
                         f"with a sampler of {', '.join(registry.SAMPLERS)})")
    return sampler_group(ctx, group, spec, keys)
