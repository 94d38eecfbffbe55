"""Recomputing the AUTOMATIC1111 reference files (``shared/fixtures/README-prompts-lora.md``) for ``tritonsd parity``.

Five kinds, told apart by what the reference JSON holds (never by the file's name):

* ``prompts``: ``cases`` of prompts (``prompts-*``): each case's conditioning(s), from its prompts, clip skip and
  (SDXL) size through A1111's batched encoding (``model/prompt_encode.py``);
* ``ti``: the same with textual-inversion embeddings (``embeddings_loaded``; ``ti-*``), read from the folder(s)
  the JSON registered, beside the reference file (or ``--embeddings-dir``);
* ``rng``: A1111's NV noise (``opts.randn_source``; ``rng-philox``), no model needed;
* ``unet_sizes``: UNet calls whose ``cases`` give latent sizes (``latent_hw``; ``unet-odd-sizes-*``): the inputs
  ``CASE.{x,t,context[,y]}`` are stored, ``CASE.out`` is recomputed;
* ``lora``: merged weights (``lora_files``; ``lora-*``) from the LoRA files beside the reference;
* ``hires`` / ``img2img``: webui's txt2img with hires fix and its img2img (``cases`` of that ``kind``; ``hires-*``,
  ``img2img-*``), each case run through the Pipeline's stages (``testing/a1111_hires.py``);
* ``controlnet``: the ControlNet references (a ``controlnet_file``; ``controlnet-*``, ``webui-controlnet-*``),
  recomputed by ``testing/controlnet.py``.

Case-based kinds group tensors by case name (the JSON's per-tensor ``case``); the others by name prefix. The
Pipeline does not yet take clip skip or embeddings, so prompts are encoded with the model-level
``encode_prompts`` the Pipeline is being wired to.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from tritonsd.testing import a1111_hires as H
from tritonsd.testing import controlnet as CN
from tritonsd.testing.reference import GroupError
from tritonsd.prompt.encode import encode_prompts, load_model_embeddings
from tritonsd.formats.embeddings import embedding_files, EmbeddingError, load_embedding_file, printable
from tritonsd.lora.apply import recompute_lora_reference
from tritonsd.sampler.rng import create_generator, ImageRNG, PhiloxGenerator

NV_BOUND = 1e-6  # issue 13: every NV noise tensor within 1e-6
LORA_BOUND = 1e-5  # issue 14: every merged weight within 1e-5
CASE_KINDS = ("prompts", "ti", "unet_sizes", "hires", "img2img")
UNET_INPUTS = ("x", "t", "context", "y")


class A1111GroupError(GroupError):
    """A group of an A1111 reference cannot be recomputed from what the file and its JSON hold."""


# ---------------------------------------------------------------- what the reference is


def reference_kind(meta: dict) -> str | None:
    """"prompts" | "ti" | "rng" | "unet_sizes" | "lora" from the JSON's fields, or None (an original-code
    reference, handled by ``testing/groups.py``)."""
    if not isinstance(meta, dict):
        return None
    if CN.is_reference(meta):  # the ControlNet references (testing/controlnet.py)
        return CN.KIND
    if meta.get("lora_files"):
        return "lora"
    cases = meta.get("cases")
    if isinstance(cases, list) and cases and all(isinstance(c, dict) for c in cases):
        hires_kind = H.kind_of(cases)  # their opts name a randn_source too: before the NV noise references
        if hires_kind is not None:
            return hires_kind
    opts = meta.get("opts")
    if isinstance(opts, dict) and "randn_source" in opts:
        return "rng"
    cases = meta.get("cases")
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) for c in cases):
        return None
    if "embeddings_loaded" in meta or "embedding_dirs_registered" in meta:
        return "ti"
    if all("latent_hw" in c for c in cases):
        return "unet_sizes"
    if all("prompts" in c for c in cases):
        return "prompts"
    return None


def needs_model(kind: str | None) -> bool:
    return kind != "rng"


def uses_text_towers(kind: str | None) -> bool:
    return kind in ("prompts", "ti", "hires", "img2img", CN.KIND)


def _case_names(meta: dict) -> list[str]:
    return [str(c["name"]) for c in meta.get("cases", []) if isinstance(c, dict) and "name" in c]


def case_of(name: str, meta: dict) -> str | None:
    """The case a tensor belongs to: the JSON's per-tensor ``case``, else the case listing it, else the longest
    case name that prefixes it."""
    entry = meta.get("tensors", {}).get(name, {})
    if isinstance(entry, dict) and entry.get("case") is not None:
        return str(entry["case"])
    for case in meta.get("cases", []):
        listed = [case.get("tensor")] + list(case.get("tensors") or [])
        if name in listed:
            return str(case.get("name"))
    prefixes = [c for c in _case_names(meta) if name.startswith(c + ".")]
    return max(prefixes, key=len) if prefixes else None


def group_of(name: str, meta: dict, kind: str) -> str:
    if kind in CASE_KINDS:
        case = case_of(name, meta)
        if case is not None:
            return case
    return name.split(".", 1)[0]


def is_input(name: str, meta: dict, kind: str) -> bool:
    """The UNet references store inputs (``CASE.x`` / ``.t`` / ``.context`` / ``.y``), img2img its init image and
    the posterior noise webui drew from its global generator."""
    if kind in ("hires", "img2img"):
        return H.is_input(name)
    if kind == CN.KIND:
        return CN.is_input(name, meta)
    if kind != "unet_sizes":
        return False
    case = case_of(name, meta)
    return case is not None and name[len(case) + 1:] in UNET_INPUTS and name.startswith(case + ".")


def bound_for(kind: str | None, default: float, name: str = "") -> float:
    """The bound of tensor ``name``: relative error for float tensors (0: exactly), levels for 8-bit ones."""
    if kind in ("hires", "img2img"):
        return H.bound_for(name)
    if kind == CN.KIND:
        return CN.bound_for(name, default)
    return {"rng": NV_BOUND, "lora": LORA_BOUND}.get(kind, default)


def ulps_for(kind: str | None, name: str) -> int:
    """Elementwise units in the last place tensor ``name`` may differ by (0: compared by ``bound_for``)."""
    return H.ulps_for(name) if kind in ("hires", "img2img") else 0


# ---------------------------------------------------------------- does it fit the checkpoint


def misfit(kind: str, model, ref: dict[str, torch.Tensor], meta: dict) -> str | None:
    """Why the reference cannot belong to ``model`` (one line), or None."""
    cfg = model.config
    sdxl = cfg.family == "sdxl"
    if kind == CN.KIND:
        return CN.misfit(model, ref, meta)
    if kind in ("prompts", "ti"):
        ref_sdxl = any(k.endswith((".crossattn", ".vector")) for k in ref)
        if ref_sdxl != sdxl:
            return (f"it holds {'SDXL' if ref_sdxl else 'SD 1.x/2.x'} conditionings, the checkpoint is "
                    f"{'SDXL' if sdxl else 'SD 1.x/2.x'}")
        for name, t in ref.items():
            if not name.endswith(".vector") and t.dim() == 3 and t.shape[-1] != cfg.unet.context_dim:
                return (f"{_safe(name)} is {t.shape[-1]} wide, the checkpoint's context width is "
                        f"{cfg.unet.context_dim}")
    if kind == "unet_sizes":
        for name, t in ref.items():
            suffix = name.rsplit(".", 1)[-1]
            if suffix == "x" and (t.dim() != 4 or t.shape[1] != cfg.unet.in_channels):
                return f"{_safe(name)} has shape {list(t.shape)}, the UNet takes {cfg.unet.in_channels} channels"
            if suffix == "context" and t.shape[-1] != cfg.unet.context_dim:
                return (f"{_safe(name)} is {t.shape[-1]} wide, the checkpoint's context width is "
                        f"{cfg.unet.context_dim}")
            if suffix == "y" and (cfg.unet.adm_in_channels is None or t.shape[-1] != cfg.unet.adm_in_channels):
                return (f"{_safe(name)} is a vector condition of width {t.shape[-1]}, the UNet takes "
                        f"{cfg.unet.adm_in_channels or 'none'}")
    if kind in ("hires", "img2img"):
        return H.misfit(model, ref)
    if kind == "lora":
        shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
        merged = [k for k in ref if k.startswith("merged.")]
        foreign = [k for k in merged if shapes.get(k[len("merged."):]) != tuple(ref[k].shape)]
        if foreign:
            return (f"{len(foreign)} of its {len(merged)} merged weights are not weights of this checkpoint "
                    f"with that shape (e.g. {_safe(foreign[0])})")
    return None


# ---------------------------------------------------------------- recomputation


def recompute(ctx, kind: str, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """Everything of ``group`` recomputed (``ctx``: ``testing.groups.Recompute``)."""
    handler = _HANDLERS[kind]
    return handler(ctx, group, keys)


def _case(ctx, group: str) -> dict:
    for case in ctx.meta.get("cases", []):
        if str(case.get("name")) == group:
            return case
    raise A1111GroupError(f"no case {group!r} in the reference JSON's 'cases'")


def _prompts(case: dict) -> list[str]:
    prompts = case.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise A1111GroupError(f"case {case.get('name')!r} gives no prompts")
    out = [p.get("prompt") if isinstance(p, dict) else p for p in prompts]
    if not all(isinstance(p, str) for p in out):
        raise A1111GroupError(f"case {case.get('name')!r}: a prompt is not text")
    return out


def _opts(ctx) -> dict:
    opts = ctx.meta.get("opts")
    return opts if isinstance(opts, dict) else {}


def _emphasis(ctx) -> bool:
    emphasis = _opts(ctx).get("emphasis", "Original")
    if emphasis not in ("Original", "None"):
        raise A1111GroupError(f"emphasis mode {emphasis!r} is not supported (Original and None are)")
    backtrack = _opts(ctx).get("comma_padding_backtrack", 20)
    if backtrack != 20:
        raise A1111GroupError(f"comma_padding_backtrack {backtrack!r} is not supported (A1111's default 20 is)")
    return emphasis == "Original"


def _clip_skip(ctx, case: dict) -> int:
    """The case's ``clip_skip``, else ``opts.CLIP_stop_at_last_layers`` when it is a number, else 1. SDXL's
    CLIP-L ignores it unless ``opts.sdxl_clip_l_skip``, as A1111."""
    value = case.get("clip_skip", _opts(ctx).get("CLIP_stop_at_last_layers", 1))
    skip = value if isinstance(value, int) and not isinstance(value, bool) else 1
    if ctx.config.family == "sdxl" and skip != 1:
        if _opts(ctx).get("sdxl_clip_l_skip"):
            raise A1111GroupError("clip skip on SDXL's CLIP-L (opts.sdxl_clip_l_skip) is not supported")
        skip = 1
    return skip


def _sdxl_size(ctx, case: dict) -> dict:
    """``encode_prompts`` keywords for SDXL: width / height (A1111 falls back to 1024 x 1024 when the prompts come
    without a size), the crop, and whether it is a negative prompt; ``sdxl_conds`` must agree with them."""
    conds = case.get("sdxl_conds") if isinstance(case.get("sdxl_conds"), dict) else {}
    height, width = case.get("height"), case.get("width")
    if height is None or width is None:
        height, width = conds.get("target_size_as_tuple") or (1024, 1024)
    opts = _opts(ctx)
    crop = tuple(conds.get("crop_coords_top_left") or (opts.get("sdxl_crop_top", 0), opts.get("sdxl_crop_left", 0)))
    for key in ("original_size_as_tuple", "target_size_as_tuple"):
        if key in conds and list(conds[key]) != [int(height), int(width)]:
            raise A1111GroupError(f"case {case.get('name')!r}: {key} {conds[key]} is not the image size "
                                  f"[{height}, {width}], which A1111 uses for both")
    return {"width": int(width), "height": int(height), "crop": (int(crop[0]), int(crop[1])),
            "is_negative": bool(case.get("is_negative_prompt", False))}


def _case_tensor_names(ctx, case: dict, keys: list[str]) -> dict[str, str]:
    """{"context" | "vector": tensor name} for the case's stored conditionings."""
    out = {}
    for name in keys:
        suffix = name.rsplit(".", 1)[-1]
        if suffix in ("cond", "crossattn", "c_crossattn"):
            out["context"] = name
        elif suffix == "vector":
            out["vector"] = name
    if not out:
        raise A1111GroupError(f"case {case.get('name')!r}: no conditioning tensor (.cond / .crossattn / .vector)")
    return out


