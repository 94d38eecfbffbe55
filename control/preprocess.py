"""Control maps from control images, as the AUTOMATIC1111 extension makes them (its preprocessors, resize modes,
``processor_res`` and pixel-perfect).

The contract every caller uses is :func:`detect`. Only the ``none`` module on an image already at the target size
is here yet; the extension's modules and resize modes come with the doors of issue 23.
"""

from __future__ import annotations

import numpy as np
import torch

from tritonsd.sampler.control import ControlUnit, ControlUnitError


def detect(unit: ControlUnit, width: int, height: int, init_image=None) -> torch.Tensor:
    """The unit's control map for an image of width x height: [1, 3, height, width] float32 in [0, 1]."""
    image = init_image if unit.image is None else unit.image
    if unit.module != "none":
        raise ControlUnitError(f"unknown module {unit.module!r}")
    if isinstance(image, torch.Tensor):
        hint = image.float()
    else:
        hint = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if hint.shape[-2:] != (height, width):
        raise ControlUnitError(f"control image is {hint.shape[-1]}x{hint.shape[-2]}, not {width}x{height}")
    return hint
