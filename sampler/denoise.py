"""Model wrappers between the UNet and the samplers; they know nothing about samplers.

The UNet is a callable ``unet(x, t, context, y=None)`` (``StableDiffusion.apply_model``), optionally taking
``t_emb=`` (``timestep_embedding(t)`` precomputed, see ``takes_embedding``); conditioning travels as keywords
``context``, ``y`` (SDXL's vector) and ``c_concat`` (inpainting: concatenated to the latent on channels,
unscaled, after the input scaling).

Sigma space (k-diffusion style, ``denoiser(x, sigma, **cond) -> denoised x0``):
* ``EpsDenoiser`` / ``VDenoiser``: k-diffusion 0.1.1 ``CompVisDenoiser`` / ``CompVisVDenoiser``
  (quantize=False: the UNet gets the FRACTIONAL timestep ``sigma_to_t(sigma)``).
* ``SGMEpsDenoiser``: sgm ``DiscreteDenoiser`` + ``EpsScaling`` (SDXL): sigma snapped to the nearest training
  sigma, whose integer index is the timestep.

Timestep space (DDIM / PLMS, ``model(x, t, **cond) -> (eps, pred_x0 or None)``):
* ``UNetOutput``: the raw UNet output (eps or v); ``EpsPrediction`` / ``EpsFromV`` turn it into eps (and x0
  for v, with the DDPM buffers, as the Stability ``DDIMSampler`` does).

Guidance: ``CFGDenoiser(inner, cond_scale)`` wraps either kind (cond and uncond of different token lengths run
as two calls, as AUTOMATIC1111 does; ``PerCallConditioning`` selects per-step rows for prompt editing); it goes INSIDE the eps/v conversion for
DDIM (``EpsFromV(CFGDenoiser(UNetOutput(unet), s), acp)``: the original combines raw v) and OUTSIDE the
sigma-space wrappers (``CFGDenoiser(VDenoiser(unet, acp), s)``: k-diffusion combines denoised x0).

Per-step tables (``prepare(model, sigmas, device)``, before the sampler loop): a sigma-space denoiser, or a CFG /
prompt-editing wrapper around one, returns a copy holding ``StepTables``: for every sigma of the schedule the
scalings ``c_in`` / ``c_out`` / ``c_skip``, the UNet timestep and, for a UNet that takes ``t_emb``, the
timestep embedding's sinusoid. A step whose sigma batch is a host tensor equal to a schedule sigma (the samplers
pass one when ``sigmas`` is on the CPU, as the CUDA-graph runner keeps it) reads its row and does no scalar
work on the device; its output is one fused launch (``dispatch.denoiser_output``). Any other call computes
everything as an unprepared denoiser does. The tables are made by the call's own operations on the same dtypes,
so a prepared denoiser returns bit for bit what an unprepared one does.
"""

from __future__ import annotations

import copy
import inspect

import torch

from tritonsd.kernels import dispatch
from tritonsd.model import hoist
from tritonsd.model.layers import timestep_embedding
from tritonsd.sampler import schedule


class CFGError(ValueError):
    """Conditional and unconditional inputs do not pair up."""


def _append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - v.ndim)]


def call_unet(unet, x, t, context=None, y=None, c_concat=None, t_emb=None, cond_mark=None, step_emb=None):
    """The one place that assembles the UNet input: ``cat([x, c_concat], 1)`` when inpainting; ``t_emb`` (the
    precomputed ``timestep_embedding(t)``) goes along only when given (see ``takes_embedding``); ``cond_mark``
    (1 for the rows of the conditional prompt, 0 for the unconditional ones: ControlNet's "ControlNet is more
    important", ``control/apply.py``) likewise, and ``step_emb`` (its time MLP and projections, see
    ``takes_step_embedding``)."""
    if c_concat is not None:
        if isinstance(c_concat, (list, tuple)):
            c_concat = torch.cat(list(c_concat), dim=1)
        x = torch.cat([x, c_concat], dim=1)
    extra = {} if cond_mark is None else {"cond_mark": cond_mark}
    if t_emb is None:
        return unet(x, t, context, y=y, **extra)
    if step_emb is not None:
        extra["step_emb"] = step_emb
    return unet(x, t, context, y=y, t_emb=t_emb, **extra)


def takes_embedding(unet) -> bool:
    """Whether a UNet callable takes a precomputed timestep embedding as ``t_emb=`` (ours does; a peer behind
    the same protocol, such as the benchmarks' diffusers UNet, need not, and then gets ``t`` alone)."""
    try:
        return "t_emb" in inspect.signature(unet).parameters
    except (TypeError, ValueError):
        return False


