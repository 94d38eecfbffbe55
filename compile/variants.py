"""Which kernel launches (and so which compiled variants) a model needs at given image sizes and batches.

The model itself is walked on the meta device with the kernels CUDA would choose ("auto") and every launch recorded
(``_triton.recording``): the launchers compute exactly the strides, constexprs and shapes they would on the
GPU, so this list never drifts from the code. A :class:`Launch` is plain data (picklable, for compile
workers); :meth:`Launch.variant` is what decides a distinct compiled binary (Triton specialises integers on
``== 1`` and divisibility by 16, pointers on 16-byte alignment), :meth:`Launch.tuning_key` what decides a
distinct autotuning decision.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import triton

from tritonsd.compile.shapes import TEXT_TOKENS
from tritonsd.kernels import _triton, dispatch
from tritonsd.kernels._triton import innermost
from tritonsd.model.layers import circular_padding
from tritonsd.model.unet import UNetModel
from tritonsd.model.vae import AutoencoderKL



@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the JIT sees it: dtype and whether its address is 16-byte aligned."""

    dtype: str  # "float16", ...
    aligned: bool


@dataclass(frozen=True)
class Launch:
    module: str  # the kernel module (tritonsd.kernels.conv, ...)
    kernel: str  # the kernel's name in that module (an Autotuner or JITFunction)
    args: tuple  # TensorArg, int, float, bool, None
    kwargs: tuple  # sorted (name, value) pairs: the constexprs the launcher passes

    def resolve(self):
        """The kernel object (imports its module)."""
        return getattr(importlib.import_module(self.module), self.kernel)

    def call_args(self) -> tuple[tuple, dict]:
        """Arguments for ``kernel.warmup``: tensors become MockTensors of the right dtype and alignment."""
        return tuple(_mock(a) for a in self.args), dict(self.kwargs)

    def variant(self) -> tuple:
        """What selects a compiled binary (besides the autotune config and the target)."""
        spec = []
        for a in self.args:
            if isinstance(a, TensorArg):
                spec.append(("*", a.dtype, a.aligned))
            elif isinstance(a, bool) or a is None:
                spec.append(a)
            elif isinstance(a, int):
                spec.append(("i", a == 1, a % 16 == 0, not -2**31 <= a < 2**31))
            else:
                spec.append(type(a).__name__)
        return (self.module, self.kernel, tuple(spec), self.kwargs)

    def tuning_key(self) -> tuple:
        """The autotuner's key for this launch: its key arguments' values, then every tensor's dtype."""
        kernel = self.resolve()
        if not isinstance(kernel, triton.runtime.Autotuner):
            return ()
        named = dict(zip(kernel.arg_names, self.args))
        named.update(self.kwargs)
        named = {k: v for k, v in named.items() if k in kernel.arg_names}
        key = [named[k] for k in kernel.keys if k in named]
        key += [f"torch.{v.dtype}" for v in named.values() if isinstance(v, TensorArg)]
        return tuple(key)

    @property
    def name(self) -> str:
        return f"{self.module.rsplit('.', 1)[-1]}.{self.kernel}"


