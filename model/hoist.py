"""Values that depend only on what a sampler run holds fixed, computed once per run instead of once per step.

Inside :func:`scope` (the sampler loop opens one: ``sampler/graph.py``'s loop body, the Pipeline's eager loop),
``once(owner, inputs, compute)`` returns the value ``compute()`` returned the first time it was asked for the
same ``owner`` and the same ``inputs``, and calls ``compute`` again when any input changed. Outside a scope it
just calls ``compute()``, so a bare UNet call is what it always was. Users: the cross-attention keys and values
of the conditioning (``model/unet.CrossAttention``), the conditioning cast to the weights' dtype (``UNetModel``),
the CFG pair of conditioning tensors (``sampler/denoise.CFGDenoiser``).

"The same input" is the same memory viewed the same way (storage, offset, shape, strides, dtype) with the same
version counter, which every in-place write bumps: a static conditioning buffer the graph runner copies a new
prompt into, or a weight a LoRA switch writes into (pass the weights among the inputs), is a new input. The scope
holds its inputs, so their memory cannot be freed and reused by another tensor while it lives. The value is
what ``compute`` returned, so a hit is bit for bit what recomputing would give.

Under CUDA-graph capture the loop body opens its own scope: a value is computed (and captured) at its first use
in the loop, and every replay recomputes it there from the buffers of that replay; the later steps read it.
Nothing computed outside the capture is ever read by the graph.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


class Memo:
    """One scope's values: (owner, where the inputs are) -> (the inputs, their versions, the value)."""

    def __init__(self):
        self.entries: dict[tuple, tuple[tuple, tuple, Any]] = {}
        self.computed = 0  # how many times compute ran (tests, the plan)

    def get(self, owner: Any, inputs: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
        try:
            versions = tuple(t._version for t in inputs)
        except RuntimeError:  # inference tensors keep no version counter: nothing can be known, compute
            return compute()
        key = (owner, tuple(_place(t) for t in inputs))
        hit = self.entries.get(key)
        if hit is not None and hit[1] == versions:
            return hit[2]
        value = compute()
        self.computed += 1
        self.entries[key] = (inputs, versions, value)
        return value


_memo: contextvars.ContextVar[Memo | None] = contextvars.ContextVar("tritonsd_hoist", default=None)
_suspended: contextvars.ContextVar[bool] = contextvars.ContextVar("tritonsd_hoist_suspended", default=False)


def _place(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


@contextlib.contextmanager
def scope() -> Iterator[Memo | None]:
    """A run: inside it, :func:`once` computes each value once; the values are dropped when it ends (inside
    :func:`suspended`, no scope opens: every value is computed at every call)."""
    if _suspended.get():
        yield None
        return
    memo = Memo()
    token = _memo.set(memo)
    try:
        yield memo
    finally:
        _memo.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Scopes opened inside the block do nothing: the unhoisted loop, for comparisons (``bench plan --no-hoist``)."""
    token, memo_token = _suspended.set(True), _memo.set(None)
    try:
        yield
    finally:
        _memo.reset(memo_token)
        _suspended.reset(token)


def once(owner: Any, inputs: tuple[torch.Tensor, ...], compute: Callable[[], T]) -> T:
    """``compute()``, or inside a :func:`scope` the value it gave for the same ``owner`` and unchanged
    ``inputs`` (every tensor ``compute`` reads that may differ between calls: the conditioning, the weights)."""
    memo = _memo.get()
    return compute() if memo is None else memo.get(owner, inputs, compute)