def takes_step_embedding(unet) -> bool:
    """Whether a UNet callable takes ``step_emb=`` (``model/unet.StepEmbedding``, made before the loop)."""
    try:
        return "step_emb" in inspect.signature(unet).parameters
    except (TypeError, ValueError):
        return False


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """The sigma batch on x's device (an unprepared denoiser computes its scalings there)."""
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """The sigma batch where it is: a host batch stays on the host, where a prepared denoiser reads it."""
    sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def prepare(model, sigmas: torch.Tensor, device: str | torch.device | None = None):
    """``model.prepare(sigmas, device)`` for a wrapper that tabulates its per-step values, else ``model``."""
    fn = getattr(model, "prepare", None)
    return model if fn is None else fn(sigmas, device)


# ---------------------------------------------------------------- per-step tables


class StepTables:
    """What a sigma-space denoiser derives from sigma alone, for every sigma of one schedule, made before the loop.

    Row k belongs to the k-th distinct schedule sigma: ``c_in`` / ``c_out`` / ``c_skip`` as host floats (``c_skip``
    None: 1, the eps form), ``timesteps`` [n] and ``embeddings`` [n, dim] (or None) on the device. The step finds
    its row by the host value of its sigma batch (a dict lookup, no device work).

    With an ``embedder`` (``model/unet.StepEmbedder``; for SDXL the time MLP only), the first step of a UNet batch
    size embeds every row for that batch (the time MLP and every ResBlock's projection, by the operations the
    UNet would run in the step, on the same [batch, dim] input: the same values), so the later steps, and every
    replay of a captured loop, launch none of it. ``refresh`` recomputes them in place when the embedder's
    weights changed (a LoRA switch): a captured graph reads their storage.
    """

    def __init__(self, sigmas: torch.Tensor, c_in: list[float], c_out: list[float], c_skip: list[float] | None,
                 timesteps: torch.Tensor, embeddings: torch.Tensor | None, embedder=None):
        self.dtype = sigmas.dtype
        self.rows = {v: k for k, v in enumerate(sigmas.tolist())}
        self.c_in, self.c_out, self.c_skip = c_in, c_out, c_skip
        self.timesteps, self.embeddings = timesteps, embeddings
        self.embedder = embedder if embeddings is not None else None
        self.step_embeddings: dict[int, list] = {}  # UNet batch -> one StepEmbedding per row
        self._embedded_with = None  # the embedder's weights' version the rows hold

    def find(self, sigma) -> int | None:
        """The row of a sigma batch that is on the host, in the tables' dtype and one schedule sigma throughout;
        None for anything else (a device batch, mixed values, a sigma outside the schedule)."""
        if not isinstance(sigma, torch.Tensor) or sigma.device.type != "cpu" or sigma.dtype != self.dtype:
            return None
        values = sigma.reshape(-1).tolist()
        if not values or any(v != values[0] for v in values):
            return None
        return self.rows.get(values[0])

    def unet_inputs(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t [n], t_emb [n, dim] or None) of ``row`` for a UNet batch of n: views, no copy."""
        t = self.timesteps[row].expand(n)
        emb = None if self.embeddings is None else self.embeddings[row].expand(n, self.embeddings.shape[1])
        return t, emb

    def step_embedding(self, row: int, n: int):
        """Row ``row``'s ``StepEmbedding`` for a UNet batch of n (every row made at the first ask for n), or None
        without an embedder."""
        if self.embedder is None:
            return None
        self.refresh()
        rows = self.step_embeddings.get(n)
        if rows is None:  # the last sigma, 0, is never a model input: its row is made only if asked for
            rows = self.step_embeddings[n] = [None if sigma == 0 else self.embedder(self.unet_inputs(k, n)[1])
                                              for sigma, k in self.rows.items()]
            self._embedded_with = self.embedder.version()
        if rows[row] is None:
            rows[row] = self.embedder(self.unet_inputs(row, n)[1])
        return rows[row]

    def refresh(self) -> None:
        """Recompute the made rows in place if the embedder's weights changed since they were made."""
        if not self.step_embeddings or self.embedder.version() == self._embedded_with:
            return
        for n, rows in self.step_embeddings.items():
            for k, emb in enumerate(rows):
                if emb is not None:
                    self.embedder(self.unet_inputs(k, n)[1], out=emb)
        self._embedded_with = self.embedder.version()


