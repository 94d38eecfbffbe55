"""``tritonsd inspect CHECKPOINT``: what a checkpoint holds, as this runtime understands it.

Family, inpainting, eps / v and whether that was given or assumed, weight dtypes, parameters per component, keys
per prefix, and the keys set aside on loading (grouped and counted). Reads the file; builds no modules.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from ..model.checkpoint import SCHEDULE_BUFFERS, normalize_keys, read_checkpoint_shapes
from ..model.config import TEXT_PREFIXES, UNET, VAE, ModelConfig, ModelConfigError, detect_config
from ..model.text import TextConfigError

FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL (base)"}
PARAM_SOURCES = {"yaml": "from the YAML", "option": "given with --parameterization",
                 "assumed": "assumed: the weights cannot tell eps from v (give --config or --parameterization)"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe a checkpoint (family, eps/v, dtypes, parameters, keys)",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help=".safetensors or .ckpt file")
    p.add_argument("--config", type=Path, default=None, help="the original inference YAML (decides eps/v, heads)")
    p.add_argument("--parameterization", choices=("eps", "v"), default=None,
                   help="override the prediction type (SD2 v vs eps is not visible in the weights)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.checkpoint, args.config, args.parameterization)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def inspect_checkpoint(path: Path, yaml_path: Path | None = None, parameterization: str | None = None) -> dict:
    """The report as a JSON-able dict (from the shapes alone: a .safetensors file's data is never read)."""
    path = Path(path)
    raw = read_checkpoint_shapes(path)
    try:
        cfg = detect_config(raw, yaml_path, parameterization=parameterization)
    except (ModelConfigError, TextConfigError) as e:
        raise type(e)(f"{path.name}: {e}") from None
    norm = normalize_keys(raw)
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "family": cfg.family,
        "family_name": FAMILY_NAMES[cfg.family],
        "inpainting": cfg.inpainting,
        "parameterization": cfg.parameterization,
        "parameterization_source": cfg.parameterization_source,
        "scale_factor": cfg.scale_factor,
        "alphas_cumprod": cfg.alphas_cumprod_source,
        "weight_dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in norm.weights.values())),
        "parameters": _parameters(cfg, norm.weights),
        "keys": len(raw),
        "keys_by_prefix": dict(sorted(Counter(_prefix(k) for k in raw).items())),
        "ignored": {reason: {"count": len(keys), "keys": sorted(keys)[:5]} for reason, keys in norm.ignored.items()},
        "renamed_from_older_layout": norm.renamed,
        "unet": _unet_summary(cfg),
        "vae": {"ch": cfg.vae.ch, "ch_mult": list(cfg.vae.ch_mult), "z_channels": cfg.vae.z_channels},
        "text": {prefix: {"kind": t.kind, "width": t.width, "layers": t.layers, "heads": t.heads}
                 for prefix, t in cfg.text.items()},
    }


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


def format_report(r: dict) -> str:
    def millions(n: int) -> str:
        return f"{n / 1e6:,.2f} M"

    lines = [
        f"file            {r['file']} ({r['bytes'] / 1e6:,.1f} MB, {r['keys']} tensors)",
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
        lines.append(f"text            {prefix} {t['kind']}: width {t['width']}, {t['layers']} layers")
    lines.append("keys by prefix")
    lines += [f"  {prefix:<40} {n}" for prefix, n in r["keys_by_prefix"].items()]
    if r["ignored"]:
        lines.append("ignored on loading")
        lines += [f"  {reason:<60} {g['count']}" for reason, g in r["ignored"].items()]
    if r["renamed_from_older_layout"]:
        lines.append(f"renamed         {r['renamed_from_older_layout']} keys from an older layout")
    return "\n".join(lines)
