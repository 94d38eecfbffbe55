"""Per-step tables (issue 21): a prepared denoiser reads every per-step scalar from tables made before the loop,
and they are bit for bit what the loop computed (so are the images); one step of the captured loop launches at
most 8 kernels besides the UNet, counted statically on the meta device."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tritonsd.kernels import _triton
from tritonsd.model.layers import timestep_embedding
from tritonsd.sampler import denoise as D
from tritonsd.sampler import samplers as K
from tritonsd.sampler import schedule as S
from tritonsd.sampler import wiring as W
from tritonsd.sampler.graph import GraphRunner, noise_draws, predraw_noise, tables_on_device, warmup_sigmas

ACP = S.linear_alphas_cumprod()  # float64; the checkpoints' buffer is its float32
KINDS = {
    "eps": lambda unet, dim: D.EpsDenoiser(unet, ACP.float(), embedding_dim=dim),
    "v": lambda unet, dim: D.VDenoiser(unet, ACP.float(), embedding_dim=dim),
    "sgm": lambda unet, dim: D.SGMEpsDenoiser(unet, ACP, embedding_dim=dim),
}
SAMPLERS = {"euler": K.sample_euler, "euler_a": K.sample_euler_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}


def schedules(kind: str) -> list[torch.Tensor]:
    """Sampling sigmas as the wiring makes them: k-diffusion's (or sgm's) and Karras's, a few step counts."""
    training = S.discrete_sigmas(ACP.float()) if kind != "sgm" else S.sgm_training_sigmas(ACP)
    lo, hi = float(training[0]), float(training[-1])
    out = [S.get_sigmas_karras(n, lo, hi) for n in (3, 20)]
    out += [S.sgm_sigmas(ACP, n) for n in (4, 25)] if kind == "sgm" else [S.get_sigmas(training, n) for n in (4, 25)]
    return out


class SpyUNet:
    """Records what the UNet gets and answers a deterministic function of it; takes ``t_emb`` like ours."""

    def __init__(self, dim: int):
        self.dim, self.calls = dim, []

    def __call__(self, x, t, context, y=None, t_emb=None):
        self.calls.append((x.clone(), t.clone(), None if t_emb is None else t_emb.clone()))
        return torch.sin(x) * 0.75 + context.mean()

    def embedding(self, call) -> torch.Tensor:
        """The sinusoid the UNet uses for a recorded call: the given one, or the one it would compute from t."""
        x, t, t_emb = call
        return timestep_embedding(t, self.dim) if t_emb is None else t_emb


@pytest.mark.parametrize("dim", [32, 320])
@pytest.mark.parametrize("kind", list(KINDS))
def test_tables_are_the_values_the_call_computes(kind, dim):
    """Every sigma of several schedules, UNet batches of 1 to 6 (CFG pairs of 1 to 3): the prepared call gives
    the UNet the same input, timestep and embedding, and returns the same x0, as the unprepared call."""
    spy = SpyUNet(dim)
    plain = KINDS[kind](spy, dim)
    g = torch.Generator().manual_seed(0)
    for sigmas in schedules(kind):
        prepared = plain.prepare(sigmas, "cpu")
        for batch in (1, 2, 3, 4, 6):
            x = torch.randn(batch, 4, 6, 6, generator=g) * 8
            ctx = torch.randn(batch, 77, 8, generator=g)
            for sigma in sigmas[:-1]:
                s_in = sigma * torch.ones(batch)  # the samplers' sigma batch: host values for CPU sigmas
                spy.calls.clear()
                want = plain(x, s_in, context=ctx)
                got = prepared(x, s_in, context=ctx)
                (x0, t0, e0), (x1, t1, e1) = spy.calls
                assert e0 is None and e1 is not None, "the prepared call must read its tables"
                assert torch.equal(x1, x0) and torch.equal(t1, t0) and t1.dtype == t0.dtype
                assert torch.equal(e1, spy.embedding(spy.calls[0]))
                assert torch.equal(got, want), f"{kind} sigma {float(sigma)} batch {batch}"


