"""CUDA-graph capture of the whole denoising loop, one graph per loop shape.

A ``GraphRunner`` runs a sigma-space sampler (the registry's ``graphable`` ones) over a CFG denoiser. On
CUDA the loop (every UNet call, the CFG combine and every sampler update, unrolled over the steps) is captured
ONCE per ``LoopKey`` into a graph that reads static buffers: the start latents, the conditioning (cond and
uncond, plus shared inputs such as inpainting's ``c_concat``) and, for ancestral samplers, the noise of every
step (pre-drawn on the CPU from the seed, see ``predraw_noise``). A run copies its inputs into those buffers
and replays the graph; a prompt change with the same shapes only copies new conditioning. On the CPU (or with
``use_graphs=False``) the same loop body runs eagerly from the same static buffers, so CPU tests exercise the
code that is captured on the GPU. Live previews (``preview_every``, part of the key) are copies taken inside the
loop on its preview steps and read by a host thread while the replay runs (``graph_preview.py``).

Capturability: the sampler gets ``sigmas`` as a CPU tensor, so its Python control flow (``sigmas[i + 1] > 0``,
the ancestral step sizes) reads host values and never syncs the device, and the scalars reach the device as
kernel arguments. Per-step tables: each captured loop prepares the denoiser for its sigmas before the loop
(``denoise.prepare``: ``c_in`` / ``c_out`` / ``c_skip`` on the host, the timesteps and the timestep embeddings
on the device), so a captured step reads its row and launches no scalar work: the input scaling, the UNet,
the denoiser output, the CFG combine and the sampler update (one fused launch each, ``kernels/sampler_step``).
The denoiser's training-sigma table must be on the device too (``tables_on_device``) for calls the tables do not
cover: a host-to-device copy inside the captured region fails the capture, reported as ``GraphCaptureError``.

What depends only on the run leaves the step: the loop body opens a ``model/hoist`` scope, so the conditioning's
per-run values (the CFG pair, its dtype cast, the cross-attention keys and values) are computed at their first
use, inside the graph, and read by the later steps of every replay; the step embeddings (the time MLP and the
ResBlocks' projections, ``StepTables``) are made in the warm-up, before the capture, and ``run`` refreshes them in
place before a replay when their weights changed (a LoRA switch).

Timestep samplers (DDIM, PLMS) take integer timesteps and a different model protocol; run them through
``samplers`` directly.
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from tritonsd.model import hoist
from tritonsd.sampler.denoise import CFGDenoiser, PerCallConditioning, prepare, refresh
from tritonsd.sampler.graph_preview import PreviewSink, PreviewTap
from tritonsd.sampler import registry
from tritonsd.sampler.registry import SamplerSpec


def _capture_error(e: Exception) -> bool:
    """A CUDA error or one of triton's (OutOfResources, CompilationError, PTXASError: not RuntimeErrors). Triton's
    can only come from a triton already imported: looked up there, so this module does not import triton."""
    triton_errors = sys.modules.get("triton.errors")
    return isinstance(e, RuntimeError) or (triton_errors is not None and isinstance(e, triton_errors.TritonError))

class GraphRunnerError(ValueError):
    """The runner was called with inputs it cannot serve (unknown sampler, missing noise, bad shapes)."""


class GraphCaptureError(RuntimeError):
    """CUDA-graph capture of the loop failed (something in the loop synchronised or copied from the host)."""


@dataclass(frozen=True)
class LoopKey:
    """Everything a captured loop bakes in: shapes, dtypes, device, sampler, the sigma values, CFG scale, the
    conditioning's shapes and the convolutions' padding mode."""

    batch: int
    channels: int
    height: int
    width: int
    dtype: torch.dtype
    device: str
    sampler: str  # the registry name of the spec the loop runs
    steps: int
    sigmas: tuple[float, ...]
    cfg_scale: float
    eta: float
    noise_draws: int
    inputs: tuple  # ((group, name, shape, dtype), ...) of the conditioning buffers (their token length too)
    per_step: bool = False  # cond / uncond are per-step tables [calls, B, ...] (prompt editing)
    tiling: bool = False  # the convolutions pad circularly (the captured kernels bake the padding in)
    rows: tuple | None = None  # per-step tables: each side's row per call (``PerCallConditioning``'s ``rows``)
    control: tuple = ()  # a ControlNet run's signature (``control/apply.ControlRun``): its nets and buffer shapes
    preview_every: int = 0  # live previews every N steps (``graph_preview.PreviewTap``: copies inside the loop)


def tables_on_device(denoiser, device: str | torch.device):
    """Move a sigma-space denoiser's ``sigmas`` (and ``log_sigmas``) tables (``EpsDenoiser``, ``VDenoiser``,
    ``SGMEpsDenoiser``) to ``device`` in place and return it, so that no host-to-device copy happens inside the
    captured loop."""
    inner = getattr(denoiser, "inner", denoiser)
    for name in ("sigmas", "log_sigmas"):
        if isinstance(getattr(inner, name, None), torch.Tensor):
            setattr(inner, name, getattr(inner, name).to(device))
    return denoiser


def graph_spec(sampler: SamplerSpec | str) -> SamplerSpec:
    """The registry spec of a sampler the runner serves (a spec, or a registry name); ``GraphRunnerError``
    for any other."""
    spec = sampler if isinstance(sampler, SamplerSpec) else registry.SAMPLERS.get(sampler)
    if spec is None or not spec.graphable:
        name = spec.name if spec is not None else sampler
        raise GraphRunnerError(f"the graph runner serves {', '.join(GraphRunner.serves())}, not {name!r}")
    return spec


def noise_draws(sampler: SamplerSpec | str, sigmas: torch.Tensor, eta: float = 1.0) -> int:
    """How many noise tensors ``sampler`` (a spec or a registry name) draws over ``sigmas``: the spec's
    ``noise_draws`` (an ancestral sampler: one per step whose next sigma > 0)."""
    spec = sampler if isinstance(sampler, SamplerSpec) else registry.get(sampler)
    return spec.noise_draws(sigmas, eta)


def predraw_noise(shape, count: int, seed: int) -> torch.Tensor:
    """[count, *shape] float32 CPU noise: exactly the stream ``samplers.seeded_noise_sampler`` would draw."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.empty((count, *shape), dtype=torch.float32)
    for i in range(count):
        out[i] = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return out