def _tabulate(den, sigmas: torch.Tensor, device) -> StepTables:
    """``den``'s tables over the distinct values of ``sigmas``, by the operations its unprepared call runs.

    The scalings use only correctly rounded operations (square, add, square root, divide, negate), so they are
    computed on the host and equal the device's values bit for bit. The timestep (a log, for k-diffusion's
    fractional t) and the sinusoid (exp, cos, sin) are computed on the device, one sigma at a time as the loop
    computed them, so that they are the very values it used.
    """
    values = list(dict.fromkeys(sigmas.detach().cpu().reshape(-1).tolist()))  # distinct, in schedule order
    host = torch.tensor(values, dtype=sigmas.dtype)
    c_skip, c_out, c_in = den.scalings(den.scaled_sigma(host, host.device))
    on_device = host.to(device)
    timesteps = [den.timestep(on_device[k:k + 1]) for k in range(len(values))]
    embeddings = None
    if den.embedding_dim and takes_embedding(den.unet):
        embeddings = torch.cat([timestep_embedding(t, den.embedding_dim) for t in timesteps])
    embedder = den.step_embedder if takes_step_embedding(den.unet) else None
    return StepTables(host, c_in.tolist(), c_out.tolist(), None if c_skip is None else c_skip.tolist(),
                      torch.cat(timesteps), embeddings, embedder)


class _SigmaDenoiser:
    """What the sigma-space wrappers share: the call, unprepared (scalings computed from the sigma batch on x's
    device) or prepared (``prepare``: the values read from ``StepTables``, the output in one fused launch).

    A subclass defines ``scalings(s) -> (c_skip or None, c_out, c_in)``, ``scaled_sigma(sigma, device)`` (the
    sigma the scalings see) and ``timestep(sigma)`` (the UNet's t), and sets ``sigmas`` (the training sigmas,
    which ``graph.tables_on_device`` may move) and ``host_sigmas`` (the same, kept on the host); the eps / v ones also
    ``log_sigmas`` / ``host_log_sigmas``.
    """

    def training_sigmas(self, device: str | torch.device) -> torch.Tensor:
        """The training sigmas on ``device``; on the host, the copy kept there (the device's may be meta)."""
        return self.host_sigmas if torch.device(device).type == "cpu" else self.sigmas.to(device)

    def training_log_sigmas(self, device: str | torch.device) -> torch.Tensor:
        """Their logs (k-diffusion's ``log_sigmas``), likewise."""
        return self.host_log_sigmas if torch.device(device).type == "cpu" else self.log_sigmas.to(device)

    def prepare(self, sigmas: torch.Tensor, device: str | torch.device | None = None):
        """A copy of this denoiser with the tables of ``sigmas`` (the sampler's schedule) on ``device`` (default:
        where the training-sigma table is). Calls at other sigmas still work, computed in the call."""
        prepared = copy.copy(self)
        prepared.tables = _tabulate(self, sigmas, self.sigmas.device if device is None else device)
        return prepared

    def __call__(self, x, sigma, **cond):
        row = None if self.tables is None else self.tables.find(sigma)
        if row is None:
            return self._call_unprepared(x, sigma, **cond)
        tables = self.tables
        t, t_emb = tables.unet_inputs(row, x.shape[0])
        step_emb = tables.step_embedding(row, x.shape[0])
        raw = call_unet(self.unet, x * tables.c_in[row], t, t_emb=t_emb, step_emb=step_emb, **cond)
        c_skip = None if tables.c_skip is None else tables.c_skip[row]
        return dispatch.denoiser_output(x, raw, tables.c_out[row], c_skip)

    def _call_unprepared(self, x, sigma, **cond):
        sigma = _batch_sigma(sigma, x)
        c_skip, c_out, c_in = self.scalings(_append_dims(self.scaled_sigma(sigma, x.device), x.ndim))
        raw = call_unet(self.unet, x * c_in, self.timestep(sigma), **cond)
        return x + raw * c_out if c_skip is None else raw * c_out + x * c_skip


