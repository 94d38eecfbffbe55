"""The one table of samplers: everything the rest of the runtime knows about a sampler lives in its
``SamplerSpec`` here, so that no other module branches on a sampler's name.

For each sampler: the function, the space it runs in, whether its loop can be captured in a CUDA graph, its
default schedule, how it draws noise (ancestral: every step, at AUTOMATIC1111's fixed eta 1; or from the user's
eta, DDIM's), AUTOMATIC1111's display name and aliases, the other spellings reference files use, and whether
sgm (SDXL's reference code) has it. A new sampler is one ``register(SamplerSpec(...))``: the CLI's
``--sampler`` choices, the infotext, the graph runner, parity's ``<sampler>_cfg<scale>`` groups and the
server's ``/sdapi/v1/samplers`` all read this table when they run.

Sigma-space samplers take ``(denoiser, x, sigmas, ...)`` (k-diffusion's protocol); timestep-space ones take
``(model, x, DDIMSchedule, ...)`` and return ``(x, intermediates)`` (CompVis' DDIM / PLMS). AUTOMATIC1111 (v1.10)
writes the sampler and the schedule apart ("DPM++ 2M" + "Schedule type: Karras"); older versions wrote one
combined name ("DPM++ 2M Karras"), which ``from_a1111_name`` still reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
    stochastic: bool = False  # ancestral: draws noise every step, at A1111's fixed eta 1 (``fn``'s ``eta=``)
    takes_eta: bool = False  # the user's eta (GenerationSettings.eta, A1111's eta_ddim) sets its noise; 0: none
    a1111_aliases: tuple[str, ...] = ()  # AUTOMATIC1111's aliases (its /sdapi/v1/samplers "aliases")
    reference_names: tuple[str, ...] = ()  # other spellings in reference files' <sampler>_cfg<scale> groups
    sgm: bool = False  # sgm (SDXL's reference code) has it: SDXL parity references may use it

    def a1111_schedule(self, karras: bool) -> str:
        """AUTOMATIC1111's "Schedule type" field for this run: the schedule the sampler's sigmas come from
        (``schedule_label``), else "Automatic" (v1.10 always writes the field: ``process_images`` turns an unset
        scheduler into "Automatic"; DDIM / PLMS have no sigma schedule and keep it)."""
        return self.schedule_label(karras) or "Automatic"

    def schedule_label(self, karras: bool) -> str | None:
        """The label of the schedule function webui's ``get_sigmas`` runs for this sampler, None when it runs
        none (the model's own sigmas under "Automatic", or a timestep sampler): "Karras" for Karras sigmas,
        "Uniform" for the uniform ones on a sampler whose default is Karras."""
        if self.space != "sigmas":
            return None
        if karras:
            return "Karras"
        return "Uniform" if self.karras else None

    @property
    def takes_noise(self) -> bool:
        """``fn`` takes a ``noise_sampler``: ancestral samplers draw from it every step, eta samplers (DDIM) when
        their schedule's eta is above 0."""
        return self.stochastic or self.takes_eta

    def noise_draws(self, sigmas: torch.Tensor, eta: float = 1.0) -> int:
        """How many noise tensors one run over the sigma-space ``sigmas`` draws: an ancestral sampler one per
        step whose next sigma is above 0 (none at ``eta`` 0), any other sigma sampler none."""
        if self.stochastic and eta:
            return int((sigmas[1:] > 0).sum())
        return 0


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("dpmpp_2m", K.sample_dpmpp_2m, "sigmas", True, "DPM++ 2M", karras=True,
                a1111_aliases=("k_dpmpp_2m",), reference_names=("dpmpp2m",), sgm=True),
    SamplerSpec("euler", K.sample_euler, "sigmas", True, "Euler", karras=False,
                a1111_aliases=("k_euler",), reference_names=("k_euler",), sgm=True),
    SamplerSpec("euler_a", K.sample_euler_ancestral, "sigmas", True, "Euler a", karras=False, stochastic=True,
                a1111_aliases=("k_euler_a", "k_euler_ancestral"), reference_names=("euler_ancestral", "k_euler_a")),
    SamplerSpec("ddim", K.sample_ddim, "timesteps", False, "DDIM", karras=False, takes_eta=True,
                a1111_aliases=("ddim",)),
    SamplerSpec("plms", K.sample_plms, "timesteps", False, "PLMS", karras=False, a1111_aliases=("plms",)),
)}
DEFAULT_SAMPLER = "dpmpp_2m"  # the CLI's, the Python API's and the batch jobs' (A1111's DPM++ 2M, Karras)
ORIGINAL_SAMPLER = "ddim"  # the original scripts' (CompVis txt2img.py, runwayml inpaint_st.py): parity's
# fixed ``ddim`` and ``inpaint`` groups
REFERENCE_SIGMA_SAMPLER = "euler"  # k-diffusion's / sgm's plain sampler: parity's ``kdiff`` and ``sample`` groups