def warmup_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The loop's first (up to) three sigmas, then 0: a short loop that launches every kernel variant the whole
    loop launches (dpmpp_2m's first- and second-order updates and its last step, euler_a's noisy steps and its
    last one), so that nothing is compiled inside the capture. It draws no more noise tensors than the loop."""
    return torch.cat([sigmas[:-1][:3], sigmas.new_zeros(1)])


class StaticNoise:
    """A noise sampler over a pre-filled buffer [N, *shape]: the k-th call since ``reset`` returns ``buffer[k]``."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def __call__(self, _a, _b) -> torch.Tensor:
        if self.calls >= self.buffer.shape[0]:
            raise GraphRunnerError(f"the sampler drew more than the {self.buffer.shape[0]} pre-drawn noise tensors")
        noise = self.buffer[self.calls]
        self.calls += 1
        return noise


def _as_inputs(cond) -> dict[str, torch.Tensor]:
    """Conditioning as a dict of tensors: a bare tensor is the cross-attention ``context``; None values drop."""
    if cond is None:
        return {}
    if isinstance(cond, torch.Tensor):
        return {"context": cond}
    if not isinstance(cond, Mapping):
        raise GraphRunnerError(f"conditioning must be a tensor or a dict of tensors, got {type(cond).__name__}")
    out = {}
    for name, value in cond.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise GraphRunnerError(f"conditioning entry {name!r} must be a tensor, got {type(value).__name__}")
        out[name] = value
    return out


