"""The training sigmas of the standard linear schedule, pinned to the values the originals give on the machines
the parity fixtures were made on, so that schedules are the same on every machine.

Why a table: on the CPU, torch computes float32 ``sqrt``, ``log`` and ``exp`` of contiguous tensors with MKL's
vector math library (VML), and VML's last bit depends on the code path MKL picks for the processor. On an
AVX2 / AVX-512 Intel CPU, ``((1 - acp) / acp) ** 0.5`` of the float32 ``alphas_cumprod`` differs from MKL's
compatible path (``MKL_CBWR=COMPATIBLE``, also its SSE4.2 and AVX paths) by 1 ulp at 166 of the 1000 entries, and
``log`` at 209. So the originals themselves (k-diffusion's ``CompVisDenoiser``, sgm's
``LegacyDDPMDiscretization``) give schedules that differ by 1 ulp between machines. The SD 1.x / 2.x / XL
fixtures were made where MKL ran its compatible path (``kdiff.sigmas`` at t = 333 and 111, SDXL's
``sample.sigmas`` at t = 699); neither path is correctly rounded, so no ISA-independent arithmetic gives them.

This module holds those values for the one schedule the released SD 1.x / 2.x / XL models use (linear betas
0.00085 -> 0.012, 1000 steps), read from ``data/linear_schedule_sigmas.json``:

* ``kdiff_sigmas`` / ``kdiff_log_sigmas``: k-diffusion's ``DiscreteSchedule.sigmas`` / ``log_sigmas`` for
  ``CompVisDenoiser(model)``: ``((1 - acp) / acp) ** 0.5`` of the model's float32 buffer, then ``.log()``.
* ``sgm_sigmas``: sgm's training sigmas, ``to_torch((1 - acp) / acp) ** 0.5`` of the float64 schedule.

They apply only when the schedule equals ``alphas_cumprod_float64`` (or its float32 rounding) exactly; any
other schedule is computed live by ``schedule.py``, with this machine's last bit.

Regenerate (x86-64 torch built with MKL; the variable must be set before torch loads)::

    MKL_CBWR=COMPATIBLE python benchmarks/pin_schedule.py   (from the checkout; writes data/ here)
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch

DATA_FILE = "linear_schedule_sigmas.json"
LINEAR = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}


class PinnedSchedule(NamedTuple):
    """The pinned tables, ascending in t, on the CPU."""

    alphas_cumprod64: torch.Tensor  # float64 [1000], the key
    kdiff_sigmas: torch.Tensor  # float32 [1000]
    kdiff_log_sigmas: torch.Tensor  # float32 [1000]
    sgm_sigmas: torch.Tensor  # float32 [1000]


# ---------------------------------------------------------------- reading


def _from_hex(words: list[str], dtype) -> torch.Tensor:
    """Big-endian hex bit patterns (8 digits per float32, 16 per float64) -> a tensor, bit for bit."""
    bits = np.array([int(w, 16) for w in words], dtype=np.uint32 if dtype == np.float32 else np.uint64)
    return torch.from_numpy(bits.view(dtype).copy())


@functools.lru_cache(maxsize=None)
def pinned() -> PinnedSchedule:
    """The tables of ``data/linear_schedule_sigmas.json`` (read once)."""
    text = resources.files(__package__).joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    raw = json.loads(text)
    return PinnedSchedule(
        alphas_cumprod64=_from_hex(raw["alphas_cumprod_float64"], np.float64),
        kdiff_sigmas=_from_hex(raw["kdiff_sigmas"], np.float32),
        kdiff_log_sigmas=_from_hex(raw["kdiff_log_sigmas"], np.float32),
        sgm_sigmas=_from_hex(raw["sgm_sigmas"], np.float32),
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal values (``a`` may live on another device; it is compared on the CPU)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b)


def kdiff_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """The pinned ``CompVisDenoiser`` sigmas when ``alphas_cumprod`` (float32) is the linear schedule, else None."""
    table = pinned()
    return table.kdiff_sigmas.clone() if _same(alphas_cumprod, table.alphas_cumprod64.float()) else None


def kdiff_log_sigmas(sigmas: torch.Tensor) -> torch.Tensor | None:
    """The pinned ``log_sigmas`` when ``sigmas`` are the pinned sigmas, else None."""
    table = pinned()
    return table.kdiff_log_sigmas.clone() if _same(sigmas, table.kdiff_sigmas) else None


def sgm_sigmas(alphas_cumprod64: torch.Tensor) -> torch.Tensor | None:
    """The pinned sgm training sigmas when ``alphas_cumprod64`` (float64) is the linear schedule, else None."""
    table = pinned()
    return table.sgm_sigmas.clone() if _same(alphas_cumprod64, table.alphas_cumprod64) else None