def test_calls_outside_the_tables_compute_as_before():
    """A sigma outside the schedule, mixed sigmas in one batch, another dtype, a device batch: computed in the
    call (no embedding passed), with the unprepared result."""
    spy = SpyUNet(32)
    plain = KINDS["eps"](spy, 32)
    sigmas = S.get_sigmas_karras(5, 0.03, 14.6)
    prepared = plain.prepare(sigmas, "cpu")
    x, ctx = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 8)
    for s_in in (torch.tensor([3.25, 3.25]), torch.stack([sigmas[0], sigmas[1]]), sigmas[1] * torch.ones(2).double()):
        spy.calls.clear()
        assert torch.equal(prepared(x, s_in, context=ctx), plain(x, s_in, context=ctx))
        assert spy.calls[0][2] is None
    assert prepared.tables.find(sigmas[1] * torch.ones(2)) is not None
    assert prepared.tables.find((sigmas[1] * torch.ones(2)).to("meta")) is None  # no host value to look up


def test_a_unet_without_t_emb_gets_the_timestep_alone():
    """A peer UNet behind the plain protocol (the benchmarks' diffusers UNet) still gets tabulated timesteps."""
    seen = []
    den = KINDS["eps"](lambda x, t, context, y=None: seen.append(t) or x * 0, 32)
    sigmas = S.get_sigmas_karras(3, 0.03, 14.6)
    prepared = den.prepare(sigmas, "cpu")
    assert prepared.tables.embeddings is None and not D.takes_embedding(den.unet)
    prepared(torch.ones(2, 4, 2, 2), sigmas[1] * torch.ones(2), context=torch.zeros(2, 77, 8))
    den(torch.ones(2, 4, 2, 2), sigmas[1] * torch.ones(2), context=torch.zeros(2, 77, 8))
    assert torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [4, 12, 50])
def test_ddim_tables_are_the_in_loop_values(eta, steps):
    """The DDIM / PLMS scalars precomputed for every step equal the 0-d in-loop computation of the original."""
    sched = S.ddim_schedule(ACP.float(), steps, eta)
    x = torch.zeros(3, 4, 2, 2)
    coef = K._DDIMCoefficients(sched, x)
    for index in range(len(sched.timesteps)):
        a_t, a_prev, sigma_t = coef.alphas[index], coef.alphas_prev[index], coef.sigmas[index]
        assert torch.equal(coef.sqrt_alphas[index], a_t.sqrt())
        assert torch.equal(coef.sqrt_alphas_prev[index], a_prev.sqrt())
        assert torch.equal(coef.dir_coef[index], (1.0 - a_prev - sigma_t ** 2).sqrt())
        full = torch.full((3,), int(sched.timesteps[index]), dtype=torch.long)
        assert torch.equal(coef.batch_t[index], full)


