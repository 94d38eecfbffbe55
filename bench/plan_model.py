"""The model the plan walks, and the walk of one image: text encoders, the sampler loop, the VAE decode.

``MODEL`` is a released family (``sd15``, ``sd21``, ``sdxl``: built on the meta device from its key manifest,
``bench/random_weights.py``) or a checkpoint file (its tensors' shapes from the header, ``formats/checkpoint``):
no weights are read and nothing is allocated. The loop is the one the Pipeline runs on CUDA (the graph runner's
body, ``sampler/graph.py``, with its per-step tables), walked eagerly over all its steps; a UNet call opens a
new span, so the middle span is one whole step in the steady state (its UNet, CFG combine and sampler update;
what the loop makes once, before or at its first step, is in the first spans).

With ControlNets (``controlnets``: random full-size ones at the model's widths, on the meta device like the model)
the loop's UNet is the controlled one, as a captured loop calls it (``control/apply.ControlledUNet`` over a static
``ControlRun``: every unit's forward, then the UNet with the summed residuals); each launch is marked with the
``part`` that made it: ``controlnet``, ``unet`` or ``sampler`` (the denoiser, CFG and the sampler's update; and the
hint features, made once a run, count as ``controlnet``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tritonsd.bench.plan_walk import Event, Walk, walking
from tritonsd.bench.random_weights import build_meta_model
from tritonsd.escape import escape
from tritonsd.compile.shapes import LATENT_FACTOR, TEXT_TOKENS
from tritonsd.control.apply import ControlRun, PreparedUnit
from tritonsd.formats.checkpoint import read_checkpoint_shapes
from tritonsd.formats.keys import normalize_keys
from tritonsd.model.config import ModelConfig, detect_config, find_config
from tritonsd.model.controlnet import ControlNet, ControlNetConfig
from tritonsd.model import hoist
from tritonsd.model.load import no_parameter_init
from tritonsd.model.sd import StableDiffusion, build_model
from tritonsd.sampler import registry
from tritonsd.sampler.control import ControlUnit
from tritonsd.sampler.graph import GraphRunner, tables_on_device
from tritonsd.sampler.wiring import make_schedule, sigma_denoiser

FAMILIES = ("sd15", "sd21", "sdxl")
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # the released ControlNets' input_hint_block (RGB in, UNet width out)
PARTS = ("controlnet", "unet", "sampler")


class PlanModelError(ValueError):
    """A model name that is neither a known family nor a checkpoint file, or a size the model cannot take."""


def build(model: str, dtype: torch.dtype, text_heads: int | None = None) -> StableDiffusion:
    """The model on the meta device in ``dtype``: a family's released layout, or a checkpoint's shapes (and the
    YAML beside it; ``text_heads`` as ``tritonsd generate --text-heads``)."""
    if model in FAMILIES:
        return build_meta_model(model).to(dtype)
    path = Path(model)
    if not path.is_file():
        raise PlanModelError(f"unknown model {escape(model)!r}: expected {', '.join(FAMILIES)} or a checkpoint file")
    # the schedule buffer's values are not read (meta): the config's defaults derive it, as for files without it
    shapes = {k: v for k, v in read_checkpoint_shapes(path).items() if k != "alphas_cumprod"}
    config = detect_config(normalize_keys(shapes), find_config(path), text_heads=text_heads)
    return build_from_config(config, dtype)


def build_from_config(config: ModelConfig, dtype: torch.dtype) -> StableDiffusion:
    """The modules of ``config`` on the meta device in ``dtype``."""
    with torch.device("meta"), no_parameter_init():
        built = build_model(config)
    return built.eval().requires_grad_(False).to(dtype)


def controlnet_for(model: StableDiffusion, dtype: torch.dtype) -> ControlNet:
    """A full-size ControlNet at the model's UNet widths (as the released ones), on the meta device in ``dtype``."""
    unet = model.config.unet
    config = ControlNetConfig(unet=unet, hint_widths=(3, *HINT_WIDTHS, unet.model_channels))
    with torch.device("meta"), no_parameter_init():
        net = ControlNet(config)
    return net.eval().requires_grad_(False).to(dtype)


