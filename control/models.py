"""ControlNet files by name, as the AUTOMATIC1111 extension lists and finds them (``scripts/global_state.py``).

* A folder (``--controlnet-dir``) is listed recursively: files ending in .pt, .pth, .ckpt, .safetensors or .bin,
  sorted by file name, each titled ``name [hash]`` (``name``: the file name without its extension; a file named
  ``None`` is left out). The hash is webui's OLD model hash, ``sd_models.model_hash``, which the extension calls:
  the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (not the short sha256 of the whole file that
  checkpoints get in the infotext).
* A unit's ``model`` is found as the extension's ``find_closest_lora_model_name``: the exact title, else the name
  in any case, else the shortest name that contains the text; a title whose hash no longer matches (the file
  changed) is found by its name.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

from tritonsd.escape import escape
from tritonsd.sampler.control import ControlUnitError

MODEL_EXTENSIONS = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
_OFFSET, _LENGTH = 0x100000, 0x10000
_hashes: dict[tuple, str] = {}


def model_hash(path: str | os.PathLike) -> str:
    """webui's ``sd_models.model_hash``: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits ("NOFILE" if missing)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "NOFILE"
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        with open(path, "rb") as f:
            f.seek(_OFFSET)
            _hashes[key] = hashlib.sha256(f.read(_LENGTH)).hexdigest()[0:8]
    return _hashes[key]


def title(path: str | os.PathLike) -> str:
    """``name [hash]`` of a ControlNet file, as the extension lists it."""
    return f"{Path(path).stem} [{model_hash(path)}]"


def list_models(directory: str | os.PathLike | None) -> dict[str, Path]:
    """{``name [hash]``: path} of the folder's ControlNet files, in the extension's order ("None" not included)."""
    if directory is None or not os.path.isdir(directory):
        return {}
    files = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        dirs.sort()
        files += [Path(root) / n for n in names if os.path.splitext(n)[1] in MODEL_EXTENSIONS]
    files.sort(key=lambda p: p.name)
    return {title(p): p for p in files if p.stem != "None" and p.is_file()}


def find_model(name: str, directory: str | os.PathLike | None) -> Path:
    """The file a unit's ``model`` names in ``directory`` (the extension's lookup), or a one-line error."""
    models = list_models(directory)
    if name in models:
        return models[name]
    by_name = {p.stem.lower(): p for p in reversed(list(models.values()))}
    wanted = name.lower()
    if wanted in by_name:
        return by_name[wanted]
    stem = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
    if stem in by_name:  # a title whose file changed since (another hash): the name still finds it
        return by_name[stem]
    close = sorted((n for n in by_name if wanted in n), key=len)
    if close:
        return by_name[close[0]]
    where = "no --controlnet-dir was given" if directory is None else f"{len(models)} in {escape(str(directory))}"
    raise ControlUnitError(f"unknown ControlNet model {escape(name, 80)!r} ({where})")


def resolve_units(units, directory: str | os.PathLike | None, allow_paths: bool = True) -> tuple:
    """The units with each ``model`` given by name turned into its file's path. ``allow_paths``: a ``model`` that
    is an existing file (or a diffusers folder) is used as it is (the command line, Python); the server names
    models only."""
    out = []
    for i, unit in enumerate(units):
        model = unit.model
        if isinstance(model, (str, os.PathLike)):
            if allow_paths and (os.path.isfile(model) or os.path.isdir(model)):
                model = Path(model)
            else:
                try:
                    model = find_model(str(model), directory)
                except ControlUnitError as e:
                    raise ControlUnitError(f"unit {i}: {e}") from None
        out.append(unit if model is unit.model else replace(unit, model=model))
    return tuple(out)


def model_title(model) -> str:
    """What the infotext's ``Model:`` says of a unit's model: ``name [hash]`` of a file, a loaded ControlNet's
    ``title`` (or its file's, ``path``), else the text given."""
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        return title(model)
    for attr in ("title", "path"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and attr == "title":
            return value
        if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
            return title(value)
    return str(model)


def attach_images(units, images) -> tuple:
    """An infotext's units (which carry no image: a PNG does not hold its control images) with ``images`` in
    order, one per unit (None: the unit uses the init image)."""
    images = list(images or ())
    if len(images) != len(units):
        raise ControlUnitError(f"the infotext has {len(units)} ControlNet unit(s) but {len(images)} control image(s) "
                               "were given: the PNG does not hold its control images, give one per unit, in order "
                               "(--control-image / control_images=[...])")
    return tuple(replace(u, image=im) for u, im in zip(units, images))