def prompts_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    return _encode_case(ctx, group, keys)[0]


def _encode_case(ctx, group: str, keys: list[str], embeddings=None):
    """One case: its prompts encoded together, as one forward of A1111's conditioning module; ({name: tensor},
    the ``encode_prompts`` result)."""

    case = _case(ctx, group)
    kwargs = {"clip_skip": _clip_skip(ctx, case), "embeddings": embeddings, "emphasis": _emphasis(ctx)}
    if ctx.config.family == "sdxl":
        kwargs.update(_sdxl_size(ctx, case))
    out = encode_prompts(ctx.model, _prompts(case), **kwargs)
    names = _case_tensor_names(ctx, case, keys)
    result = {names["context"]: out.context} if "context" in names else {}
    if "vector" in names and out.vector is not None:
        result[names["vector"]] = out.vector
    return result, out


def ti_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """A prompts case with the embeddings; a ``TI hashes`` value other than the reference run's is noted."""
    result, out = _encode_case(ctx, group, keys, embeddings=embedding_database(ctx))
    expected = _case(ctx, group).get("infotext_TI_hashes")
    if isinstance(expected, str) and out.ti_hashes != expected:
        ctx.notes.append(f"note: {group}: TI hashes {_safe(out.ti_hashes)!r}, the reference run wrote "
                         f"{_safe(expected)!r}")
    return result


