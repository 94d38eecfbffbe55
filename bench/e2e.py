"""``tritonsd bench e2e``: whole-image speed of full-size models with random weights, and the diffusers peer.

Models are built from the released checkpoints' key manifests (``bench/random_weights.py``): the same layout,
shapes and dtype as the real files, random values (speed does not depend on them). For each model, size,
batch and sampler, every implementation generates ``--repeat`` images after a first one:

* ``tritonsd-graph``: the product: a ``Pipeline`` over our model, the sampling loop captured in a CUDA graph;
* ``tritonsd-eager``: the same Pipeline without the graph;
* ``diffusers-eager`` / ``diffusers-compile``: the same Pipeline (our text encoder, noise, sampler loop) with
  diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` at the same config and dtype swapped in as its UNet
  and VAE (so the difference is the UNet and the VAE): eager as diffusers' users run it (SDPA attention), and
  compiled with the recipe of huggingface/diffusion-fast (channels_last, fused QKV projections,
  ``torch.compile(mode=--compile-mode, fullgraph=True)``, inductor's ``conv_1x1_as_mm``,
  ``coordinate_descent_tuning`` and ``epilogue_fusion=False``).

Every image runs the Pipeline's stages (``encode``, ``prepare_latents``, ``denoise``, ``decode``) on the same
settings a user's ``pipe(...)`` call would resolve to; nothing here wires samplers, denoisers or noise.

Reported per row: ``warmup_s`` (tritonsd rows on CUDA: the library warm-up for the row's shapes, run first:
every kernel variant compiled in parallel and every autotune key tuned once; split into ``warmup_compile_s``
and ``warmup_tuning_s``), ``step_ms`` (denoising loop / steps: one UNet call at the CFG batch, the CFG combine
and the sampler update; CUDA events), ``it_per_s``, ``unet_tflop_per_step`` / ``vae_tflop`` (torch's FLOP
counter on the meta device: the arithmetic floor; ``unet_tflops_per_s`` is it over ``step_ms``),
``unet_forward_ms`` (one UNet call, eager impls), ``image_ms`` (text encoding, start noise, loop, VAE decode
and the copy to the host, wall clock), ``first_image_ms`` (the first image of the row in this process, after
the warm-up: graph capture, and for the peer ``torch.compile``, included; rows run in the order printed),
``peak_mem_gb`` (``torch.cuda.max_memory_allocated``, weights included). Medians over ``--repeat`` (default
10) timed images; the raw lists are kept. Results go to ``benchmarks/results/e2e-*.json`` with the device, its
driver and clocks, versions, git commit, settings and command (``bench/environment.py``);
``tools/readme_table.py`` renders them.

diffusers is optional: imported only here, and only when a diffusers impl is asked for.

On a lent GPU machine (no network; the tree travels without ``../shared`` and without ``.git``) this runs as
stages of ``benchmarks/gpu_run.sh`` (see benchmarks/README.md), which carries the wheels and fixtures, passes
``--git-commit`` and writes the JSON to ``$OUT``. Split a long run over several commands (``--model``,
``--impl``); ``tools/readme_table.py`` merges the files.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tritonsd.kernels import dispatch
from tritonsd.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from tritonsd.pipeline import Pipeline
from tritonsd.bench import environment as bench_environment
from tritonsd.bench.random_weights import MANIFESTS, build_meta_model, build_random_model, fill_random_
from tritonsd.sampler import registry
from tritonsd.compile.warmup import warmup

IMPLS = ("tritonsd-graph", "tritonsd-eager", "diffusers-eager", "diffusers-compile")
BENCH_MODELS = ("sd15", "sd21", "sdxl")
DEFAULT_SIZE = {"sd15": 512, "sd21": 768, "sdxl": 1024}
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
UNET_TIMINGS = 10


class BenchE2EError(RuntimeError):
    """The end-to-end benchmark cannot run as asked (no GPU, diffusers missing, ...)."""


def bench_samplers() -> tuple[str, ...]:
    """The samplers a row may time: those whose loop tritonsd-graph captures (the registry's ``graphable``)."""
    return tuple(registry.graph_samplers())


def default_samplers() -> list[str]:
    """The rows' samplers when none is asked for: the captured ones that draw no noise."""
    return [name for name, spec in registry.graph_samplers().items() if not spec.stochastic]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help=f"{', '.join(BENCH_MODELS)} or a key-manifest JSON path (repeatable; default sd15, sd21)")
    p.add_argument("--size", type=int, default=None, help="image side (default: sd15 512, sd21 768, sdxl 1024)")
    p.add_argument("--batch", type=int, action="append", default=None, help="images per run (repeatable; "
                                                                             "default 1 and 4)")
    p.add_argument("--sampler", choices=bench_samplers(), action="append", default=None,
                   help=f"repeatable; default {' and '.join(default_samplers())}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="fp16")
    p.add_argument("--impl", choices=IMPLS, action="append", default=None,
                   help="repeatable; default all (the diffusers ones only when diffusers imports)")
    p.add_argument("--repeat", type=int, default=10, help="timed images per row after the first (default 10)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of diffusers-compile")
    p.add_argument("--kernels", choices=dispatch.BACKENDS, default="auto", help="our kernels' backend")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs only)")
    p.add_argument("--text-heads", type=int, default=None, help="text heads for a manifest path's model")
    p.add_argument("--hires-scale", type=float, default=0.0, metavar="S",
                   help="hires fix: a second pass at S times the size (latent upscale, webui's defaults: strength "
                        "0.7, --steps steps; 0: off); its time is hires_ms, part of image_ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--git-commit", default=None, help="record this commit (when the tree has no .git; else "
                                                      "$TRITONSD_GIT_COMMIT, else git)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="results file (default benchmarks/results/e2e-DEVICE-DTYPE-TIME.json); rewritten after "
                        "every row, so a run cut short keeps what it measured")