class EpsDenoiser(_SigmaDenoiser):
    """eps-prediction UNet as a denoiser: ``x + eps(x * c_in, t(sigma)) * c_out`` with c_out = -sigma.

    ``embedding_dim`` (the UNet's model channels) lets ``prepare`` tabulate the timestep embedding too, and
    ``step_embedder`` (``StableDiffusion.step_embedder()``) its time MLP and projections (see ``StepTables``).
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, embedding_dim: int | None = None, step_embedder=None):
        self.unet = unet
        self.step_embedder = step_embedder
        self.sigmas = schedule.discrete_sigmas(alphas_cumprod)  # ascending, float32
        self.log_sigmas = schedule.discrete_log_sigmas(self.sigmas)  # k-diffusion's buffer (pinned: schedule.py)
        self.host_sigmas, self.host_log_sigmas = self.sigmas.cpu(), self.log_sigmas.cpu()
        self.embedding_dim = embedding_dim
        self.tables = None

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int) -> torch.Tensor:
        return schedule.get_sigmas(self.sigmas, n, self.log_sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedule.sigma_to_t(sigma, self.training_sigmas(sigma.device), self.training_log_sigmas(sigma.device))

    @staticmethod
    def scalings(s):
        return None, -s, 1 / (s ** 2 + 1.0) ** 0.5

    @staticmethod
    def scaled_sigma(sigma, device):
        return sigma

    def timestep(self, sigma):
        return self.sigma_to_t(sigma)


class VDenoiser(EpsDenoiser):
    """v-prediction UNet as a denoiser: ``v(x * c_in, t(sigma)) * c_out + x * c_skip`` (sigma_data 1)."""

    @staticmethod
    def scalings(s):
        c_skip = 1.0 / (s ** 2 + 1.0)
        c_out = -s / (s ** 2 + 1.0) ** 0.5
        c_in = 1 / (s ** 2 + 1.0) ** 0.5
        return c_skip, c_out, c_in


class SGMEpsDenoiser(_SigmaDenoiser):
    """sgm ``DiscreteDenoiser`` with ``EpsScaling`` (SDXL): quantised sigma, integer timestep:
    ``eps(x * c_in, idx) * c_out + x`` at the nearest training sigma.

    ``alphas_cumprod`` should be the float64 schedule (``schedule.linear_alphas_cumprod``), as sgm rebuilds it;
    sampling sigmas come from ``schedule.sgm_sigmas``.
    """

    def __init__(self, unet, alphas_cumprod: torch.Tensor, embedding_dim: int | None = None, step_embedder=None):
        self.unet = unet
        self.sigmas = self.host_sigmas = schedule.sgm_training_sigmas(alphas_cumprod)  # ascending, float32
        self.embedding_dim = embedding_dim
        self.step_embedder = step_embedder  # the time MLP only: SDXL's embedding adds y's
        self.tables = None

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedule.sigma_to_idx(sigma, self.training_sigmas(sigma.device))

    @staticmethod
    def scalings(s):
        return None, -s, 1 / (s ** 2 + 1.0) ** 0.5  # eps * c_out + x: the same sum as x + eps * c_out

    def scaled_sigma(self, sigma, device):
        return self.training_sigmas(device)[self.sigma_to_idx(sigma)]

    def timestep(self, sigma):
        return self.sigma_to_idx(sigma)


class UNetOutput:
    """The UNet's raw output (eps or v) at integer timesteps, conditioning as keywords."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x, t, **cond):
        return call_unet(self.unet, x, t, **cond)


class EpsPrediction:
    """An eps model for DDIM / PLMS: ``(eps, None)``; the sampler derives x0 with its own alphas."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x, t, **cond):
        return self.inner(x, t, **cond), None


class EpsFromV:
    """A v model for DDIM: ``predict_eps_from_z_and_v`` and ``predict_start_from_z_and_v`` of the original.

    ``sqrt(alphas_cumprod)`` and ``sqrt(1 - alphas_cumprod)`` are taken in float64 then held in float32, as
    ``register_schedule`` does; pass the float64 schedule to match its buffers to the bit.
    """

    def __init__(self, inner, alphas_cumprod: torch.Tensor):
        self.inner = inner
        acp = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sqrt_alphas_cumprod = acp.sqrt().to(torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (1.0 - acp).sqrt().to(torch.float32)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Both buffers on ``device``, copied there once rather than at every call."""
        if device not in self._on_device:
            self._on_device[device] = (self.sqrt_alphas_cumprod.to(device),
                                       self.sqrt_one_minus_alphas_cumprod.to(device))
        return self._on_device[device]

    def __call__(self, x, t, **cond):
        v = self.inner(x, t, **cond)
        sqrt_a, sqrt_one_minus_a = self._tables(x.device)
        a = _append_dims(sqrt_a[t], x.ndim).to(x.dtype)
        b = _append_dims(sqrt_one_minus_a[t], x.ndim).to(x.dtype)
        eps = a * v + b * x
        pred_x0 = a * x - b * v
        return eps, pred_x0