def _units(nets: list[ControlNet], size: tuple[int, int], hint: bool) -> list[PreparedUnit]:
    """Units of weight 1 (Balanced) over ``nets``, with the hint features of an RGB control map at the image's size
    (``hint``: computed by the network; else an empty buffer of their shape)."""
    w, h = size
    units = []
    for net in nets:
        mc = net.config.unet.model_channels
        guided = (net.hint_features(_meta((1, 3, h, w), torch.float32)) if hint else
                  _meta((1, mc, h // LATENT_FACTOR, w // LATENT_FACTOR), net.dtype))
        units.append(PreparedUnit(net, guided, ControlUnit(model=net), False))
    return units


def _control_run(walk: Walk, static: ControlRun, size: tuple[int, int], steps: int) -> ControlRun:
    """A run's part in the walk: its hint features (once a run) and its scale table, copied into the captured
    loop's ``static`` buffers (made once per loop shape, outside the walk) as ``CapturedLoop.load`` copies them."""
    walk.in_part("controlnet")
    static.load(ControlRun(_units([p.source for p in static.units], size, True), steps, "meta"))
    walk.in_part("sampler")
    return static


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` in pixels, each a positive multiple of 8 -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise PlanModelError(f"size must be WxH in pixels (e.g. 512x512), got {text!r}")
    w, h = (int(p) for p in parts)
    if w <= 0 or h <= 0 or w % LATENT_FACTOR or h % LATENT_FACTOR:
        raise PlanModelError(f"size {w}x{h}: width and height must be positive multiples of {LATENT_FACTOR}")
    return w, h


def native_size(model: StableDiffusion) -> tuple[int, int]:
    side = 1024 if model.config.family == "sdxl" else 768 if model.config.parameterization == "v" else 512
    return side, side


@dataclass
class ImageWalk:
    """One image's launches, by part: ``text`` (every text encoder, cond and uncond), ``loop`` (every span
    of the walked loop: ``pre`` then one per UNet call), ``vae`` (the decode)."""

    text: list[Event]
    spans: dict[str, list[Event]]
    vae: list[Event]
    steps_walked: int

    @property
    def step(self) -> list[Event]:
        """One steady-state step: the span of the middle UNet call."""
        return self.spans[f"step{self.steps_walked // 2}"]

    @property
    def loop(self) -> list[Event]:
        """The whole loop: its set-up and every step."""
        return [e for span in self.spans.values() for e in span]


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _text_embedders(model: StableDiffusion) -> list[torch.nn.Module]:
    stage = model.text_module
    return list(stage.text_embedders) if hasattr(stage, "text_embedders") else [stage]


def walk_text(model: StableDiffusion, batch: int, cfg: bool) -> list[Event]:
    """Every text encoder on [batch, 77] tokens, once for the prompt and once for the negative (with CFG)."""
    tokens = torch.empty((batch, TEXT_TOKENS), device="meta", dtype=torch.long)
    with walking() as walk:
        for _ in range(2 if cfg else 1):
            for embedder in _text_embedders(model):
                embedder.encode_tokens(tokens)
    return walk.events


def _conditioning(model: StableDiffusion, batch: int) -> dict[str, torch.Tensor]:
    """The UNet's keywords as the Pipeline passes them (``prompt/encode.unet_keywords``: float32)."""
    unet = model.config.unet
    cond = {"context": _meta((batch, TEXT_TOKENS, unet.context_dim), torch.float32)}
    if unet.adm_in_channels is not None:
        cond["y"] = _meta((batch, unet.adm_in_channels), torch.float32)
    return cond


def walk_loop(model: StableDiffusion, size: tuple[int, int], batch: int, cfg: bool, dtype, steps: int,
              sampler: str = registry.DEFAULT_SAMPLER, cfg_scale: float = 7.0,
              hoists: bool = True, controlnets: int = 0) -> dict[str, list[Event]]:
    """The graph runner's loop body over ``steps`` steps (Karras sigmas), spans split at each UNet call;
    ``hoists=False``: without the per-run and per-step-index hoists (``model/hoist``, the step embeddings);
    ``controlnets``: that many ControlNet units on every call (see the module docstring)."""
    spec = registry.get(sampler)
    w, h = size
    # latents are float32 (the Pipeline's), the conditioning in the model's dtype (the text encoders')
    x = _meta((batch, model.config.unet.in_channels, h // LATENT_FACTOR, w // LATENT_FACTOR), torch.float32)
    sigmas = make_schedule(model.config, spec, steps, karras=True)
    cond = _conditioning(model, batch)
    uncond = _conditioning(model, batch) if cfg else None
    spans: dict[str, list[Event]] = {}
    calls = []
    static = None  # a captured loop's copy of the ControlNets and buffers: made once per shape, not per run
    if controlnets:
        nets = [controlnet_for(model, dtype) for _ in range(controlnets)]
        static = ControlRun(_units(nets, size, False), steps, "meta").static_copy("meta")

    with walking() as walk, contextlib.nullcontext() if hoists else hoist.suspended():
        walk.span("pre", "sampler")

        def unet(x, t, context, y=None, t_emb=None, step_emb=None, control=None, only_mid_control=False):
            """The model, opening a span per call (unless the ControlNets opened it)."""
            if control is None:
                walk.span(f"step{len(calls)}", "unet")
                calls.append(1)
            walk.in_part("unet")
            out = model.apply_model(x, t, context, y=y, t_emb=t_emb, step_emb=step_emb, control=control,
                                    only_mid_control=only_mid_control)
            walk.in_part("sampler")
            return out

        controlled = None if static is None else _control_run(walk, static, size, steps).wrap(unet)

        def controlled_unet(x, t, context, y=None, t_emb=None, cond_mark=None, step_emb=None):  # ControlledUNet's
            """The ControlNets' forwards, then the UNet with their residuals: one span per call."""
            walk.span(f"step{len(calls)}", "controlnet")
            calls.append(1)
            return controlled(x, t, context, y=y, t_emb=t_emb, cond_mark=cond_mark, step_emb=step_emb)

        den = sigma_denoiser(unet if controlled is None else controlled_unet, model.config, model.step_embedder() if hoists else None)  # as the Pipeline
        runner = GraphRunner(tables_on_device(den, "meta"), device="meta", use_graphs=False)
        runner.run(x, cond, uncond, None, sigmas=sigmas, cfg_scale=cfg_scale if cfg else 1.0, sampler=spec)
    for event in walk.events:
        spans.setdefault(event.mark, []).append(event)
    if len(calls) != steps:
        raise PlanModelError(f"the walked loop made {len(calls)} UNet calls for {steps} steps")
    return spans


def walk_unet(model: StableDiffusion, size: tuple[int, int], batch: int, dtype) -> list[Event]:
    """One UNet call on [batch, in_channels, H/8, W/8] (``batch`` is the UNet's: CFG's doubling included)."""
    w, h = size
    x = _meta((batch, model.config.unet.in_channels, h // LATENT_FACTOR, w // LATENT_FACTOR), torch.float32)
    t = torch.full((batch,), 500.0, device="meta")
    cond = _conditioning(model, batch)
    with walking() as walk:
        model.apply_model(x, t, cond["context"], y=cond.get("y"))
    return walk.events


def walk_vae(model: StableDiffusion, size: tuple[int, int], batch: int, dtype) -> list[Event]:
    w, h = size
    z = _meta((batch, model.config.unet.out_channels, h // LATENT_FACTOR, w // LATENT_FACTOR), torch.float32)
    with walking() as walk:
        model.decode_first_stage(z)
    return walk.events


def walk_image(model: StableDiffusion, size: tuple[int, int], batch: int, cfg: bool, dtype, steps: int,
               hoists: bool = True, controlnets: int = 0) -> ImageWalk:
    spans = walk_loop(model, size, batch, cfg, dtype, steps, hoists=hoists, controlnets=controlnets)
    return ImageWalk(walk_text(model, batch, cfg), spans, walk_vae(model, size, batch, dtype), steps)