# ---------------------------------------------------------------- timing


class Clock:
    """Stage marks on the device timeline (CUDA events) or the host clock (CPU, synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronises first)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- implementations


class TritonsdImpl:
    """The product: a Pipeline over our model, with or without the CUDA graph."""

    def __init__(self, name: str, model, graphs: bool):
        self.name, self.graphs = name, graphs
        self.pipe = Pipeline(model)

    def info(self) -> dict:
        runner = self.pipe._runner
        entries = list(runner.entries.values()) if runner is not None else []
        model = self.pipe.model
        return {"loop_entries": len(entries), "cuda_graph": any(e.graph is not None for e in entries),
                "vae_retries": self.pipe.vae_guard.retries,
                "unet_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
                "vae_params": sum(p.numel() for p in model.first_stage_model.parameters())}

    def close(self) -> None:
        self.pipe.clear_graphs()


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise BenchE2EError(
            "diffusers is not installed, and the diffusers-eager / diffusers-compile rows need it: pip install "
            "diffusers (on a lent GPU machine, carry its wheel), or pass --impl tritonsd-graph --impl "
            "tritonsd-eager") from None
    return diffusers


def diffusers_configs(name: str, size: int) -> tuple[dict, dict]:
    """UNet2DConditionModel and AutoencoderKL configs of the released models (their diffusers conversions)."""
    sd1 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               in_channels=4, out_channels=4, sample_size=size // 8)
    unet = {
        "sd15": dict(sd1, cross_attention_dim=768, attention_head_dim=8),
        "sd21": dict(sd1, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                     in_channels=4, out_channels=4, sample_size=size // 8),
    }
    if name not in unet:
        raise BenchE2EError(f"no diffusers config for {name!r} (the peer runs for {', '.join(unet)})")
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size)
    return unet[name], vae


class DiffusersUNet:
    """diffusers' UNet behind the Pipeline's UNet protocol ``unet(x, t, context, y=None) -> float32``."""

    def __init__(self, module, fn, sdxl: bool):
        self.module, self.fn, self.sdxl = module, fn, sdxl

    def __call__(self, x, t, context, y=None):
        dtype = self.module.dtype
        kwargs = {}
        if self.sdxl:  # text_embeds [B, 1280] + time_ids [B, 6] -> the 2816-wide vector inside
            time_ids = torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], device=x.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": y[:, :1280].to(dtype),
                                           "time_ids": time_ids.expand(x.shape[0], 6).to(dtype)}
        return self.fn(x.to(dtype), t, encoder_hidden_states=context.to(dtype), **kwargs).sample.float()


class DiffusersVAE:
    """diffusers' VAE behind the Pipeline's decode-guard protocol (``vae`` and ``decode(unscaled z)``)."""

    def __init__(self, vae):
        self.vae, self.retries = vae, 0

    def decode(self, z):
        return self.vae.decode(z).sample


def compile_recipe(unet, vae, mode: str):
    """huggingface/diffusion-fast's setup: channels_last, fused QKV, inductor flags, ``fullgraph=True``."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
    for module in (unet, vae):
        module.to(memory_format=torch.channels_last)
        if hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()
    return torch.compile(unet, mode=mode, fullgraph=True, dynamic=False)