class CFGDenoiser:
    """Classifier-free guidance: ``uncond + (cond - uncond) * scale`` from ONE batched call ``[uncond, cond]``.

    Called as ``cfg(x, s, cond, uncond=None, **shared)``: ``cond`` / ``uncond`` are dicts of per-sample
    conditioning (``context``, ``y``, ...) with the same keys, concatenated uncond first; ``shared`` tensors
    (e.g. inpainting's ``c_concat``) serve both halves. With scale 1.0 or no ``uncond`` only the conditional
    batch is evaluated, as the original DDIM does. The combine is one fused launch on CUDA
    (``dispatch.cfg_combine``); the sigma batch stays where the sampler made it (the host, for CPU sigmas).
    """

    def __init__(self, inner, cond_scale: float):
        self.inner = inner
        self.cond_scale = float(cond_scale)

    def prepare(self, sigmas: torch.Tensor, device: str | torch.device | None = None) -> CFGDenoiser:
        """This guidance around the inner denoiser prepared for ``sigmas`` (see ``StepTables``)."""
        return CFGDenoiser(prepare(self.inner, sigmas, device), self.cond_scale)

    def __call__(self, x, s, cond: dict, uncond: dict | None = None, **shared):
        if uncond is None or self.cond_scale == 1.0:
            return self.inner(x, s, **cond, **shared)
        if set(cond) != set(uncond):
            raise CFGError(f"cond has keys {sorted(cond)} but uncond has {sorted(uncond)}")
        if any(_rows_shape(cond[k]) != _rows_shape(uncond[k]) for k in cond):
            # prompts of different lengths (77 * k tokens): two UNet calls, as AUTOMATIC1111 does by default
            out_cond = self.inner(x, s, **cond, **shared)
            out_uncond = self.inner(x, s, **uncond, **shared)
            return dispatch.cfg_combine(out_uncond, out_cond, self.cond_scale)
        inputs = {k: _pair(uncond[k], cond[k]) for k in cond}
        inputs.update({k: _pair(v, v) for k, v in shared.items()})
        s = _sigma_batch(s, x)
        out_uncond, out_cond = self.inner(torch.cat([x, x]), torch.cat([s, s]), **inputs).chunk(2)
        return dispatch.cfg_combine(out_uncond, out_cond, self.cond_scale)


class PerCallConditioning:
    """Prompt editing: the conditioning tensors are tables [calls, B, ...] and call k of the model gets row
    ``min(k, calls - 1)`` (AUTOMATIC1111's ``CFGDenoiser.step`` count). Wraps the outermost model (a CFG
    denoiser, or DDIM's eps wrapper around one); make one per sampler run. Under a CUDA graph the row choice
    happens at capture: each captured step reads its own row of the static tables.

    ``rows`` (``prompt/encode.call_rows``: per side, row k -> the first row of the same entry) makes the calls of
    one entry read the same row, so that per-run values computed from it are computed once per entry."""

    def __init__(self, inner, rows: tuple | None = None):
        self.inner = inner
        self.rows = rows
        self.calls = 0

    def prepare(self, sigmas: torch.Tensor, device: str | torch.device | None = None) -> PerCallConditioning:
        """A fresh wrapper (call count 0) around the inner model prepared for ``sigmas``."""
        return PerCallConditioning(prepare(self.inner, sigmas, device), self.rows)

    def __call__(self, x, s, cond: dict, uncond: dict | None = None, **shared):
        k = self.calls
        self.calls += 1
        cond_rows, uncond_rows = self.rows if self.rows is not None else (None, None)

        def row(side, rows):
            if side is None:
                return None
            out = {}
            for n, t in side.items():
                j = min(k, t.shape[0] - 1)
                out[n] = t[rows[j] if rows is not None and j < len(rows) else j]
            return out

        return self.inner(x, s, cond=row(cond, cond_rows), uncond=row(uncond, uncond_rows), **shared)


def _rows_shape(t) -> tuple:
    return tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else ()


def _pair(a, b):
    """``_cat_pair``, once per run for the same two tensors (``model/hoist``: the conditioning is the same at every
    step, so the UNet's per-run values computed from it are found again)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return hoist.once("cfg-pair", (a, b), lambda: _cat_pair(a, b))
    return _cat_pair(a, b)


def refresh(model) -> None:
    """Bring the per-step tables of ``model`` (a prepared denoiser, or a wrapper around one) up to date with the
    weights (``StepTables.refresh``): before a captured loop replays."""
    while model is not None:
        tables = getattr(model, "tables", None)
        if tables is not None:
            tables.refresh()
        model = getattr(model, "inner", None)


def _cat_pair(a, b):
    if a is None or b is None:
        if a is None and b is None:
            return None
        raise CFGError("a conditioning entry is None on one side of the guidance pair only")
    if isinstance(a, (list, tuple)):
        return [torch.cat([u, c]) for u, c in zip(a, b)]
    return torch.cat([a, b])
