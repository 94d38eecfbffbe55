"""Limits checked before a job is queued: request body size, iterations, image sides, and whether the batch's
pixels fit in the device's memory. Prompts follow the project's limits (``GenerationSettings.check``: characters
and tokens, before anything is queued)."""

from __future__ import annotations

from tritonsd.sampler.memory import available_bytes, estimate_bytes
from tritonsd.serve.errors import TooLarge

MAX_BODY_BYTES = 64 << 20  # 64 MiB; larger bodies get 413
MAX_N_ITER = 100
MAX_SIDE = 8192  # pixels per side (the settings also ask for a multiple of 8)
MAX_QUEUE = 64  # jobs waiting for the device; one more gets 503 with Retry-After
RETRY_AFTER_S = 10
MAX_CONNECTIONS = 256  # open connections and running requests together (uvicorn answers 503 past it)
HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this of the connection (or the last answer)
BODY_IDLE_TIMEOUT_S = 30.0  # the longest pause between two parts of a body (408 after it)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_OPTION_KEYS = 256  # /sdapi/v1/options: keys the server does not use, kept and echoed, at most this many ...
MAX_OPTION_BYTES = 64 * 1024  # ... and this many bytes of JSON together


def check_memory(batch: int, width: int, height: int, device, dtype_bytes: int) -> None:
    """TooLarge (413) when ``batch`` images of ``width`` x ``height`` cannot fit in the device's free memory."""
    if width > MAX_SIDE or height > MAX_SIDE:
        raise TooLarge(f"{width}x{height} is larger than the server's limit of {MAX_SIDE} pixels per side")
    need = estimate_bytes(batch, width, height, dtype_bytes)  # the released VAE's width (the model's may be less)
    free = available_bytes(device)
    if free is not None and need > free:
        raise TooLarge(f"batch_size {batch} at {width}x{height} needs about {need / 2**30:.1f} GiB of working "
                       f"memory; the device has {free / 2**30:.1f} GiB free", "OutOfMemory")
