"""The one place that decides which implementation of a hot op runs.

Triton on CUDA tensors (when triton imports), the plain-torch reference everywhere else. ``force("triton")``
or ``force("torch")`` overrides that for the calls made inside the ``with`` block (tests force Triton on CPU
under ``TRITON_INTERPRET=1``; ``tritonsd parity --kernels triton`` does the same). The choice lives in a
context variable, so it is scoped and thread-safe rather than a module-level switch.

The model calls only these functions, never a kernel module directly.

Each Triton launcher falls back to its torch reference, explicitly and documented in its docstring, for what
its kernel does not cover (e.g. attention head dims above 512, grouped convolutions, dtypes other than
float16/bfloat16/float32); forcing Triton on CPU tensors without ``TRITON_INTERPRET=1`` is a clear
``KernelDeviceError`` rather than a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import sys
from types import ModuleType
from typing import Iterator

import torch
import torch.nn.functional as F


def _on_first_use(name: str) -> ModuleType:
    """The kernel module ``tritonsd.kernels.<name>``, executed when one of its names is first read
    (``importlib.util.LazyLoader``). Each imports triton (0.1 s of CPU, and it must follow the CLI's choice of
    ``TRITON_INTERPRET``): a process that calls no op (a load, ``inspect``, ``merge``) never pays it."""
    full = f"tritonsd.kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec(full)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["tritonsd.kernels"], name, module)  # as an import binds a submodule to its package
    return module


_triton = _on_first_use("_triton")
_attention = _on_first_use("attention")
_concat = _on_first_use("concat")
_conv = _on_first_use("conv")
_geglu = _on_first_use("geglu")
_group_norm = _on_first_use("group_norm")
_layer_norm = _on_first_use("layer_norm")
_linear = _on_first_use("linear")
_step = _on_first_use("sampler_step")

BACKENDS = ("auto", "torch", "triton")
_forced: contextvars.ContextVar[str] = contextvars.ContextVar("tritonsd_kernels", default="auto")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def force(backend: str) -> Iterator[None]:
    """Run the enclosed calls on ``backend`` ("auto", "torch" or "triton")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("the Triton kernels were asked for, but triton is not installed")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str:
    return _forced.get()


