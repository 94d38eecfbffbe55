"""Stage 9 of the GPU run: each fusion of issue 22 checked and measured on the GPU.

1. Every fused GEMM (``kernels/linear.py``) at the transformer shapes of SD 1.5 / SD 2.1 / SDXL (batch 2, CFG),
   and the convolution with its GroupNorm prologue at the ResBlock shapes,
   against its float32 reference, on fresh random inputs with the free memory poisoned with NaN first
   (``gpu_correctness``'s rule: finite, ``max|out - ref| / max|ref|`` within 1e-2 for fp16 / bf16).
2. Stage timings, fused against the launches it replaces, on the same inputs (``triton.testing.do_bench``
   medians): ``qkv+norm`` (LayerNorm kernel + three cuBLAS GEMMs -> one GEMM with the norm in its prologue),
   ``ff-proj+norm+geglu`` (LayerNorm kernel + cuBLAS GEMM + GEGLU kernel -> one GEMM), ``out+residual``
   (cuBLAS GEMM + torch add -> one GEMM: attention out-projections, SD2/SDXL proj_out), ``ff-out+residual``,
   ``cross-q-attention`` (the q GEMM with norm2 in its prologue + the attention kernel -> one attention kernel
   projecting its own query tiles: the transformer block's cross-attention over the 77 text tokens),
   ``conv+groupnorm+silu`` (GroupNorm kernels + conv -> statistics + a conv normalising its input as it loads
   it; the ResBlock's 3x3 conv at every UNet level), ``conv+groupstats`` (conv, GroupNorm statistics launches,
   normalising conv -> the first conv computing the statistics in its epilogue: the ResBlock's two 3x3 convs)
   and ``cat+groupstats`` (torch's cat, statistics launches, normalising conv -> the Triton concat computing
   them: a decoder ResBlock's input), ``skip-concat`` (a decoder ResBlock's entry: the concat writing
   ``cat([h, skip])`` with the statistics, then the 3x3 conv and the 1x1 shortcut each reading it -> the
   statistics alone, and both convs reading h and skip themselves; issue 22 item 7), and ``conv-split-k`` (SD
   1.5's 3x3 convs at the 32x32, 16x16 and 8x8 levels, whose autotuned tiles fill less than two waves of SMs:
   the grid-filling 64x32 tile, split K where it still falls short, as the launcher picks them for this GPU,
   against the autotuned tiles with one program per tile, ``split_k=1``; the row's shape records TILE and
   SPLIT_K).
3. One UNet step (random weights, the model's own shapes; ``dispatch.force("auto")``) with every fusion, with
   each one switched off (``dispatch.unfused``), and with all off, in the same process; the output of each
   against the fused step's (the fusions change no result beyond rounding).

``python3 benchmarks/gpu_fusions.py --dtype fp16 --models sd15-512 --step sd15 --json FILE``; exits 1 when a
correctness check fails. The timings are measurements of this run on this GPU, nothing more; without a GPU
there is nothing to run (``--dry-run`` lists the cases and the step configurations).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tritonsd.bench import environment, harness
from tritonsd.compile.shapes import BATCH, MODELS, TEXT_TOKENS
from tritonsd.kernels import dispatch
from tritonsd.kernels import conv as conv_mod
from tritonsd.kernels.attention import attention_triton, cross_q_attention_reference, cross_q_attention_triton
from tritonsd.kernels.concat import concat_channels_triton, concat_stats
from tritonsd.kernels.conv import GroupNormIn, conv2d_reference, conv2d_triton
from tritonsd.kernels.geglu import geglu_triton
from tritonsd.kernels.group_norm import group_norm_triton
from tritonsd.kernels.layer_norm import layer_norm_triton
from tritonsd.kernels.linear import Norm, linear_reference, linear_triton
from tritonsd.testing.reference import relative_error, strict_float32

DEVICE = "cuda"  # the tests run the script's logic on the CPU (Triton's interpreter)
STEP_CONFIGS = {"fused": (), **{f"no-{f}": (f,) for f in dispatch.FUSIONS}, "unfused": dispatch.FUSIONS}


@dataclass
class FusionCase:
    kind: str
    model: str  # "sd15-512", ...
    name: str
    shape: dict
    make: Callable[[torch.dtype], dict]  # keyword arguments of ``fused`` / ``reference`` / ``unfused``
    unfused: Callable[..., torch.Tensor]  # the launches the fusion replaces, on the same arguments
    fused: Callable[..., torch.Tensor] = None  # the fused kernel's launcher (default: linear_triton)
    reference: Callable[..., torch.Tensor] = None  # what it must equal, on float32 copies (default: linear_reference)

    def __post_init__(self):
        self.fused = self.fused or (lambda **kw: linear_triton(**kw))
        self.reference = self.reference or linear_reference


def _norm(c: int, dtype, g) -> Norm:
    return Norm(1.0 + 0.02 * torch.randn(c, device=DEVICE, generator=g).to(dtype),
                0.02 * torch.randn(c, device=DEVICE, generator=g).to(dtype), 1e-5)


def _rand(g, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dtype)


def _qkv_unfused(x, weight, bias=None, residual=None, geglu=False, norm=None):
    h = layer_norm_triton(x, norm.weight, norm.bias, norm.eps)
    return torch.cat([F.linear(h, w) for w in weight.chunk(3)], dim=-1)


def _geglu_unfused(x, weight, bias=None, residual=None, geglu=False, norm=None):
    return geglu_triton(F.linear(layer_norm_triton(x, norm.weight, norm.bias, norm.eps), weight, bias))


def _residual_unfused(x, weight, bias=None, residual=None, geglu=False, norm=None):
    return F.linear(x, weight, bias) + residual


def _conv_fused(x, weight, bias, emb, norm_in):
    return conv2d_triton(x, weight, bias, 1, 1, emb=emb, norm_in=norm_in)


def _conv_unfused(x, weight, bias, emb, norm_in):
    h = group_norm_triton(x, norm_in.weight, norm_in.bias, norm_in.groups, norm_in.eps, silu=norm_in.silu)
    return conv2d_triton(h, weight, bias, 1, 1, emb=emb)


def _conv_reference(x, weight, bias, emb, norm_in):
    return conv2d_reference(x, weight, bias, 1, 1, emb=emb, norm_in=norm_in)


def conv_cases() -> list[FusionCase]:
    """The ResBlock's GroupNorm + SiLU + 3x3 conv (+ time embedding) at every UNet level (C -> C)."""
    out = []
    for spec in MODELS.values():
        for c, side in spec.levels():
            def make(dtype, c=c, side=side):
                g = harness.case_generator(DEVICE)
                x = _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=torch.channels_last)
                norm = _norm(c, dtype, g)
                return {"x": x, "weight": _rand(g, dtype, c, c, 3, 3, scale=(9 * c) ** -0.5),
                        "bias": _rand(g, dtype, c, scale=0.02), "emb": _rand(g, dtype, BATCH, c),
                        "norm_in": GroupNormIn(norm.weight, norm.bias, 32, 1e-5, True)}
            out.append(FusionCase("conv+groupnorm+silu", spec.label, f"resblock-conv-{side}x{side}-C{c}",
                                  {"B": BATCH, "C": c, "H": side, "W": side}, make, _conv_unfused,
                                  fused=_conv_fused, reference=_conv_reference))
    return out


