"""The running job's live preview (``/sdapi/v1/progress``' ``current_image``): taken from the step callback every
``every`` steps (A1111's ``show_progress_every_n_steps``; 0 or less: none), made and PNG-encoded on a thread of its
own, so the sampling thread only starts a copy.

On CUDA the latent is copied with ``non_blocking=True`` into pinned host memory and an event is recorded after the
copy; the preview thread waits on that event, never the sampling thread, so the loop does not stop for a preview.
A preview still being made when the next one is due is replaced, not queued. A CUDA-graph replay reports its
steps after the whole loop without latents; its previews are copied inside the captured loop instead
(``sampler/graph_preview.py``) and offered here as host tensors from the runner's reader thread.

With a TAESD decoder (``serve --taesd FILE``) the preview thread decodes instead of mapping channels to RGB; on
CUDA on a stream of its own, so the loop's stream never waits for it.
"""

from __future__ import annotations

import base64
import io
import logging
import threading

import torch
from PIL import Image

from tritonsd.sampler.preview import CHEAP_RGB, DEFAULT_EVERY, due, grid, preview_pixels, taesd_pixels
from tritonsd.serve.errors import BadRequest, printable

log = logging.getLogger("tritonsd.serve")
MAX_EVERY = 1000  # the largest period /options takes (a loop has at most this many steps)


def check_every(value) -> int:
    """``show_progress_every_n_steps`` from a client: an integer from -1 to MAX_EVERY (-1 and 0: no previews)."""
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= MAX_EVERY:
        raise BadRequest(f"show_progress_every_n_steps must be an integer from -1 to {MAX_EVERY} "
                         f"(0 or -1: no live previews), got {printable(value)}")
    return value


def check_enabled(value) -> bool:
    """``live_previews_enable`` from a client: true or false (A1111's checkbox)."""
    if not isinstance(value, bool):
        raise BadRequest(f"live_previews_enable must be true or false, got {printable(value)}")
    return value


class Previews:
    """The latest preview of the running job as base64 PNG (``image()``), or None."""

    def __init__(self, every: int = DEFAULT_EVERY, decoder=None):
        self.every = every
        self.enabled = True  # A1111's live_previews_enable: off, no previews whatever ``every`` is
        self.decoder = decoder  # a TAESDDecoder (on the model's device) or None: "Approx cheap"
        self._stream = None  # the decoder's CUDA stream, made on first use
        self._cond = threading.Condition()
        self._pending: tuple | None = None  # (job generation, host latents [B, C, H, W], CUDA event or None, family)
        self._image: str | None = None
        self._generation = 0  # bumped by reset(): a preview of an earlier job is dropped
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """A job starts or ends: no preview until the next one is made."""
        with self._cond:
            self._generation += 1
            self._pending, self._image = None, None

    def image(self) -> str | None:
        with self._cond:
            return self._image

    def offer(self, step: int, latent: torch.Tensor | None, family: str) -> bool:
        """From the step callback: start copying ``latent`` [B, C, H, W] when step ``step`` is due (the preview is
        a grid of the batch, as A1111's ``show_progress_grid``); True when a preview was started."""
        if not self.enabled or latent is None or not due(step, self.every) or family not in CHEAP_RGB:
            return False
        sample = latent.detach()
        if sample.is_cuda:
            host = torch.empty(sample.shape, dtype=sample.dtype, pin_memory=True)
            host.copy_(sample, non_blocking=True)  # queued on the loop's stream, after the step that made it
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = sample.clone(), None  # the loop may update its latent in place
        with self._cond:
            self._pending = (self._generation, host, ready, family)
            self._cond.notify()
        self._start()
        return True

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="tritonsd-previews", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                generation, host, ready, family = self._pending
                self._pending = None
            try:
                if ready is not None:
                    ready.synchronize()  # this thread waits for the copy; the sampling thread never does
                b64 = png_b64(self._pixels(host, family))
            except Exception as e:  # noqa: BLE001 - a preview that fails must not touch the job
                log.warning("live preview failed: %s: %s", type(e).__name__, e)
                continue
            with self._cond:
                if generation == self._generation:
                    self._image = b64

    def _pixels(self, host: torch.Tensor, family: str):
        """The batch's previews [B, C, H, W] -> one uint8 grid [H', W', 3]."""
        if self.decoder is None:
            return grid([preview_pixels(x, family) for x in host])
        device = next(self.decoder.parameters()).device
        if device.type != "cuda":
            return grid([taesd_pixels(self.decoder, x) for x in host])
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(self._stream):
            return grid([taesd_pixels(self.decoder, x) for x in host])


def png_b64(pixels) -> str:
    """uint8 [H, W, 3] -> base64 PNG (A1111's ``encode_pil_to_base64`` with samples_format png)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
