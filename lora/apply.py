"""LoRA applied in place: ``LoraState(model).apply([LoraSpec(path, te, unet), ...])``.

A captured CUDA graph reads the parameters' memory, so a switch never reassigns a Parameter: it copies the
pristine weight back and adds the new deltas into the same storage (``copy_``). A pristine copy of each touched
weight is kept (on the CPU by default) while it is changed; ``ApplyReport.pristine_bytes`` reports it.

All-or-nothing: every file is read and every delta computed (float32, on ``delta_device``) before any weight
is touched, so a failed apply (bad file, another family, unsupported module) leaves the weights exactly as they
were, previous LoRAs included. Each weight is summed in float32 (pristine + delta of LoRA 1 + delta of LoRA 2,
webui's order) and rounded to the weight's dtype once.

OpenCLIP towers (SD2, SDXL's second): the q / k / v deltas go into their thirds of ``in_proj_weight`` (webui's
``torch.vstack``), out_proj gets its own. webui changes ``in_proj_weight`` only when a layer has all of q, k, v
and out_proj (kohya's files always do); here each part applies on its own, which is webui's result whenever
webui applies them.

Also here: ``<lora:name:w>`` prompt tags (webui's ``extra_networks.parse_prompt`` + ``ExtraNetworkLora``),
``find_lora`` (the file stem in ``--lora-dir``), ``--lora FILE:W`` arguments, and the ``lora`` parity group.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from tritonsd.formats.lora_file import LoraError, LoraFile, lora_hashes_value, read_lora, safe_text, short_hash
from tritonsd.lora.keys import LayerIndex, Target, lora_family_hint, model_family
from tritonsd.lora.deltas import LoraShapeError, module_delta


class LoraWarning(UserWarning):
    """LoRA modules that matched no weight of the model (they are skipped, and counted)."""


MAX_MULTIPLIER = 100.0  # |multiplier| of a LoRA (webui's sliders stop at 2; 1e38 overflowed every weight)
MAX_WEIGHT = 65504.0  # a changed weight past half precision's largest number is refused (alpha or multiplier
# far too large): it would only turn the image into NaN after the whole sampling loop


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and the text-encoder / U-Net multipliers."""

    path: Path
    te_multiplier: float = 1.0
    unet_multiplier: float | None = None  # None: the te multiplier (``<lora:name:w>`` sets both)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.unet_multiplier is None:
            object.__setattr__(self, "unet_multiplier", self.te_multiplier)
        for what in ("te_multiplier", "unet_multiplier"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraError(f"{safe_text(self.path.name)}: {what} must be a finite number, got {value!r}")
            if abs(value) > MAX_MULTIPLIER:
                raise LoraError(f"{safe_text(self.path.name)}: {what} {value:g} is outside -{MAX_MULTIPLIER:g}.."
                                f"{MAX_MULTIPLIER:g}")


@dataclass
class Delta:
    """The float32 change of one weight by one LoRA module (``rows``: part of an OpenCLIP in_proj_weight)."""

    target: Target
    value: torch.Tensor | None  # None once summed into its weight (memory released)
    source: str = ""  # the LoRA file's name, for messages


@dataclass
class LoraDeltas:
    """Every delta of one LoRA for one model, and what did not match."""

    name: str
    deltas: list[Delta]
    unmatched: list[str] = field(default_factory=list)  # module names (untrusted text)

    @property
    def matched(self) -> int:
        return len(self.deltas)


@dataclass
class ApplyReport:
    """What an ``apply`` did: per-LoRA matched / unmatched module counts, the weights changed, the bytes of the
    pristine copies held, warnings (one per LoRA with unmatched modules) and the ``Lora hashes`` value."""

    loras: list[dict]
    weights_changed: int
    pristine_bytes: int
    warnings: list[str]
    lora_hashes: str = ""


# ---------------------------------------------------------------- deltas


def lora_deltas(lora: LoraFile, shapes: Mapping[str, Sequence[int]], te_multiplier: float,
                unet_multiplier: float, device: torch.device | str | None = None) -> LoraDeltas:
    """The deltas of ``lora`` for a model whose weights have ``shapes`` (our keys: ``model.named_parameters()``
    or a normalised checkpoint). ``LoraError`` when the file is for another family or a module cannot apply."""
    index = LayerIndex.of(shapes)
    family = model_family(shapes)
    hint = lora_family_hint(lora.modules)
    if hint is not None and (hint == "sdxl") != (family == "sdxl"):
        raise LoraError(f"{safe_text(lora.path.name)}: this LoRA is for {'SDXL' if hint == 'sdxl' else 'SD 1.x / 2.x'}"
                        f" (its text-encoder modules), the model is {family.upper()}")
    out = LoraDeltas(lora.name, [])
    for module, parts in lora.modules.items():
        target = index.resolve(module)
        if target is None:
            out.unmatched.append(module)
            continue
        shape = tuple(shapes[target.param])
        if target.rows is not None:
            shape = (shape[0] // target.rows[1], *shape[1:])
        if len(shape) not in (2, 4):
            raise LoraError(f"{safe_text(lora.path.name)}: module {safe_text(module)} targets {target.param}, "
                            f"a {len(shape)}-D weight LoRA cannot change")
        multiplier = te_multiplier if target.is_text else unet_multiplier
        try:
            value = module_delta(parts, shape, multiplier, device)
        except LoraShapeError as e:
            raise LoraError(f"{safe_text(lora.path.name)}: module {safe_text(module)} ({target.param}): {e}; "
                            "a LoRA for another model?") from None
        except LoraError as e:
            raise LoraError(f"{safe_text(lora.path.name)}: module {safe_text(module)}: {e}") from None
        out.deltas.append(Delta(target, value, lora.path.name))
    if not out.deltas:
        raise LoraError(f"{safe_text(lora.path.name)}: none of its {len(lora.modules)} modules matches a weight of "
                        f"this {family.upper()} model (a LoRA for another model family?)")
    return out


def merged_weight(pristine: torch.Tensor, deltas: Iterable[Delta]) -> torch.Tensor:
    """``pristine`` + each delta in order, summed in float32 (on the deltas' device), rounded to
    ``pristine``'s dtype once."""
    deltas = list(deltas)
    device = deltas[0].value.device if deltas else pristine.device
    acc = pristine.to(device=device, dtype=torch.float32, copy=True)
    for d in deltas:
        if d.target.rows is None:
            acc += d.value
        else:
            index, parts = d.target.rows
            n = acc.shape[0] // parts
            acc[index * n:(index + 1) * n] += d.value  # q / k / v rows of in_proj_weight
    return acc.to(pristine.dtype)


def merge_all(grouped: dict[str, list[Delta]], pristine_of) -> dict[str, torch.Tensor]:
    """``merged_weight`` of every weight in ``grouped`` (emptied as it goes: each delta's memory is released
    once its weight is summed, so the peak stays near the deltas' own size)."""
    out = {}
    for name in list(grouped):
        deltas = grouped.pop(name)
        out[name] = merged_weight(pristine_of(name), deltas)
        for d in deltas:
            d.value = None
        _check_merged(name, out[name], [d.source for d in deltas])
    return out


def _check_merged(name: str, weight: torch.Tensor, sources: list[str]) -> None:
    """LoraError when a changed weight is not finite or past MAX_WEIGHT (checked before anything is changed)."""
    peak = weight.detach().abs().amax().item() if weight.numel() else 0.0
    if not peak <= MAX_WEIGHT:
        files = ", ".join(safe_text(s) for s in dict.fromkeys(sources) if s) or "the LoRAs"
        raise LoraError(f"{files}: changes weight {name} to {peak:.3g}, beyond {MAX_WEIGHT:g}: a multiplier, alpha "
                        "or scale far too large")


def deltas_by_weight(all_deltas: Iterable[LoraDeltas]) -> dict[str, list[Delta]]:
    """Our weight key -> its deltas, LoRA by LoRA in the order given (webui adds them one after the other)."""
    out: dict[str, list[Delta]] = {}
    for lora in all_deltas:
        for d in lora.deltas:
            out.setdefault(d.target.param, []).append(d)
    return out


def unmatched_warning(lora: LoraDeltas) -> str | None:
    if not lora.unmatched:
        return None
    examples = ", ".join(safe_text(m, 60) for m in lora.unmatched[:3])
    return (f"LoRA {safe_text(lora.name)}: {len(lora.unmatched)} of {len(lora.unmatched) + lora.matched} modules "
            f"match no weight of this model and are skipped (e.g. {examples})")


def read_and_compute(specs: Sequence[LoraSpec], shapes: Mapping[str, Sequence[int]],
                     device=None) -> tuple[list[LoraFile], list[LoraDeltas]]:
    """Read every file and compute every delta (nothing is changed; any error is raised before)."""
    files = [read_lora(s.path) for s in specs]
    deltas = [lora_deltas(f, shapes, s.te_multiplier, s.unet_multiplier, device) for f, s in zip(files, specs)]
    return files, deltas


# ---------------------------------------------------------------- in-place state


class LoraState:
    """The LoRAs applied in place to one model's weights (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, pristine_device: torch.device | str = "cpu",
                 delta_device: torch.device | str | None = None):
        self.model = model
        self.params = dict(model.named_parameters())
        self.shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        self.pristine_device = torch.device(pristine_device)
        self.delta_device = delta_device  # None: where the weights are, at each apply
        self.pristine: dict[str, torch.Tensor] = {}
        self.applied: list[LoraSpec] = []
        self._last: tuple | None = None  # (file signatures, report) of the applied set

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pristine.values())

    def apply(self, specs: Sequence[LoraSpec]) -> ApplyReport:
        """Replace the applied LoRAs by ``specs`` (empty: ``clear``). On error nothing has changed. The same
        specs again, with their files unchanged (size, mtime), is a no-op returning the same report."""
        specs = list(specs)
        signature = (specs, [_file_signature(s.path) for s in specs])
        if self._last is not None and self._last[0] == signature:
            return self._last[1]
        device = self.delta_device or next(iter(self.params.values())).device
        files, all_deltas = read_and_compute(specs, self.shapes, device)
        hashes = [(f.name, short_hash(f.path)) for f in files]
        grouped = deltas_by_weight(all_deltas)
        new_values = merge_all(grouped, self._pristine_of)
        # ---- nothing below can fail on bad input: same shapes and dtypes, copies only
        with torch.no_grad():
            for name in [n for n in self.pristine if n not in new_values]:
                self.params[name].copy_(self.pristine.pop(name))
            for name, value in new_values.items():
                if name not in self.pristine:
                    # same strides as the parameter (the convolutions' kernel layout): restoring is a plain copy
                    self.pristine[name] = self.params[name].detach().to(self.pristine_device, copy=True,
                                                                        memory_format=torch.preserve_format)
                self.params[name].copy_(value)
        self.applied = specs
        report = self._report(files, specs, all_deltas, hashes, len(new_values))
        self._last = (signature, report)
        return report

    def clear(self) -> None:
        """Copy every pristine weight back (bit-exact) and drop the copies."""
        with torch.no_grad():
            for name, value in self.pristine.items():
                self.params[name].copy_(value)
        self.pristine.clear()
        self.applied = []
        self._last = None

    def _pristine_of(self, name: str) -> torch.Tensor:
        return self.pristine[name] if name in self.pristine else self.params[name].detach()

    def _report(self, files, specs, all_deltas, hashes, changed: int) -> ApplyReport:
        messages = [m for m in map(unmatched_warning, all_deltas) if m]
        for m in messages:
            warnings.warn(m, LoraWarning, stacklevel=3)
        loras = [{"name": d.name, "path": str(f.path), "te": s.te_multiplier, "unet": s.unet_multiplier,
                  "matched": d.matched, "unmatched": len(d.unmatched), "hash": h}
                 for f, s, d, (_, h) in zip(files, specs, all_deltas, hashes)]
        return ApplyReport(loras, changed, self.pristine_bytes, messages,
                           lora_hashes_value(hashes) if hashes else "")


def _file_signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


# ---------------------------------------------------------------- names, prompt tags, arguments

RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # webui's extra_networks.re_extra_net
LORA_TAG_TYPES = ("lora", "lyco")  # webui registers the Lora extension under both


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """``(prompt without its extra-network tags, [(name, te_w, unet_w), ...])`` as webui: every ``<type:...>``
    tag is removed from the text (unknown types with a warning); ``<lora:name>`` is 1.0, ``<lora:name:w>`` sets
    both, ``<lora:name:te:unet>``; ``te=`` / ``unet=`` named items override."""
    found: list[tuple[str, float, float]] = []
    skipped: list[str] = []

    def take(m: re.Match) -> str:
        kind, items = m.group(1), m.group(2).split(":")
        if kind in LORA_TAG_TYPES:
            found.append(_lora_tag(items, m.group(0)))
        else:
            skipped.append(kind)
        return ""

    text = RE_EXTRA_NETWORK.sub(take, prompt)
    for kind in dict.fromkeys(skipped):
        warnings.warn(f"skipping unknown extra network <{safe_text(kind, 40)}:...> in the prompt", LoraWarning,
                      stacklevel=2)
    return text, found


def _lora_tag(items: list[str], tag: str) -> tuple[str, float, float]:
    positional, named = [], {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional:
        raise LoraError(f"{safe_text(tag)}: no LoRA name")
    te = _number(named.get("te", positional[1] if len(positional) > 1 else 1.0), tag)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else te), tag)
    return positional[0], te, unet


def _number(value, tag: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise LoraError(f"{safe_text(tag)}: {safe_text(str(value), 40)!r} is not a number") from None
    if not math.isfinite(x):
        raise LoraError(f"{safe_text(tag)}: the multiplier must be finite")
    if abs(x) > MAX_MULTIPLIER:
        raise LoraError(f"{safe_text(tag)}: the multiplier {x:g} is outside -{MAX_MULTIPLIER:g}..{MAX_MULTIPLIER:g}")
    return x


def lora_files(lora_dir: str | Path) -> dict[str, list[Path]]:
    """Every ``.safetensors`` regular file under ``lora_dir`` (subfolders and linked folders included), by file
    stem: what ``<lora:stem>`` can name. The one walk that both lookups (``find_lora``) and the server's listing
    (``lora_names``) use, so they agree."""
    out: dict[str, list[Path]] = {}
    for root, _dirs, files in os.walk(lora_dir, followlinks=True):
        for fn in files:
            p = Path(root) / fn
            if p.suffix.lower() == ".safetensors" and p.is_file():
                out.setdefault(p.stem, []).append(p)
    return {name: sorted(paths) for name, paths in sorted(out.items())}


def lora_names(lora_dir: str | Path) -> dict[str, Path]:
    """The names ``<lora:name>`` resolves to exactly one file (an ambiguous name is an error there)."""
    return {name: paths[0] for name, paths in lora_files(lora_dir).items() if len(paths) == 1}


def find_lora(name: str, lora_dir: str | Path) -> Path:
    """The ``.safetensors`` file under ``lora_dir`` (subfolders included) whose stem is ``name``."""
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise LoraError(f"LoRA folder {safe_text(str(lora_dir))} does not exist")
    hits = lora_files(lora_dir).get(name, [])
    if not hits:
        raise LoraError(f"unknown LoRA <lora:{safe_text(name, 60)}>: no {safe_text(name, 60)}.safetensors in "
                        f"{safe_text(str(lora_dir))}")
    if len(hits) > 1:
        examples = ", ".join(safe_text(str(h.relative_to(lora_dir)), 60) for h in hits[:3])
        raise LoraError(f"LoRA name {safe_text(name, 60)} is ambiguous: {len(hits)} files in "
                        f"{safe_text(str(lora_dir))} ({examples})")
    return hits[0]


def parse_lora_arg(text: str) -> LoraSpec:
    """``FILE``, ``FILE:W`` or ``FILE:TE_W:UNET_W`` (numbers taken from the right, so FILE may hold ':')."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2 and _is_number(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    path = ":".join(parts)
    if not path:
        raise LoraError(f"--lora {safe_text(text)!r}: expected FILE, FILE:W or FILE:TE_W:UNET_W")
    if any(not math.isfinite(x) for x in numbers):
        raise LoraError(f"--lora {safe_text(text)!r}: multipliers must be finite")
    if not numbers:
        return LoraSpec(Path(path), 1.0)
    return LoraSpec(Path(path), numbers[0], numbers[-1])


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- parity: the "lora" reference group


def recompute_lora_reference(model: torch.nn.Module, ref_tensors: Mapping[str, torch.Tensor], meta: dict,
                             lora_path: str | Path) -> dict[str, torch.Tensor]:
    """The ``merged.<key>`` tensors of a LoRA reference, recomputed without changing ``model``: its weights plus
    the deltas of the LoRA file(s) of ``meta["lora_files"]`` at their multipliers. ``lora_path``: the LoRA file
    (one-file references) or the folder holding the listed files."""
    lora_path = Path(lora_path)
    entries = meta.get("lora_files") or [{"file": lora_path.name}]
    specs = []
    for e in entries:
        path = lora_path / e["file"] if lora_path.is_dir() else lora_path
        te = float(e.get("te_multiplier", e.get("multiplier", 1.0)))
        specs.append(LoraSpec(path, te, float(e.get("unet_multiplier", te))))
    params = dict(model.named_parameters())
    _, all_deltas = read_and_compute(specs, {k: tuple(v.shape) for k, v in params.items()})
    merged = merge_all(deltas_by_weight(all_deltas), lambda key: params[key].detach())
    out = {}
    for name in ref_tensors:
        key = name[len("merged."):]
        if name.startswith("merged.") and key in params:
            out[name] = merged.get(key, params[key].detach()).float().cpu()
    return out