def _stats_conv_fused(x, w1, b1, w2, b2, norm):
    y, stats = conv2d_triton(x, w1, b1, 1, 1, stats_for=norm)  # the statistics in the first conv's epilogue
    return conv2d_triton(y, w2, b2, 1, 1, norm_in=norm._replace(stats=stats))


def _stats_conv_unfused(x, w1, b1, w2, b2, norm):
    return conv2d_triton(conv2d_triton(x, w1, b1, 1, 1), w2, b2, 1, 1, norm_in=norm)  # two statistics launches


def _stats_conv_reference(x, w1, b1, w2, b2, norm):
    return conv2d_reference(conv2d_reference(x, w1, b1, 1, 1), w2, b2, 1, 1, norm_in=norm)


def _stats_cat_fused(h, skip, w, b, norm):
    y, stats = concat_channels_triton(h, skip, stats_for=norm)
    return conv2d_triton(y, w, b, 1, 1, norm_in=norm._replace(stats=stats))


def _stats_cat_unfused(h, skip, w, b, norm):
    return conv2d_triton(torch.cat([h, skip], 1), w, b, 1, 1, norm_in=norm)


def _stats_cat_reference(h, skip, w, b, norm):
    return conv2d_reference(torch.cat([h, skip], 1), w, b, 1, 1, norm_in=norm)


