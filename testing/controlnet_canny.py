"""Parity group ``canny`` of the ControlNet reference (``controlnet-sd1-tiny.reference.*``): the canny maps
recomputed by ``control/preprocess.py`` from the stored images, compared bit for bit.

* ``canny.edges`` / ``canny.detected_map`` / ``canny.control``: the ``canny`` module on ``canny.image`` at
  ``processor_res`` = the image's short side (the extension's ``resize_image_with_pad`` is then the identity, as
  the demo's ``resize_image`` is), thresholds from the JSON (``canny.thresholds``), at the image's own size;
* ``canny.gray_edges``: the same on the one-channel ``canny.gray_image``;
* other ``canny.*`` names holding two integers (``canny.edges_50_150``, for ``canny.extra_thresholds``): those
  thresholds, the output named as above by what the name contains (``gray``, ``detected_map``, ``control``).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from tritonsd.control.preprocess import preprocess, to_tensor
from tritonsd.testing.reference import GroupError

INPUTS = {"canny.image", "canny.gray_image"}
_PAIR = re.compile(r"(\d+)\D+(\d+)")


def canny_group(ctx, keys: list[str]) -> dict[str, torch.Tensor]:
    """Every non-input ``canny.*`` key recomputed (``ctx``: ``testing.groups.Recompute``)."""
    thresholds = (ctx.meta.get("canny") or {}).get("thresholds", [100, 200])
    out = {}
    for name in keys:
        if name in INPUTS:
            continue
        pair = _PAIR.search(name.split(".", 1)[1])
        low, high = (int(pair.group(1)), int(pair.group(2))) if pair else (int(thresholds[0]), int(thresholds[1]))
        source = ctx.get("canny.gray_image" if "gray" in name else "canny.image").numpy()
        detected = preprocess("canny", source, min(source.shape[:2]), low, high)  # HxWx3 uint8
        if "control" in name:
            out[name] = to_tensor(detected)
        elif "detected_map" in name:
            out[name] = torch.from_numpy(detected)
        elif "edges" in name:
            out[name] = torch.from_numpy(np.ascontiguousarray(detected[:, :, 0]))
        else:
            raise GroupError(f"canny group: no rule for {name!r}")
    return out
