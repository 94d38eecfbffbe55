"""Noise as AUTOMATIC1111 (v1.10.1, ``modules/rng.py`` and ``rng_philox.py``) draws it.

Sources (``--rng``):

* ``nv`` (default): CUDA's ``torch.randn`` reproduced on any device: Philox4x32-10 keyed by the 64-bit seed,
  counter ``(offset, 0, i, 0)`` for the i-th number, one Box-Muller output per number; each ``randn`` call of a
  generator advances the offset by one. Same numbers on the CPU and the GPU, and A1111's default GPU noise.
* ``gpu``: ``torch.randn`` on a CUDA generator (refused, with one line, where there is no CUDA device).
* ``cpu``: ``torch.randn`` on a CPU ``torch.Generator``; image i's first draw equals the pipeline's
  ``start_noise`` (the parity fixtures' noise).

``ImageRNG`` is A1111's: image i has seed ``seeds[i]`` (the caller passes seed + i) and its own generator, whose
first draw is the start noise and whose later draws are the ancestral / eta noise; variation seeds blend the
start noise with the subseed's by A1111's slerp.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tritonsd.sampler.seeds import SEED_RANGE

SOURCES = ("nv", "gpu", "cpu")
DEFAULT_SOURCE = "nv"
MAX_SEED = SEED_RANGE - 1

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_POW32_INV = np.array([2.3283064e-10], dtype=np.float32)
_TWO_POW32_INV_2PI = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)


class RNGError(ValueError):
    """A bad seed or an unavailable noise source (one line)."""


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise RNGError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
    return int(seed)


def check_source(source: str) -> str:
    s = str(source).lower()
    if s not in SOURCES:
        raise RNGError(f"unknown noise source {source!r}; expected one of {', '.join(SOURCES)}")
    if s == "gpu" and not torch.cuda.is_available():
        raise RNGError("--rng gpu needs a CUDA device; use --rng nv for the same noise on any device")
    return s


# --------------------------------------------------------------------------------------------------------------
# Philox (CUDA torch.randn)


def _hi_lo(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 products -> (high 32 bits, low 32 bits) as uint32."""
    return (x >> np.uint64(32)).astype(np.uint32), (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """counter [4, N] uint32, key [2, N] uint32 -> [4, N] random uint32 (10 rounds)."""
    c0, c1, c2, c3 = (counter[i].copy() for i in range(4))
    k0, k1 = key[0].copy(), key[1].copy()
    for r in range(10):
        hi0, lo0 = _hi_lo(c0.astype(np.uint64) * np.uint64(_PHILOX_M[0]))
        hi1, lo1 = _hi_lo(c2.astype(np.uint64) * np.uint64(_PHILOX_M[1]))
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < 9:
            k0 = k0 + np.uint32(_PHILOX_W[0])
            k1 = k1 + np.uint32(_PHILOX_W[1])
    return np.stack([c0, c1, c2, c3])


def _box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first output of Box-Muller, in float32 steps as A1111 (and curand) compute it."""
    u = x * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """``rng_philox.Generator``: ``randn(shape)`` equals ``torch.randn(shape, device="cuda")`` after
    ``torch.manual_seed(seed)`` (the k-th call of one generator: the k-th such draw)."""

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2 ** 32:
            raise RNGError(f"cannot draw {n} numbers at once (the counter holds 2**32)")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = np.uint32(self.offset & 0xFFFFFFFF)
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.empty((2, n), dtype=np.uint32)
        key[0] = np.uint32(self.seed & 0xFFFFFFFF)
        key[1] = np.uint32(self.seed >> 32)
        g = _philox4x32_10(counter, key)
        return _box_muller(g[0], g[1]).reshape(tuple(shape))


# --------------------------------------------------------------------------------------------------------------
# One generator per image


class _Generator:
    """A seeded generator of one source; ``randn(shape)`` -> float32 tensor on ``device``."""

    def __init__(self, seed: int, source: str, device):
        self.source, self.device = source, torch.device(device)
        seed = check_seed(seed)
        if source == "nv":
            self.g = PhiloxGenerator(seed)
        else:
            self.g = torch.Generator("cuda" if source == "gpu" else "cpu").manual_seed(seed)

    def randn(self, shape) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if self.source == "nv":
            return torch.from_numpy(self.g.randn(shape)).to(self.device)
        draw_device = "cuda" if self.source == "gpu" else "cpu"
        return torch.randn(shape, generator=self.g, device=draw_device, dtype=torch.float32).to(self.device)


def create_generator(seed: int, source: str = DEFAULT_SOURCE, device="cpu") -> _Generator:
    return _Generator(seed, check_source(source), device)


def randn(seed: int, shape, source: str = DEFAULT_SOURCE, device="cpu") -> torch.Tensor:
    """A fresh generator's first draw (A1111 ``randn(seed, shape)``)."""
    return create_generator(seed, source, device).randn(shape)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's slerp, verbatim in effect: norms over dim 1 of [C, H, W] noise (per channel and column), and
    ``low * val + high * (1 - val)`` when the two are nearly parallel."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) \
        * high


class ImageRNG:
    """A1111's ``ImageRNG``: ``first()`` gives the start noise [B, *shape], ``next()`` the first call's noise,
    then each image generator's next draw (ancestral / eta noise).

    shape: one image's latent shape (C, H, W). seeds: one per image (seed + i). subseeds / subseed_strength:
    variation seeds (a missing subseed is 0, as A1111). seed_resize_from_h / _w: pixel size the seed's noise was
    made for (A1111's "resize seed from"); the noise is drawn at that size and pasted centred.
    eta_noise_seed_delta: A1111's ENSD: after the start noise, the image generators restart at seed + delta.
    """

    def __init__(self, shape, seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                 source: str = DEFAULT_SOURCE, device="cpu", eta_noise_seed_delta: int = 0):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise RNGError(f"ImageRNG needs one image's (C, H, W) shape, got {self.shape}")
        self.seeds = [check_seed(s) for s in seeds]
        if not self.seeds:
            raise RNGError("ImageRNG needs at least one seed")
        self.subseeds = None if subseeds is None else [check_seed(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.source = check_source(source)
        self.device = torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.generators = [_Generator(s, self.source, self.device) for s in self.seeds]
        self.is_first = True

    def _fresh(self, seed: int, shape) -> torch.Tensor:
        return _Generator(seed, self.source, self.device).randn(shape)

    def first(self) -> torch.Tensor:
        resized = self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0
        noise_shape = (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8) if resized \
            else self.shape
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._fresh(subseed, noise_shape)
            noise = self._fresh(seed, noise_shape) if noise_shape != self.shape else generator.randn(self.shape)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                noise = _paste_centred(generator.randn(self.shape), noise)
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [_Generator(s + self.eta_noise_seed_delta, self.source, self.device)
                               for s in self.seeds]
        return torch.stack(xs)

    def next(self) -> torch.Tensor:
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([g.randn(self.shape) for g in self.generators])

    def noise_sampler(self):
        """k-diffusion-style ``noise_sampler(sigma, sigma_next)``: each call is one ``next()``."""
        return lambda _sigma, _sigma_next: self.next()


def _paste_centred(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A1111's seed-resize paste: the centre of ``noise`` [C, h, w] into ``x`` [C, H, W] (crop or pad)."""
    dx = (x.shape[2] - noise.shape[2]) // 2
    dy = (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    dx, dy = max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
    return x


INFOTEXT_RNG = {"nv": "NV", "gpu": None, "cpu": "CPU"}  # webui's randn_source names; its default "GPU" unwritten


def infotext_rng(source: str) -> str | None:
    """The ``RNG`` infotext value as webui v1.10.1's ``create_infotext`` writes it (``opts.randn_source`` unless it
    is "GPU"): "NV" for nv, "CPU" for cpu, None for gpu. Needs no device: an infotext may name the gpu source on a
    machine without one."""
    s = str(source).lower()
    if s not in INFOTEXT_RNG:
        raise RNGError(f"unknown noise source {source!r}; expected one of {', '.join(SOURCES)}")
    return INFOTEXT_RNG[s]


def source_from_infotext(value: str | None) -> str:
    """A1111's ``RNG`` field back to a source: "NV" -> nv, "CPU" -> cpu; absent / "GPU" (webui's default GPU
    source, whose CUDA numbers nv reproduces on any device) -> nv, which then writes ``RNG: NV``."""
    if value is None:
        return DEFAULT_SOURCE
    v = str(value).strip().upper()
    if v == "CPU":
        return "cpu"
    if v in ("GPU", "NV"):
        return "nv"
    raise RNGError(f"unknown RNG value {value!r} in the infotext (expected GPU, CPU or NV)")


__all__ = ["DEFAULT_SOURCE", "ImageRNG", "PhiloxGenerator", "RNGError", "SOURCES", "check_seed",
           "check_source", "create_generator", "INFOTEXT_RNG", "infotext_rng", "randn", "slerp", "source_from_infotext"]