def group_stats_cases() -> list[FusionCase]:
    """GroupNorm statistics in the producer's epilogue (issue 22 item 6) at every UNet level: a 3x3 conv whose
    output the next 3x3 conv normalises (GroupNorm + SiLU), and the decoder's concat of two C-wide inputs."""
    out = []
    for spec in MODELS.values():
        for c, side in spec.levels():
            def conv_pair(dtype, c=c, side=side):
                g = harness.case_generator(DEVICE)
                norm = _norm(c, dtype, g)
                return {"x": _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=torch.channels_last),
                        "w1": _rand(g, dtype, c, c, 3, 3, scale=(9 * c) ** -0.5), "b1": _rand(g, dtype, c),
                        "w2": _rand(g, dtype, c, c, 3, 3, scale=(9 * c) ** -0.5), "b2": _rand(g, dtype, c),
                        "norm": GroupNormIn(norm.weight, norm.bias, 32, 1e-5, True)}

            def cat(dtype, c=c, side=side):
                g = harness.case_generator(DEVICE)
                norm = _norm(2 * c, dtype, g)
                cl = torch.channels_last
                return {"h": _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=cl),
                        "skip": _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=cl),
                        "w": _rand(g, dtype, c, 2 * c, 3, 3, scale=(18 * c) ** -0.5), "b": _rand(g, dtype, c),
                        "norm": GroupNormIn(norm.weight, norm.bias, 32, 1e-5, True)}
            shape = {"B": BATCH, "C": c, "H": side, "W": side}
            out += [FusionCase("conv+groupstats", spec.label, f"resblock-convs-{side}x{side}-C{c}", shape,
                               conv_pair, _stats_conv_unfused, fused=_stats_conv_fused,
                               reference=_stats_conv_reference),
                    FusionCase("cat+groupstats", spec.label, f"skip-cat-{side}x{side}-2x{c}", shape, cat,
                               _stats_cat_unfused, fused=_stats_cat_fused, reference=_stats_cat_reference)]
    return out


def _skip_entry_fused(h, skip, w, b, emb, w_skip, b_skip, norm):
    """The decoder ResBlock's entry reading h and skip apart: the concatenation's statistics alone, then
    in_layers' 3x3 conv (GroupNorm + SiLU prologue, time embedding) and the 1x1 shortcut each reading both. The
    shortcut's output enters the 3x3 conv as its residual: one output to check (in the ResBlock it is
    out_layers' residual), the same launches on both sides."""
    stats = concat_stats(h, skip, norm)
    shortcut = conv2d_triton(h, w_skip, b_skip, 1, 0, x2=skip)
    return conv2d_triton(h, w, b, 1, 1, emb=emb, residual=shortcut, norm_in=norm._replace(stats=stats), x2=skip)


def _skip_entry_unfused(h, skip, w, b, emb, w_skip, b_skip, norm):
    x, stats = concat_channels_triton(h, skip, stats_for=norm)  # the concatenation stored, then read twice
    shortcut = conv2d_triton(x, w_skip, b_skip, 1, 0)
    return conv2d_triton(x, w, b, 1, 1, emb=emb, residual=shortcut, norm_in=norm._replace(stats=stats))


