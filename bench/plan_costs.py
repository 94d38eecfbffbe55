"""What one recorded launch costs: its FLOPs and its minimum HBM traffic, from the shapes it was launched with.

FLOPs are counted as torch's FLOP counter counts them (``torch.utils.flop_counter``): the matrix products,
convolutions and attention, two per multiply-add; elementwise arithmetic counts none (it is bandwidth-bound and
costed by its bytes). An aten op's FLOPs come from the counter's own registry, so the two cannot disagree. A
Triton kernel's come from :data:`TRITON_FLOPS`, one formula per kernel that multiplies matrices, read off the
tensors it was launched with; a kernel in neither that table nor :data:`TRITON_NO_MATMUL` is reported as
unknown (so a new kernel cannot silently count as free).

Minimum HBM bytes: every distinct tensor the launch touches, read once or written once (a launcher's dummy
arguments are the same tensor object as a real one, or flagged off, and are not counted twice); a broadcast
(stride 0) dimension is read once. An in-place aten op reads and writes its destination. A split-K convolution's
float32 workspace (``Ws`` [SPLIT, M, N]) is written once and read back by the tile's finishing program, all but
its own partial (:data:`TRITON_EXTRA_READS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from tritonsd.bench.plan_walk import Event
from tritonsd.kernels._triton import autotune_key, innermost

CUBLAS_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "addbmm"})
CUDNN_OPS = frozenset({"convolution", "cudnn_convolution", "_convolution", "conv2d"})
SDPA_OPS = frozenset({"_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                      "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention"})


class UnknownKernelCost(LookupError):
    """A Triton kernel with no FLOP formula (see the module docstring)."""


def _named(kernel, args: tuple, kwargs: dict) -> dict:
    fn = innermost(kernel)
    return {**dict(zip(fn.arg_names, args)), **kwargs}


def _conv_flops(a: dict) -> int:
    """Y [B, C_out, H', W'] from Wt [C_out, C_in, KH, KW]: 2 * |Y| * C_in * KH * KW."""
    w = a["Wt"]
    return 2 * a["Y"].numel() * math.prod(w.shape[1:])


def _attention_flops(a: dict) -> int:
    """Q [B, N, H*D], K [B, M, H*D]: Q K^T and P V, each 2 * B * N * M * H*D (causal counted whole, as torch's
    counter counts SDPA)."""
    q, k = a["Q"], a["K"]
    return 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]


def _cross_q_attention_flops(a: dict) -> int:
    """X [B, N, C] projected by Wq [H*D, C] (2 * B * N * C * H*D, as torch counts the q GEMM), then the attention
    of that q [B, N, H*D] over K [B, M, H*D] (:func:`_attention_flops`)."""
    x, hd, m = a["X"], a["Wq"].shape[0], a["K"].shape[1]
    b, n, c = x.shape
    return 2 * b * n * c * hd + 4 * b * n * m * hd


def _linear_flops(a: dict) -> int:
    """X [M, K] times Wt [N_w, K] transposed (GEGLU's Wt holds both halves: 2N rows): 2 * M * K * N_w; the
    LayerNorm prologue and the epilogues are not counted, as torch's counter counts no norm or add."""
    return 2 * int(a["M"]) * int(a["K"]) * a["Wt"].shape[0]


# kernel function name -> FLOPs from its named launch arguments
TRITON_FLOPS: dict[str, Callable[[dict], int]] = {
    "_conv2d_kernel": _conv_flops,
    "_attention_kernel": _attention_flops,
    "_cross_q_attention_kernel": _cross_q_attention_flops,
    "_linear_kernel": _linear_flops,
    "_linear_geglu_kernel": _linear_flops,
}
def _conv_workspace_reads(a: dict) -> int:
    """Split-K: the finishing program of each tile reads the other SPLIT - 1 partials back (its own it holds)."""
    split = int(a.get("SPLIT_K", 1))
    return unique_bytes(a["Ws"]) // split * (split - 1) if split > 1 else 0


# kernel function name -> bytes read beyond every distinct tensor once (a workspace written, then read back)
TRITON_EXTRA_READS: dict[str, Callable[[dict], int]] = {"_conv2d_kernel": _conv_workspace_reads}
# kernels that multiply no matrices (norms, gates, the sampler's fused updates)
TRITON_NO_MATMUL = frozenset({
    "_group_stats_kernel", "_group_norm_apply_kernel", "_group_affine_kernel", "_layer_norm_kernel", "_geglu_kernel",
    "_concat_kernel",
    "_denoiser_output_kernel", "_cfg_combine_kernel", "_euler_step_kernel", "_dpmpp_2m_step_kernel",
})


@dataclass
class Cost:
    op: str  # conv2d, attention, mm, add, ...
    impl: str  # "triton", "cuBLAS", "cuDNN", "torch"
    kernel: str  # the Triton kernel (module.function) or the aten overload
    shapes: str  # the tensors' shapes as launched, in argument order
    flops: int
    hbm_bytes: int
    matmul: bool  # whether its FLOPs run on the tensor cores (else the vector units)
    config: dict = field(default_factory=dict)  # a Triton launch's constexprs as launched
    flops_known: bool = True
    autotune: tuple | None = None  # an autotuned launch: (kernel name, source hash, autotune key, config count)
    part: str = ""  # the network that launched it ("unet", "controlnet"; "" for the sampler's own work)

    @property
    def key(self) -> str:
        """The key a measured-times file uses for this launch: op, implementation, shapes."""
        return f"{self.op}|{self.impl}|{self.shapes}"


def unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) tensor holds: stride-0 dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _identity(t: torch.Tensor) -> tuple:
    """Two arguments are the same bytes when they view the same storage at the same place the same way."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _distinct(tensors) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            k = _identity(t)
            if k not in seen:
                seen.add(k)
                out.append(t)
    return out


def _shape(t) -> str:
    if isinstance(t, torch.Tensor):
        return "[" + ",".join(str(s) for s in t.shape) + "]"
    return ""


def triton_cost(event: Event) -> Cost:
    fn = innermost(event.kernel)
    name = fn.__name__
    named = _named(event.kernel, event.args, event.kwargs)
    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
    known = name in TRITON_FLOPS or name in TRITON_NO_MATMUL
    flops = TRITON_FLOPS[name](named) if name in TRITON_FLOPS else 0
    config = {k: v for k, v in event.kwargs.items() if not isinstance(v, torch.Tensor)}
    full_module = getattr(fn, "module", None) or fn.fn.__module__  # a JITFunction's, or an interpreted one's
    module = full_module.rsplit(".", 1)[-1]
    autotune = None
    if isinstance(event.kernel, triton.runtime.Autotuner):  # its name as the tuning tables key it
        autotune = (f"{full_module}.{name}", getattr(fn, "cache_key", ""),
                    autotune_key(event.kernel, event.args, event.kwargs), len(event.kernel.configs))
    hbm = sum(unique_bytes(t) for t in _distinct(tensors.values())) + _workspace_rereads(named)
    hbm += TRITON_EXTRA_READS[name](named) if name in TRITON_EXTRA_READS else 0
    return Cost(op=name.strip("_").removesuffix("_kernel"), impl="triton", kernel=f"{module}.{name}",
                shapes=_named_shapes(tensors),
                flops=flops, hbm_bytes=hbm,
                matmul=name in TRITON_FLOPS, config={k: _plain(v) for k, v in config.items()},
                flops_known=known, autotune=autotune)


def _workspace_rereads(named: dict) -> int:
    """Bytes a launch reads back from a workspace it wrote itself: the GroupNorm statistics epilogue's partials
    (``STATS_OUT``: written by every program, read by the last; kernels/group_norm.py), counted a second time.
    Its other arguments (the consumer's gamma, mean and scale [B, C], the int32 counter) are distinct tensors
    the generic count already holds once each."""
    part = named.get("SPart")
    if named.get("STATS_OUT") and isinstance(part, torch.Tensor):
        return unique_bytes(part)
    return 0


def _named_shapes(tensors: dict[str, torch.Tensor]) -> str:
    """``X=[...] Wt=[...]``; a tensor passed under several names (a launcher's dummy for an argument it turned
    off) is shown once with all of them: ``Emb=Res=Y=[...]``."""
    names: dict[tuple, list[str]] = {}
    shapes: dict[tuple, str] = {}
    for k, t in tensors.items():
        key = _identity(t)
        names.setdefault(key, []).append(k)
        shapes[key] = _shape(t)
    return " ".join("=".join(names[key]) + "=" + shapes[key] for key in names)


def _plain(v):
    return v if isinstance(v, (int, float, bool, str)) or v is None else str(v)


PURE_DESTINATIONS = frozenset({"copy", "fill", "zero"})  # in-place ops that overwrite without reading


def aten_cost(event: Event) -> Cost:
    func = event.func
    packet = func._overloadpacket
    op = packet.__name__
    flops = int(flop_registry[packet](*event.args, **event.kwargs, out_val=event.out)) \
        if packet in flop_registry else 0
    outputs = _distinct(tree_flatten(event.out)[0])
    written = {_identity(t) for t in outputs}
    inputs = _distinct(tree_flatten((event.args, event.kwargs))[0])
    base = op.rstrip("_")
    overwrites = op.endswith("_") and base in PURE_DESTINATIONS
    reads = [t for t in inputs if _identity(t) not in written or not overwrites]
    impl = "cuBLAS" if base in CUBLAS_OPS else "cuDNN" if base in CUDNN_OPS else "torch"
    shown = [t for t in tree_flatten((event.args, event.kwargs))[0] if isinstance(t, torch.Tensor)]
    return Cost(op=op, impl=impl, kernel=str(func), shapes=" ".join(_shape(t) for t in shown),
                flops=flops, hbm_bytes=sum(unique_bytes(t) for t in reads) + sum(unique_bytes(t) for t in outputs),
                matmul=flops > 0 and (impl != "torch" or base in SDPA_OPS))


def cost(event: Event) -> Cost:
    c = triton_cost(event) if event.kind == "triton" else aten_cost(event)
    c.part = event.part
    return c
