"""Reading ControlNet files as they are released, by their keys (never by their names).

Forms recognised (all end as the original ``cldm.ControlNet``'s own names, without a prefix: ``time_embed.*``,
``input_blocks.*``, ``zero_convs.*``, ``input_hint_block.*``, ``middle_block.*``, ``middle_block_out.*`` and, SDXL,
``label_emb.*``):

* ControlNet 1.1 (``control_v11p_sd15_canny.pth``): only ``control_model.*``;
* repacks of those without the prefix (the extension strips ``control_model.`` the same way);
* ControlNet 1.0 (``control_sd15_canny.pth``): a whole SD checkpoint (``model.diffusion_model.*``,
  ``first_stage_model.*``, ...) plus ``control_model.*``: the control part is taken;
* "difference" files (a ``difference`` key): the weights are differences to the base UNet's, which the model
  loader adds back (``ControlNetFile.difference``; sd-webui-controlnet ``controlnet_model_guess.py``);
* SDXL single-file original layout (recognised by ``label_emb.0.0.bias``);
* diffusers ``ControlNetModel`` (a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``, or a
  single file of its keys, ``controlnet_cond_embedding.*``): its keys converted to the original's, as the
  extension's ``controlnet_diffusers.py`` maps them, with the block counts read from the keys.

``.pth`` / ``.ckpt`` go through ``formats/checkpoint.py``'s weights-only unpickler and its narrow allowlist;
``.safetensors`` through its header checks. Every problem is one ``ControlNetFileError`` line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tritonsd.escape import escape
from tritonsd.formats.checkpoint import CheckpointError, read_checkpoint

CONTROL_PREFIX = "control_model."
DIFFERENCE_KEY = "difference"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HINT_KEY = "input_hint_block.0.weight"
SDXL_MARKER = "label_emb.0.0.bias"


class ControlNetFileError(ValueError):
    """A file that is not a ControlNet we can use: unreadable, truncated, unsafe, or another kind of model."""


@dataclass
class ControlNetFile:
    """A ControlNet's weights under the original's names (no prefix), as stored (dtype kept).

    ``difference``: the weights are differences to the base UNet's (added back by ``model/controlnet.py``);
    ``layout``: which form the file had ("v1.1", "no prefix", "v1.0 checkpoint", "diffusers")."""

    path: Path
    weights: dict[str, torch.Tensor]
    difference: bool = False
    layout: str = "v1.1"

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def sdxl(self) -> bool:
        return SDXL_MARKER in self.weights


def read_controlnet(path: str | Path) -> ControlNetFile:
    """Read a ControlNet file (or a diffusers folder) into the original's key names; see the module docstring."""
    path = Path(path)
    if path.is_dir():
        return _read_diffusers_folder(path)
    try:
        raw = read_checkpoint(path)
    except CheckpointError as e:
        raise ControlNetFileError(f"ControlNet {e}") from None
    return controlnet_from_state_dict(path, raw)


def controlnet_from_state_dict(path: Path, raw: dict[str, torch.Tensor]) -> ControlNetFile:
    """The recognition step of ``read_controlnet`` on a state dict already read."""
    name = escape(path.name)
    layout = "v1.1"
    other = _other_kind(raw)
    if other is not None:
        raise ControlNetFileError(f"{name}: {other}, not a ControlNet; not supported")
    if any(k.startswith("controlnet_cond_embedding.") for k in raw):
        weights, layout = convert_diffusers_keys(raw), "diffusers"
    elif any(k.startswith(CONTROL_PREFIX) for k in raw):
        whole = any(k.startswith("model.diffusion_model.") for k in raw)
        weights = {k[len(CONTROL_PREFIX):]: v for k, v in raw.items() if k.startswith(CONTROL_PREFIX)}
        layout = "v1.0 checkpoint" if whole else "v1.1"
        if DIFFERENCE_KEY in raw:
            weights[DIFFERENCE_KEY] = raw[DIFFERENCE_KEY]
    else:
        weights, layout = dict(raw), "no prefix"
    if HINT_KEY not in weights or "input_blocks.0.0.weight" not in weights:
        raise ControlNetFileError(f"{name}: not a ControlNet (no {CONTROL_PREFIX}{HINT_KEY} or {HINT_KEY}; "
                                  f"top-level keys: {_top_level(raw)})")
    difference = weights.pop(DIFFERENCE_KEY, None) is not None
    bad = next((k for k, v in weights.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise ControlNetFileError(f"{name}: tensor {escape(bad, 80)} is {str(weights[bad].dtype)[6:]}, not a "
                                  "floating-point weight")
    return ControlNetFile(path, weights, difference=difference, layout=layout)


def _other_kind(raw) -> str | None:
    """The control models sd-webui-controlnet also loads that are not ControlNets (by its own key tests)."""
    if "lora_controlnet" in raw:
        return "a ControlNet-LoRA (lora_controlnet)"
    if any(k.startswith(("adapter.", "body.")) for k in raw) and not any("input_hint_block" in k for k in raw):
        return "a T2I-Adapter (adapter.* / body.*)"
    if "ip_adapter" in raw or any(k.startswith("ip_adapter.") for k in raw):
        return "an IP-Adapter (ip_adapter)"
    return None


def _top_level(raw) -> str:
    found = sorted({k.split(".")[0] for k in raw})
    return ", ".join(escape(f, 40) for f in found[:6]) or "none"


def _read_diffusers_folder(folder: Path) -> ControlNetFile:
    """A diffusers ``ControlNetModel`` folder: ``config.json`` and the weights file beside it."""
    if not (folder / "config.json").is_file():
        raise ControlNetFileError(f"{escape(folder.name)}: a folder without config.json is not a diffusers "
                                  "ControlNet")
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise ControlNetFileError(f"{escape(folder.name)}: no {' or '.join(DIFFUSERS_WEIGHTS)} in the folder")
    try:
        raw = read_checkpoint(weights)
    except CheckpointError as e:
        raise ControlNetFileError(f"ControlNet {e}") from None
    out = controlnet_from_state_dict(weights, raw)
    out.path = folder
    return out


# ---------------------------------------------------------------- diffusers keys


_RESNET_PARTS = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_FIXED = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
          "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
          "conv_in.": "input_blocks.0.0.", "controlnet_mid_block.": "middle_block_out.0.",
          "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
          "mid_block.resnets.1.": "middle_block.2.", "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
          "controlnet_cond_embedding.conv_out.": "input_hint_block.14."}


def convert_diffusers_keys(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``ControlNetModel`` keys -> the original's (sd-webui-controlnet's ``controlnet_diffusers.py``
    table, with the ResBlocks per level read from the keys instead of assumed to be 2)."""
    per_level = 1 + max((int(m.group(1)) for k in raw if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))),
                        default=1)
    out = {}
    for key, value in raw.items():
        out[_diffusers_key(key, per_level)] = value
    return out


def _diffusers_key(key: str, per_level: int) -> str:
    for old, new in _FIXED.items():
        if key.startswith(old):
            return _resnet_parts(new + key[len(old):]) if "resnets" in old else new + key[len(old):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = 1 + level * (per_level + 1) + j
        if kind == "resnets":
            return _resnet_parts(f"input_blocks.{block}.0.{rest}")
        return f"input_blocks.{block}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (per_level + 1)}.0.op.{m.group(2)}"
    m = re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key)
    if m:
        return f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    return key


def _resnet_parts(key: str) -> str:
    head, _, tail = key.rpartition(".")  # tail: weight / bias
    for old, new in _RESNET_PARTS:
        if head.endswith("." + old):
            return f"{head[: -len(old)]}{new}.{tail}"
    return key