def _signature(groups: dict[str, dict[str, torch.Tensor]]) -> tuple:
    return tuple((g, n, tuple(t.shape), t.dtype) for g, d in groups.items() for n, t in sorted(d.items()))


def _chain(first: Callable[[dict], None], then: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """A step callback calling ``first`` then ``then`` (when given)."""
    if then is None:
        return first

    def both(d: dict) -> None:
        first(d)
        then(d)
    return both


class CapturedLoop:
    """The static buffers of one ``LoopKey``, the denoiser's per-step tables for its sigmas and, on CUDA, the
    graph that replays the loop over them."""

    def __init__(self, key: LoopKey, spec: SamplerSpec, denoiser, sigmas: torch.Tensor, x_like: torch.Tensor,
                 groups: dict[str, dict[str, torch.Tensor]], eta: float, control=None):
        device = torch.device(key.device)
        self.key = key
        self.spec = spec  # the sampler the loop runs (key.sampler is its name)
        self.sigmas = sigmas  # CPU: host-side control flow in the sampler, and the keys of the tables
        self.eta = eta
        # a ControlNet run: its own buffers (hint features, per-step scales), read by the UNet calls of the loop
        self.control = None if control is None else control.static_copy(device)
        if self.control is not None:
            denoiser = copy.copy(denoiser)
            denoiser.unet = self.control.wrap(denoiser.unet)
        self.cfg = CFGDenoiser(prepare(denoiser, sigmas, device), key.cfg_scale)
        self.static_x = torch.empty(x_like.shape, dtype=x_like.dtype, device=device)
        self.static = {g: {n: torch.empty(t.shape, dtype=t.dtype, device=device) for n, t in d.items()}
                       for g, d in groups.items()}
        self.static_noise = torch.empty((max(key.noise_draws, 1), *x_like.shape), dtype=x_like.dtype, device=device)
        self.noise = StaticNoise(self.static_noise)
        self.tap = PreviewTap(key.preview_every, key.steps, device) if key.preview_every > 0 else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_out: torch.Tensor | None = None
        self.replays = 0

    def load(self, x_T: torch.Tensor, groups: dict[str, dict[str, torch.Tensor]], noise: torch.Tensor | None,
             control=None):
        """Copy this run's inputs into the static buffers (host-to-device when they come from the CPU)."""
        self.static_x.copy_(x_T)
        if self.control is not None:
            self.control.load(control)
        for g, d in groups.items():
            for n, t in d.items():
                self.static[g][n].copy_(t)
        if self.key.noise_draws:
            self.static_noise.copy_(noise[: self.key.noise_draws])

    def body(self, sigmas: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """The loop over the static buffers: exactly the sampler function called on them."""
        sigmas = self.sigmas if sigmas is None else sigmas
        self.noise.reset()
        if self.tap is not None:  # the preview copies are part of the loop (captured with it)
            callback = _chain(self.tap.callback, callback)
        if self.control is not None:  # webui's sampling step: 0, then each callback's i (captured as table rows)
            self.control.reset()
            callback = self.control.step_callback(callback)
        extra = {"cond": self.static["cond"], "uncond": self.static.get("uncond") or None,
                 **self.static.get("shared", {})}
        spec = self.spec
        model = PerCallConditioning(self.cfg, self.key.rows) if self.key.per_step else self.cfg
        with hoist.scope():  # per-run values (the conditioning's) once per loop; under capture, in the graph
            if spec.stochastic:  # ancestral: its noise from the static buffer, at the runner's eta
                return spec.fn(model, self.static_x, sigmas, extra_args=extra, callback=callback, eta=self.eta,
                               noise_sampler=self.noise)
            return spec.fn(model, self.static_x, sigmas, extra_args=extra, callback=callback)

    def capture(self) -> None:
        """Warm up (up to three steps, on a side stream: Triton compiles and autotuning, cuBLAS handles) then
        capture the whole loop."""
        stream = torch.cuda.Stream(device=self.static_x.device)
        stream.wait_stream(torch.cuda.current_stream(self.static_x.device))
        graph = torch.cuda.CUDAGraph()
        try:  # the warm-up compiles and tunes: Triton's errors surface there
            with torch.cuda.stream(stream):
                self.body(warmup_sigmas(self.sigmas))
            torch.cuda.current_stream(self.static_x.device).wait_stream(stream)
            torch.cuda.synchronize(self.static_x.device)
            with torch.cuda.graph(graph):
                out = self.body()
        except Exception as e:
            if not _capture_error(e):
                raise
            raise GraphCaptureError(
                f"CUDA-graph capture of the {self.key.sampler} loop failed ({str(e).splitlines()[0]}); is the "
                "denoiser built from alphas_cumprod on the device?") from e
        self.graph, self.static_out = graph, out

    def run(self, progress: Callable[[int, int], None] | None = None,
            preview: PreviewSink | None = None) -> torch.Tensor:
        """Replay the graph (or run the loop eagerly without one); ``progress(i, n)`` after each step;
        ``preview(i, latents)`` with a host copy of each preview step's latents (a thread of the tap's on CUDA,
        while the replay runs)."""
        self.replays += 1
        n = self.key.steps
        if self.tap is not None:
            self.tap.begin(preview)
        if self.graph is None:
            callback = None if progress is None else (lambda d: progress(d["i"], n))
            try:
                return self.body(callback=callback)
            finally:
                if self.tap is not None:
                    self.tap.end()
        refresh(self.cfg)  # step embeddings made before the capture follow a LoRA switch
        self.graph.replay()
        if self.tap is not None:
            self.tap.replayed()
        if progress is not None:
            for i in range(n):
                progress(i, n)
        return self.static_out.clone()


class GraphRunner:
    """Runs the denoising loop for one denoiser (sigma space, without CFG), a captured loop per ``LoopKey``.

    Keep one runner per loaded model so the graphs are reused across images; ``max_entries`` bounds how many
    captured loops (each with its own memory pool) stay alive, least recently used first out.
    """

    def __init__(self, denoiser, device: str | torch.device = "cpu", use_graphs: bool | None = None,
                 max_entries: int = 4):
        self.denoiser = denoiser
        self.device = torch.device(device)
        if use_graphs and self.device.type != "cuda":
            raise GraphRunnerError(f"CUDA graphs need a CUDA device, the runner is on {self.device}")
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else bool(use_graphs)
        self.max_entries = max_entries
        self.entries: OrderedDict[LoopKey, CapturedLoop] = OrderedDict()
        self.captures = 0

    @staticmethod
    def serves() -> tuple[str, ...]:
        """The names of the samplers this runner can run: the registry's ``graphable`` ones, read now."""
        return tuple(registry.graph_samplers())

    def key(self, x_T, sigmas, cfg_scale, sampler: SamplerSpec, eta, groups, per_step: bool = False,
            tiling: bool = False, rows: tuple | None = None, control=None, preview_every: int = 0) -> LoopKey:
        b, c, h, w = x_T.shape
        return LoopKey(batch=b, channels=c, height=h, width=w, dtype=x_T.dtype, device=str(self.device),
                       sampler=sampler.name, steps=len(sigmas) - 1, sigmas=tuple(float(s) for s in sigmas),
                       cfg_scale=float(cfg_scale), eta=float(eta) if sampler.stochastic else 0.0,
                       noise_draws=sampler.noise_draws(sigmas, eta), inputs=_signature(groups),
                       per_step=per_step, tiling=bool(tiling), rows=rows if per_step else None,
                       control=() if control is None else control.signature(),
                       preview_every=max(int(preview_every), 0))

    def run(self, x_T: torch.Tensor, cond, uncond=None, noise: torch.Tensor | None = None, *,
            sigmas: torch.Tensor, cfg_scale: float, sampler: SamplerSpec | str = registry.DEFAULT_SAMPLER,
            eta: float = 1.0,
            shared: Mapping[str, torch.Tensor] | None = None,
            progress: Callable[[int, int], None] | None = None, per_step: bool = False,
            tiling: bool = False, rows: tuple | None = None, control=None, preview_every: int = 0,
            preview: PreviewSink | None = None) -> torch.Tensor:
        """Latents after the loop. ``x_T``: start latents already scaled (``x * sigmas[0]``); ``cond`` /
        ``uncond``: context tensors or dicts (``context``, ``y``); ``sampler``: its registry spec (what the
        Pipeline passes) or name; ``eta``: an ancestral sampler's; ``noise``: [N, *x_T.shape] pre-drawn noise for
        an ancestral sampler (``predraw_noise(x_T.shape, noise_draws(...), seed)``); ``progress(i, n)`` after each step
        (all at once after the replay, when captured); ``per_step``: cond / uncond are per-step tables
        [calls, B, ...] (prompt editing), copied into static tables that the captured steps read row by row;
        ``tiling``: the model's convolutions pad circularly during this run (the caller sets that; a captured loop
        bakes the padding in, so it is part of the key); ``rows``: with ``per_step``, each side's row per call
        (``prompt/encode.call_rows``; part of the key, since the graph bakes the rows it reads); ``control``: a
        ControlNet run (``control/apply.ControlRun``) whose hint features and per-step scales are copied into the
        loop's own buffers, so another control image, weight or start / end replays the same graph;
        ``preview(i, latents)``: live previews every ``preview_every`` steps (``preview.due``) of the loop's
        ``denoised``, host copies made inside the loop without synchronising it (``graph_preview``; the period is
        part of the key)."""
        sampler = graph_spec(sampler)
        if x_T.ndim != 4:
            raise GraphRunnerError(f"x_T must be [B, C, H, W], got {list(x_T.shape)}")
        sigmas = sigmas.detach().to("cpu")
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise GraphRunnerError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
        groups = {"cond": _as_inputs(cond)}
        if uncond is not None and float(cfg_scale) != 1.0:
            groups["uncond"] = _as_inputs(uncond)
        if shared:
            groups["shared"] = _as_inputs(shared)
        if not groups["cond"]:
            raise GraphRunnerError("no conditioning given")
        for g, d in groups.items():
            axis = 1 if per_step and g != "shared" else 0
            for n, t in d.items():
                if t.shape[axis] != x_T.shape[0]:
                    raise GraphRunnerError(f"{g} {n!r} has batch {t.shape[axis]}, x_T has {x_T.shape[0]}")
        key = self.key(x_T, sigmas, cfg_scale, sampler, eta, groups, per_step, tiling, rows, control,
                       preview_every if preview is not None else 0)
        if key.noise_draws:
            want = (key.noise_draws, *x_T.shape)
            if noise is None or noise.ndim != len(want) or noise.shape[0] < want[0] or noise.shape[1:] != want[1:]:
                got = None if noise is None else list(noise.shape)
                raise GraphRunnerError(f"{sampler.name} needs pre-drawn noise of shape {list(want)}, got {got}")
        entry = self._entry(key, sampler, sigmas, x_T, groups, eta, control)
        entry.load(x_T, groups, noise, control)
        if entry.graph is None and self.use_graphs:
            for other in self.entries.values():  # no preview reader may query events during a capture
                if other.tap is not None:
                    other.tap.quiesce()
            try:
                entry.capture()
            except BaseException:  # a failed entry is never reused
                del self.entries[key]
                raise
        return entry.run(progress, preview)

    def _entry(self, key, spec, sigmas, x_T, groups, eta, control=None) -> CapturedLoop:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        while len(self.entries) >= self.max_entries:
            self.entries.popitem(last=False)
        entry = CapturedLoop(key, spec, self.denoiser, sigmas, x_T, groups, eta, control)
        self.entries[key] = entry
        self.captures += 1
        return entry

    def clear(self) -> None:
        """Drop every captured loop (and with them their graphs' memory pools)."""
        self.entries.clear()