def use_triton(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` goes to the Triton kernel."""
    backend = _forced.get()
    if backend == "auto":  # CUDA tensors; meta ones stand for them while launches are recorded (kernels/variants)
        return (x.is_cuda or (x.is_meta and _triton.is_recording())) and triton_available()
    return backend == "triton"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head attention. q: [B, N, H*D], k and v: [B, M, H*D] (any strides) -> [B, N, H*D]."""
    impl = _attention.attention_triton if use_triton(q) else _attention.attention_reference
    return impl(q, k, v, heads, causal=causal)


def cross_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: torch.Tensor,
                    v: torch.Tensor, heads: int, norm: _linear.Norm | None = None) -> torch.Tensor:
    """``attention(linear(x, weight, bias, norm=norm), k, v, heads)``: cross-attention with its query projection.
    x: [B, N, C], weight: [H*D, C], k and v: [B, M, H*D] -> [B, N, H*D]. On Triton one launch that projects each
    query tile in the kernel (q never stored; kernels/attention.py); ``unfused("cross_q")``, and what that kernel
    does not cover, run the q GEMM and then the attention."""
    if use_triton(x) and is_fused("cross_q"):
        if norm is not None and not is_fused("norm"):
            x, norm = layer_norm(x, *norm), None
        if _attention.covers_cross_q(x, weight, bias, k, v, heads, norm):
            return _attention.cross_q_attention_triton(x, weight, bias, k, v, heads, norm)
    return attention(linear(x, weight, bias, norm=norm), k, v, heads)


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int = 32,
               eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm over x [B, C, ...] with statistics in float32, optionally followed by SiLU."""
    impl = _group_norm.group_norm_triton if use_triton(x) else _group_norm.group_norm_reference
    return impl(x, weight, bias, num_groups, eps, silu=silu)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    impl = _layer_norm.layer_norm_triton if use_triton(x) else _layer_norm.layer_norm_reference
    return impl(x, weight, bias, eps)


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GEGLU gate: x [..., 2F] -> a * gelu(gate) [..., F], with (a, gate) = x.chunk(2, -1)."""
    impl = _geglu.geglu_triton if use_triton(x) else _geglu.geglu_reference
    return impl(x)


# The fusions of issue 22 that ``unfused`` can switch off, to measure each one (benchmarks/gpu_fusions.py):
# "norm" (LayerNorm in the next GEMM's prologue), "geglu" (in the FF projection's epilogue), "residual" (the
# transformer's residual adds in GEMM epilogues), "qkv" (self-attention's q, k, v as one GEMM; model/unet.py;
# apart, the three projections read norm1's output, so that LayerNorm runs apart too), "group_norm" (GroupNorm
# + SiLU applied in the next convolution's input load), "upsample" (the nearest 2x upsample in the next
# convolution's input load), "group_stats" (that GroupNorm's statistics computed in the epilogue of the kernel that
# writes its input: a convolution, the skip connections' concat), "split_k" (the convolutions whose autotuned tiles fill less than
# two waves of the GPU take a small grid-filling tile, split over several programs along K where even that falls
# short, kernels/conv.py; off: the autotuned tiles, one program per output tile), "cross_q" (cross-attention's query
# projection inside the attention kernel, q never stored; off: the q GEMM, then the attention kernel),
# "skip_concat" (the decoder's ResBlocks read h and the skip connection apart in their two convolutions, the
# concatenation never stored, model/unet.py; off: the concat writes it and both convolutions read it).
FUSIONS = ("norm", "geglu", "residual", "qkv", "group_norm", "upsample", "group_stats", "split_k", "cross_q",
           "skip_concat")
GEMM_FUSIONS = frozenset({"norm", "geglu", "residual"})  # what the linear kernel fuses into its GEMM
_unfused: contextvars.ContextVar[frozenset] = contextvars.ContextVar("tritonsd_unfused", default=frozenset())


@contextlib.contextmanager
def unfused(*fusions: str) -> Iterator[None]:
    """Inside the block, the named fusions run as the separate launches they replace (LayerNorm kernel, cuBLAS
    GEMM, GEGLU kernel, torch add, three q/k/v GEMMs, GroupNorm kernel, nearest upsample): the same results, for
    timing the fused step against the unfused one in the same run."""
    unknown = set(fusions) - set(FUSIONS)
    if unknown:
        raise ValueError(f"unknown fusion(s) {', '.join(sorted(unknown))}; expected {', '.join(FUSIONS)}")
    token = _unfused.set(_unfused.get() | frozenset(fusions))
    try:
        yield
    finally:
        _unfused.reset(token)


def is_fused(fusion: str) -> bool:
    return fusion not in _unfused.get()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, geglu: bool = False, norm: _linear.Norm | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with a fused prologue and epilogue: ``norm`` first (a LayerNorm over x's last
    dim, never stored), then ``a * gelu(gate)`` of the product's two halves (``geglu``: the feed-forward's GEGLU,
    the 2F-wide product never stored), then ``+ residual`` [..., N]."""
    # a convolution's / attention's switches: the GEMMs stay as they are
    off = _unfused.get() - {"split_k", "cross_q", "skip_concat"}
    if off:
        return _linear_unfused(x, weight, bias, residual, geglu, norm, off)
    if not use_triton(x):
        return _linear.linear_reference(x, weight, bias, residual, geglu, norm)
    apart = lambda: _linear_unfused(x, weight, bias, residual, geglu, norm, GEMM_FUSIONS)  # noqa: E731
    if _linear.runs_apart(x, weight, bias, residual, geglu, norm, apart):  # the tuning found cuBLAS faster here
        return apart()
    return _linear.linear_triton(x, weight, bias, residual, geglu, norm)


def _linear_unfused(x, weight, bias, residual, geglu, norm, off: frozenset) -> torch.Tensor:
    """:func:`linear` with the fusions in ``off`` as separate launches; a GEMM left with nothing fused is
    ``F.linear`` (cuBLAS on CUDA), as the unfused model's ``nn.Linear``."""
    if norm is not None and "norm" in off:
        x, norm = layer_norm(x, *norm), None
    late_geglu = geglu and "geglu" in off
    late_residual = residual if residual is not None and "residual" in off else None
    geglu = geglu and not late_geglu
    residual = None if late_residual is not None else residual
    if norm is None and not geglu and residual is None:
        y = F.linear(x, weight, bias)
    else:
        impl = _linear.linear_triton if use_triton(x) else _linear.linear_reference
        y = impl(x, weight, bias, residual, geglu, norm)
    if late_geglu:
        y = (_geglu.geglu_triton if use_triton(y) else _geglu.geglu_reference)(y)  # the GEGLU kernel
    return y + late_residual if late_residual is not None else y


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0, emb: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           scale: float | None = None, circular: bool = False,
           norm_in: _conv.GroupNormIn | None = None, upsample: int = 1,
           stats_for: _conv.GroupNormIn | None = None, x2: torch.Tensor | None = None):
    """2-D convolution with a fused epilogue: ``(conv(x) + bias + emb[:, :, None, None] + residual) * scale``.

    emb: [B, C_out] per-channel add (the ResBlock's time embedding); residual: [B, C_out, H', W']; ``circular``:
    the padding wraps around (tiling); ``norm_in``: a GroupNorm (+ SiLU) applied to x as the kernel loads it (the
    normalised x never stored); ``upsample``: x nearest-upsampled that many times first (never stored by the
    Triton kernel). With "auto", convolutions of fewer than ``conv.MIN_TRITON_C_IN`` input channels
    run the reference (cuDNN on CUDA).

    ``stats_for``: the GroupNorm that reads the result next. The call then returns ``(y, GroupStats | None)``: the
    Triton kernel computes that norm's (mean, scale) in its epilogue, to pass on as ``norm_in.stats`` of the
    conv that applies it; None where the reference runs or ``unfused("group_stats")`` (the consumer then computes
    them itself, as without ``stats_for``).

    ``x2``: a second input [B, C2, H, W]: the convolution of ``torch.cat([x, x2], 1)``, which the Triton kernel
    reads from x and x2 (the concatenation never stored; kernels/conv.py); elsewhere (the reference,
    ``unfused("skip_concat")``, an unfused GroupNorm or upsample) the concatenation is made first.
    """
    if x2 is not None and not (use_triton(x) and is_fused("skip_concat") and upsample == 1
                               and (norm_in is None or is_fused("group_norm"))):
        x, x2 = _concat.concat_channels_reference(x, x2), None
    if norm_in is not None and not is_fused("group_norm"):
        x, norm_in = group_norm(x, norm_in.weight, norm_in.bias, norm_in.groups, norm_in.eps, silu=norm_in.silu), None
    if upsample != 1 and not is_fused("upsample"):
        x, upsample = F.interpolate(x, scale_factor=float(upsample), mode="nearest"), 1
    triton_here = use_triton(x)
    if triton_here and x2 is not None and x.shape[1] < _conv.MIN_TRITON_C_IN and _forced.get() == "auto":
        x, x2 = _concat.concat_channels_reference(x, x2), None  # the narrow case below sees the whole input
    if triton_here and x.dim() == 4 and x.shape[1] < _conv.MIN_TRITON_C_IN and _forced.get() == "auto":
        # the reference (cuDNN) on a channels-last input writes a channels-last output, as the Triton convolutions
        # that read it next want: no copy of conv_in's output for them and for the skip concatenation
        x, triton_here = x.contiguous(memory_format=torch.channels_last), False
    kwargs = dict(emb=emb, residual=residual, scale=scale, circular=circular, norm_in=norm_in,
                  upsample=upsample)
    if triton_here:
        if not is_fused("split_k"):
            kwargs["split_k"] = 1  # the autotuned tiles, one program per output tile
        if x2 is not None:
            kwargs["x2"] = x2
        if stats_for is not None and is_fused("group_stats"):
            return _conv.conv2d_triton(x, weight, bias, stride, padding, **kwargs, stats_for=stats_for)
        y = _conv.conv2d_triton(x, weight, bias, stride, padding, **kwargs)
    else:
        y = _conv.conv2d_reference(x, weight, bias, stride, padding, **kwargs)
    return y if stats_for is None else (y, None)


def concat_channels(a: torch.Tensor, b: torch.Tensor, stats_for: _conv.GroupNormIn | None = None):
    """``torch.cat([a, b], 1)``. ``stats_for``: the GroupNorm that reads the result next; the call then returns
    ``(y, GroupStats | None)``: the Triton concat computes that norm's statistics as it writes (the UNet's skip
    connections); None where torch's cat runs (the reference, ``unfused("group_stats")``, or no ``stats_for``:
    then nothing is gained over torch's cat)."""
    if stats_for is not None and use_triton(a) and is_fused("group_stats"):
        return _concat.concat_channels_triton(a, b, stats_for=stats_for)
    y = _concat.concat_channels_reference(a, b)
    return y if stats_for is None else (y, None)


def concat_stats(a: torch.Tensor, b: torch.Tensor, stats_for: _conv.GroupNormIn) -> _group_norm.GroupStats | None:
    """``stats_for``'s statistics of ``torch.cat([a, b], 1)`` without storing the concatenation, for convolutions
    that read a and b themselves (``conv2d(a, ..., x2=b)``): the Triton concat's launch without its store; None
    where the reference runs or ``unfused("group_stats")`` (the consumer then makes the concatenation)."""
    if use_triton(a) and is_fused("group_stats"):
        return _concat.concat_stats(a, b, stats_for)
    return None


# ---- the sampler loop's elementwise arithmetic (kernels/sampler_step.py): scalars are host numbers


def denoiser_output(x: torch.Tensor, raw: torch.Tensor, c_out, c_skip=None) -> torch.Tensor:
    """A sigma-space denoiser's result from the UNet's raw output: ``x + raw * c_out`` (``c_skip`` None) or
    ``raw * c_out + x * c_skip``."""
    impl = _step.denoiser_output_triton if use_triton(x) else _step.denoiser_output_reference
    return impl(x, raw, c_out, c_skip)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + (cond - uncond) * scale``."""
    impl = _step.cfg_combine_triton if use_triton(uncond) else _step.cfg_combine_reference
    return impl(uncond, cond, scale)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma, dt, noise: torch.Tensor | None = None,
               noise_scale=1.0, noise_sigma=0.0) -> torch.Tensor:
    """``x + ((x - denoised) / sigma) * dt``, then ``+ noise * noise_scale * noise_sigma`` when ``noise`` is given."""
    impl = _step.euler_step_triton if use_triton(x) else _step.euler_step_reference
    return impl(x, denoised, sigma, dt, noise, noise_scale, noise_sigma)


def dpmpp_2m_step(x: torch.Tensor, ratio, decay, denoised: torch.Tensor, old: torch.Tensor | None = None,
                  w=None, w_old=None) -> torch.Tensor:
    """``ratio * x - decay * denoised``; with ``old``, ``denoised`` is first ``w * denoised - w_old * old``."""
    impl = _step.dpmpp_2m_step_triton if use_triton(x) else _step.dpmpp_2m_step_reference
    return impl(x, ratio, decay, denoised, old, w, w_old)


def __getattr__(name: str):
    """``Norm`` (a LayerNorm to apply to linear's input: ``Norm(weight, bias, eps)``) and ``GroupNormIn`` (a
    GroupNorm (+ SiLU) to apply to conv2d's input: ``GroupNormIn(w, b, groups, eps, silu)``): the kernel
    modules' argument types, read from them when first asked for."""
    if name == "Norm":
        return _linear.Norm
    if name == "GroupNormIn":
        return _conv.GroupNormIn
    if name == "GroupStats":  # a GroupNorm's (mean, scale) [B, C] float32, made by the kernel that wrote x
        return _group_norm.GroupStats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