def _skip_entry_reference(h, skip, w, b, emb, w_skip, b_skip, norm):
    x = torch.cat([h, skip], 1)
    return conv2d_reference(x, w, b, 1, 1, emb=emb, residual=conv2d_reference(x, w_skip, b_skip, 1, 0),
                            norm_in=norm)


def skip_concat_cases() -> list[FusionCase]:
    """A decoder ResBlock's entry at every UNet level: h and skip C wide each, C out (a conv shortcut)."""
    out = []
    for spec in MODELS.values():
        for c, side in spec.levels():
            def make(dtype, c=c, side=side):
                g = harness.case_generator(DEVICE)
                norm = _norm(2 * c, dtype, g)
                cl = torch.channels_last
                return {"h": _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=cl),
                        "skip": _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=cl),
                        "w": _rand(g, dtype, c, 2 * c, 3, 3, scale=(18 * c) ** -0.5), "b": _rand(g, dtype, c),
                        "emb": _rand(g, dtype, BATCH, c),
                        "w_skip": _rand(g, dtype, c, 2 * c, 1, 1, scale=(2 * c) ** -0.5),
                        "b_skip": _rand(g, dtype, c), "norm": GroupNormIn(norm.weight, norm.bias, 32, 1e-5, True)}
            out.append(FusionCase("skip-concat", spec.label, f"resblock-entry-{side}x{side}-2x{c}",
                                  {"B": BATCH, "C": c, "H": side, "W": side}, make, _skip_entry_unfused,
                                  fused=_skip_entry_fused, reference=_skip_entry_reference))
    return out


def _upsample_fused(x, weight, bias):
    return conv2d_triton(x, weight, bias, 1, 1, upsample=2)


def _upsample_unfused(x, weight, bias):
    return conv2d_triton(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, 1, 1)


def _upsample_reference(x, weight, bias):
    return conv2d_reference(x, weight, bias, 1, 1, upsample=2)


