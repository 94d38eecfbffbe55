"""What a PNG needs to reproduce itself: the LoRAs and embeddings its infotext names.

AUTOMATIC1111 records every LoRA as a ``<lora:name:weight>`` tag in the prompt plus ``Lora hashes``, and every
embedding in ``TI hashes``. ``lora_tag`` writes the tag of a LoRA applied outside the prompt (``--lora FILE:W``,
``set_loras``, batch's ``loras``), so that the recorded prompt brings it back; ``missing_networks`` names, by
name and hash, the LoRAs and embeddings an infotext uses that the given folders do not hold, so that a rerun
never silently renders without them.
"""

from __future__ import annotations

import os
from pathlib import Path

from tritonsd.escape import escape
from tritonsd.formats.embeddings import EMBEDDING_SUFFIXES
from tritonsd.lora.apply import LoraSpec, parse_lora_tags


class MissingNetworkError(ValueError):
    """An infotext names a LoRA or an embedding that is not available (one line, by name and hash)."""


def _weight(w: float) -> str:
    return f"{w:g}"


def lora_tag(spec: LoraSpec) -> str:
    """``<lora:name:w>`` (or ``<lora:name:te_w:unet_w>`` when the two differ) for a LoRA file, as A1111 writes the
    tag: the name is the file's stem, which is how ``<lora:...>`` finds it in a LoRA folder."""
    weights = [spec.te_multiplier] if spec.unet_multiplier == spec.te_multiplier else \
        [spec.te_multiplier, spec.unet_multiplier]
    return f"<lora:{spec.path.stem}:{':'.join(_weight(w) for w in weights)}>"


def with_lora_tags(prompt: str, specs: list[LoraSpec]) -> str:
    """``prompt`` with the tag of each LoRA in ``specs`` appended (those it does not already name)."""
    named = {name for name, _te, _unet in parse_lora_tags(prompt)[1]}
    tags = [lora_tag(s) for s in specs if s.path.stem not in named]
    return " ".join([prompt, *tags]) if tags and prompt else " ".join(tags) or prompt


def _named_hashes(value: str | None) -> dict[str, str]:
    """``"a: 123, b: 456"`` (Lora hashes, TI hashes) -> {"a": "123", "b": "456"}."""
    out = {}
    for part in (value or "").split(","):
        name, sep, h = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


def _has_file(folder: Path | None, stem: str, suffixes: tuple[str, ...]) -> bool:
    if folder is None or not folder.is_dir():
        return False
    return any(p.stem == stem and p.suffix.lower() in suffixes for p in folder.rglob("*"))


def missing_networks(raw: dict[str, str], lora_dir: str | os.PathLike | None,
                     embeddings_dir: str | os.PathLike | None) -> list[str]:
    """One phrase per LoRA (a ``<lora:...>`` tag of the prompts) or embedding (``TI hashes``) of the parsed
    infotext ``raw`` that ``lora_dir`` / ``embeddings_dir`` do not hold, with its recorded hash."""
    lora_dir = Path(lora_dir) if lora_dir is not None else None
    embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
    lora_hashes = _named_hashes(raw.get("Lora hashes"))
    missing = []
    names = [n for text in (raw.get("Prompt", ""), raw.get("Negative prompt", "")) for n, *_ in parse_lora_tags(text)[1]]
    for name in dict.fromkeys(names):
        if not _has_file(lora_dir, name, (".safetensors",)):
            h = lora_hashes.get(name.replace(":", "").replace(",", ""))
            where = f"in {escape(str(lora_dir), 100)}" if lora_dir is not None else "(no LoRA folder given)"
            missing.append(f"LoRA {escape(name, 60)}" + (f" (hash {escape(h, 20)})" if h else "") + f" {where}")
    for name, h in _named_hashes(raw.get("TI hashes")).items():
        if not _has_file(embeddings_dir, name, EMBEDDING_SUFFIXES):
            where = (f"in {escape(str(embeddings_dir), 100)}" if embeddings_dir is not None
                     else "(no embeddings folder given)")
            missing.append(f"embedding {escape(name, 60)} (hash {escape(h, 20)}) {where}")
    return missing


def check_networks(raw: dict[str, str], lora_dir, embeddings_dir, lora_flag: str = "lora_dir",
                   embeddings_flag: str = "embeddings_dir") -> None:
    """``MissingNetworkError`` (one line) when ``missing_networks`` finds any."""
    missing = missing_networks(raw, lora_dir, embeddings_dir)
    if missing:
        raise MissingNetworkError(f"the infotext uses what is not found, so the image would differ: "
                                  f"{'; '.join(missing)} (give {lora_flag} / {embeddings_flag})")
