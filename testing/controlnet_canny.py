"""Parity group ``canny`` of the ControlNet reference (``controlnet-sd1-tiny.reference.*``), and the original demo's
control map (``gradio_canny.py``'s ``process``) for the demo groups.

The group recomputes, bit for bit, what the ORIGINAL annotator made (``annotator.canny.CannyDetector`` is
``cv2.Canny(img, low, high)``, ``annotator.util.HWC3``), with the thresholds of the JSON (``canny.thresholds``):

* ``canny.edges``: Canny on the 3-channel ``canny.image``; ``canny.detected_map`` = HWC3 of it;
  ``canny.control`` = the map / 255 as [1, 3, H, W];
* ``canny.gray_edges``: Canny on the one-channel ``canny.gray_image``;
* other ``canny.*`` names holding two integers (``canny.edges_50_150``, for ``canny.extra_thresholds``): those
  thresholds, the output named as above by what the name contains (``gray``, ``detected_map``, ``control``).

It also checks that the runtime's ``canny`` module (the A1111 extension's path, ``control/preprocess.py``) gives the
same map where the two paths agree: at ``processor_res`` = the short side of an image whose sides are multiples of
64 (no resize, no padding); those checks are rows of their own.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from tritonsd.control.preprocess import preprocess, to_tensor
from tritonsd.sampler.control import hwc3
from tritonsd.testing.reference import GroupError

INPUTS = {"canny.image", "canny.gray_image"}
_PAIR = re.compile(r"(\d+)\D+(\d+)")


def _cv2():
    import cv2  # lazy: OpenCV is the optional `controlnet` extra (in the test extra)

    return cv2


def original_canny(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """``annotator.canny.CannyDetector()(image, low, high)``: OpenCV's Canny on the image as given."""
    return _cv2().Canny(image, low, high)


def original_resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """``annotator.util.resize_image``: the short side to ``resolution``, both sides rounded to multiples of 64
    (half to even, numpy's round), Lanczos-4 when enlarging, area otherwise."""
    cv2 = _cv2()
    h, w = float(image.shape[0]), float(image.shape[1])
    k = float(resolution) / min(h, w)
    h, w = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def demo_detected_map(image: np.ndarray, image_resolution: int, detect_resolution: int, low: int, high: int,
                      det: str = "Canny") -> np.ndarray:
    """``gradio_canny.py``'s ``process``: the detected map (HxWx3 uint8) at the size of the image resized to
    ``image_resolution``; ``det`` "None" uses the image itself."""
    image = hwc3(image)
    if det == "None":
        detected = image.copy()
    else:
        detected = hwc3(original_canny(original_resize_image(image, detect_resolution), low, high))
    h, w = original_resize_image(image, image_resolution).shape[:2]
    return _cv2().resize(detected, (w, h), interpolation=_cv2().INTER_LINEAR)


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
        edges = original_canny(source, low, high)
        if "control" in name:
            out[name] = to_tensor(hwc3(edges))
        elif "detected_map" in name:
            out[name] = torch.from_numpy(hwc3(edges))
        elif "edges" in name:
            out[name] = torch.from_numpy(edges)
        else:
            raise GroupError(f"canny group: no rule for {name!r}")
        _check_module(ctx, name, source, edges, low, high)
    return out


def _check_module(ctx, name: str, source: np.ndarray, edges: np.ndarray, low: int, high: int) -> None:
    """The runtime's canny module against the original where their paths are the same computation."""
    h, w = source.shape[:2]
    if h % 64 or w % 64:
        return
    module = preprocess("canny", source, min(h, w), low, high)
    ok = bool(np.array_equal(module, hwc3(edges)))
    ctx.checks.append({"name": f"{name} (canny module)", "group": "canny", "pass": ok,
                       "note": None if ok else "the extension's canny module differs from cv2.Canny"})
