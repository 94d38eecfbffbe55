"""ControlNet units applied per step, as sd-webui-controlnet's ``scripts/hook.py`` applies them.

For each model call of a sampler run, every unit that is not stopped computes its ControlNet's residuals on the
call's batch (``x``, ``t``, the unmarked ``context``, SDXL's ``y``) and scales them:

* ``control_scales = [weight] * n`` ("Balanced"), or the soft injection ``[weight * 0.825 ** float(12 - i) for i
  in range(13)][:n]`` ("My prompt is more important", "ControlNet is more important"; n = 13 for SD1 / SD2, 10
  for SDXL: its first 10 of those 13); the original demos' guess mode uses the same soft scales;
* "ControlNet is more important" (``cfg_injection``) first multiplies each residual by ``cond_mark`` (1 for the
  rows of the conditional prompt, 0 for the unconditional ones), so the uncond rows get none;
* the residuals of all units are summed (``item + total``, unit by unit) and the UNet adds them
  (``UNetModel.forward(control=...)``).

Guidance start / end (``guidance_schedule_handler``): at every model call ``percent = sampling_step / total``
where ``sampling_step`` is webui's ``state.sampling_step``: 0 when the loop starts, then the ``i`` of the
sampler's last callback (so step k >= 1 calls see k - 1, and a second call inside a step sees k); ``total`` the
steps the loop runs. A unit with ``percent < start or percent > end`` is stopped (both ends inclusive).

The per-step scales live in one float32 table [total + 1, units, n] on the model's device, filled before the loop
and indexed by the step (a view: no host-to-device copy in the step), and each unit's hint features
(``input_hint_block`` of the control map, which depends on nothing else) are computed once per run into a buffer:
a captured loop reads both, so another weight, start / end, control image or soft / balanced mode only refills
them ("ControlNet is more important" multiplies by the conditional rows' mark: a loop structure of its own).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from tritonsd.model.controlnet import ControlNet
from tritonsd.sampler.control import CONTROL_MODES, ControlUnit

SOFT_BASE = 0.825
SOFT_COUNT = 13  # the extension's soft scales are made for 13 residuals (SDXL takes the first 10)


def control_scales(weight: float, mode: str, residuals: int, soft: bool | None = None) -> list[float]:
    """The extension's ``control_scales`` of one unit for a ControlNet with ``residuals`` outputs (Python floats,
    as ``hook.py`` computes them; the table holds them as float32). ``soft``: force soft injection (hires fix's
    second pass with a canny unit) or not (None: from the mode)."""
    soft = mode != CONTROL_MODES[0] if soft is None else soft
    if not soft:
        return [weight] * residuals
    scales = [weight * (SOFT_BASE ** float(12 - i)) for i in range(max(SOFT_COUNT, residuals))]
    return scales[:residuals]


def guidance_stopped(step: int, total: int, start: float, end: float) -> bool:
    """``guidance_schedule_handler``: stopped when ``step / total`` lies outside [start, end]."""
    percent = step / total
    return percent < start or percent > end


def guess_mode_scales(strength: float, residuals: int = SOFT_COUNT) -> list[float]:
    """The original demos' guess mode (``gradio_*.py``): ``[strength * 0.825 ** float(12 - i) for i in
    range(13)]``, the same numbers as the extension's soft injection."""
    return control_scales(strength, CONTROL_MODES[1], residuals)


@dataclass
class PreparedUnit:
    """One unit ready for a run: its loaded ControlNet, its hint features and how it is injected."""

    net: ControlNet
    guided_hint: torch.Tensor  # [1 or B, model_channels, h, w] on the model's device
    unit: ControlUnit
    cfg_injection: bool
    soft: bool | None = None  # None: soft injection from the mode; True: forced (hires fix's canny)
    source: object = None  # a captured loop's copy of the network: the network whose weights it holds now


