"""Whether a generation fits in the device's memory, estimated before anything is allocated: 8192x8192 on a
24 GB machine gets one line at once, not minutes of allocation and a crash.

The VAE decoder's activations dominate the peak (its widest level runs at full resolution): about 40 values per
output pixel for each channel of the VAE's base width, i.e. 5 KiB per pixel in bytes of the dtype for the
released VAE (128 channels), per image of the batch.
"""

from __future__ import annotations

import os

import torch

VALUES_PER_PIXEL_PER_CHANNEL = 40
RELEASED_VAE_CHANNELS = 128


def estimate_bytes(batch: int, width: int, height: int, dtype_bytes: int, vae_channels: int = RELEASED_VAE_CHANNELS) -> int:
    """Peak working memory of ``batch`` images of ``width`` x ``height`` (the weights not included)."""
    return batch * width * height * VALUES_PER_PIXEL_PER_CHANNEL * vae_channels * dtype_bytes


def available_bytes(device) -> int | None:
    """Free memory of ``device`` (CUDA: free plus what torch's cache holds; CPU: MemAvailable), None if unknown."""
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


def memory_shortfall(batch: int, width: int, height: int, device, dtype: torch.dtype,
                     vae_channels: int = RELEASED_VAE_CHANNELS) -> str | None:
    """None when the generation fits, else one line saying what it needs and what is free."""
    need = estimate_bytes(batch, width, height, torch.empty((), dtype=dtype).element_size(), vae_channels)
    free = available_bytes(device)
    if free is None or need <= free:
        return None
    return (f"{batch} image(s) of {width}x{height} need about {need / 2**30:,.1f} GiB of working memory; the "
            f"{torch.device(device).type} has {free / 2**30:,.1f} GiB free")