class _AlignedMock:
    """A stand-in tensor for ``warmup``: dtype, and an address whose alignment is the real tensor's."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype = dtype
        self._ptr = 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._ptr

    def ptr_range(self) -> int:
        return 0

    def stride(self):  # pragma: no cover - not read by the binder
        return (1,)


def _mock(a):
    if isinstance(a, TensorArg):
        return _AlignedMock(getattr(torch, a.dtype), a.aligned)
    return a


def _kernel_name(kernel) -> tuple[str, str]:
    fn = innermost(kernel)
    module_name = getattr(fn, "module", None) or fn.fn.__module__
    for name, value in vars(sys.modules[module_name]).items():
        if value is kernel:
            return module_name, name
    raise LookupError(f"kernel {kernel} is not a global of {module_name}")


def _as_arg(a):
    if isinstance(a, torch.Tensor):
        # the real address is the allocation's (16-byte aligned by every CUDA allocator) plus the view's offset
        return TensorArg(str(a.dtype).removeprefix("torch."), (a.storage_offset() * a.element_size()) % 16 == 0)
    return a


def record(fn: Callable[[], object]) -> list[Launch]:
    """The launches ``fn`` makes with the kernels CUDA would choose (run on meta tensors: nothing is computed)."""
    with _triton.recording() as raw, dispatch.force("auto"), torch.no_grad():
        fn()
    out = []
    for kernel, args, kwargs in raw:
        module, name = _kernel_name(kernel)
        out.append(Launch(module, name, tuple(_as_arg(a) for a in args),
                          tuple(sorted((k, _as_arg(v)) for k, v in kwargs.items()))))
    return out


def unique(launches: Iterable[Launch], by: Callable[[Launch], object] = Launch.variant) -> list[Launch]:
    """Launches with distinct ``by`` (default: distinct compiled variants), first seen first."""
    seen, out = set(), []
    for launch in launches:
        k = by(launch)
        if k not in seen:
            seen.add(k)
            out.append(launch)
    return out


# ---- walking models --------------------------------------------------------------------------------------------

def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def unet_launches(unet: torch.nn.Module, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype) -> list[Launch]:
    """One UNet step on x [batch, in_channels, h, w] (the UNet built on the meta device, in ``dtype``)."""
    cfg = unet.cfg
    x = _meta((batch, cfg.in_channels, *latent_hw), dtype)
    context = _meta((batch, TEXT_TOKENS, cfg.context_dim), dtype)
    y = _meta((batch, cfg.adm_in_channels), dtype) if cfg.adm_in_channels is not None else None
    t = _meta((batch,), dtype)
    return record(lambda: unet(x, t, context, y))


def vae_decode_launches(vae: torch.nn.Module, latent_hw: tuple[int, int], batch: int,
                        dtype: torch.dtype) -> list[Launch]:
    z = _meta((batch, vae.cfg.embed_dim if hasattr(vae, "cfg") else 4, *latent_hw), dtype)
    return record(lambda: vae.decode(z))


def text_launches(width: int, heads: int, batch: int, dtype: torch.dtype) -> list[Launch]:
    """One text-encoder layer's kernels ([batch, 77, width] tokens, causal attention; all layers are alike)."""
    x = _meta((batch, TEXT_TOKENS, width), dtype)
    qkv = _meta((batch, TEXT_TOKENS, 3 * width), dtype)
    q, k, v = qkv.chunk(3, dim=-1)
    w = _meta((width,), dtype)

    def layer():
        dispatch.layer_norm(x, w, w)
        dispatch.attention(q, k, v, heads, causal=True)
    return record(layer)


def meta_modules(config, dtype: torch.dtype):
    """The UNet and VAE of a ``ModelConfig`` on the meta device, in ``dtype`` (nothing allocated)."""
    with torch.device("meta"):
        unet = UNetModel(config.unet).to(dtype).eval()
        vae = AutoencoderKL(config.vae).to(dtype).eval()
    return unet, vae


def model_launches(config, sizes: Iterable[tuple[int, int]], batches: Iterable[int], dtype: torch.dtype,
                   vae: bool = True, text: bool = True, tiling: bool = False) -> list[Launch]:
    """Every launch of one UNet step per (image size, batch), the VAE decode (batch 1) per size and one text
    layer per tower, for a ``ModelConfig`` or a released model's ``shapes.ModelShapes`` (sizes in pixels,
    (height, width)); ``tiling``: the UNet and VAE launches with circular padding too (the conv kernel's
    ``CIRCULAR`` variants)."""
    unet, decoder = meta_modules(config, dtype)
    factor = 8
    out: list[Launch] = []
    for circular in (False, True) if tiling else (False,):
        with circular_padding(unet, circular), circular_padding(decoder, circular):
            for h, w in sizes:
                latent = (h // factor, w // factor)
                for b in batches:
                    out += unet_launches(unet, latent, b, dtype)
                if vae:
                    out += vae_decode_launches(decoder, latent, 1, dtype)
    if text:
        for tower in getattr(config, "text", {}).values():
            width, heads = getattr(tower, "width", None), getattr(tower, "heads", None)
            if width and heads:
                for b in sorted(set(batches) | {1}):
                    out += text_launches(width, heads, b, dtype)
    return out
