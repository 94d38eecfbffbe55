"""What a model launches, recorded on the meta device: the Triton launches (``kernels/_triton.recording``) and
every other kernel from torch's dispatch log, in the order a GPU would run them.

Nothing here knows the model's layers: the rows are whatever the code launches. ``dispatch.force("auto")`` with
the recorder on makes every dispatch function pick the path CUDA would pick (meta tensors stand for CUDA ones),
so the Triton launchers compute the same grids, strides and constexprs they would on a GPU. An aten op that is
a view, an allocation, or touches no meta tensor (host arithmetic on CPU tensors) launches nothing and is left
out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tritonsd.kernels import _triton, dispatch

ALLOCATIONS = frozenset({"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
                         "aten.empty.SymInt", "aten.new_empty.default", "aten.new_empty_strided.default"})
# ops that only describe a tensor, read metadata, or change nothing on the device
NO_LAUNCH = frozenset({"aten.detach.default", "aten._unsafe_view.default", "aten.lift_fresh.default",
                       "aten.is_same_size.default", "aten.sym_size.default", "aten.sym_stride.default",
                       "aten.sym_numel.default"})


@dataclass
class Event:
    """One launch: a Triton kernel (``kernel`` set: the kernel object, its args and kwargs as launched) or an aten
    op (``func``: the OpOverload, its args, kwargs and output, all tensors meta)."""

    kind: str  # "triton" or "aten"
    kernel: Any = None
    func: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    out: Any = None
    mark: str = ""  # the span it belongs to (see Walk.span)
    part: str = ""  # the network it belongs to within the span: "unet", "controlnet", or "" (see Walk.part)


class Walk(TorchDispatchMode):
    """Records launches in order: aten ops as they are dispatched, Triton launches as the recorder appends them
    (flushed before the next aten op and at the end, so the two logs interleave as the program ran)."""

    def __init__(self, triton_log: list):
        super().__init__()
        self.triton_log = triton_log
        self.seen = 0
        self.events: list[Event] = []
        self.mark = ""
        self.part = ""

    def flush(self) -> None:
        for kernel, args, kwargs in self.triton_log[self.seen:]:
            self.events.append(Event("triton", kernel=kernel, args=args, kwargs=kwargs, mark=self.mark,
                                     part=self.part))
        self.seen = len(self.triton_log)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.flush()
        out = func(*args, **kwargs)
        name = str(func)
        if name == "aten.convolution.default":
            out = _cudnn_layout(out, args[0], args[1])
        if func.is_view or name in ALLOCATIONS or name in NO_LAUNCH:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors):
            self.events.append(Event("aten", func=func, args=args, kwargs=kwargs, out=out, mark=self.mark,
                                     part=self.part))
        return out

    def span(self, mark: str, part: str = "") -> None:
        """Later launches belong to span ``mark`` (launches already made keep theirs), and to ``part``."""
        self.flush()
        self.mark, self.part = mark, part

    def in_part(self, part: str) -> None:
        """Later launches belong to ``part`` of the current span (the network making them)."""
        self.flush()
        self.part = part


def _cudnn_layout(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The convolution's output in the memory format cuDNN gives it: channels-last when the input or the weight
    is (ATen's ``cudnn_conv_suggest_memory_format``). The meta kernel always answers contiguous, which would show
    copies that a GPU does not make."""
    def channels_last(t: torch.Tensor) -> bool:  # ATen's suggest_memory_format() == ChannelsLast, in Python
        return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    if out.dim() == 4 and (channels_last(x) or channels_last(weight)):
        return torch.empty_like(out, memory_format=torch.channels_last)
    return out


@contextlib.contextmanager
def walking() -> Iterator[Walk]:
    """Record every launch made inside the block, the Triton kernels CUDA would choose included."""
    with _triton.recording() as log, dispatch.force("auto"), torch.no_grad():
        walk = Walk(log)
        with walk:
            yield walk
        walk.flush()


def record(fn: Callable[[], object]) -> list[Event]:
    """The launches ``fn`` makes (its tensors on the meta device)."""
    with walking() as walk:
        fn()
    return walk.events