class DiffusersImpl:
    """A Pipeline over our model (text encoder, noise, sampler loop) with diffusers' UNet and VAE swapped in
    (random weights, same dtype); eager, or compiled with ``compile_recipe``."""

    def __init__(self, name: str, bench_model: str, ours, size: int, dtype, device, compile_mode: str | None,
                 seed: int):
        diffusers = _import_diffusers()
        self.name, self.graphs = name, False
        unet_cfg, vae_cfg = diffusers_configs(bench_model, size)
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(**unet_cfg)
            vae = diffusers.AutoencoderKL(**vae_cfg)
        self.unet_module = fill_random_(unet.to(dtype).eval().requires_grad_(False), seed)
        self.vae = fill_random_(vae.to(dtype).eval().requires_grad_(False), seed)
        fn = compile_recipe(self.unet_module, self.vae, compile_mode) if compile_mode else self.unet_module
        self.pipe = Pipeline(ours)
        self.pipe.unet = DiffusersUNet(self.unet_module, fn, "addition_embed_type" in unet_cfg)
        self.pipe.vae_guard = DiffusersVAE(self.vae)

    def info(self) -> dict:
        return {"unet_params": sum(p.numel() for p in self.unet_module.parameters()),
                "vae_params": sum(p.numel() for p in self.vae.parameters()), "recipe": "diffusion-fast"
                if self.name == "diffusers-compile" else "eager"}

    def close(self) -> None:
        self.pipe.clear_graphs()


# ---------------------------------------------------------------- one image, one row


def bench_settings(impl, batch: int, size: int, sampler: str, args):
    """What ``pipe(PROMPT, ...)`` would run: the sampler's default schedule, as a user gets it."""
    hires = dict(enable_hr=True, hr_scale=args.hires_scale) if args.hires_scale else {}
    return impl.pipe.settings(prompt=PROMPT, sampler=sampler, steps=args.steps, cfg_scale=args.cfg,
                              width=size, height=size, batch_size=batch, seed=args.seed, use_graphs=impl.graphs,
                              **hires)


@torch.no_grad()
def one_image(impl, device, settings) -> dict:
    """Stage times of one whole image through the Pipeline's stages (text -> noise -> loop -> VAE -> host)."""
    pipe = impl.pipe
    clock = Clock(device)
    t0 = time.perf_counter()
    clock.mark()
    cond = pipe.encode(settings)
    clock.mark()
    latents = pipe.prepare_latents(settings)
    clock.mark()
    x = pipe.denoise(latents, cond, settings)
    clock.mark()
    if settings.enable_hr:  # upscale, noise and the second loop at the large size
        x = pipe.hires(x, settings, cond)
    clock.mark()
    image = pipe.decode(x)
    clock.mark()
    image = image.cpu()
    wall = (time.perf_counter() - t0) * 1e3
    text_ms, prep_ms, loop_ms, hires_ms, decode_ms = clock.spans_ms()
    return {"image_ms": wall, "text_ms": text_ms, "loop_ms": loop_ms, "hires_ms": hires_ms, "decode_ms": decode_ms,
            "finite": bool(torch.isfinite(image).all())}


@torch.no_grad()
def unet_forward_ms(impl, device, settings) -> float:
    """Median of single UNet calls at the CFG batch (2 x batch), warmed up."""
    pipe = impl.pipe
    cond = pipe.encode(settings)
    context = torch.cat([cond.uncond["context"], cond.cond["context"]])
    y = torch.cat([cond.uncond["y"], cond.cond["y"]]) if "y" in cond.cond else None
    c, h, w = pipe.latent_shape(settings)
    x = torch.randn(context.shape[0], c, h, w, device=device)
    t = torch.full((context.shape[0],), 500.0, device=device)
    for _ in range(2):
        pipe.unet(x, t, context, y)
    times = []
    for _ in range(UNET_TIMINGS):
        clock = Clock(device)
        clock.mark()
        pipe.unet(x, t, context, y)
        clock.mark()
        times.append(clock.spans_ms()[0])
    return statistics.median(times)


