"""Limits checked before a job is queued: request body size, iterations, image sides, and whether the batch's
pixels fit in the device's memory. Prompts follow the project's limits (``GenerationSettings.check``: characters
and tokens, before anything is queued)."""

from __future__ import annotations

import os

from .errors import TooLarge

MAX_BODY_BYTES = 64 << 20  # 64 MiB; larger bodies get 413
MAX_N_ITER = 100
MAX_SIDE = 8192  # pixels per side (the settings also ask for a multiple of 8)
# Peak working memory per output pixel and image, in bytes per byte of the dtype: the VAE decoder's activations
# dominate (about 5 KiB per pixel in fp16 at 512x512 with a batch of one; kept at twice that for headroom).
WORK_BYTES_PER_PIXEL = 5 << 10


def estimate_bytes(batch: int, width: int, height: int, dtype_bytes: int) -> int:
    return batch * width * height * WORK_BYTES_PER_PIXEL * dtype_bytes


def available_bytes(device) -> int | None:
    """Free memory of ``device`` (CUDA: free plus what torch's cache holds; CPU: MemAvailable), None if unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(batch: int, width: int, height: int, device, dtype_bytes: int) -> None:
    """TooLarge (413) when ``batch`` images of ``width`` x ``height`` cannot fit in the device's free memory."""
    if width > MAX_SIDE or height > MAX_SIDE:
        raise TooLarge(f"{width}x{height} is larger than the server's limit of {MAX_SIDE} pixels per side")
    need = estimate_bytes(batch, width, height, dtype_bytes)
    free = available_bytes(device)
    if free is not None and need > free:
        raise TooLarge(f"batch_size {batch} at {width}x{height} needs about {need / 2**30:.1f} GiB of working "
                       f"memory; the device has {free / 2**30:.1f} GiB free", "OutOfMemory")
