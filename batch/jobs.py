"""Job lines: one JSON object per line of ``JOBS.jsonl``, with AUTOMATIC1111's txt2img field names, checked on the
driver without a model so that a bad line costs nothing and is reported by its line number.

Fields: ``id`` (required: the output's file name), ``prompt``, ``negative_prompt``, ``seed``, ``subseed``,
``subseed_strength`` (A1111's variation seed), ``steps``,
``sampler_name`` (A1111's "DPM++ 2M", the old "DPM++ 2M Karras", or ours "dpmpp_2m"), ``scheduler``
("Automatic", "Uniform", "Karras"), ``cfg_scale``, ``width``, ``height``, ``tiling`` (true: seamless textures), ``loras`` (a list of ``"FILE"``,
``"FILE:W"``, ``"FILE:TE_W:UNET_W"`` or ``{"path": FILE, "weight": W}``; FILE relative to the current directory,
else to the LoRA folder, with or without ``.safetensors``); hires fix with A1111's txt2img names: ``enable_hr``,
``denoising_strength``, ``hr_scale``, ``hr_resize_x``, ``hr_resize_y``, ``hr_upscaler``, ``hr_second_pass_steps``,
``hr_sampler_name``, ``hr_scheduler``, ``hr_prompt``, ``hr_negative_prompt`` (model files from
``--upscaler-dir``), ``hr_checkpoint_name`` (a checkpoint file, or its name in ``--models-dir``; "Use same
checkpoint" as not given); ``controlnet``: a list of ControlNet units with the A1111 extension's field names
(``model``: a file relative to the current directory or a name in the ControlNet folder; ``image``: a file
relative to the current directory; module, weight, resize_mode, processor_res, threshold_a, threshold_b,
guidance_start, guidance_end, pixel_perfect, control_mode, hr_option; ``sampler/control.py``). A missing field takes ``tritonsd generate``'s default; a missing seed (or A1111's -1) is
derived from the id, so a rerun gives the same image.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from tritonsd.escape import escape  # the batch modules print untrusted ids and text through it
from tritonsd.control.models import resolve_units
from tritonsd.formats.checkpoint import CheckpointError, validate_safetensors_header
from tritonsd.formats.image_file import ImageFileError, open_image
from tritonsd.sampler.control import ControlUnit, ControlUnitError, check_units
from tritonsd.sampler.seeds import RANDOM_SEEDS
from tritonsd.sampler.settings import GenerationSettings, SettingsError
from tritonsd.sampler.registry import DEFAULT_SAMPLER, UnknownSamplerError, resolve_name

HIRES_FIELDS = ("enable_hr", "denoising_strength", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
                "hr_second_pass_steps", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
                "hr_checkpoint_name")
FIELDS = ("id", "prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "steps", "sampler_name",
          "scheduler", "cfg_scale", "width", "height", "tiling", "loras", *HIRES_FIELDS, "controlnet")
# GenerationSettings field -> the job field a SettingsError names
JOB_FIELD = {"sampler": "sampler_name", "karras": "scheduler", "strength": "denoising_strength",
             "hr_sampler": "hr_sampler_name", "controls": "controlnet"}
SETTINGS_FIELDS = ("prompt", "negative_prompt", "sampler", "karras", "steps", "cfg_scale", "seed", "subseed",
                   "subseed_strength", "width", "height", "tiling", "enable_hr", "strength", "hr_scale", "hr_resize_x",
                   "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "hr_sampler", "hr_scheduler", "hr_prompt",
                   "hr_negative_prompt", "hr_checkpoint_name", "controls")  # what travels to a Ray worker
MAX_ID_BYTES = 200  # "<id>.png" and its temporary name stay under the usual 255-byte file-name limit
MAX_LINE_BYTES = 1 << 20
_LORA_TAG = re.compile(r"<(?:lora|lyco):[^>]+>")  # the prompt's own LoRAs (webui's extra-network tags)


class JobError(ValueError):
    """A job line that cannot run; the message is one line, its untrusted parts escaped."""


@dataclass(frozen=True)
class Job:
    """One checked job line. ``settings`` is a checked ``GenerationSettings`` (batch of one, seed set)."""

    line: int  # 1-based line number in the jobs file
    id: str
    settings: object
    loras: tuple[tuple[str, float, float], ...] = ()  # (absolute path, te weight, unet weight)

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    def group_key(self) -> tuple:
        """What jobs must share to run in one UNet batch: the sampler loop, the size, the convolutions' padding
        (tiling) and the LoRA weights (``loras`` and the prompt's ``<lora:...>`` tags, which the Pipeline applies
        per generation)."""
        s = self.settings
        hires = (s.enable_hr, s.strength, s.hr_scale, s.hr_resize_x, s.hr_resize_y, s.hr_upscaler,
                 s.hr_second_pass_steps, s.hr_sampler, s.hr_scheduler, s.hr_checkpoint_name) if s.enable_hr else ()
        return (s.sampler, s.karras, s.steps, s.cfg_scale, s.width, s.height, s.tiling, self.loras,
                tuple(_LORA_TAG.findall(s.prompt)), hires, control_key(s.controls))

    def to_dict(self) -> dict:
        """A plain, JSON-able form (what travels to a Ray worker)."""
        s = self.settings
        settings = {f: getattr(s, f) for f in SETTINGS_FIELDS}
        settings["controls"] = [unit_json(u) for u in s.controls]
        return {"line": self.line, "id": self.id, "loras": [list(x) for x in self.loras], "settings": settings}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        settings = dict(d["settings"])
        settings["controls"] = tuple(ControlUnit(**u) for u in settings.get("controls", ()))
        return cls(line=d["line"], id=d["id"], settings=GenerationSettings(**settings),
                   loras=tuple(tuple(x) for x in d["loras"]))


@dataclass
class Rejected:
    """A line that will not run: ``id`` when one could be read."""

    line: int
    error: str
    id: str | None = None

    def row(self) -> dict:
        return {"line": self.line, "id": self.id, "error": self.error}


# ------------------------------------------------------------------------------------------------ escaping


# ------------------------------------------------------------------------------------------------ one line


def check_id(value) -> str:
    if not isinstance(value, str):
        raise JobError(f"id must be a string, got {escape(json.dumps(value), 40)}")
    if not value:
        raise JobError("id must not be empty")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in value):
        raise JobError(f"id {escape(value)!r} holds a control character")
    if "/" in value or "\\" in value or (os.altsep and os.altsep in value):
        raise JobError(f"id {escape(value)!r} holds a path separator")
    if ".." in value:
        raise JobError(f"id {escape(value)!r} holds '..'")
    if value.startswith("."):
        raise JobError(f"id {escape(value)!r} starts with '.' (hidden files and temporaries start so)")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise JobError(f"id is longer than {MAX_ID_BYTES} bytes")
    return value


def seed_from_id(job_id: str) -> int:
    """The seed of a job that names none: the first 4 bytes of sha256(id), so it never changes; in the range
    random seeds are drawn from (AUTOMATIC1111's)."""
    return int.from_bytes(hashlib.sha256(job_id.encode("utf-8")).digest()[:4], "big") % RANDOM_SEEDS


def parse_sampler(fields: dict) -> tuple[str | None, bool | None]:
    name, schedule = fields.get("sampler_name"), fields.get("scheduler")
    if schedule is not None and not isinstance(schedule, str):
        raise JobError(f"scheduler must be a string, got {escape(json.dumps(schedule), 40)}")
    if name is None:
        if schedule is None:
            return None, None
        name = DEFAULT_SAMPLER  # with the schedule asked for
    if not isinstance(name, str):
        raise JobError(f"sampler_name must be a string, got {escape(json.dumps(name), 40)}")
    try:
        return resolve_name(name, schedule)
    except UnknownSamplerError as e:
        raise JobError(escape(str(e), 300)) from None


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JobError(f"{name} must be a finite number, got {escape(json.dumps(value), 40)}")
    return float(value)


def parse_loras(value, lora_dir: Path | None, base: Path) -> tuple[tuple[str, float, float], ...]:
    """``loras`` as (absolute path, te weight, unet weight); a missing file is this line's error."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise JobError("loras must be a list of \"FILE:W\" strings or {\"path\": FILE, \"weight\": W} objects")
    out = []
    for item in value:
        if isinstance(item, str):
            path, weights = _split_lora_text(item)
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "weight"}:
            path, weights = item["path"], [_number("loras weight", item.get("weight", 1.0))]
        else:
            raise JobError(f"loras item {escape(json.dumps(item), 60)} is not \"FILE:W\" or "
                           "{\"path\": FILE, \"weight\": W}")
        te, unet = (weights + [1.0])[0], weights[-1] if weights else 1.0
        out.append((str(find_lora_file(path, lora_dir, base)), te, unet))
    return tuple(out)


def _split_lora_text(text: str) -> tuple[str, list[float]]:
    """``FILE[:TE_W[:UNET_W]]``, numbers taken from the right (FILE may hold ':')."""
    parts, weights = text.split(":"), []
    while len(parts) > 1 and len(weights) < 2:
        try:
            w = float(parts[-1])
        except ValueError:
            break
        weights.insert(0, _number("loras weight", w))
        parts.pop()
    return ":".join(parts), weights


def find_lora_file(path: str, lora_dir: Path | None, base: Path) -> Path:
    """``path`` (relative to ``base``), else ``lora_dir/path`` or ``lora_dir/path.safetensors``: a regular
    ``.safetensors`` file whose header reads as one. Nothing else is opened, and a file that is not a LoRA is
    refused by its name alone: no byte of it (nor a number made of its bytes) reaches a message."""
    candidates = [base / path]
    if lora_dir is not None:
        candidates += [lora_dir / path, lora_dir / f"{path}.safetensors"]
    for c in candidates:
        if c.suffix.lower() == ".safetensors" and c.is_file():
            _check_lora_header(c, path)
            return c.resolve()
    if any(c.exists() for c in candidates):
        raise JobError(f"loras: {escape(path)} is not a .safetensors LoRA file")
    where = f" (nor in {escape(str(lora_dir))})" if lora_dir is not None else ""
    raise JobError(f"LoRA file not found: {escape(path)}{where}")


def _check_lora_header(file: Path, named: str) -> None:
    try:
        validate_safetensors_header(file)
    except (CheckpointError, OSError):
        raise JobError(f"loras: {escape(named)} is not a readable safetensors LoRA file") from None


def control_key(units) -> tuple:
    """What units must share for their jobs to run in one batch: every field, the image by its digest."""
    return tuple((str(u.model), u.module, u.weight, u.resize_mode, u.processor_res, u.threshold_a, u.threshold_b,
                  u.guidance_start, u.guidance_end, u.pixel_perfect, u.control_mode, u.hr_option,
                  None if u.image is None else hashlib.sha256(np.ascontiguousarray(_pixels(u.image))).hexdigest())
                 for u in units)


def _pixels(image):
    return image.numpy() if hasattr(image, "numpy") else image


def unit_json(unit: ControlUnit) -> dict:
    """A checked unit as JSON (the image as a base64 PNG, the model as its path), for a Ray worker."""
    d = dataclasses.asdict(unit)
    d["model"] = str(unit.model)
    if isinstance(unit.image, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(unit.image).save(buf, format="PNG")
        d["image"] = base64.b64encode(buf.getvalue()).decode("ascii")
    elif unit.image is not None:
        raise JobError("controlnet: a unit image given as a tensor cannot travel to a Ray worker")
    return d


CONTROL_FIELDS = ("model", "image", "module", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                  "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option")


def parse_controlnet(value, controlnet_dir: Path | None, base: Path) -> tuple:
    """``controlnet``: a list of units (dicts of the extension's fields), images read from files relative to
    ``base``, models found as files relative to ``base`` or by name in ``controlnet_dir``."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(u, dict) for u in value):
        raise JobError("controlnet must be a list of units (objects with the A1111 extension's field names)")
    units = []
    for i, fields in enumerate(value):
        unknown = [k for k in fields if k not in CONTROL_FIELDS]
        if unknown:
            raise JobError(f"controlnet[{i}]: unknown field {escape(unknown[0], 60)!r}; the fields are "
                           f"{', '.join(CONTROL_FIELDS)}")
        fields = dict(fields)
        if isinstance(fields.get("model"), str) and (base / fields["model"]).is_file():
            fields["model"] = str(base / fields["model"])
        image = fields.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise JobError(f"controlnet[{i}]: image must be a file name")
            fields["image"] = _read_image(base / image, f"controlnet[{i}].image")
        try:
            (unit,) = resolve_units(check_units([ControlUnit(**{"model": None, **fields})]), controlnet_dir)
        except ControlUnitError as e:
            raise JobError(f"controlnet[{i}]: {escape(str(e).removeprefix('unit 0: '), 300)}") from None
        units.append(unit)
    return tuple(units)


def _read_image(path: Path, what: str):
    try:
        return open_image(path, what)
    except ImageFileError as e:
        raise JobError(str(e)) from None


def parse_job(fields, line: int, *, lora_dir: Path | None = None, base: Path | None = None,
              controlnet_dir: Path | None = None) -> Job:
    """One job from a decoded JSON line, checked without a model; raises ``JobError`` (one line)."""

    if not isinstance(fields, dict):
        raise JobError(f"a job line must be a JSON object, got {type(fields).__name__}")
    job_id = check_id(fields.get("id")) if "id" in fields else None
    if job_id is None:
        raise JobError("id is missing (the output's file name)")
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise JobError(f"unknown field {escape(unknown[0], 60)!r}; the fields are {', '.join(FIELDS)}")
    sampler, karras = parse_sampler(fields)
    seed = fields.get("seed")
    if seed is None or (seed == -1 and not isinstance(seed, bool)):
        seed = seed_from_id(job_id)
    given = {k: fields[k] for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "subseed",
                                    "subseed_strength", "tiling") if fields.get(k) is not None}
    if given.get("subseed") == -1 and not isinstance(given["subseed"], bool):
        given["subseed"] = seed_from_id(job_id + "\0subseed")  # A1111's "random": derived, as the seed
    if sampler is not None:
        given["sampler"] = sampler
    given.update(_hires(fields))
    controls = parse_controlnet(fields.get("controlnet"), controlnet_dir, base if base is not None else Path.cwd())
    try:
        settings = GenerationSettings(seed=seed, karras=karras, controls=controls, **given).check()
    except SettingsError as e:
        raise JobError(f"{JOB_FIELD.get(e.field, e.field)} {escape(e.detail, 300)}") from None
    loras = parse_loras(fields.get("loras"), lora_dir, base if base is not None else Path.cwd())
    return Job(line=line, id=job_id, settings=settings, loras=loras)


def _hires(fields: dict) -> dict:
    """The hires fields of a line as GenerationSettings fields (A1111's "Use same ..." as not given)."""
    out = {k: fields[k] for k in ("enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
                                  "hr_second_pass_steps", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
                                  "hr_checkpoint_name")
           if fields.get(k) is not None}
    checkpoint = out.get("hr_checkpoint_name")
    if isinstance(checkpoint, str) and Path(checkpoint).is_file():  # a file relative to here: absolute for workers
        out["hr_checkpoint_name"] = str(Path(checkpoint).resolve())
    if fields.get("denoising_strength") is not None:
        out["strength"] = fields["denoising_strength"]
    if out.get("hr_scheduler") == "Use same scheduler":
        del out["hr_scheduler"]
    name = fields.get("hr_sampler_name")
    if name is not None and name != "Use same sampler":
        sampler, _karras = parse_sampler({"sampler_name": name})
        out["hr_sampler"] = sampler
    others = [k for k in fields if k in HIRES_FIELDS and k != "enable_hr" and fields[k] is not None]
    if others and not out.get("enable_hr"):
        raise JobError(f"{others[0]} needs enable_hr: true (hires fix)")
    return out


# ------------------------------------------------------------------------------------------------ a file


def read_jobs(lines: Iterable[str | dict], *, lora_dir=None, base=None,
              controlnet_dir=None) -> tuple[list[Job], list[Rejected]]:
    """(jobs in line order, rejected lines). Items are JSON text lines or already-decoded dicts; blank lines
    are skipped (their numbers still count); a later line reusing an id is rejected."""
    lora_dir = Path(lora_dir) if lora_dir is not None else None
    jobs: list[Job] = []
    rejected: list[Rejected] = []
    seen: dict[str, int] = {}
    for number, item in enumerate(lines, start=1):
        if isinstance(item, str):
            if not item.strip():
                continue
            try:
                fields = json.loads(item)
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                rejected.append(Rejected(number, f"invalid JSON: {msg}"))
                continue
        else:
            fields = item
        raw_id = fields.get("id") if isinstance(fields, dict) and isinstance(fields.get("id"), str) else None
        try:
            job = parse_job(fields, number, lora_dir=lora_dir, base=base,
                            controlnet_dir=Path(controlnet_dir) if controlnet_dir is not None else None)
        except JobError as e:
            rejected.append(Rejected(number, str(e), raw_id))
            continue
        if job.id in seen:
            rejected.append(Rejected(number, f"duplicate id {escape(job.id)!r} (first on line {seen[job.id]})",
                                     job.id))
            continue
        seen[job.id] = number
        jobs.append(job)
    return jobs, rejected


def read_jobs_file(path: str | os.PathLike, **kw) -> tuple[list[Job], list[Rejected]]:
    """``read_jobs`` over a file; lines that are not UTF-8 or too long are rejected by number."""
    path = Path(path)
    lines: list[str] = []
    pre: list[Rejected] = []
    with open(path, "rb") as f:
        for number, (raw, whole) in enumerate(bounded_lines(f, MAX_LINE_BYTES), start=1):
            bad = None if whole else "line is longer than 1 MiB"
            text = ""
            if whole:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad = "not UTF-8 text"
            if bad:
                pre.append(Rejected(number, bad))
            lines.append(text)
    jobs, rejected = read_jobs(lines, **kw)
    return jobs, sorted(pre + rejected, key=lambda r: r.line)


def bounded_lines(f, limit: int, block: int = 1 << 16):
    """(line bytes, True) for each line of binary file ``f``, or (b"", False) for a line over ``limit`` bytes,
    which is skipped in blocks without being held: a 400 MB line costs ``block`` bytes of memory, not 400 MB."""
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit:
            yield raw, True
            continue
        while not raw.endswith(b"\n"):  # the rest of the long line
            raw = f.readline(block)
            if not raw:
                break
        yield b"", False


__all__ = ["Job", "JobError", "Rejected", "escape", "parse_job", "read_jobs", "read_jobs_file", "seed_from_id"]