def warmup_row(impl, device, batch: int, size: int, args) -> dict:
    """Our compile and tuning time for the row's shapes, apart from the first image: the library warm-up
    (``tritonsd.compile.warmup.warmup``: every kernel variant compiled in parallel, then every autotune key
    tuned once into the persistent cache) for one UNet step at the CFG batch and the VAE decode. Rows of the
    peer, and runs off CUDA, have none (``warmup_s`` null: the peer's compile is in its first image)."""
    if not isinstance(impl, TritonsdImpl) or device.type != "cuda":
        return {"warmup_s": None}

    pipe = impl.pipe
    start = time.perf_counter()
    sizes = [(size, size)] + ([(int(size * args.hires_scale),) * 2] if args.hires_scale else [])
    report = warmup(pipe.config, sizes=sizes, batches=(2 * batch,), dtype=pipe.dtype, device=device,
                    model=pipe.model)
    return {"warmup_s": time.perf_counter() - start, "warmup_compiles": report.tasks,
            "warmup_compile_misses": report.misses, "warmup_compile_s": report.compile.wall_seconds,
            "warmup_tuned_keys": report.tuned, "warmup_tuning_s": report.tuning_seconds,
            "warmup_failures": len(report.compile.failures)}


def measure(impl, device, batch, size, sampler, args) -> dict:
    impl.close()  # each row captures its own loop: its first image pays for it, its peak holds only it
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    settings = bench_settings(impl, batch, size, sampler, args)
    warm = warmup_row(impl, device, batch, size, args)
    first = one_image(impl, device, settings)
    runs = [one_image(impl, device, settings) for _ in range(args.repeat)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("image_ms", "text_ms", "loop_ms", "hires_ms",
                                                               "decode_ms")}
    row = {**warm, "first_image_ms": first["image_ms"], **med, "step_ms": med["loop_ms"] / args.steps,
           "it_per_s": args.steps / (med["loop_ms"] / 1e3), "karras": settings.karras,
           "finite": first["finite"] and all(r["finite"] for r in runs),
           "hires_scale": args.hires_scale or None,
           "raw": {k: [r[k] for r in runs] for k in ("image_ms", "text_ms", "loop_ms", "hires_ms", "decode_ms")}}
    if not impl.graphs:
        row["unet_forward_ms"] = unet_forward_ms(impl, device, settings)
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return row


@torch.no_grad()
def work_tflop(meta_model, size: int, batch: int) -> dict:
    """FLOPs (torch's counter: convolutions, matrix products, attention) of one UNet call at the CFG batch and of
    the VAE decode of the batch, counted on the meta device: the arithmetic floor of a step and a decode."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = meta_model.config.unet
    h = size // 8
    x = torch.empty(2 * batch, cfg.in_channels, h, h, device="meta")
    t = torch.full((2 * batch,), 500.0, device="meta")
    ctx = torch.empty(2 * batch, 77, cfg.context_dim, device="meta")
    y = torch.empty(2 * batch, cfg.adm_in_channels, device="meta") if cfg.adm_in_channels else None
    with FlopCounterMode(display=False) as unet:
        meta_model.apply_model(x, t, ctx, y)
    with FlopCounterMode(display=False) as vae:
        meta_model.first_stage_model.decode(torch.empty(batch, 4, h, h, device="meta"))
    return {"unet_tflop_per_step": unet.get_total_flops() / 1e12, "vae_tflop": vae.get_total_flops() / 1e12}


# ---------------------------------------------------------------- environment and output


def environment(args, device: torch.device) -> dict:
    """The shared record (commit, command, device, driver, clocks, versions) plus this run's settings."""
    env = bench_environment.record(git_commit_override=args.git_commit)
    if device.type != "cuda":
        env["device"] = platform.processor() or "cpu"
    env["bench"] = "e2e"
    env["settings"] = {"steps": args.steps, "cfg": args.cfg, "dtype": args.dtype, "repeat": args.repeat,
                       "kernels": args.kernels, "compile_mode": args.compile_mode,
                       "schedule": "the sampler's default", "seed": args.seed, "prompt": PROMPT,
                       "peer_text_encoder": "tritonsd", "peer_sampler_loop": "tritonsd (eager)",
                       "peer_attention": "SDPA"}
    return env


def results_path(args, env: dict) -> Path:
    if args.json is not None:
        return args.json
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    device = "".join(c if c.isalnum() or c in "-_" else "_" for c in env["device"])
    return bench_environment.results_dir() / f"e2e-{device}-{args.dtype}-{stamp}.json"


def write_results(path: Path, env: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**env, "rows": rows}, indent=1))
    tmp.replace(path)


