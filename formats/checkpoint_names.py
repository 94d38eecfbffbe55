"""AUTOMATIC1111's names for checkpoint files and its lookup by them (v1.10.1 ``modules/sd_models.py``:
``CheckpointInfo`` and ``get_closet_checkpoint_match``), for hires fix's ``hr_checkpoint_name`` and the infotext's
``Hires checkpoint: name [hash]``.

A file ``DIR/sub/model.safetensors`` of the models folder DIR has the names ``sub/model.safetensors`` (``name``),
``model`` (``name_for_extra``), ``sub_model`` (``model_name``), ``sub/model.safetensors [0123456789]`` (``title``,
with the first 10 hex digits of its sha256) and ``model [0123456789]`` (``short_title``, what the infotext
writes). A lookup takes, in webui's order: one of those names exactly (or a short or full sha256), else the
shortest title containing the text, else the same with a trailing ``[checksum]`` stripped from the text (the
checksum is not checked, as there). Here also an existing file path is taken as it is. The sha256 comes from the
on-disk hash cache (``hashes.cached_sha256``): a lookup hashes a file only when the text needs its hash (a title
or a hash), and the short title hashes the one file it names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tritonsd.escape import escape
from tritonsd.formats.hashes import cached_sha256

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
USE_SAME = "Use same checkpoint"  # webui's "no other checkpoint" (its UI's default, and the infotext's absence)
_STRIP_CHECKSUM = re.compile(r"\s*\[[^]]+]\s*$")  # webui's re_strip_checksum
_HEX = re.compile(r"[0-9a-f]{10}|[0-9a-f]{64}")


class CheckpointNotFound(ValueError):
    """No checkpoint of the folder answers to the name (one line)."""


def short_title(path: str | os.PathLike) -> str:
    """``name_for_extra [shorthash]``: the file's stem and the first 10 hex digits of its sha256."""
    return f"{Path(path).stem} [{cached_sha256(path)[:10]}]"


def checkpoint_files(folder: str | os.PathLike | None) -> list[Path]:
    """Every ``.safetensors`` / ``.ckpt`` file under ``folder`` (subfolders included), sorted; none for None."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        found.extend(Path(root) / f for f in files if Path(f).suffix.lower() in CHECKPOINT_SUFFIXES)
    return sorted(p for p in found if p.is_file())


def _names(path: Path, folder: Path) -> set[str]:
    """The hash-free names of ``path``: name, name without its suffix, name_for_extra, model_name."""
    name = path.relative_to(folder).as_posix()
    stem = os.path.splitext(name)[0]
    return {name, stem, path.stem, stem.replace("/", "_")}


def _title(path: Path, folder: Path) -> str:
    return f"{path.relative_to(folder).as_posix()} [{cached_sha256(path)[:10]}]"


def find_checkpoint(text: str, folder: str | os.PathLike | None) -> Path:
    """The checkpoint ``text`` names: an existing checkpoint file's path, or a file of ``folder`` by webui's
    lookup (see the module docstring). ``CheckpointNotFound`` otherwise."""
    wanted = text.strip() if isinstance(text, str) else ""
    if not wanted:
        raise CheckpointNotFound("the hires checkpoint's name is empty")
    direct = Path(wanted)
    if direct.suffix.lower() in CHECKPOINT_SUFFIXES and direct.is_file():
        return direct.resolve()
    root = Path(folder) if folder is not None else None
    files = checkpoint_files(root)
    found = _lookup(wanted, files, root) if files else None
    if found is None:
        where = f"in {escape(str(root))}" if root is not None else "(no models folder given)"
        raise CheckpointNotFound(f"checkpoint '{escape(wanted, 120)}' not found {where}")
    return found.resolve()


def _lookup(wanted: str, files: list[Path], root: Path) -> Path | None:
    for p in files:  # the aliases that need no hash
        if wanted in _names(p, root):
            return p
    if _HEX.fullmatch(wanted):  # a short or full sha256
        for p in files:
            if cached_sha256(p).startswith(wanted):
                return p
    stripped = _STRIP_CHECKSUM.sub("", wanted)
    if stripped != wanted:  # "name [hash]": the title or short title, exactly
        for p in files:
            if stripped in _names(p, root) and wanted in (_title(p, root), short_title(p)):
                return p
    for text in dict.fromkeys((wanted, stripped)):  # the shortest title containing it
        hits = [p for p in files if text in _title(p, root)] if _STRIP_CHECKSUM.search(text) else \
            [p for p in files if text in p.relative_to(root).as_posix()]
        if hits:
            return min(hits, key=lambda p: len(p.relative_to(root).as_posix()))
    return None
