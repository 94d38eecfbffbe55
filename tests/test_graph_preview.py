"""The preview tap's CUDA reader (``sampler/graph_preview.py``) without a GPU: its events replaced by host-side
stand-ins with CUDA's semantics (an event not yet recorded reads as complete; a launched graph's event records
are pending until the device reaches them), the "device" a thread that writes the ring as a replay would. What
must hold: every preview handed out is the latent of its step (never a slot rewritten meanwhile), in step order,
and the last one always arrives."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tritonsd.sampler.graph_preview import PreviewTap


class FakeEvent:
    """A CUDA event as the host sees it: ``query`` / ``synchronize``; ``pend`` is a graph launch's record
    (pending until the device reaches it: ``fire``); ``record`` outside a graph (the device here is done at once)."""

    def __init__(self):
        self._done = threading.Event()
        self._done.set()  # never recorded: complete

    def record(self, _stream=None):
        self._done.set()

    def pend(self):
        self._done.clear()

    def fire(self):
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self):
        assert self._done.wait(10), "an event the device never reached"


def fake_cuda_tap(monkeypatch, every, steps, ring, shape=(1, 4, 2, 2)) -> PreviewTap:
    monkeypatch.setattr(PreviewTap, "RING", ring)
    tap = PreviewTap(every, steps, torch.device("cpu"))
    tap.cuda = True
    tap.started = [FakeEvent() for _ in tap.steps]
    tap.done = [FakeEvent() for _ in tap.steps]
    tap.copied = [FakeEvent() for _ in range(tap._slots())]
    tap.stream = None  # torch.cuda.stream(None): no stream switch
    tap.ring = [torch.zeros(shape) for _ in range(tap._slots())]
    tap.host = [torch.zeros(shape) for _ in range(tap._slots())]
    return tap


def latents(steps, shape=(1, 4, 2, 2)):
    return [torch.full(shape, float(i)) for i in range(steps)]


def wait_for(got, last, timeout=10):
    deadline = time.monotonic() + timeout
    while (not got or got[-1][0] != last) and time.monotonic() < deadline:
        time.sleep(0.005)


def replay(tap, xs, pause):
    """A launched replay: every event pending, then the device writes each preview step's slot in order."""
    for e in (*tap.started, *tap.done):
        e.pend()
    tap.replayed()  # what CapturedLoop.run does right after graph.replay()

    def device():
        for p, i in enumerate(tap.steps):
            time.sleep(pause)
            tap.started[p].fire()
            tap.ring[p % len(tap.ring)].copy_(xs[i])
            tap.done[p].fire()
    t = threading.Thread(target=device)
    t.start()
    return t


@pytest.mark.parametrize("ring, pause", [(8, 0.0), (2, 0.0), (1, 0.001), (2, 0.002)])
def test_replay_previews_are_their_steps_latents(monkeypatch, ring, pause):
    tap = fake_cuda_tap(monkeypatch, every=2, steps=12, ring=ring)  # previews at 0, 2, ..., 10
    xs = latents(12)
    got = []
    tap.begin(lambda i, x: got.append((i, x)))
    replay(tap, xs, pause).join()
    wait_for(got, 10)
    assert got and got[-1][0] == 10
    assert [i for i, _ in got] == sorted({i for i, _ in got})  # in step order, none twice
    for i, x in got:
        assert torch.equal(x, xs[i]), i
    if ring >= len(tap.steps):  # no slot reused: every preview arrives
        assert [i for i, _ in got] == tap.steps


def test_a_slot_rewritten_before_it_is_read_is_dropped(monkeypatch):
    """The device is far ahead of the reader: slots 0 and 1 hold previews 2 and 3 when the reader gets to
    previews 0 and 1, whose ``started`` successors have fired: those copies are dropped, 2 and 3 are delivered."""
    tap = fake_cuda_tap(monkeypatch, every=1, steps=4, ring=2)
    xs = latents(4)
    got = []
    tap.begin(lambda i, x: got.append((i, x)))
    run = tap._run
    for e in (*tap.started, *tap.done):
        e.pend()
    for p in range(4):  # the device ran the whole loop before the reader was told of it
        tap.started[p].fire()
        tap.ring[p % 2].copy_(xs[p])
        tap.done[p].fire()
    tap.replayed()
    run.thread.join(10)
    assert [i for i, _ in got] == [2, 3]
    assert all(torch.equal(x, xs[i]) for i, x in got)


def test_eager_cuda_previews_through_the_callback(monkeypatch):
    """Without a graph (CUDA, use_graphs off) the loop's callback records the events and queues each preview as it
    goes; the reader hands them out in order."""
    tap = fake_cuda_tap(monkeypatch, every=3, steps=10, ring=4)  # previews at 0, 3, 6, 9
    xs = latents(10)
    got = []
    tap.begin(lambda i, x: got.append((i, x)))
    run = tap._run
    for i in range(10):
        tap.callback({"i": i, "x": xs[i] + 100, "denoised": xs[i]})  # denoised, as the uncaptured path previews
    tap.end()
    run.thread.join(10)
    assert [i for i, _ in got] == [0, 3, 6, 9]
    assert all(torch.equal(x, xs[i]) for i, x in got)


def test_a_new_run_stops_the_last_runs_reader(monkeypatch):
    tap = fake_cuda_tap(monkeypatch, every=1, steps=3, ring=4)
    got = []
    tap.begin(lambda i, x: got.append(("old", i)))
    old = tap._run
    for e in tap.done:
        e.pend()  # the old replay never gets there
    tap.replayed()
    tap.begin(lambda i, x: got.append(("new", i)))
    for e in tap.done:
        e.fire()
    old.thread.join(10)
    assert not old.thread.is_alive() and ("old", 1) not in got and ("old", 2) not in got
    tap.quiesce()
    assert tap._run is None