def print_row(r: dict) -> None:
    head = f"{r['model']:<6} {r['size']:>4} b{r['batch']:<2} {r['sampler']:<9} {r['impl']:<18}"
    if "error" in r:
        print(f"{head} -- {r['error']}", flush=True)
        return
    unet = f"unet {r['unet_forward_ms']:7.2f} ms  " if "unet_forward_ms" in r else ""
    mem = f"  peak {r['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in r else ""
    rate = f" ({r['unet_tflops_per_s']:.0f} TFLOP/s)" if "unet_tflops_per_s" in r else ""
    warm = f"warmup {r['warmup_s']:6.1f} s  " if r.get("warmup_s") is not None else ""
    print(f"{head} {r['step_ms']:8.2f} ms/step{rate} {r['it_per_s']:7.2f} it/s  {unet}image {r['image_ms']:8.1f} ms  "
          f"{warm}first {r['first_image_ms']:9.1f} ms{mem}", flush=True)


# ---------------------------------------------------------------- the run


def _make_impl(name, bench_model, model, size, dtype, device, args):
    if name == "tritonsd-graph":
        return TritonsdImpl(name, model, graphs=device.type == "cuda")
    if name == "tritonsd-eager":
        return TritonsdImpl(name, model, graphs=False)
    mode = args.compile_mode if name == "diffusers-compile" else None
    return DiffusersImpl(name, bench_model, model, size, dtype, device, mode, args.seed)


def _check_args(args) -> None:
    for flag, values in (("--batch", args.batch or []), ("--steps", [args.steps]), ("--repeat", [args.repeat])):
        if any(v < 1 for v in values):
            raise BenchE2EError(f"{flag} must be at least 1")
    if args.size is not None and args.size % 64:
        raise BenchE2EError(f"--size must be a multiple of 64, got {args.size}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    device = resolve_device(args.device)
    if device.type == "cuda":
        import os
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise BenchE2EError("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled kernels")
    dtype = resolve_dtype(args.dtype)
    impls = list(dict.fromkeys(args.impl or IMPLS))
    unavailable: dict[str, str] = {}  # impls asked for by name whose package does not import: impl -> why
    if any(i.startswith("diffusers") for i in impls):
        try:
            _import_diffusers()
        except BenchE2EError as e:
            peers = [i for i in impls if i.startswith("diffusers")]
            impls = [i for i in impls if not i.startswith("diffusers")]
            if args.impl and not impls:  # only diffusers rows asked for: nothing to measure
                raise
            print(f"note: {e}; running {', '.join(impls)} only", file=sys.stderr)
            if args.impl:  # asked for by name: an error row each (and exit 1), the other rows still measured
                unavailable = {i: f"{type(e).__name__}: {e}" for i in peers}
    env = environment(args, device)
    path = results_path(args, env)
    rows: list[dict] = []
    for bench_model in args.model or ["sd15", "sd21"]:
        size = args.size or DEFAULT_SIZE.get(bench_model, 512)
        model = build_random_model(bench_model, dtype=dtype, device=device, seed=args.seed,
                                   text_heads=args.text_heads)
        meta_model = build_meta_model(bench_model, text_heads=args.text_heads)
        work = {b: work_tflop(meta_model, size, b) for b in args.batch or [1, 4]}
        del meta_model
        for impl_name, why in unavailable.items():
            rows.append({"model": bench_model, "size": size, "impl": impl_name, "batch": None, "sampler": None,
                         "error": why[:300]})
            print(f"{bench_model:<6} {size:>4} {impl_name:<18} -- {why}", flush=True)
        for impl_name in impls:
            impl = None
            try:
                impl = _make_impl(impl_name, bench_model, model, size, dtype, device, args)
                for batch in args.batch or [1, 4]:
                    for sampler in args.sampler or default_samplers():
                        row = {"model": bench_model if bench_model in MANIFESTS else Path(bench_model).stem,
                               "family": model.config.family, "size": size, "batch": batch, "sampler": sampler,
                               "steps": args.steps, "cfg": args.cfg, "dtype": args.dtype, "impl": impl_name}
                        try:
                            with dispatch.force(args.kernels):
                                row.update(measure(impl, device, batch, size, sampler, args))
                            row.update(impl.info())
                            row.update(work[batch])
                            row["unet_tflops_per_s"] = work[batch]["unet_tflop_per_step"] / (row["step_ms"] / 1e3)
                        except (RuntimeError, ValueError) as e:  # OOM, capture failure: record, go on
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                        rows.append(row)
                        print_row(row)
                        write_results(path, env, rows)
            except (RuntimeError, ValueError, ImportError) as e:
                row = {"model": bench_model, "size": size, "impl": impl_name, "batch": None, "sampler": None,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                rows.append(row)
                print(f"{bench_model:<6} {size:>4} {impl_name:<18} -- {row['error']}", flush=True)
                write_results(path, env, rows)
            finally:
                if impl is not None:
                    impl.close()
                del impl
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonsd.bench.e2e", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