class ControlRun:
    """The ControlNet side of one sampler run: the units, the per-step scale table and webui's sampling step.

    ``on_step`` is the sampler callback's part (``state.sampling_step = d["i"]``); ``residuals`` is what a
    model call adds. ``static``: always run every unit (a captured loop may not branch on the table's values;
    a stopped unit then adds exact zeros); otherwise a stopped unit is skipped, as the extension skips it.
    """

    def __init__(self, units: list[PreparedUnit], total: int, device, *, static: bool = False,
                 only_mid_control: bool = False):
        if total < 1:
            raise ValueError(f"a ControlNet run needs at least one step, got {total}")
        self.units = units
        self.total = total
        self.static = static
        self.only_mid_control = only_mid_control
        self.step = 0
        self.residual_count = units[0].net.config.residuals if units else 0
        self.host_scales = torch.zeros((total + 1, len(units), self.residual_count), dtype=torch.float64)
        self.fill()
        self.scales = self.host_scales.to(torch.float32).to(device)

    def fill(self) -> None:
        """The host table from the units (their weight, mode, start / end): row k holds the scales of a model
        call at webui's sampling step k, zeros where the unit is stopped."""
        for u, p in enumerate(self.units):
            scales = torch.tensor(control_scales(p.unit.weight, p.unit.control_mode, self.residual_count, p.soft),
                                  dtype=torch.float64)
            for step in range(self.total + 1):
                stopped = guidance_stopped(step, self.total, p.unit.guidance_start, p.unit.guidance_end)
                self.host_scales[step, u] = 0.0 if stopped else scales

    def reset(self) -> None:
        self.step = 0

    # ---- for a captured loop (``sampler/graph.py``): its own buffers, refilled by every run of the same shape

    def signature(self) -> tuple:
        """What a captured loop bakes in: the steps, the networks' shapes (not which file: another file of the same
        shape is copied into the loop's own copy), the hint features' shapes, the injections."""
        return (self.total, self.only_mid_control, self.residual_count,
                tuple((p.net.config, p.net.dtype, tuple(p.guided_hint.shape), p.guided_hint.dtype, p.cfg_injection)
                      for p in self.units))

    def static_copy(self, device) -> ControlRun:
        """A run over buffers of its own on ``device``: the hint features, the scale table and a copy of each
        network (whose parameters the captured kernels read; ``load`` copies another file's weights into them).
        ``static``: every unit always runs, so the captured kernels never depend on the table's values."""
        clone = copy.copy(self)
        clone.units = [dataclasses.replace(p, guided_hint=torch.empty_like(p.guided_hint, device=device),
                                           net=copy.deepcopy(p.net), source=p.net) for p in self.units]
        clone.scales = torch.empty_like(self.scales, device=device)
        clone.host_scales = self.host_scales.clone()
        clone.static, clone.step = True, 0
        return clone

    def load(self, other: ControlRun) -> None:
        """Copy ``other``'s hint features and scale table (another image, weight, start / end) into these
        buffers, in place."""
        for mine, theirs in zip(self.units, other.units):
            mine.guided_hint.copy_(theirs.guided_hint)
            if mine.source is not theirs.net:  # another ControlNet file of the same shape
                with torch.no_grad():
                    for a, b in zip((*mine.net.parameters(), *mine.net.buffers()),
                                    (*theirs.net.parameters(), *theirs.net.buffers())):
                        a.copy_(b)
                mine.source = theirs.net
        self.units = [dataclasses.replace(mine, unit=theirs.unit, source=theirs.net)
                      for mine, theirs in zip(self.units, other.units)]
        self.scales.copy_(other.scales)
        self.host_scales.copy_(other.host_scales)
        self.step = 0

    def wrap(self, unet) -> ControlledUNet:
        return ControlledUNet(unet, self)

    def step_callback(self, callback):
        return with_step_callback(self, callback)

    def on_step(self, d: dict) -> None:
        """The sampler's callback: webui's ``callback_state`` sets ``state.sampling_step = d['i']``."""
        self.step = int(d["i"])

    def active(self, u: int) -> bool:
        return bool(self.host_scales[min(self.step, self.total), u].any())

    def residuals(self, x: torch.Tensor, t, context: torch.Tensor, y=None, t_emb=None,
                  cond_mark: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """The summed, scaled residuals of every active unit for one model call, or None when none is active."""
        step = min(self.step, self.total)
        total: list[torch.Tensor] | None = None
        for u, p in enumerate(self.units):
            if not self.static and not self.active(u):
                continue
            outs = p.net(x, t, context, y=y, t_emb=t_emb, guided_hint=p.guided_hint)
            if p.cfg_injection:
                mark = _cond_mark(cond_mark, x).to(outs[0].dtype)
                outs = [c * mark for c in outs]
            row = self.scales[step, u]  # float32: a half residual times it rounds once, as times a Python float
            outs = [c * row[i] for i, c in enumerate(outs)]
            total = outs if total is None else [item + prev for item, prev in zip(outs, total)]
        return total


def _cond_mark(cond_mark: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, 1]: 1 for conditional rows; without a mark every row is conditional (the extension's fallback
    when the prompts are unmarked)."""
    if cond_mark is None:
        return torch.ones((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
    return cond_mark.reshape(-1, 1, 1, 1)


class ControlledUNet:
    """A UNet callable ``(x, t, context, y=None, t_emb=None, cond_mark=None, step_emb=None)`` that adds ``run``'s
    residuals: the ``unet`` it wraps takes ``control=`` (``UNetModel.forward``). ``step_emb`` (the UNet's time MLP
    and projections, made before the loop) goes to the UNet alone: the ControlNet has time weights of its own."""

    def __init__(self, unet, run: ControlRun):
        self.unet = unet
        self.run = run

    def __call__(self, x, t, context, y=None, t_emb=None, cond_mark=None, step_emb=None):
        control = self.run.residuals(x, t, context, y=y, t_emb=t_emb, cond_mark=cond_mark)
        extra = {} if step_emb is None else {"step_emb": step_emb}
        return self.unet(x, t, context, y=y, t_emb=t_emb, control=control,
                         only_mid_control=self.run.only_mid_control, **extra)


def with_step_callback(run: ControlRun | None, callback):
    """The sampler callback that first advances ``run``'s sampling step (webui's ``callback_state``) then calls
    ``callback``."""
    if run is None:
        return callback

    def step(d: dict) -> None:
        run.on_step(d)
        if callback is not None:
            callback(d)

    return step


def with_cond_mark(conditioning):
    """A pipeline ``Conditioning`` with ``cond_mark`` added to both sides (1 for every conditional row, 0 for
    every unconditional one; [calls, B] for per-step tables): what the extension's ``mark_prompt_context`` /
    ``unmark_prompt_context`` tell the hook, carried as a keyword so that it follows the rows through CFG's
    batching (``[uncond, cond]``) or its two separate calls."""
    def marked(side: dict, value: float) -> dict:
        ref = side["context"]
        shape = ref.shape[:2] if conditioning.per_step else ref.shape[:1]
        return {**side, "cond_mark": torch.full(shape, value, dtype=torch.float32, device=ref.device)}

    uncond = None if conditioning.uncond is None else marked(conditioning.uncond, 0.0)
    return dataclasses.replace(conditioning, cond=marked(conditioning.cond, 1.0), uncond=uncond)
