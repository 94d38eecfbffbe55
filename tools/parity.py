"""``tritonsd parity CHECKPOINT --reference REF.safetensors``: recompute every tensor of a reference file.

A reference file (the fixtures' format: ``NAME.reference.safetensors`` + ``NAME.reference.json``) holds the
inputs and outputs of runs of the ORIGINAL code. This command loads the checkpoint, recomputes each stored
output from the stored inputs (see ``testing/groups.py``: groups by name prefix, sampler groups parsed as
``<sampler>_cfg<scale>``) and prints one row per tensor: name, shape, relative error
``max|a - b| / max|ref|``, bound (1e-4 for float32 tensors, exact for integer ones), pass / FAIL.

AUTOMATIC1111 references (``testing/a1111_groups.py``; told apart by their JSON) are recomputed too: prompt
conditionings (groups = the JSON's cases), textual inversion (the ``embeddings/`` folder beside the reference, or
``--embeddings-dir``), the UNet at odd latent sizes, LoRA merged weights (the LoRA files beside the reference;
bound 1e-5), NV noise (bound 1e-6; no model: the CHECKPOINT argument is left out), and webui's hires fix and
img2img (``testing/a1111_hires.py``: one group per case, run from the JSON's inputs through the Pipeline's stages;
the noises exactly, the sigma schedules to one unit in the last place, 8-bit images within one level, the rest
within 5e-4; each infotext a row of its own, compared with webui's but for ``Version``).

Every key of the file gets a row: inputs are shown as such (or, for conditioning stored as "rows [i, j] of
text.context", compared with the recomputed rows), and a tensor that cannot be recomputed is a FAILURE that
names it. Exit code 0 when every row passes, 1 when one fails, 2 on bad usage (a missing file, a reference of
another model).

Kernels: ``--kernels auto`` (Triton on CUDA, the torch references on the CPU), ``torch`` or ``triton``. Triton
without a GPU runs under Triton's interpreter, which is chosen when the kernel modules are imported: ``run`` sets
``TRITON_INTERPRET=1`` first thing when they are not imported yet (this module imports the model lazily), and
otherwise (the CLI imports every subcommand, and some import the model at start-up) re-runs the same command in a
child process with ``TRITON_INTERPRET=1`` in its environment. Setting it yourself avoids the re-run.

Defaults: the checkpoint's YAML is ``--config``, else ``CHECKPOINT.yaml`` beside it when that exists; the
text towers' head count (not in the weights) is ``--text-heads``, else the JSON's ``text_encoder_config``;
v-prediction comes from the YAML, else from the JSON's ``parameterization``; the JSON's ``scale_factor``
overrides the config's (it is a setting of the reference run, not of the weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from tritonsd.devices import DeviceError, resolve_device
from tritonsd.sampler import registry
from tritonsd.tools.cli import UsageError
from tritonsd.testing.reference import relative_error, strict_float32

FP32_BOUND = 1e-4  # the fixtures' README: relative error bound for float32 implementations
KERNELS = ("auto", "torch", "triton")
MODEL_FREE_GROUPS = {"canny"}  # groups recomputed without the checkpoint (ControlNet's canny maps)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="recompute every tensor of a reference file and compare (exit 1 on any failure)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help=".safetensors or .ckpt file (not needed for a reference that uses no model, e.g. NV noise)")
    p.add_argument("--reference", type=Path, required=True,
                   help="NAME.reference.safetensors (its NAME.reference.json is read too)")
    p.add_argument("--config", type=Path, default=None,
                   help="the original inference YAML (default: CHECKPOINT.yaml beside the checkpoint, if any)")
    p.add_argument("--only", default=None, metavar="GROUP,...",
                   help="check only these groups (name prefixes: tokens, text, unet, vae, sample, "
                        f"<sampler>_cfg<scale> with a sampler of {', '.join(registry.names())}, ...)")
    p.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="auto: Triton on CUDA, torch on the CPU; triton without a GPU uses Triton's interpreter")
    p.add_argument("--text-heads", type=int, default=None,
                   help="attention heads of the text towers (default: the reference JSON's text_encoder_config)")
    p.add_argument("--embeddings-dir", type=Path, default=None, metavar="DIR",
                   help="textual-inversion references: the embeddings folder (default: the folder the JSON "
                        "registered, beside the reference)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--json", type=Path, default=None, dest="json_out", metavar="OUT",
                   help="write the rows (and a summary) as JSON")
    p.add_argument("--save", type=Path, default=None, metavar="OUT.safetensors",
                   help="save every recomputed tensor (and the inputs used) under the reference's names")
    p.set_defaults(run=run)


# ---------------------------------------------------------------- entry


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = _device(args.device)
    _check_paths(args)
    if _needs_interpreter(args.kernels, device):
        if _kernels_imported_compiled():
            return _rerun_under_interpreter(args)
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are imported (below, lazily)
    ref, meta = _read_reference(args.reference)
    kind = _kind(meta)
    groups = _groups(ref, meta)
    selected = _select(groups, args.only)
    model, config_path = None, None
    if not set(selected) <= MODEL_FREE_GROUPS and _needs_model(args, kind):
        config_path = args.config if args.config is not None else _sibling_yaml(args.checkpoint)
        model = _load(args, config_path, meta, device, kind)
        check_fits(model, ref, meta, args.checkpoint, args.reference)
        for note in _notes(model, meta, config_path):
            print(note, file=sys.stderr)

    from tritonsd.kernels import dispatch  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    with dispatch.force(args.kernels), torch.no_grad(), strict_float32():
        computed, errors, timings, checks = recompute(model, ref, meta, device, {g: groups[g] for g in selected},
                                                      reference=args.reference, embeddings_dir=args.embeddings_dir)
    rows = build_rows(ref, meta, {g: groups[g] for g in selected}, computed, errors) + check_rows(checks)
    seconds = time.perf_counter() - started

    print(format_header(args, device, config_path, model is not None))
    print(format_rows(rows))
    print(format_summary(rows, seconds, skipped=len(ref) - sum(len(groups[g]) for g in selected)))
    if args.json_out is not None:
        _write_json(args, device, config_path, rows, timings, seconds)
    if args.save is not None:
        _save(args.save, rows, computed, ref)
    return 0 if all(r["pass"] for r in rows) else 1


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except DeviceError as e:
        raise UsageError(f"--device: {e}") from None


def _kind(meta: dict) -> str | None:
    from tritonsd.testing.groups import reference_kind  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    return reference_kind(meta)


def _needs_model(args, kind: str | None) -> bool:
    """Whether the reference is recomputed with the checkpoint; one that needs none ignores a given one."""
    from tritonsd.testing.a1111_groups import needs_model  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    if needs_model(kind):
        if args.checkpoint is None:
            raise UsageError(f"{args.reference.name} is recomputed with a model: give the CHECKPOINT it was made "
                             "with")
        return True
    if args.checkpoint is not None:
        print(f"note: {args.reference.name} uses no model; {args.checkpoint.name} is not loaded", file=sys.stderr)
    return False


def _needs_interpreter(kernels: str, device: torch.device) -> bool:
    """``--kernels triton`` on the CPU runs under Triton's interpreter, which is chosen (``TRITON_INTERPRET=1``)
    when the kernel modules are imported."""
    return kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def _kernels_imported_compiled() -> bool:
    loaded = sys.modules.get("tritonsd.kernels._triton")
    return loaded is not None and not getattr(loaded, "INTERPRET", False)


def _rerun_under_interpreter(args) -> int:
    """The kernels were imported for compilation (another subcommand's module imports the model at start-up):
    run this same check in a child process whose environment selects the interpreter; its exit code is ours."""
    import subprocess

    print("note: --kernels triton on the CPU: re-running under TRITON_INTERPRET=1", file=sys.stderr)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    argv = [sys.executable, "-m", "tritonsd.tools.cli", "parity", *_argv(args)]
    return subprocess.run(argv, env=env).returncode


def _argv(args) -> list[str]:
    """The command line that gives ``args`` back (for the re-run)."""
    argv = [str(args.checkpoint)] if args.checkpoint is not None else []
    argv += ["--reference", str(args.reference), "--kernels", args.kernels, "--device", args.device]
    for flag, value in (("--config", args.config), ("--only", args.only), ("--text-heads", args.text_heads),
                        ("--embeddings-dir", args.embeddings_dir), ("--json", args.json_out), ("--save", args.save)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _check_paths(args) -> None:
    for what, path in (("checkpoint", args.checkpoint), ("reference", args.reference), ("--config", args.config)):
        if path is not None and not path.is_file():
            raise UsageError(f"{what} {path} does not exist")
    if args.embeddings_dir is not None and not args.embeddings_dir.is_dir():
        raise UsageError(f"--embeddings-dir {args.embeddings_dir} is not a folder")
    if args.text_heads is not None and args.text_heads < 1:
        raise UsageError(f"--text-heads must be at least 1, got {args.text_heads}")


def _read_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from tritonsd.testing.reference import load_reference  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    try:
        ref, meta = load_reference(path)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path.with_suffix('.json').name} is not valid JSON: {e}") from None
    except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
        raise UsageError(f"cannot read the reference {path.name}: {str(e).splitlines()[0]}") from None
    if not ref:
        raise UsageError(f"the reference {path.name} holds no tensors")
    if not meta:
        print(f"note: no {path.with_suffix('.json').name} beside the reference: prompts and steps are unknown",
              file=sys.stderr)
    return ref, meta


def _sibling_yaml(checkpoint: Path) -> Path | None:
    from tritonsd.model.config import find_config  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    return find_config(checkpoint)


# ---------------------------------------------------------------- model and fit


def heads_from_meta(meta: dict) -> int | None:
    """The text towers' head count from the JSON's ``text_encoder_config`` (one value for every tower)."""
    found: set[int] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("num_attention_heads", "heads") and isinstance(value, int):
                    found.add(value)
                else:
                    walk(value)

    walk(meta.get("text_encoder_config"))
    if len(found) > 1:
        raise UsageError(f"the reference's text towers have different head counts {sorted(found)}; a single "
                         "--text-heads cannot serve them")
    return found.pop() if found else None


def _load(args, config_path: Path | None, meta: dict, device: torch.device, kind: str | None = None):
    from tritonsd.model.load import load_model  # lazy: imports the kernels, after TRITON_INTERPRET is chosen
    # lazy: imports the kernels, after TRITON_INTERPRET is chosen
    from tritonsd.model.text_config import TextConfigError
    # lazy: imports the kernels, after TRITON_INTERPRET is chosen
    from tritonsd.testing.a1111_groups import uses_text_towers

    heads = args.text_heads if args.text_heads is not None else heads_from_meta(meta)
    try:
        model = load_model(args.checkpoint, config_path, text_heads=heads, dtype=torch.float32, device=device)
    except TextConfigError:
        if heads is not None or kind is None or uses_text_towers(kind):
            raise
        # the text towers' head count is not in the weights, and this reference never runs them
        print("note: text heads unknown (not in the weights, the JSON or --text-heads); this reference does not "
              "use the text towers", file=sys.stderr)
        model = load_model(args.checkpoint, config_path, text_heads=1, dtype=torch.float32, device=device)
    cfg = model.config
    wanted = meta.get("parameterization")
    if wanted in ("eps", "v") and wanted != cfg.parameterization:
        if cfg.parameterization_source != "assumed":
            raise UsageError(f"the reference was made with {wanted}-prediction, but {args.checkpoint.name} is "
                             f"{cfg.parameterization} (from the {cfg.parameterization_source}): another model?")
        cfg = dataclasses.replace(cfg, parameterization=wanted, parameterization_source="reference")
    scale = meta.get("scale_factor")
    if isinstance(scale, (int, float)) and float(scale) != cfg.scale_factor:
        cfg = dataclasses.replace(cfg, scale_factor=float(scale))
    model.config = cfg
    return model


def _notes(model, meta: dict, config_path: Path | None) -> list[str]:
    cfg = model.config
    notes = []
    if config_path is None:
        notes.append("note: no YAML given or beside the checkpoint; shapes from the weights, defaults otherwise")
    if cfg.parameterization_source == "reference":
        notes.append(f"note: {cfg.parameterization}-prediction taken from the reference JSON")
    return notes


SDXL_MARKERS = ("tokens.clip_l", "tokens.open_clip", "text.crossattn", "text.vector", "unet.y", "sample.crossattn")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def check_fits(model, ref: dict[str, torch.Tensor], meta: dict, checkpoint: Path, reference: Path) -> None:
    """Refuse (exit 2) a reference whose tensors cannot belong to this checkpoint, naming the first misfit."""
    from tritonsd.testing import a1111_groups  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    kind = a1111_groups.reference_kind(meta)
    if kind is not None:
        problem = a1111_groups.misfit(kind, model, ref, meta)
        if problem:
            raise UsageError(f"{reference.name} does not fit {checkpoint.name}: {problem}")
        return
    cfg = model.config
    problems = []
    ref_sdxl = any(k in ref for k in SDXL_MARKERS)
    if ref_sdxl != (cfg.family == "sdxl"):
        problems.append(f"it is a reference of an {'SDXL' if ref_sdxl else 'SD 1.x/2.x'} model, the checkpoint is "
                        f"{FAMILY_NAMES.get(cfg.family, cfg.family)}")
    expected = {"unet.x": (1, cfg.unet.in_channels, "UNet input channels")}
    for name in ("vae.z", "sample.x_T", "inpaint.x_T"):
        expected[name] = (1, cfg.vae.embed_dim, "latent channels")
    for name in ("unet.context", "sample.cond", "sample.uncond", "sample.crossattn", "inpaint.cond"):
        expected[name] = (-1, cfg.unet.context_dim, "context width")
    if cfg.unet.adm_in_channels is not None:
        for name in ("unet.y", "sample.vector"):
            expected[name] = (-1, cfg.unet.adm_in_channels, "vector width")
    for name in ("vae.image", "inpaint.image"):
        expected[name] = (1, cfg.vae.in_channels, "image channels")
    for name, (dim, size, what) in expected.items():
        t = ref.get(name)
        if t is not None and (t.dim() < 2 or t.shape[dim] != size) and not problems:
            problems.append(f"{name} has shape {list(t.shape)}, but the checkpoint's {what} is {size}")
    if any(k.startswith("inpaint.") for k in ref) and not cfg.inpainting and not problems:
        problems.append("it holds an inpainting run, the checkpoint is not an inpainting model")
    if problems:
        raise UsageError(f"{reference.name} does not fit {checkpoint.name}: {problems[0]}")


# ---------------------------------------------------------------- groups and recomputation


def _groups(ref: dict[str, torch.Tensor], meta: dict) -> dict[str, list[str]]:
    """{group: names}, in the JSON's order (then any names it does not list, sorted)."""
    from tritonsd.testing.groups import group_names  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    return group_names(ref, meta)


def _select(groups: dict[str, list[str]], only: str | None) -> list[str]:
    if only is None:
        return list(groups)
    wanted = [g.strip() for g in only.split(",") if g.strip()]
    unknown = [g for g in wanted if g not in groups]
    if not wanted or unknown:
        raise UsageError(f"--only: no group {', '.join(map(repr, unknown)) or '(none given)'} in the reference "
                         f"(it has: {', '.join(groups)})")
    return [g for g in groups if g in wanted]


def recompute(model, ref, meta, device, groups: dict[str, list[str]], reference: Path | None = None,
              embeddings_dir: Path | None = None):
    """({name: tensor on the CPU}, {group: error message}, {group: seconds}, [checks of what is not a tensor])
    over ``groups``; ``model`` None for a reference that needs none."""
    from tritonsd.pipeline import Pipeline  # lazy: imports the kernels, after TRITON_INTERPRET is chosen
    from tritonsd.testing import groups as G  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    pipe = None
    if model is not None:  # the model's name and hash as a load names them (the A1111 references' infotexts)
        source = getattr(model, "source", None)
        pipe = Pipeline(model) if source is None else Pipeline(model, name=source.model_name,
                                                               model_hash=source.model_hash)
    ctx = G.Recompute(pipe, ref, meta, device, reference=reference, embeddings_dir=embeddings_dir)
    computed: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    for group, names in groups.items():
        if all(G.is_input(n, meta) for n in names):
            continue
        t0 = time.perf_counter()
        try:
            out = G.recompute_group(ctx, group, names)
            computed.update({k: v.detach().to("cpu") for k, v in out.items() if not G.is_input(k, meta)})
        except Exception as e:  # one group's failure is reported on its rows; the others still run
            errors[group] = _one_line(e)
        timings[group] = time.perf_counter() - t0
        print(f"  {group}: {timings[group]:.1f} s{' (failed)' if group in errors else ''}", file=sys.stderr,
              flush=True)
        for note in ctx.notes:
            print(note, file=sys.stderr)
        ctx.notes.clear()
    return computed, errors, timings, ctx.checks


def _one_line(e: BaseException) -> str:
    from tritonsd.testing import groups as G  # lazy: imports the kernels, after TRITON_INTERPRET is chosen

    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, G.GroupError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------- rows


def build_rows(ref, meta, groups: dict[str, list[str]], computed, errors) -> list[dict]:
    from tritonsd.testing import groups as G  # lazy: imports the kernels, after TRITON_INTERPRET is chosen
    from tritonsd.testing.a1111_groups import bound_for, ulps_for  # lazy: imports the kernels, after TRITON_INTERPRET

    kind = G.reference_kind(meta)
    rows = []
    for group, names in groups.items():
        for name in names:
            stored = ref[name]
            bound = bound_for(kind, FP32_BOUND, name)
            row = {"name": name, "group": group, "shape": list(stored.shape),
                   "dtype": str(stored.dtype).removeprefix("torch."), "kind": "input", "error": None,
                   "bound": None, "pass": True, "note": None}
            if G.is_input(name, meta):
                source = G.derived_from(name, meta)
                if source is not None and source[0] in computed:
                    row.update(compare(stored, _rows_of(computed[source[0]], source[1]), bound), kind="derived",
                               note=f"rows {source[1]} of the recomputed {source[0]}")
            elif name in computed:
                row.update(compare(stored, computed[name], bound, ulps_for(kind, name)))
            else:
                row.update(kind="missing", **{"pass": False},
                           note=errors.get(group) or f"cannot recompute {name}: this runtime does not produce it")
            rows.append(row)
    return rows


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest elementwise distance of two float32 tensors in units in the last place (their bit patterns
    mapped to ordered integers)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def check_rows(checks: list[dict]) -> list[dict]:
    """Rows for the checks of what is not a tensor (an infotext against the reference run's)."""
    return [{"name": c["name"], "group": c["group"], "shape": "text", "dtype": "str", "kind": "text",
             "error": None, "bound": None, "pass": c["pass"], "note": c["note"]} for c in checks]


def _rows_of(t: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
    return t[rows] if rows and max(rows) < t.shape[0] else None


def compare(stored: torch.Tensor, actual: torch.Tensor | None, bound: float = FP32_BOUND, ulps: int = 0) -> dict:
    """Relative error and verdict: float tensors against ``bound`` (0: exactly), or elementwise within ``ulps``
    units in the last place of float32 when given; integer tensors exactly, or 8-bit images within ``bound``
    levels where the reference kind gives one (``bound_for``)."""
    if ulps and stored.dtype == torch.float32 and actual is not None and actual.shape == stored.shape:
        apart = ulp_distance(actual.to(torch.float32), stored)
        ok = apart <= ulps
        return {"kind": "compared", "bound": f"{ulps}ulp", "error": relative_error(actual, stored), "pass": ok,
                "note": None if ok else f"{apart} units in the last place apart"}
    exact = not stored.is_floating_point()
    levels = bound if exact and stored.dtype == torch.uint8 and bound >= 1 else 0.0
    out = {"kind": "exact" if exact and not levels else "compared", "bound": levels if exact else bound}
    if actual is None:
        return {**out, "pass": False, "note": "no recomputed tensor to compare"}
    if tuple(actual.shape) != tuple(stored.shape):
        return {**out, "pass": False, "note": f"recomputed shape {list(actual.shape)} differs from the reference's"}
    if exact:
        diff = (actual.to(torch.float64) - stored.to(torch.float64)).abs()
        err = diff.max().item() if diff.numel() else 0.0
        return {**out, "error": err, "pass": err <= levels,
                "note": None if err == 0.0 else f"{int((diff != 0).sum())} of {diff.numel()} values differ"}

    err = relative_error(actual, stored)
    ok = math.isfinite(err) and err <= bound
    return {**out, "error": err, "pass": ok, "note": None if math.isfinite(err) else "not finite"}


# ---------------------------------------------------------------- output


def format_header(args, device, config_path, loaded: bool = True) -> str:
    model = (f"{args.checkpoint.name} (config {config_path.name if config_path else 'none'})"
             if loaded and args.checkpoint is not None else "no model")
    return f"parity: {model} vs {args.reference.name}; kernels {args.kernels}, {device}, float32"


def _fmt_error(row: dict) -> str:
    if row["error"] is None:
        return "-"
    return "0" if row["error"] == 0 else f"{row['error']:.2e}"


def _fmt_bound(row: dict) -> str:
    if row["bound"] is None:
        return "-"
    if isinstance(row["bound"], str):
        return row["bound"]
    return "exact" if row["bound"] == 0 else f"{row['bound']:.0e}"


def _verdict(row: dict) -> str:
    if row["kind"] == "input":
        return "input"
    return "pass" if row["pass"] else "FAIL"


def format_rows(rows: list[dict]) -> str:
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'name':<{width}}  {'shape':<20} {'rel. error':>10}  {'bound':>5}  result"]
    for r in rows:
        line = (f"{r['name']:<{width}}  {str(r['shape']):<20} {_fmt_error(r):>10}  {_fmt_bound(r):>5}  "
                f"{_verdict(r)}")
        if r["note"] and (not r["pass"] or r["kind"] == "derived"):
            line += f"  ({r['note']})"
        lines.append(line)
    return "\n".join(lines)


def _max_error(rows: list[dict]) -> tuple[float | None, str | None]:
    scored = [r for r in rows if r["error"] is not None and r["bound"]]
    if not scored:
        return None, None
    worst = max(scored, key=lambda r: r["error"] if math.isfinite(r["error"]) else math.inf)
    return worst["error"], worst["name"]


def format_summary(rows: list[dict], seconds: float, skipped: int = 0) -> str:
    failed = [r["name"] for r in rows if not r["pass"]]
    inputs = sum(r["kind"] == "input" for r in rows)
    err, name = _max_error(rows)
    text = (f"{len(rows)} tensors: {len(rows) - inputs} checked, {len(failed)} failed, {inputs} inputs"
            + (f"; max relative error {err:.2e} ({name})" if err is not None else "") + f"; {seconds:.1f} s")
    if skipped:
        text += f"; {skipped} tensors of other groups not checked (--only)"
    if failed:
        text += "\nFAILED: " + ", ".join(failed)
    return text


def _write_json(args, device, config_path, rows, timings, seconds) -> None:
    err, name = _max_error(rows)
    report = {
        "checkpoint": str(args.checkpoint) if args.checkpoint is not None else None, "reference": str(args.reference),
        "config": str(config_path) if config_path else None, "kernels": args.kernels, "device": str(device),
        "dtype": "float32", "bound": max((r["bound"] for r in rows if isinstance(r["bound"], float) and r["bound"]
                       and r["dtype"].startswith("float")), default=FP32_BOUND),
        "passed": all(r["pass"] for r in rows),
        "failed": [r["name"] for r in rows if not r["pass"]], "max_error": err, "max_error_name": name,
        "seconds": seconds, "group_seconds": timings, "rows": rows,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")


def _save(path: Path, rows: list[dict], computed: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """The recomputed tensors (cast to the reference's dtypes) and, so that the file is itself a complete
    reference, the inputs they were computed from; the metadata lists which are which."""
    from safetensors.torch import save_file

    out, inputs = {}, []
    for r in rows:
        name = r["name"]
        if r["kind"] in ("input", "derived"):
            out[name] = ref[name].contiguous()
            inputs.append(name)
        elif name in computed and tuple(computed[name].shape) == tuple(ref[name].shape):
            out[name] = computed[name].to(ref[name].dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"inputs": ",".join(inputs), "producer": "tritonsd parity"})
