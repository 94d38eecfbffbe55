"""Recomputing the ControlNet references (``shared/fixtures/README-controlnet.md``) for ``tritonsd parity``.

A ControlNet reference is told apart by its JSON's ``controlnet_file`` (the file(s) beside the reference: one
name, or ``{"pth": ..., "safetensors": ...}``; every form is loaded, the first recomputes, the others are checked
to hold the same weights). Groups are name prefixes and are recognised by what they hold, not by their names:

* ``G.x`` + ``G.hint`` + ``G.t`` (``direct``, ``odd``): one ControlNet call (``G.control.NN``, ``G.guided_hint``)
  and ControlledUnetModel calls ``G.eps.*`` with each entry's ``control_scales`` / ``only_mid_control`` (an entry
  made with ``control=None`` is the plain UNet); ``G.context`` from its prompts when the JSON gives them;
* ``G.x_T`` with ``demo_runs[G]`` (``demo``, ``demo_guess``): ``gradio_canny.py``'s ``process()``: its own
  preprocessing (``annotator/util.py``'s ``resize_image`` / ``HWC3`` and OpenCV's Canny) for ``detected_map``,
  then the Pipeline's stages: DDIM with one ControlNet unit ("Balanced" at ``strength``, or guess mode = the extension's
  "ControlNet is more important": soft scales and no control on the unconditional half), then each step's
  ``apply_model`` on both halves, the decode and the demo's 8-bit image;
* ``G.x`` + ``G.hint`` + ``G.cond`` / ``G.uncond`` (``webui``, ``webui_odd``): sd-webui-controlnet's hooked UNet
  call on AUTOMATIC1111's CFG batch (cond rows, then uncond rows; the prompts marked +-1024 and unmarked again),
  one per control mode and guidance step, through ``control/apply.py``;
* ``canny``: ``testing/controlnet_canny.py`` (the original annotator's maps, and the extension's module beside it).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tritonsd.control import apply as C
from tritonsd.formats.controlnet_file import read_controlnet
from tritonsd.model.controlnet import load_controlnet
from tritonsd.pipeline import Conditioning
from tritonsd.sampler import registry
from tritonsd.sampler import schedule as S
from tritonsd.sampler.control import CONTROL_MODES, ControlUnit
from tritonsd.testing.controlnet_canny import canny_group, demo_detected_map
from tritonsd.testing.reference import GroupError, fixtures_dir

KIND = "controlnet"
MARK = 1024.0  # hook.py's POSITIVE_MARK_TOKEN
MARK_EPS = 1e-3
_INPUT_SUFFIXES = ("hint", "t", "x_T", "input_image")
_INPUT_SOURCES = ("torch.randn", "torch.rand(", "rows ", "synthetic", "canny.image[", "start noise")


def is_reference(meta: dict) -> bool:
    return isinstance(meta, dict) and bool(meta.get("controlnet_file"))


def _entry(meta: dict, name: str) -> dict:
    entry = meta.get("tensors", {}).get(name, {})
    return entry if isinstance(entry, dict) else {}


def is_input(name: str, meta: dict) -> bool:
    """Stored inputs: the hints, timesteps, start noise and images given to the runs, random draws and rows
    copied from another tensor; conditioning without prompts to encode."""
    suffix = name.rsplit(".", 1)[-1]
    entry = _entry(meta, name)
    source = str(entry.get("produced_by", ""))
    if suffix in _INPUT_SUFFIXES or source.startswith(_INPUT_SOURCES) or name == "canny.image":
        return True
    if suffix in ("context", "cond", "uncond"):  # conditioning: recomputed where its prompts are known
        group = name.split(".", 1)[0]
        return not (_prompts_of(meta, name) or entry.get("text") or group in meta.get("demo_runs", {}))
    return False


def bound_for(name: str, default: float) -> float:
    """8-bit images within one level; the canny maps (integers) exactly; the rest ``default``."""
    return 1.0 if name.endswith(".image") and not name.startswith("canny.") else default


def base_reference_meta(meta: dict, reference: Path) -> dict:
    """The JSON of the base checkpoint's own reference beside this one (``base_checkpoint``: ``sd1-tiny.ckpt``
    -> ``sd1-tiny.reference.json``), for what this JSON leaves to it (the text towers' heads); {} if none."""
    import json

    names = meta.get("base_checkpoint") or []
    for name in names if isinstance(names, list) else [names]:
        words = str(name).split()
        candidate = reference.parent / f"{Path(words[0]).stem}.reference.json" if words else None
        if candidate is not None and candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (OSError, ValueError):
                return {}
    return {}


def misfit(model, ref: dict[str, torch.Tensor], meta: dict) -> str | None:
    width = model.config.unet.context_dim
    for name, t in ref.items():
        if name.rsplit(".", 1)[-1] in ("context", "cond", "uncond") and t.dim() == 3 and t.shape[-1] != width:
            return f"{name} is {t.shape[-1]} wide, the checkpoint's context width is {width}"
    return None


# ---------------------------------------------------------------- the ControlNet file(s)


def _files(ctx) -> list[Path]:
    named = ctx.meta.get("controlnet_file")
    names = list(named.values()) if isinstance(named, dict) else [named]
    folder = ctx.reference.parent if ctx.reference is not None else fixtures_dir()
    paths = [folder / str(n) for n in names if n]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GroupError(f"the ControlNet file {missing[0]} named by the JSON is not beside the reference")
    return paths


def controlnet(ctx):
    """The ControlNet of the file form being recomputed (each loaded once per run, in float32)."""
    index = ctx.cache.get("controlnet_form", 0)
    if ("controlnet", index) not in ctx.cache:
        path = _files(ctx)[index]
        ctx.cache[("controlnet", index)] = load_controlnet(path, ctx.model.model.diffusion_model,
                                                           dtype=torch.float32, device=ctx.device)
    return ctx.cache[("controlnet", index)]


def _forms_differ(ctx) -> list[int]:
    """The indices of the file forms whose float32 weights differ from the first's (those are recomputed on
    their own); one check row per further form, the first time."""
    if "controlnet_differ" not in ctx.cache:
        paths = _files(ctx)
        first = {k: v.float() for k, v in read_controlnet(paths[0]).weights.items()}
        differ = []
        for i, other in enumerate(paths[1:], start=1):
            weights = read_controlnet(other).weights
            same = weights.keys() == first.keys() and all(torch.equal(v.float(), first[k]) for k, v in weights.items())
            if not same:
                differ.append(i)
            ctx.checks.append({"name": f"controlnet_file.{other.suffix.lstrip('.')}", "group": "controlnet_file",
                               "pass": True, "note": f"{other.name}: the same float32 weights as {paths[0].name}"
                               if same else f"{other.name}: other weights than {paths[0].name}, recomputed too"})
        ctx.cache["controlnet_differ"] = differ
    return ctx.cache["controlnet_differ"]


def _param(ctx, group: str, name: str | None, key: str, default=None):
    """A setting of a run: the tensor entry's, else the JSON's group entry's (``direct``, ...), else top level."""
    if name is not None and key in _entry(ctx.meta, name):
        return _entry(ctx.meta, name)[key]
    node = ctx.meta.get(group)
    if isinstance(node, dict) and key in node:
        return node[key]
    return ctx.meta.get(key, default)


def _prompts_of(meta: dict, name: str):
    entry = _entry(meta, name)
    group = meta.get(name.split(".", 1)[0])
    return entry.get("prompts") or (group.get("prompts") if isinstance(group, dict) else None)


# ---------------------------------------------------------------- direct / odd: one call each


def direct_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    net = controlnet(ctx)
    x, hint, t = ctx.get(f"{group}.x"), ctx.get(f"{group}.hint"), ctx.get(f"{group}.t")
    out: dict[str, torch.Tensor] = {}
    context_name = f"{group}.context"
    prompts = _prompts_of(ctx.meta, context_name)
    if prompts:
        out[context_name] = ctx.model.get_learned_conditioning([str(p) for p in prompts])
    context = ctx.get(context_name)
    guided = net.hint_features(hint)
    residuals = net(x, t, context, guided_hint=guided)
    out[f"{group}.guided_hint"] = guided
    out.update({f"{group}.control.{i:02d}": r for i, r in enumerate(residuals)})
    for name in keys:
        if not name.startswith(f"{group}.eps."):
            continue
        entry = _entry(ctx.meta, name)
        if "control=None" in str(entry.get("produced_by", "")) or name.endswith(".no_control"):
            out[name] = ctx.model.apply_model(x, t, context)
            continue
        scales = entry.get("control_scales")
        if not isinstance(scales, list) or len(scales) != len(residuals):
            raise GroupError(f"{name}: the JSON gives no control_scales for its {len(residuals)} residuals")
        control = [r * float(s) for r, s in zip(residuals, scales)]
        out[name] = ctx.model.apply_model(x, t, context, control=control,
                                          only_mid_control=bool(entry.get("only_mid_control", False)))
    return out


# ---------------------------------------------------------------- demo / demo_guess: gradio_canny.py process()


def demo_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    run = ctx.meta.get("demo_runs", {}).get(group)
    if not isinstance(run, dict):
        raise GroupError(f"the JSON's demo_runs has no {group!r}")
    net = controlnet(ctx)
    out: dict[str, torch.Tensor] = {}
    out.update(_demo_maps(ctx, group, run))
    x_T = ctx.get(f"{group}.x_T")
    n = x_T.shape[0]
    cond_text = run.get("cond_text") or f"{run['prompt']}, {run['a_prompt']}"
    out[f"{group}.cond"] = ctx.pipe.encode_text([cond_text] * n)["context"]
    out[f"{group}.uncond"] = ctx.pipe.encode_text([str(run["n_prompt"])] * n)["context"]
    steps = int(run["ddim_steps"])
    sched = S.ddim_schedule(ctx.config.alphas_cumprod, steps, float(run.get("eta", 0.0)))
    out[f"{group}.timesteps"] = sched.timesteps
    out[f"{group}.step_t"] = sched.timesteps.flip(0)
    guess = bool(run.get("guess_mode"))
    control = ctx.get(f"{group}.control")
    unit = ControlUnit(model=net, image=control[:1], weight=float(run["strength"]),
                       control_mode=CONTROL_MODES[2] if guess else CONTROL_MODES[0])
    if float(run.get("eta", 0.0)) != 0.0:
        raise GroupError(f"{group} was sampled with eta {run['eta']}, whose noise the file does not store")
    settings = ctx.settings(x_T, sampler=registry.ORIGINAL_SAMPLER, steps=steps, cfg_scale=float(run["scale"]),
                            eta=0.0, controls=(unit,))
    cond = Conditioning({"context": ctx.get(f"{group}.cond")}, {"context": ctx.get(f"{group}.uncond")})
    latents = ctx.pipe.prepare_latents(settings, _StartNoise(x_T))
    step_dicts: list[dict] = []
    x = ctx.pipe.denoise(latents, cond, settings, callback=step_dicts.append)
    xs = [latents.x, *(d["x"] for d in step_dicts[1:]), x]
    out[f"{group}.x"] = torch.stack(xs)
    out[f"{group}.pred_x0"] = torch.stack([d["denoised"] for d in step_dicts])
    out[f"{group}.latents"] = x
    out.update(_demo_eps(ctx, group, net, run, xs, out[f"{group}.step_t"], control))
    decoded = ctx.model.decode_first_stage(x)
    out[f"{group}.decoded"] = decoded
    out[f"{group}.image"] = (decoded.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    return out


class _StartNoise:
    """A ``NoiseSource`` of the stored start noise alone (DDIM at eta 0 draws nothing else)."""

    def __init__(self, x_T: torch.Tensor):
        self.x_T = x_T

    def start(self, shape) -> torch.Tensor:
        if tuple(self.x_T.shape[1:]) != tuple(shape):
            need = ", ".join(map(str, shape))
            raise GroupError(f"the stored x_T is {list(self.x_T.shape)}, the run needs [B, {need}]")
        return self.x_T

    def vae(self, shape) -> torch.Tensor:
        raise GroupError("the demo run needs no VAE noise")

    def ancestral(self, shape) -> torch.Tensor:
        raise GroupError("the demo run (eta 0) draws no noise")


def _demo_eps(ctx, group, net, run, xs, step_t, control) -> dict[str, torch.Tensor]:
    """Each step's ``apply_model(x, t, cond)`` and ``(x, t, un_cond)`` as ``ddim_hacked.py`` makes them: two
    calls, the control scaled by the run's ``control_scales``; guess mode's uncond without control."""
    scales = run.get("control_scales") or C.control_scales(float(run["strength"]), CONTROL_MODES[
        1 if run.get("guess_mode") else 0], net.config.residuals)
    guided = net.hint_features(control)
    cond, uncond = ctx.get(f"{group}.cond"), ctx.get(f"{group}.uncond")
    eps_c, eps_u = [], []
    for i, t in enumerate(step_t.tolist()):
        x = xs[i]
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        res = [r * float(s) for r, s in zip(net(x, tt, cond, guided_hint=guided), scales)]
        eps_c.append(ctx.model.apply_model(x, tt, cond, control=res))
        if run.get("guess_mode"):
            eps_u.append(ctx.model.apply_model(x, tt, uncond))
        else:
            res = [r * float(s) for r, s in zip(net(x, tt, uncond, guided_hint=guided), scales)]
            eps_u.append(ctx.model.apply_model(x, tt, uncond, control=res))
    return {f"{group}.eps_cond": torch.stack(eps_c), f"{group}.eps_uncond": torch.stack(eps_u)}


def _demo_maps(ctx, group: str, run: dict) -> dict[str, torch.Tensor]:
    """``detected_map`` and ``control`` as ``gradio_canny.py``'s ``process()`` makes them
    (``testing/controlnet_canny.demo_detected_map``); ``control`` = the map / 255, one row per sample."""
    image = ctx.ref.get(f"{group}.input_image")
    if image is None:
        return {}
    detected = demo_detected_map(image.numpy(), int(run["image_resolution"]), int(run["detect_resolution"]),
                                 int(run["low_threshold"]), int(run["high_threshold"]))
    control = torch.from_numpy(detected.copy()).float() / 255.0  # [H, W, 3]
    n = int(run.get("num_samples", 1))
    control = control[None].expand(n, -1, -1, -1).permute(0, 3, 1, 2)  # b h w c -> b c h w
    return {f"{group}.detected_map": torch.from_numpy(detected), f"{group}.control": control.contiguous()}


def mark_context(cond: torch.Tensor, positive: bool) -> torch.Tensor:
    """hook.py ``mark_prompt_context`` on each prompt's [77, C] conditioning: a first row of +-1024."""
    mark = MARK if positive else -MARK
    return torch.cat([torch.zeros_like(cond[:, :1]) + mark, cond], dim=1)


def unmark_context(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hook.py ``unmark_prompt_context``: (cond_mark [B] float, the context without its mark row)."""
    mark = torch.mean(torch.abs(context[:, 0, :] - (-MARK)), dim=1)
    return (mark > MARK_EPS).float(), context[:, 1:, :]


def webui_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    net = controlnet(ctx)
    x, hint = ctx.get(f"{group}.x"), ctx.get(f"{group}.hint")
    cond, uncond = ctx.get(f"{group}.cond"), ctx.get(f"{group}.uncond")
    x_in = torch.cat([x, x])
    t = _param(ctx, group, f"{group}.t_in", "t")
    if t is None and f"{group}.t_in" not in ctx.ref:
        raise GroupError(f"the JSON gives no 't' for {group} and the file stores no {group}.t_in")
    t_in = ctx.get(f"{group}.t_in").float() if t is None else \
        torch.full((x_in.shape[0],), float(t), dtype=torch.float32, device=x.device)
    context_in = torch.cat([mark_context(cond, True), mark_context(uncond, False)])
    cond_mark, context = unmark_context(context_in)
    out = {f"{group}.x_in": x_in, f"{group}.t_in": t_in, f"{group}.context_in": context_in,
           f"{group}.cond_mark": cond_mark}
    guided = net.hint_features(hint)
    guidance = _param(ctx, group, None, "guidance", {}) or {}
    for name in keys:
        if not name.startswith(f"{group}.eps."):
            continue
        entry = _entry(ctx.meta, name)
        if name.endswith(".plain") or "without the hook" in str(entry.get("produced_by", "")):
            out[name] = ctx.model.apply_model(x_in, t_in, context)
            continue
        unit, step, total = _webui_unit(ctx, group, name, entry, guidance, net)
        prepared = C.PreparedUnit(net, guided, unit, cfg_injection=unit.control_mode == CONTROL_MODES[2])
        run = C.ControlRun([prepared], total, x.device)
        run.step = step
        out[name] = C.ControlledUNet(ctx.pipe.unet, run)(x_in, t_in, context, cond_mark=cond_mark)
    _check_schedule(ctx, group, guidance)
    return out


def _webui_unit(ctx, group, name, entry, guidance, net) -> tuple[ControlUnit, int, int]:
    """The unit of one eps entry (mode, weight, guidance range) and the sampling step / total it runs at."""
    mode = entry.get("control_mode")
    if mode is None:
        mode = CONTROL_MODES[2] if entry.get("cfg_injection") else CONTROL_MODES[1] if entry.get(
            "soft_injection") else CONTROL_MODES[0]
    weight = _param(ctx, group, name, "weight")
    if weight is None:
        found = re.search(r"weight ([0-9.]+)", str(entry.get("produced_by", "")))
        if found is None:
            raise GroupError(f"{name}: the JSON gives no control weight")
        weight = found.group(1)
    weight = float(weight)
    suffix = name.rsplit(".", 1)[-1]
    if suffix.startswith("guidance_step"):
        step = int(entry.get("sampling_step", suffix[len("guidance_step"):]))
        unit = ControlUnit(model=net, weight=weight, control_mode=mode,
                           guidance_start=float(guidance["start"]), guidance_end=float(guidance["end"]))
        return unit, step, int(guidance["total"])
    return ControlUnit(model=net, weight=weight, control_mode=mode), 0, 1


def _check_schedule(ctx, group: str, guidance: dict) -> None:
    """The JSON's ``guidance.schedule`` (stopped per sampling step) against ``control/apply.guidance_stopped``."""
    schedule = guidance.get("schedule") if isinstance(guidance, dict) else None
    if not schedule:
        return
    wrong = [row["sampling_step"] for row in schedule
             if C.guidance_stopped(int(row["sampling_step"]), int(guidance["total"]), float(guidance["start"]),
                                   float(guidance["end"])) != bool(row["guidance_stopped"])]
    ctx.checks.append({"name": f"{group}.guidance.schedule", "group": group, "pass": not wrong,
                       "note": None if not wrong else f"stopped differs at sampling steps {wrong}"})


# ---------------------------------------------------------------- dispatch


def recompute(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The group from the first file form; where another form holds other weights (a float16 repack of values
    float16 cannot hold), from that form too, each tensor the one farther from the reference: both must pass."""
    ctx.cache["controlnet_form"] = 0
    out = _recompute(ctx, group, keys)
    if group == "canny":
        return out
    for index in _forms_differ(ctx):
        ctx.cache["controlnet_form"] = index
        try:
            other = _recompute(ctx, group, keys)
        finally:
            ctx.cache["controlnet_form"] = 0
        out = {name: _farther(ctx.ref.get(name), t, other.get(name)) for name, t in out.items()}
    return out


def _farther(stored, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Of two recomputations of one tensor, the one farther from the stored reference."""
    if stored is None or b is None or a.shape != b.shape or a.shape != stored.shape or not a.numel():
        return a
    err_a = (a.double() - stored.double()).abs().max().item()
    err_b = (b.double() - stored.double()).abs().max().item()
    return b if err_b > err_a else a


def _recompute(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    has = set(keys)
    if group == "canny":
        return canny_group(ctx, keys)
    if f"{group}.x_T" in has and group in ctx.meta.get("demo_runs", {}):
        return demo_group(ctx, group, keys)
    if {f"{group}.x", f"{group}.hint", f"{group}.cond", f"{group}.uncond"} <= has:
        return webui_group(ctx, group, keys)
    if {f"{group}.x", f"{group}.hint", f"{group}.t"} <= has:
        return direct_group(ctx, group, keys)
    raise GroupError(f"group {group!r} of the ControlNet reference holds none of the runs this runtime recomputes "
                     "(x + hint + t; x_T with demo_runs; x + hint + cond + uncond; canny)")