def register(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` to the table (after the built-in samplers); a name already taken is refused."""
    if spec.name in SAMPLERS:
        raise ValueError(f"a sampler named {spec.name!r} is already registered")
    SAMPLERS[spec.name] = spec
    return spec


def get(name: str) -> SamplerSpec:
    spec = SAMPLERS.get(name)
    if spec is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return spec


def names() -> tuple[str, ...]:
    """Our names of every sampler, in table order (the CLI's ``--sampler`` choices)."""
    return tuple(SAMPLERS)


def graph_samplers() -> dict[str, SamplerSpec]:
    """The samplers whose loop the CUDA-graph runner captures (``graphable``), by name."""
    return {name: spec for name, spec in SAMPLERS.items() if spec.graphable}


def a1111_name(name: str, karras: bool, combined: bool = False) -> str:
    """AUTOMATIC1111's sampler name; ``combined`` gives the pre-1.9 form with " Karras" appended."""
    spec = get(name)
    if combined and karras and spec.space == "sigmas":
        return f"{spec.a1111_name} Karras"
    return spec.a1111_name


def from_a1111_alias(text: str) -> str | None:
    """AUTOMATIC1111's sampler name for one of its aliases (``k_euler_a`` -> "Euler a"; any case, spaces
    around), None for anything else."""
    key = text.strip().lower()
    for spec in SAMPLERS.values():
        if key in (alias.lower() for alias in spec.a1111_aliases):
            return spec.a1111_name
    return None


def from_reference_name(text: str) -> SamplerSpec | None:
    """The sampler a reference file's group name spells (ours, or one of its ``reference_names``), None if
    none does."""
    for spec in SAMPLERS.values():
        if text == spec.name or text in spec.reference_names:
            return spec
    return None


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
SCHEDULE_NAMES = ("Automatic", "Uniform", "Karras")  # AUTOMATIC1111's "Schedule type" values we run


def schedule_karras(schedule: str) -> bool | None:
    """``karras`` for one of AUTOMATIC1111's schedule types: "Automatic" (the sampler's default) -> None,
    "Uniform" -> False, "Karras" -> True, in any case; anything else raises ``UnknownSamplerError``."""
    key = schedule.strip().lower() if isinstance(schedule, str) else schedule
    if key not in _SCHEDULES:
        raise UnknownSamplerError(f"unknown schedule type {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return _SCHEDULES[key]


def resolve_name(text: str, schedule: str | None = None) -> tuple[str, bool | None]:
    """(our name, karras or None) from any name a user may type, the one place every door reads a sampler name:
    ours ("dpmpp_2m"), AUTOMATIC1111's ("DPM++ 2M", the older combined "DPM++ 2M Karras") or one of its aliases
    ("k_euler_a"), with an optional schedule type. An old combined name keeps its schedule under "Automatic", as
    A1111's ``get_sampler_and_scheduler`` does. Unknown names raise ``UnknownSamplerError``."""
    name = from_a1111_alias(text) or text
    if name.strip().endswith(" Karras") and (schedule is None or schedule.strip().lower() in ("", "automatic")):
        schedule = None
    return from_a1111_name(name, schedule)