def upsample_cases() -> list[FusionCase]:
    """The UNet's Upsample (nearest 2x, then a 3x3 conv C -> C) at the end of every level but the outermost, with
    that level's channels, into the side of the level above."""
    out = []
    for spec in MODELS.values():
        levels = spec.levels()
        for (_, side), (c, _) in zip(levels, levels[1:]):
            def make(dtype, c=c, side=side):
                g = harness.case_generator(DEVICE)
                x = _rand(g, dtype, BATCH, c, side // 2, side // 2).contiguous(memory_format=torch.channels_last)
                return {"x": x, "weight": _rand(g, dtype, c, c, 3, 3, scale=(9 * c) ** -0.5),
                        "bias": _rand(g, dtype, c, scale=0.02)}
            out.append(FusionCase("conv+upsample", spec.label, f"upsample-conv-{side // 2}to{side}-C{c}",
                                  {"B": BATCH, "C": c, "H": side // 2, "W": side // 2}, make, _upsample_unfused,
                                  fused=_upsample_fused, reference=_upsample_reference))
    return out


GRID_FILL_LEVELS = {"sd15": (32, 16, 8)}  # latent sides whose convolutions take the grid-filling tile on an H100
# (kernels/conv.py: 64x32 tiles, split K at the 8x8 level)


def _conv_split(x, weight, bias, emb, split_k=None):
    return conv2d_triton(x, weight, bias, 1, 1, emb=emb, split_k=split_k)  # None: the launcher's choice


def _conv_unsplit(x, weight, bias, emb, split_k=None):
    return conv2d_triton(x, weight, bias, 1, 1, emb=emb, split_k=1)  # the autotuned tiles, one program each


def _conv_plain_reference(x, weight, bias, emb, split_k=None):
    return conv2d_reference(x, weight, bias, 1, 1, emb=emb)


def split_k_cases() -> list[FusionCase]:
    """SD 1.5's ResBlock 3x3 conv (+ time embedding) at its low-resolution levels: the launcher's choice for this
    GPU (the grid-filling 64x32 tile, split where it still falls short of two waves; the row's shape records
    TILE and SPLIT_K) against the autotuned tiles unsplit (``split_k=1``)."""
    out = []
    for spec in MODELS.values():
        for c, side in spec.levels():
            if side not in GRID_FILL_LEVELS.get(spec.name, ()):
                continue
            shape = {"B": BATCH, "C": c, "H": side, "W": side}

            def make(dtype, c=c, side=side, split_k=None, shape=shape):  # split_k: forced (a test on the CPU)
                g = harness.case_generator(DEVICE)
                x = _rand(g, dtype, BATCH, c, side, side).contiguous(memory_format=torch.channels_last)
                split = conv_mod._split_for_launch(split_k, BATCH * side * side, c, c, 9, x.device,
                                                   conv_mod._conv2d_kernel.configs)
                shape["TILE"] = "x".join(map(str, conv_mod.split_tile())) if split else "autotuned"
                shape["SPLIT_K"] = split or 1
                return {"x": x, "weight": _rand(g, dtype, c, c, 3, 3, scale=(9 * c) ** -0.5),
                        "bias": _rand(g, dtype, c, scale=0.02), "emb": _rand(g, dtype, BATCH, c),
                        "split_k": split_k}
            out.append(FusionCase("conv-split-k", spec.label, f"resblock-conv-{side}x{side}-C{c}", shape, make,
                                  _conv_unsplit, fused=_conv_split, reference=_conv_plain_reference))
    return out


def _cross_q_fused(x, weight, k, v, heads, norm):
    return cross_q_attention_triton(x, weight, None, k, v, heads, norm)


def _cross_q_unfused(x, weight, k, v, heads, norm):
    return attention_triton(linear_triton(x, weight, norm=norm), k, v, heads)  # the q GEMM (norm2 in its prologue)


def _cross_q_reference(x, weight, k, v, heads, norm):
    return cross_q_attention_reference(x, weight, None, k, v, heads, norm)


def cross_q_cases() -> list[FusionCase]:
    """The transformer block's cross-attention (attn2) at every attention level: norm2 + to_q + attention over the
    text's 77 tokens in one launch (q never stored) against the q GEMM (norm2 in its prologue) + attention."""
    out = []
    for spec in MODELS.values():
        for c, side in spec.attention_levels():
            n = side * side

            def make(dtype, n=n, c=c, heads=spec.heads(c)):
                g = harness.case_generator(DEVICE)
                return {"x": _rand(g, dtype, BATCH, n, c), "weight": _rand(g, dtype, c, c, scale=c ** -0.5),
                        "k": _rand(g, dtype, BATCH, TEXT_TOKENS, c), "v": _rand(g, dtype, BATCH, TEXT_TOKENS, c),
                        "heads": heads, "norm": _norm(c, dtype, g)}
            out.append(FusionCase("cross-q-attention", spec.label, f"attn2-{side}x{side}-C{c}",
                                  {"B": BATCH, "N": n, "M": TEXT_TOKENS, "C": c, "heads": spec.heads(c)}, make,
                                  _cross_q_unfused, fused=_cross_q_fused, reference=_cross_q_reference))
    return out


def cases() -> list[FusionCase]:
    return (linear_cases() + cross_q_cases() + conv_cases() + upsample_cases() + group_stats_cases()
            + skip_concat_cases() + split_k_cases())


def linear_cases() -> list[FusionCase]:
    out = []
    for spec in MODELS.values():
        label = spec.label
        for c, side in spec.attention_levels():
            n = side * side
            shape = {"B": BATCH, "N": n, "C": c}

            def qkv(dtype, n=n, c=c):
                g = harness.case_generator(DEVICE)
                return {"x": _rand(g, dtype, BATCH, n, c), "weight": _rand(g, dtype, 3 * c, c, scale=c ** -0.5),
                        "norm": _norm(c, dtype, g)}

            def ff_proj(dtype, n=n, c=c):
                g = harness.case_generator(DEVICE)
                return {"x": _rand(g, dtype, BATCH, n, c), "weight": _rand(g, dtype, 8 * c, c, scale=c ** -0.5),
                        "bias": _rand(g, dtype, 8 * c, scale=0.02), "geglu": True, "norm": _norm(c, dtype, g)}

            def out_res(dtype, n=n, c=c, k=c):
                g = harness.case_generator(DEVICE)
                return {"x": _rand(g, dtype, BATCH, n, k), "weight": _rand(g, dtype, c, k, scale=k ** -0.5),
                        "bias": _rand(g, dtype, c, scale=0.02), "residual": _rand(g, dtype, BATCH, n, c)}

            out += [
                FusionCase("qkv+norm", label, f"attn1-qkv-{side}x{side}-C{c}", shape, qkv, _qkv_unfused),
                FusionCase("ff-proj+norm+geglu", label, f"ff-proj-{side}x{side}-F{4 * c}", shape, ff_proj,
                           _geglu_unfused),
                FusionCase("out+residual", label, f"attn-out-{side}x{side}-C{c}", shape, out_res, _residual_unfused),
                FusionCase("ff-out+residual", label, f"ff-out-{side}x{side}-F{4 * c}", {**shape, "K": 4 * c},
                           lambda dtype, n=n, c=c: out_res(dtype, n, c, 4 * c), _residual_unfused),
            ]
    return out


def _float32(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            v = v.float()
        elif isinstance(v, (Norm, GroupNormIn)):
            v = v._replace(weight=v.weight.float(), bias=v.bias.float())
        out[k] = v
    return out


def poison_free_memory() -> None:
    """``gpu_correctness``'s: the allocator's free memory filled with NaN (a sibling script, found as the script's
    neighbour, or as ``benchmarks.gpu_correctness`` from the checkout's root)."""
    try:
        from gpu_correctness import poison_free_memory as poison  # lazy: a sibling script, not a package
    except ImportError:
        from benchmarks.gpu_correctness import poison_free_memory as poison  # lazy: likewise
    poison()


def run_case(case: FusionCase, dtype: torch.dtype, time_it: bool) -> dict:
    import triton.testing

    row = {"kind": case.kind, "model": case.model, "case": case.name, "shape": case.shape,
           "dtype": str(dtype).removeprefix("torch.")}
    try:
        kwargs = case.make(dtype)
        with strict_float32(), torch.no_grad():
            expected = case.reference(**_float32(kwargs))
        poison_free_memory()
        with torch.no_grad():
            got = case.fused(**kwargs)
            apart = case.unfused(**kwargs)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - one failing case is a row, not the end
        row["error"] = harness.error_text(e)
        return row
    row["unfused_rel_error"] = relative_error(apart, expected)
    if harness.judge(row, got, expected, dtype) and time_it:
        with torch.no_grad():
            row["fused_ms"] = triton.testing.do_bench(lambda: case.fused(**kwargs), warmup=25, rep=100)
            row["unfused_ms"] = triton.testing.do_bench(lambda: case.unfused(**kwargs), warmup=25, rep=100)
    del kwargs, expected, got, apart
    torch.cuda.empty_cache()
    return row


def step_rows(spec, dtype: torch.dtype, seed: int) -> list[dict]:
    """One UNet step of ``spec`` (a ``compile.shapes.ModelShapes``: batch 2, its native size) per entry of
    STEP_CONFIGS: median ms and the output's relative difference from the fully fused step."""
    import triton.testing

    from tritonsd.model.demo import random_parameter
    from tritonsd.model.unet import UNetModel

    model = spec.name
    cfg = spec.unet
    with torch.device("meta"):
        unet = UNetModel(cfg).to(dtype).eval().requires_grad_(False)
    unet.to_empty(device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(random_parameter(name, tuple(p.shape), g))
    h, w = spec.size[0] // 8, spec.size[1] // 8
    x = torch.randn(BATCH, cfg.in_channels, h, w, device=DEVICE, generator=g).to(dtype)
    t = torch.full((BATCH,), 500.0, device=DEVICE)
    context = torch.randn(BATCH, TEXT_TOKENS, cfg.context_dim, device=DEVICE, generator=g).to(dtype)
    y = (torch.randn(BATCH, cfg.adm_in_channels, device=DEVICE, generator=g).to(dtype)
         if cfg.adm_in_channels else None)
    rows, fused_out = [], None
    for label, off in STEP_CONFIGS.items():
        row = {"model": model, "config": label, "unfused": list(off), "dtype": str(dtype).removeprefix("torch.")}
        try:
            with torch.no_grad(), dispatch.force("auto"), dispatch.unfused(*off):
                out = unet(x, t, context, y)  # compiles and tunes what this configuration launches
                torch.cuda.synchronize()
                row["median_ms"] = triton.testing.do_bench(lambda: unet(x, t, context, y), warmup=50, rep=300)
        except Exception as e:  # noqa: BLE001 - a configuration that fails is a row
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            rows.append(row)
            continue
        if fused_out is None:
            fused_out = out.float()
        row["rel_diff_from_fused"] = relative_error(out, fused_out)
        row["finite"] = bool(torch.isfinite(out).all())
        rows.append(row)
        print(f"step {model:<5} {label:<12} {row['median_ms']:8.3f} ms  diff {row['rel_diff_from_fused']:.1e}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/gpu_fusions.py", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(harness.DTYPES), default="fp16")
    p.add_argument("--models", default=None, help="comma-separated case models (sd15-512, sd21-768, sdxl-1024)")
    p.add_argument("--step", default="sd15", help="comma-separated models whose UNet step is timed ('' for none)")
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: a fresh one, recorded)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true", help="list the cases and step configurations; no GPU needed")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    selected = [c for c in cases() if not models or c.model in models]
    steps = [s.strip() for s in args.step.split(",") if s.strip()]
    unknown = [s for s in steps if s not in MODELS]
    if unknown:
        print(f"gpu_fusions: error: unknown --step model(s) {', '.join(unknown)} (expected {', '.join(MODELS)})",
              file=sys.stderr)
        return 2
    if args.dry_run:
        for c in selected:
            print(f"{c.kind:<20} {c.model:<10} {c.name}")
        print(f"{len(selected)} fusion cases; UNet step of {', '.join(steps) or 'none'} as "
              f"{', '.join(STEP_CONFIGS)}")
        return 0
    try:
        harness.require_cuda()
    except harness.BenchError as e:
        print(f"gpu_fusions: error: {e}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    harness.SEED = seed
    dtype = harness.DTYPES[args.dtype]
    rows = []
    for case in selected:
        row = run_case(case, dtype, not args.no_timing)
        rows.append(row)
        timing = (f"  fused {row['fused_ms']:.4f} ms, unfused {row['unfused_ms']:.4f} ms" if "fused_ms" in row else "")
        print(f"{row['kind']:<20} {row['model']:<10} {row['case']:<28} "
              f"{row.get('error') or 'ok  err %.1e' % row['rel_error']}{timing}", flush=True)
    step = [] if args.no_timing else [r for m in steps for r in step_rows(MODELS[m], dtype, seed)]
    failed = [r for r in rows if "error" in r] + [r for r in step if "error" in r or not r.get("finite", True)]
    print(f"{len(rows) - sum('error' in r for r in rows)}/{len(rows)} fusion cases within bound (seed {seed})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**environment.record(git_commit_override=args.git_commit),
                                         "bench": "gpu-fusions", "dtype": args.dtype, "seed": seed,
                                         "bound": harness.TOLERANCE[dtype], "failed": len(failed),
                                         "note": "measured on this run's GPU; nothing here is a prediction",
                                         "cases": rows, "step": step}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
