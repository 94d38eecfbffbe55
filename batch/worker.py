"""What one worker does: hold a Pipeline and turn units (a few jobs of one group) into PNG bytes.

Per worker (paid once): the model load, and on CUDA the kernels' compile and the CUDA-graph capture of each
loop shape. Per job: its text encoding (alone, a batch of one, as ``tritonsd generate`` does it), its noise, its
share of the UNet batch, its PNG. A UNet batch always holds ``group_size`` rows: a short group is padded with
copies of its last job, whose images are dropped, so an image's numbers never depend on how the jobs happened
to be grouped (the kernels and A1111's emphasis are batch-dependent; a fixed batch makes them byte-stable).
A hires fix job (``enable_hr``) runs alone, unpadded, exactly as ``Pipeline.generate`` runs it.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, field

import torch

from tritonsd.batch.jobs import Job, escape
from tritonsd.batch.noise import StackedNoise, job_noise


@dataclass
class Result:
    """One job's outcome: ``png`` bytes, or ``error`` (one line)."""

    line: int
    id: str
    seed: int
    seconds: float = 0.0
    png: bytes | None = None
    error: str | None = None

    def row(self) -> dict:
        if self.error is not None:
            return {"line": self.line, "id": self.id, "error": self.error}
        return {"line": self.line, "id": self.id, "file": f"{self.id}.png", "seed": self.seed,
                "seconds": round(self.seconds, 4)}


@dataclass
class _Row:
    job: Job
    settings: object  # resolved for the model
    cond: object  # the Pipeline's Conditioning, one row


@dataclass
class _Sampled:
    rows: list  # the real rows (no padding)
    latents: torch.Tensor = field(repr=False)  # [group_size, C, h, w] after the sampler loop


def png_bytes(image) -> bytes:
    """``image`` as PNG with its ``parameters`` infotext chunk, encoded as ``tritonsd generate`` writes it."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return escape(text, 300)


class BatchWorker:
    """A Pipeline and the loop over units; ``run(jobs)`` gives one ``Result`` per job."""

    def __init__(self, pipe, group_size: int = 1):
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.pipe = pipe
        self.group_size = group_size
        self._loras: tuple | None = None

    # ------------------------------------------------------------ jobs -> results

    def run(self, jobs: list[Job]) -> list[Result]:
        """Results of ``jobs`` (one group: same ``group_key``), in order; a job's failure is its own."""
        start = time.perf_counter()
        results: dict[str, Result] = {j.id: Result(j.line, j.id, j.seed) for j in jobs}
        try:
            self._use_loras(jobs[0].loras)
        except (ValueError, RuntimeError, OSError) as e:
            for r in results.values():
                r.error = one_line(e)
            return list(results.values())
        rows = []
        for job in jobs:
            try:
                rows.append(self._prepare(job))
            except (ValueError, RuntimeError, OSError) as e:
                results[job.id].error = one_line(e)
        for batch in self._batches(rows):
            try:
                for row, image in zip(batch, self.images(self.sample(batch))):
                    results[row.job.id].png = png_bytes(image)
            except (ValueError, RuntimeError, OSError) as e:
                for row in batch:
                    results[row.job.id].error = one_line(e)
        done = [r for r in results.values() if r.error is None]
        for r in done:
            r.seconds = (time.perf_counter() - start) / max(len(done), 1)  # the unit's time, shared
        return list(results.values())

    def _use_loras(self, loras: tuple) -> None:
        if loras != self._loras:
            self._loras = None
            self.pipe.set_loras([tuple(x) for x in loras])
            self._loras = loras

    def _prepare(self, job: Job) -> _Row:
        """The job's settings resolved for the model and its prompt encoded alone (a batch of one)."""
        settings = self.pipe.settings(job.settings)
        return _Row(job, settings, self.pipe.encode(settings))

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """``rows`` cut into UNet batches of at most ``group_size``, rows of one conditioning shape together
        (long prompts encode to more 77-token chunks)."""
        by_shape: dict[tuple, list[_Row]] = {}
        for row in rows:
            by_shape.setdefault(_cond_shape(row.cond), []).append(row)
        n = 1 if rows and rows[0].settings.enable_hr else self.group_size  # hires jobs run alone (see sample)
        return [same[i: i + n] for same in by_shape.values() for i in range(0, len(same), n)]

    # ------------------------------------------------------------ one UNet batch

    def sample(self, batch: list[_Row]) -> _Sampled:
        """Latents after the sampler loop for ``batch`` padded to ``group_size`` rows."""
        pipe = self.pipe
        first = batch[0].settings
        if first.enable_hr:  # a hires job alone, exactly Pipeline.generate's calls: its second pass is its own loop
            row = batch[0]
            x = pipe.denoise(pipe.prepare_latents(first), row.cond, first)
            return _Sampled(batch, pipe.hires(x, first, row.cond))
        padded = batch + [batch[-1]] * (self.group_size - len(batch))
        if len(padded) == 1:
            settings, noise, cond = first, None, padded[0].cond  # exactly Pipeline.generate's calls
        else:
            settings = dataclasses.replace(first, batch_size=len(padded))
            shape = pipe.latent_shape(first)
            noise = StackedNoise([job_noise(r.settings, shape, pipe.device) for r in padded])
            cond = _stack_conditioning([r.cond for r in padded])
        latents = pipe.prepare_latents(settings, noise)
        return _Sampled(batch, pipe.denoise(latents, cond, settings))

    def images(self, sampled: _Sampled) -> list:
        """PIL images of the real rows, each with its own job's infotext and seed."""
        pipe = self.pipe
        first = sampled.rows[0].settings
        decoder = pipe.hires_pipeline(first) if first.enable_hr else pipe  # a hires checkpoint's VAE decodes
        pixels = decoder.decode(sampled.latents, tiling=first.tiling).cpu()  # [group_size, 3, H, W]
        images = []
        for i, row in enumerate(sampled.rows):  # each row has its own encode (and so its own TI hashes)
            images.append(pipe.to_pil(pixels[i: i + 1], row.settings, row.cond)[0])
        return images


def _cond_shape(cond) -> tuple:
    """What rows must share to be stacked: per-step tables or not, and every tensor's shape (cond and uncond
    may differ in token length; each side must match across rows)."""
    sides = [cond.cond] + ([cond.uncond] if cond.uncond is not None else [])
    per_step = getattr(cond, "per_step", False)
    rows = getattr(cond, "rows", None)  # which rows of the tables the calls read: the stacked rows share it
    return (per_step, rows, *((k, tuple(v.shape)) for side in sides for k, v in sorted(side.items())))


def _stack_conditioning(conds: list):
    """One Conditioning of len(conds) rows from one-row ones (same ``_cond_shape``)."""
    first = conds[0]
    axis = 1 if getattr(first, "per_step", False) else 0  # per-step tables are [calls, B, ...]

    def cat(sides: list[dict]) -> dict:
        return {k: torch.cat([s[k] for s in sides], dim=axis) for k in sides[0]}  # n x [1, ...] -> [n, ...]

    uncond = None if first.uncond is None else cat([c.uncond for c in conds])
    return dataclasses.replace(first, cond=cat([c.cond for c in conds]), uncond=uncond)