@pytest.mark.parametrize("name", ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_prepared_loop_is_the_unprepared_loop(models, name, sampler):
    """The real tiny UNets (eps, v, sgm; the UNet takes the tabulated embedding): the whole CFG loop prepared
    gives the unprepared loop's latents bit for bit."""
    model = models(name)
    config = model.config
    plain = W.sigma_denoiser(model.apply_model, config)
    training = plain.sigmas
    sigmas = S.get_sigmas_karras(3, float(training[0]), float(training[-1]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g) * sigmas[0]
    cond = {"context": torch.randn(2, 77, config.unet.context_dim, generator=g)}
    if config.unet.adm_in_channels:
        cond["y"] = torch.randn(2, config.unet.adm_in_channels, generator=g)
    uncond = {k: torch.randn(v.shape, generator=g) for k, v in cond.items()}
    kwargs = {"seed": 4} if sampler == "euler_a" else {}
    outs = [SAMPLERS[sampler](D.CFGDenoiser(den, 7.5), x, sigmas, extra_args={"cond": cond, "uncond": uncond},
                              **kwargs)
            for den in (plain, plain.prepare(sigmas, "cpu"))]
    assert plain.prepare(sigmas, "cpu").tables.embeddings is not None
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[1], outs[0])


# ---------------------------------------------------------------- launches per step, on the meta device


ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default"}
PER_STEP_LIMIT = 8


class StepLaunches(TorchDispatchMode):
    """The kernels the loop would launch on a GPU, split into the spans between UNet calls: aten ops on meta
    tensors (views and allocations launch none; host ops on CPU tensors none either) and recorded Triton
    launches. Span k (0 < k < steps) is one whole step: after UNet call k-1 to UNet call k."""

    def __init__(self, launches: list):
        super().__init__()
        self.launches, self.spans, self.paused, self.seen = launches, [[]], False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if (not self.paused and not func.is_view and str(func) not in ALLOCATIONS
                and any(t.device.type == "meta" for t in tensors)):
            self.spans[-1].append(str(func))
        return out

    def take_launches(self) -> None:
        self.spans[-1] += [f"triton {kernel.fn.__name__}" for kernel, _, _ in self.launches[self.seen:]]
        self.seen = len(self.launches)

    def unet(self, x, t, context, y=None, t_emb=None):
        """The UNet stand-in: nothing it does is counted; it closes the span."""
        assert t_emb is not None and t_emb.shape[0] == x.shape[0] == t.shape[0], "the step must read its tables"
        self.paused = True
        self.take_launches()
        self.spans.append([])
        out = torch.empty_like(x)
        self.paused = False
        return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_one_step_launches_at_most_8_kernels_besides_the_unet(kind, sampler):
    """The captured loop's body (GraphRunner, CFG 7.5, batch 2) on the meta device with a stub UNet, launches
    recorded as the compiled path makes them: every step launches at most 8 kernels besides the UNet (before
    the tables and the fused kernels: 38 for euler, 42 for euler_a, 40 for dpmpp_2m), and nothing derives a
    per-step scalar on the device (no log, pow, exp, cos, sin, ...)."""
    steps = 5
    with _triton.recording() as launches:
        counter = StepLaunches(launches)
        den = tables_on_device(KINDS[kind](counter.unet, 32), "meta")
        runner = GraphRunner(den, device="meta", use_graphs=False)
        sigmas = S.get_sigmas_karras(steps, 0.03, 14.6)
        x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        n = noise_draws(sampler, sigmas)
        counter.paused = True  # the first run makes the entry (tables, static buffers) and loads the inputs
        runner.run(x, ctx, ctx, predraw_noise(x.shape, n, 0) if n else None, sigmas=sigmas, cfg_scale=7.5,
                   sampler=sampler)
        entry = next(iter(runner.entries.values()))
        counter.spans, counter.seen, counter.paused = [[]], len(launches), False
        with counter:
            out = entry.body()
        counter.take_launches()
    assert out.device.type == "meta" and len(counter.spans) == steps + 1
    per_step = [len(span) for span in counter.spans[1:-1]]
    assert max(per_step) <= PER_STEP_LIMIT, counter.spans
    assert sum(len(span) for span in counter.spans) <= PER_STEP_LIMIT * steps, counter.spans
    ops = {op for span in counter.spans for op in span}
    scalar_work = {"log", "exp", "pow", "sqrt", "cos", "sin", "reciprocal", "neg", "index", "argmin", "clamp"}
    assert not {op for op in ops if op.startswith("aten.") and op.split(".")[1] in scalar_work}, ops


def variants(launches) -> set:
    """The compiled variants behind recorded launches: kernel and constexprs (the shapes are the loop's own)."""
    return {(kernel.fn.__name__, tuple(sorted(kwargs.items()))) for kernel, _, kwargs in launches}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_the_warm_up_launches_every_kernel_variant_of_the_loop(sampler):
    """Before the capture the runner warms up on ``warmup_sigmas``: it must launch every Triton variant the
    whole loop launches, or a kernel would be compiled inside the CUDA-graph capture."""
    sigmas = S.get_sigmas_karras(6, 0.03, 14.6)
    den = tables_on_device(KINDS["eps"](lambda x, t, context, y=None, t_emb=None: torch.empty_like(x), 32), "meta")
    runner = GraphRunner(den, device="meta", use_graphs=False)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    n = noise_draws(sampler, sigmas)
    with _triton.recording() as launches:
        runner.run(x, ctx, ctx, predraw_noise(x.shape, n, 0) if n else None, sigmas=sigmas, cfg_scale=5.0,
                   sampler=sampler)
        whole = variants(launches)
        launches.clear()
        next(iter(runner.entries.values())).body(warmup_sigmas(sigmas))
        warm = variants(launches)
    assert whole == warm and len(whole) >= 3
    assert torch.equal(warmup_sigmas(sigmas), torch.cat([sigmas[:3], torch.zeros(1)]))