def embedding_dirs(ctx) -> list[Path]:
    """``--embeddings-dir``, else the folders the JSON registered, relative to the reference file."""
    if ctx.embeddings_dir is not None:
        return [Path(ctx.embeddings_dir)]
    base = Path(ctx.reference).parent if ctx.reference is not None else Path(".")
    registered = ctx.meta.get("embedding_dirs_registered") or ["embeddings"]
    dirs = []
    for d in registered:
        rel = Path(str(d))
        if rel.is_absolute() or ".." in rel.parts:
            raise A1111GroupError(f"the JSON registers the embeddings folder {_safe(d)}, which is not a folder "
                                  "beside the reference; give --embeddings-dir")
        dirs.append(base / rel)
    return dirs


def embedding_database(ctx):
    """The textual inversions for this model, loaded once per run; files that do not fit are reported once."""
    if "embeddings" in ctx.cache:
        return ctx.cache["embeddings"]

    dirs = embedding_dirs(ctx)
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise A1111GroupError(f"no embeddings folder {_safe(missing[0])} beside the reference (give "
                              "--embeddings-dir)")
    db, messages = load_model_embeddings(ctx.model, dirs[0])
    for directory in dirs[1:]:
        for path in embedding_files(directory):
            try:
                reason = db.add(load_embedding_file(path))
            except EmbeddingError as e:
                reason = f"embedding file skipped: {e}"
            if reason:
                messages.append(reason)
    skipped_too = ctx.meta.get("embeddings_skipped_shape_mismatch") or {}
    ctx.notes.extend(f"note: {m}" + (" (as in the reference run)" if _skipped_name(m, skipped_too) else "")
                     for m in messages)
    expected = ctx.meta.get("embeddings_loaded")
    if isinstance(expected, dict) and set(expected) != set(db.embeddings):
        ctx.notes.append(f"note: loaded embeddings {sorted(db.embeddings)}, the reference run loaded "
                         f"{sorted(expected)}")
    ctx.cache["embeddings"] = db
    return db


