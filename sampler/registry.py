"""The one table of samplers: for each name, the function, the space it runs in, whether its loop can be
captured in a CUDA graph, AUTOMATIC1111's display name and its default schedule.

Sigma-space samplers take ``(denoiser, x, sigmas, ...)`` (k-diffusion's protocol); timestep-space ones take
``(model, x, DDIMSchedule, ...)`` and return ``(x, intermediates)`` (CompVis' DDIM / PLMS). AUTOMATIC1111 (v1.10)
writes the sampler and the schedule apart ("DPM++ 2M" + "Schedule type: Karras"); older versions wrote one
combined name ("DPM++ 2M Karras"), which ``from_a1111_name`` still reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tritonsd.sampler import samplers as K


class UnknownSamplerError(ValueError):
    """A sampler name that is not in the registry."""


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # ours: the CLI's --sampler and the Python API's sampler=
    fn: Callable
    space: str  # "sigmas" (k-diffusion) | "timesteps" (DDIM / PLMS)
    graphable: bool  # its loop can be captured once as a CUDA graph (sampler/graph.py)
    a1111_name: str  # what AUTOMATIC1111 writes in "Sampler:"
    karras: bool  # the default schedule: Karras sigmas (AUTOMATIC1111's default "Schedule type")
    stochastic: bool = False  # draws noise every step (ancestral)

    def a1111_schedule(self, karras: bool) -> str | None:
        """AUTOMATIC1111's "Schedule type" field for this run, None where it writes none: its "Automatic"
        schedule is the sampler's default (Karras for DPM++ 2M, the uniform sigmas for Euler), recorded only when
        it names a schedule; DDIM / PLMS have none."""
        if self.space != "sigmas":
            return None
        if karras:
            return "Karras"
        return "Uniform" if self.karras else None


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("dpmpp_2m", K.sample_dpmpp_2m, "sigmas", True, "DPM++ 2M", karras=True),
    SamplerSpec("euler", K.sample_euler, "sigmas", True, "Euler", karras=False),
    SamplerSpec("euler_a", K.sample_euler_ancestral, "sigmas", True, "Euler a", karras=False, stochastic=True),
    SamplerSpec("ddim", K.sample_ddim, "timesteps", False, "DDIM", karras=False),
    SamplerSpec("plms", K.sample_plms, "timesteps", False, "PLMS", karras=False),
)}
DEFAULT_SAMPLER = "dpmpp_2m"


def get(name: str) -> SamplerSpec:
    spec = SAMPLERS.get(name)
    if spec is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return spec


def a1111_name(name: str, karras: bool, combined: bool = False) -> str:
    """AUTOMATIC1111's sampler name; ``combined`` gives the pre-1.9 form with " Karras" appended."""
    spec = get(name)
    if combined and karras and spec.space == "sigmas":
        return f"{spec.a1111_name} Karras"
    return spec.a1111_name


def from_a1111_name(text: str, schedule: str | None = None) -> tuple[str, bool | None]:
    """(our name, karras: True / False, or None for the sampler's default) from AUTOMATIC1111's sampler name
    (v1.10's "DPM++ 2M", the older combined "DPM++ 2M Karras", or ours) and its optional schedule type
    ("Automatic", "Uniform", "Karras"). Unknown names raise ``UnknownSamplerError``."""
    name, karras = text.strip(), None
    if name.endswith(" Karras"):
        name, karras = name[: -len(" Karras")], True
    if schedule is not None:
        karras = _SCHEDULES.get(schedule.strip().lower(), "?") if schedule.strip() else karras
        if karras == "?":
            raise UnknownSamplerError(f"unknown schedule type {schedule!r}; choose one of Automatic, Uniform, Karras")
    for spec in SAMPLERS.values():
        if name in (spec.name, spec.a1111_name):
            return spec.name, karras
    raise UnknownSamplerError(f"unknown sampler {text!r}; choose one of "
                              f"{', '.join(s.a1111_name for s in SAMPLERS.values())}")


_SCHEDULES = {"automatic": None, "uniform": False, "karras": True}
