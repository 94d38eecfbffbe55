"""``tritonsd inspect CHECKPOINT``: what a checkpoint holds, as this runtime understands it.

Family, inpainting, weight dtypes, parameters per component, keys per prefix, the keys set aside on loading
(grouped and counted), and every setting that is NOT in the weights (eps / v, scale factor, schedule, UNet and
text-tower heads, text layers, VAE) with where it came from: the YAML (given, or found beside the checkpoint),
an option, or assumed. Reads the file (a .safetensors file's header only); builds no modules.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from tritonsd.formats.checkpoint import read_checkpoint_shapes
from tritonsd.model.config import ModelConfig, ModelConfigError, detect_config, find_config
from tritonsd.model.demo import demo_config, demo_config_path, is_demo
from tritonsd.formats.keys import SCHEDULE_BUFFERS, TEXT_PREFIXES, UNET, VAE, NormalizedKeys, normalize_keys
from tritonsd.escape import escape
from tritonsd.tools.cli import plain_help
from tritonsd.model.text_config import UNKNOWN_HEADS, TextConfigError
from tritonsd.formats.vae_file import check_vae_fits, vae_weights
from tritonsd.model.sd import build_model

FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL (base)"}
PARAM_SOURCES = {"yaml": "from the YAML", "option": "given with --parameterization", "builtin": "built-in model",
                 "assumed": "assumed: the weights cannot tell eps from v (give --config or --parameterization)"}
SOURCES = {"yaml": "from the YAML", "option": "given as an option", "assumed": "assumed (released models' value)",
           "file": "in the checkpoint", "builtin": "built-in model's config",
           "unknown": "unknown: not in the weights, and the YAML's tower has another width (give --text-heads)",
           "problem": "the load needs --text-heads"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a checkpoint (family, eps/v, dtypes, parameters, keys)",
                              description=plain_help(__doc__))
    p.add_argument("checkpoint", help=".safetensors or .ckpt file, or demo:sd1 (the built-in model)")
    p.add_argument("--config", type=Path, default=None,
                   help="the original inference YAML (decides eps/v, heads; default: CHECKPOINT's stem + .yaml "
                        "when that file exists)")
    p.add_argument("--parameterization", choices=("eps", "v"), default=None,
                   help="override the prediction type (SD2 v vs eps is not visible in the weights)")
    p.add_argument("--text-heads", type=int, default=None, metavar="N",
                   help="attention heads of the text towers (not in the weights; default: the YAML's tower, "
                        "else width / 64)")
    p.add_argument("--vae", type=Path, default=None, metavar="FILE",
                   help="an external VAE file: checked against the checkpoint's VAE and reported")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.checkpoint, args.config, args.parameterization, args.text_heads, args.vae)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def inspect_checkpoint(path: str | Path, yaml_path: Path | None = None, parameterization: str | None = None,
                       text_heads: int | None = None, vae: Path | None = None) -> dict:
    """The report as a JSON-able dict (from the shapes alone: a .safetensors file's data is never read)."""
    heads_problem = None
    if is_demo(path):
        raw, cfg, file, config_source = _demo(str(path)), demo_config(str(path)), demo_config_path(str(path)), None
        norm = normalize_keys(raw)
    else:
        file = Path(path)
        config_source = "given" if yaml_path is not None else "found beside the checkpoint"
        yaml_path = yaml_path if yaml_path is not None else find_config(file)
        raw = read_checkpoint_shapes(file)
        norm = normalize_keys(raw)
        try:
            cfg, heads_problem = _detect(norm, yaml_path, parameterization, text_heads)
        except (ModelConfigError, TextConfigError) as e:
            raise type(e)(f"{file.name}: {e}") from None
    if vae is not None:
        _check_vae(vae, norm)
    return {
        "file": str(file),
        "bytes": file.stat().st_size,
        "config": {"path": str(yaml_path) if yaml_path is not None else None,
                   "source": config_source if yaml_path is not None else None},
        "family": cfg.family,
        "family_name": FAMILY_NAMES[cfg.family],
        "inpainting": cfg.inpainting,
        "parameterization": cfg.parameterization,
        "parameterization_source": cfg.parameterization_source,
        "scale_factor": cfg.scale_factor,
        "alphas_cumprod": cfg.alphas_cumprod_source,
        "settings": settings(cfg, vae, heads_problem),
        "text_heads_problem": heads_problem,
        "weight_dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in norm.weights.values())),
        "parameters": _parameters(cfg, norm.weights),
        "keys": len(raw),
        "keys_by_prefix": dict(sorted(Counter(_prefix(k) for k in raw).items())),
        "ignored": {reason: {"count": len(keys), "keys": sorted(keys)[:5]} for reason, keys in norm.ignored.items()},
        "renamed_from_older_layout": norm.renamed,
        "unet": _unet_summary(cfg),
        "vae": {"ch": cfg.vae.ch, "ch_mult": list(cfg.vae.ch_mult), "z_channels": cfg.vae.z_channels,
                "file": str(vae) if vae is not None else None},
        "text": {e.prefix: {"kind": e.tower.kind, "width": e.tower.width, "layers": e.tower.layers,
                            "heads": _heads(e), "heads_source": e.heads_source, "layer": _layer(e)}
                 for e in cfg.cond_stage.text_encoders},
    }


def _detect(norm, yaml_path, parameterization, text_heads):
    """(config, None), or, where the text towers' head count is unknown (not in the weights, and the YAML names a
    tower of another width) or ``text_heads`` contradicts the YAML, (config with those heads reported "unknown",
    the reason): the command that explains a file says what it cannot know instead of refusing it."""
    try:
        return detect_config(norm, yaml_path, parameterization=parameterization, text_heads=text_heads), None
    except TextConfigError as e:
        if "heads" not in str(e):
            raise
        cfg = detect_config(norm, yaml_path, parameterization=parameterization, text_heads=UNKNOWN_HEADS)
        return cfg, str(e)


def _heads(encoder) -> int | str:
    return "unknown" if encoder.heads_source == "unknown" else encoder.tower.heads


def _demo(name: str) -> dict[str, torch.Tensor]:
    """A built-in model's tensors as meta tensors (its modules' state dict on the meta device)."""

    with torch.device("meta"):
        return build_model(demo_config(name)).state_dict()


def _check_vae(path: Path, norm: NormalizedKeys) -> None:
    expected = {k[len(VAE):]: t.shape for k, t in norm.weights.items() if k.startswith(VAE)}
    check_vae_fits(path, vae_weights(read_checkpoint_shapes(path), path), expected)


def settings(cfg: ModelConfig, vae: Path | None = None, heads_problem: str | None = None) -> list[dict]:
    """Every setting the weights do not hold: name, value and where it came from (a text tower's heads that
    nothing states: "unknown", with the reason in ``heads_problem``)."""
    u = cfg.unet
    if cfg.alphas_cumprod_source == "file":
        schedule, schedule_source = "alphas_cumprod stored in the checkpoint", "file"
    else:
        schedule = f"linear betas {cfg.linear_start} -> {cfg.linear_end}, {cfg.timesteps} steps"
        schedule_source = cfg.schedule_source
    rows = [
        ("prediction", cfg.parameterization, cfg.parameterization_source),
        ("scale_factor", cfg.scale_factor, cfg.scale_factor_source),
        ("schedule", schedule, schedule_source),
        ("unet heads", f"{u.num_heads} heads" if u.num_heads is not None else f"{u.num_head_channels}-channel heads",
         cfg.heads_source),
    ]
    for e in cfg.cond_stage.text_encoders:
        named = f" ({e.arch})" if e.arch is not None and e.heads_source == "yaml" else ""
        rows.append((f"text heads {e.prefix}", f"{_heads(e)}{named}", e.heads_source))
        rows.append((f"text layer {e.prefix}", _layer(e), e.layer_source))
    if heads_problem is not None:
        rows.append(("text heads (problem)", heads_problem, "problem"))
    rows.append(("vae", vae.name if vae is not None else f"the checkpoint's ({VAE}*)",
                 "option" if vae is not None else "file"))
    return [{"setting": name, "value": value, "source": source} for name, value, source in rows]


def _layer(encoder) -> str:
    return encoder.layer + (f" (index {encoder.layer_idx})" if encoder.layer_idx is not None else "")


def _parameters(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    groups = {"unet": (UNET,), "vae": (VAE,)}
    for i, prefix in enumerate(TEXT_PREFIXES[cfg.family]):
        groups["text" if len(TEXT_PREFIXES[cfg.family]) == 1 else f"text{i}"] = (prefix,)
    return {name: sum(t.numel() for k, t in weights.items() if k.startswith(prefixes))
            for name, prefixes in groups.items()}


def _prefix(key: str) -> str:
    """The prefix a key is counted under: the module it belongs to, or the key itself at top level."""
    if key in SCHEDULE_BUFFERS:
        return "(schedule buffers)"
    parts = key.split(".")
    depth = {"model": 2, "conditioner": 3, "model_ema": 1}.get(parts[0], 1)
    return ".".join(parts[:depth]) + ("." if len(parts) > depth else "")


def _unet_summary(cfg: ModelConfig) -> dict:
    u = cfg.unet
    heads = ({"num_heads": u.num_heads} if u.num_heads is not None else {"num_head_channels": u.num_head_channels})
    return {"in_channels": u.in_channels, "model_channels": u.model_channels, "channel_mult": list(u.channel_mult),
            "num_res_blocks": u.num_res_blocks, "transformer_depth": list(u.transformer_depth),
            "transformer_depth_middle": u.transformer_depth_middle, "context_dim": u.context_dim,
            "linear_proj": u.use_linear_in_transformer, "adm_in_channels": u.adm_in_channels,
            **heads, "heads_source": cfg.heads_source}


def _printable(text: str) -> str:
    """Names read from files are untrusted: control characters escaped before printing."""
    return escape(text, None)


def format_report(r: dict) -> str:
    def millions(n: int) -> str:
        return f"{n / 1e6:,.2f} M"

    config = r["config"]
    lines = [
        f"file            {_printable(r['file'])} ({r['bytes'] / 1e6:,.1f} MB, {r['keys']} tensors)",
        f"config          " + (f"{_printable(config['path'])} ({config['source']})" if config["path"] else "none"),
        f"family          {r['family']} ({r['family_name']}){', inpainting (UNet in_channels 9)' if r['inpainting'] else ''}",
        f"prediction      {r['parameterization']} ({PARAM_SOURCES[r['parameterization_source']]})",
        f"scale_factor    {r['scale_factor']}; alphas_cumprod {r['alphas_cumprod']}",
        "weight dtypes   " + ", ".join(f"{d} ({n})" for d, n in r["weight_dtypes"].items()),
        "parameters      " + ", ".join(f"{k} {millions(n)}" for k, n in r["parameters"].items()),
    ]
    u = r["unet"]
    heads = (f"{u['num_heads']} heads" if "num_heads" in u else f"{u['num_head_channels']}-channel heads")
    lines.append(f"unet            channels {u['model_channels']} x {u['channel_mult']}, {u['num_res_blocks']} res "
                 f"blocks/level, transformer depth {u['transformer_depth']} (middle "
                 f"{u['transformer_depth_middle']}), context {u['context_dim']}, {heads} ({u['heads_source']})")
    for prefix, t in r["text"].items():
        lines.append(f"text            {prefix} {t['kind']}: width {t['width']}, {t['layers']} layers, "
                     f"{t['heads']} heads ({t['heads_source']}), layer {t['layer']}")
    lines.append("settings not in the weights")
    lines += [f"  {s['setting']:<40} {_printable(str(s['value'])):<44} {SOURCES.get(s['source'], s['source'])}"
              for s in r["settings"]]
    lines.append("keys by prefix")
    lines += [f"  {_printable(prefix):<40} {n}" for prefix, n in r["keys_by_prefix"].items()]
    if r["ignored"]:
        lines.append("ignored on loading")
        lines += [f"  {reason:<60} {g['count']}" for reason, g in r["ignored"].items()]
    if r["renamed_from_older_layout"]:
        lines.append(f"renamed         {r['renamed_from_older_layout']} keys from an older layout")
    return "\n".join(lines)