def _skipped_name(message: str, names) -> bool:
    return any(f"embedding {_safe(n)} skipped" in message for n in names)


def unet_sizes_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """``CASE.out`` = the UNet on the stored ``CASE.x`` / ``.t`` / ``.context`` (/ ``.y``)."""
    y = ctx.get(f"{group}.y") if f"{group}.y" in ctx.ref else None
    out = ctx.model.apply_model(ctx.get(f"{group}.x"), ctx.get(f"{group}.t"), ctx.get(f"{group}.context"), y)
    return {f"{group}.out": out}


def lora_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The ``merged.<key>`` weights: the checkpoint's weights plus the deltas of the JSON's ``lora_files`` (found
    beside the reference) at their multipliers."""

    base = Path(ctx.reference).parent if ctx.reference is not None else Path(".")
    for entry in ctx.meta.get("lora_files", []):
        name = str(entry.get("file", "")) if isinstance(entry, dict) else ""
        if not name or Path(name).name != name:
            raise A1111GroupError(f"lora_files names {_safe(name)!r}, which is not a file name")
        if not (base / name).is_file():
            raise A1111GroupError(f"the LoRA file {_safe(name)} is not beside the reference")
    wanted = {k: ctx.ref[k] for k in keys}
    return recompute_lora_reference(ctx.model, wanted, ctx.meta, base)


# ---------------------------------------------------------------- NV noise


_SEED = re.compile(r"seed(\d+)")
_DRAW = re.compile(r"draw(\d+)$")


def _source(ctx) -> str:
    source = str(_opts(ctx).get("randn_source", "NV")).lower()
    if source not in ("nv", "cpu", "gpu"):
        raise A1111GroupError(f"randn_source {source!r} is not one of NV, CPU, GPU")
    return source


def _seed(ctx, name: str) -> int:
    entry = ctx.meta.get("tensors", {}).get(name, {})
    if isinstance(entry.get("seed"), int):
        return entry["seed"]
    m = _SEED.search(name)
    if m is None:
        raise A1111GroupError(f"{name}: the JSON gives no seed and the name holds none")
    return int(m.group(1))


def _draws(name: str) -> int:
    """``.draw<k>``: the k-th call of one generator (1 when absent)."""
    m = _DRAW.search(name.rsplit(".", 1)[-1])
    return int(m.group(1)) if m else 1


def philox_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """``rng_philox.Generator(seed)``: the k-th ``randn(shape)`` of a fresh generator (shape as stored)."""

    out = {}
    for name in keys:
        g = PhiloxGenerator(_seed(ctx, name))
        shape = tuple(ctx.ref[name].shape)
        for _ in range(_draws(name)):
            x = g.randn(shape)
        out[name] = torch.from_numpy(x)
    return out


def rng_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """``modules.rng.randn(seed, shape)`` and ``randn_without_seed`` (the same generator's next draw)."""

    out = {}
    for name in keys:
        parts = name.split(".")
        call = parts[1] if len(parts) > 1 else ""
        if call not in ("randn", "randn_without_seed"):
            raise A1111GroupError(f"{name}: unknown call {call!r} (randn, randn_without_seed)")
        g = create_generator(_seed(ctx, name), _source(ctx))
        shape = tuple(ctx.ref[name].shape)
        x = g.randn(shape)
        if call == "randn_without_seed":
            x = g.randn(shape)
        out[name] = x
    return out


def image_rng_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """``ImageRNG(shape, seeds, subseeds, subseed_strength, ...)``: ``.first`` its first ``next()``, ``.next``
    the second (each image's own generator's next draw); arguments from the tensor's JSON entry."""

    out = {}
    for name in keys:
        entry = ctx.meta.get("tensors", {}).get(name, {})
        if not isinstance(entry.get("seeds"), list):
            raise A1111GroupError(f"{name}: the JSON gives no 'seeds'")
        call = name.rsplit(".", 1)[-1]
        calls = {"first": 1, "next": 2}.get(call)
        if calls is None:
            raise A1111GroupError(f"{name}: unknown call {call!r} (first, next)")
        stored = ctx.ref[name]
        rng = ImageRNG(tuple(stored.shape[1:]), entry["seeds"], subseeds=entry.get("subseeds"),
                       subseed_strength=float(entry.get("subseed_strength") or 0.0),
                       seed_resize_from_h=int(entry.get("seed_resize_from_h") or 0),
                       seed_resize_from_w=int(entry.get("seed_resize_from_w") or 0), source=_source(ctx),
                       eta_noise_seed_delta=int(_opts(ctx).get("eta_noise_seed_delta") or 0))
        for _ in range(calls):
            x = rng.next()
        out[name] = x
    return out


_RNG_GROUPS: dict[str, Callable] = {"philox": philox_group, "rng": rng_group, "ImageRNG": image_rng_group}


def nv_group(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    handler = _RNG_GROUPS.get(group)
    if handler is None:
        raise A1111GroupError(f"unknown noise group {group!r} (not one of {', '.join(_RNG_GROUPS)})")
    return handler(ctx, group, keys)


def _lora(ctx, group: str, keys: list[str]) -> dict[str, torch.Tensor]:
    if group != "merged":
        raise A1111GroupError(f"unknown group {group!r} in a LoRA reference (its tensors are merged.<key>)")
    return lora_group(ctx, group, keys)


def _safe(text) -> str:
    return printable(str(text))


_HANDLERS: dict[str, Callable] = {"prompts": prompts_group, "ti": ti_group, "unet_sizes": unet_sizes_group,
                                  "rng": nv_group, "lora": _lora, CN.KIND: CN.recompute,
                                  **H.HANDLERS}
