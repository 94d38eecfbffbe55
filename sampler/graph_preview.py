"""Live previews out of a captured loop, without synchronising it.

A replayed CUDA graph runs the whole loop in one launch, so nothing on the host sees a step's latent while it
runs. A ``PreviewTap`` puts the copy INSIDE the loop: on each preview step (``preview.due``) the loop's ``denoised``
(what the uncaptured path previews: the step callback's ``denoised``, else ``x``) is copied into a small ring of
device buffers, between two events recorded on the loop's stream (``started``: the slot is about to be written;
``done``: it was). The events are ``external`` ones, so capture turns them into event-record nodes that each replay
records again. A host thread of the tap's own (one per run) waits on ``done``, copies the slot to pinned host memory
on a side stream (``non_blocking``) and hands the host copy to the run's sink; the sampling thread only launches the
replay and never waits.

The ring is small (``RING`` slots): a slot is reused ``RING`` previews later. After its copy out, the reader checks
the ``started`` event of the preview that reuses the slot: if that one has been reached, the copy may be torn and is
dropped (a seqlock); a dropped preview is replaced by a later one, as ``serve/previews.py`` replaces a preview still
being made.

Without CUDA (the CPU twin the tests run) the same callback copies into the same ring and hands a copy to the sink at
once, on the sampling thread: there is nothing asynchronous to wait for.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch

from tritonsd.sampler.preview import due

log = logging.getLogger("tritonsd")
PreviewSink = Callable[[int, torch.Tensor], None]  # (step, a host copy of that step's denoised latents)


def preview_latent(d: dict) -> torch.Tensor | None:
    """The latent a step previews, from the sampler's callback dict: ``denoised``, else ``x`` (as serve/jobs.py)."""
    return d.get("denoised", d.get("x"))


class PreviewTap:
    """The preview copies of one captured loop (``steps`` steps, a preview every ``every``)."""

    RING = 4

    def __init__(self, every: int, steps: int, device: torch.device):
        self.steps = [i for i in range(steps) if due(i, every)]  # the loop's preview steps, in order
        self.index = {i: p for p, i in enumerate(self.steps)}  # step -> its preview number
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ring: list[torch.Tensor] | None = None  # made from the first latent (its shape and dtype)
        self.host: list[torch.Tensor] = []  # CUDA: pinned host copies, one per ring slot
        if self.cuda:
            self.started = [torch.cuda.Event(external=True) for _ in self.steps]
            self.done = [torch.cuda.Event(external=True) for _ in self.steps]
            self.copied = [torch.cuda.Event() for _ in range(self._slots())]
            self.stream = torch.cuda.Stream(device=self.device)
        self._run: _Run | None = None  # the run whose previews the callback hands out (None: warm-up, capture)
        self._last: _Run | None = None
        self._lock = threading.Lock()

    def _slots(self) -> int:
        return max(1, min(self.RING, len(self.steps)))

    def allocate(self, latent: torch.Tensor) -> None:
        """Make the ring for ``latent``'s shape and dtype (before a capture: pinned memory cannot be made in one)."""
        if self.ring is None:
            self.ring = [torch.empty(latent.shape, dtype=latent.dtype, device=self.device)
                         for _ in range(self._slots())]
            if self.cuda:
                self.host = [torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)
                             for _ in range(self._slots())]
                for event in (*self.started, *self.done):
                    event.record()  # made now (events are made on first record), not inside the capture

    def callback(self, d: dict) -> None:
        """The sampler's step callback inside the loop (captured on CUDA): copy a preview step's latent out."""
        p = self.index.get(d["i"])
        latent = preview_latent(d)
        if p is None or latent is None:
            return
        self.allocate(latent)
        slot = self.ring[p % len(self.ring)]
        run = self._run
        if not self.cuda:
            slot.copy_(latent)
            if run is not None:
                run.sink(d["i"], slot.clone())
            return
        if run is not None:
            run.issuing = p + 1  # eager CUDA: before the copy is queued (the reader's seqlock reads this count)
        self.started[p].record()
        slot.copy_(latent)
        self.done[p].record()
        if run is not None:
            run.queue.put(p)

    # ---------------------------------------------------------------- per run

    def begin(self, sink: PreviewSink | None) -> None:
        """A run starts: its previews go to ``sink`` (None: nowhere); a reader of an earlier run stops."""
        with self._lock:
            for old in {self._run, self._last} - {None}:
                old.stop()  # an earlier run's reader: this run's copies reuse the ring
            self._run = None if sink is None else _Run(self, sink)
            self._last = self._run  # the reader that may still be going after the run ended

    def replayed(self) -> None:
        """The graph's replay was launched: every preview event of the loop is queued; the reader goes through
        them (the sampling thread goes on)."""
        run = self._run
        if run is None:
            return
        run.issuing = len(self.steps)
        for p in range(len(self.steps)):
            run.queue.put(p)
        self.end()

    def quiesce(self) -> None:
        """Stop this tap's reader and wait for it (before another loop is captured: a global-mode capture
        refuses other threads' event queries and synchronisations)."""
        with self._lock:
            runs = [r for r in {self._run, self._last} if r is not None]
            self._run = self._last = None
        for r in runs:
            r.stop()
            r.join()

    def end(self) -> None:
        """The loop was launched (or, eagerly, ran) to its end: the run's reader stops after its last preview."""
        with self._lock:
            run, self._run = self._run, None
        if run is not None:
            run.queue.put(None)


class _Run:
    """One run's reader: a host thread (CUDA) that waits on the ``done`` events and hands host copies out."""

    def __init__(self, tap: PreviewTap, sink: PreviewSink):
        self.tap, self.sink = tap, sink
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        # previews whose copy the loop has queued (eager) or will run (a launched replay), counted before their
        # events are recorded (the seqlock's side)
        self.issuing = 0
        self.stopped = False
        self.thread = None
        if tap.cuda:
            self.thread = threading.Thread(target=self._read, name="tritonsd-graph-previews", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stopped = True
        self.queue.put(None)

    def join(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def _read(self) -> None:
        tap = self.tap
        while True:
            p = self.queue.get()
            if p is None or self.stopped:
                return
            try:
                tap.done[p].synchronize()  # this thread waits for the copy in the loop; the loop does not
                if self.stopped:
                    return
                k = p % len(tap.ring)
                with torch.cuda.stream(tap.stream):
                    tap.host[k].copy_(tap.ring[k], non_blocking=True)
                    tap.copied[k].record(tap.stream)
                tap.copied[k].synchronize()
                reuse = p + len(tap.ring)  # the preview that writes this slot next
                if reuse < len(tap.steps) and self.issuing > reuse and tap.started[reuse].query():
                    continue  # the slot may have been rewritten while it was copied: a later preview replaces it
                self.sink(tap.steps[p], tap.host[k].clone())
            except Exception as e:  # noqa: BLE001 - a preview that fails must not touch the run
                log.warning("live preview of the captured loop failed: %s: %s", type(e).__name__, e)
                continue
