"""AUTOMATIC1111 v1.10.1's two ways of running an upscaler model over an image in tiles
(``modules/upscaler_utils.py``), so that a large image fits in memory and the result is webui's:

* ``grid_upscale`` (``upscale_with_model``; ESRGAN, Real-ESRGAN, DAT, HAT and the rest): the 8-bit image is cut
  into ``tile`` x ``tile`` tiles overlapping by ``overlap`` pixels (``images.split_grid``: evenly spread, the
  last flush with the edge), each tile upscaled and turned back into 8 bits, and the tiles pasted together with
  a linear blend over the overlap (``images.combine_grid``). An image smaller than a tile gets one tile that
  reaches past its top-left corner: Pillow fills that part black, as in webui.
* ``tensor_upscale`` (``tiled_upscale_2``; SwinIR, SCUNet): the tiles are cut from the float image (the tile
  shrunk to the image when larger), each upscaled, and averaged where they overlap; 8 bits at the end only.

Models take and give BGR float tensors [1, 3, H, W] in [0, 1], as webui feeds them (``pil_image_to_torch_bgr``);
the result is rounded to 8 bits (``torch_bgr_to_pil_image``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image

Model = Callable[[torch.Tensor], torch.Tensor]


def to_bgr_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] float64 BGR in [0, 1] (webui's ``pil_image_to_torch_bgr``)."""
    rgb = np.asarray(image.convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)) / 255  # [H, W, RGB] -> [BGR, H, W]
    return torch.from_numpy(bgr)


def from_bgr_tensor(tensor: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] or [3, H, W] BGR -> 8-bit RGB image, clamped and rounded (``torch_bgr_to_pil_image``)."""
    if tensor.ndim == 4:
        tensor = tensor[0]
    array = 255.0 * np.moveaxis(tensor.float().cpu().clamp(0, 1).numpy(), 0, 2)  # [3, H, W] -> [H, W, 3]
    return Image.fromarray(np.ascontiguousarray(array.round().astype(np.uint8)[:, :, ::-1]), "RGB")


def run_model(model: Model, image: Image.Image, like: torch.Tensor) -> Image.Image:
    """One model call on a whole image (``upscale_pil_patch``): ``like`` gives the dtype and device."""
    with torch.inference_mode():
        return from_bgr_tensor(model(to_bgr_tensor(image)[None].to(like.device, like.dtype)))


# ---------------------------------------------------------------- webui's PIL grid


def _tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """``split_grid``'s tile offsets along one side: ``ceil((size - overlap) / (tile - overlap))`` tiles spread
    evenly, each moved back to end at the edge when it would reach it."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [size - tile if int(i * step) + tile >= size else int(i * step) for i in range(count)]


def _blend_mask(overlap: int, length: int, horizontal: bool) -> Image.Image:
    """``combine_grid``'s 8-bit ramp 0 .. 255 * (overlap - 1) / overlap across the overlap."""
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    grid = np.repeat(ramp[None, :], length, 0) if horizontal else np.repeat(ramp[:, None], length, 1)
    return Image.fromarray(grid, "L")


def grid_upscale(model: Model, image: Image.Image, tile: int, overlap: int, like: torch.Tensor) -> Image.Image:
    """``upscale_with_model``: the whole image when ``tile`` is 0, else webui's PIL grid (see the module
    docstring)."""
    if tile <= 0:
        return run_model(model, image, like)
    w, h = image.size
    rows = []
    scale = 1
    for y in _tile_origins(h, tile, overlap):
        row = []
        for x in _tile_origins(w, tile, overlap):
            out = run_model(model, image.crop((x, y, x + tile, y + tile)), like)
            scale = out.width // tile
            row.append((x * scale, out))
        rows.append((y * scale, row))
    tile_s, overlap_s = tile * scale, overlap * scale
    width, height = w * scale, h * scale
    combined = Image.new("RGB", (width, height))
    mask_w = _blend_mask(overlap_s, tile_s, horizontal=True)
    mask_h = _blend_mask(overlap_s, width, horizontal=False)
    for y, row in rows:
        line = Image.new("RGB", (width, tile_s))
        for x, out in row:
            if x == 0:
                line.paste(out, (0, 0))
                continue
            line.paste(out.crop((0, 0, overlap_s, tile_s)), (x, 0), mask=mask_w)
            line.paste(out.crop((overlap_s, 0, tile_s, tile_s)), (x + overlap_s, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, width, overlap_s)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap_s, width, tile_s)), (0, y + overlap_s))
    return combined


# ---------------------------------------------------------------- webui's tensor tiles


def tensor_upscale(model: Model, image: Image.Image, tile: int, overlap: int, scale: int,
                   like: torch.Tensor) -> Image.Image:
    """``upscale_2`` / ``tiled_upscale_2``: tiles of the float image averaged where they overlap."""
    x = to_bgr_tensor(image).to(dtype=like.dtype)[None]  # [1, 3, H, W]
    _, c, h, w = x.shape
    tile = min(tile, h, w)
    with torch.no_grad():
        if tile <= 0:
            return from_bgr_tensor(model(x.to(like.device)))
        stride = tile - overlap
        tops = list(range(0, h - tile, stride)) + [h - tile]
        lefts = list(range(0, w - tile, stride)) + [w - tile]
        result = torch.zeros(1, c, h * scale, w * scale, device=like.device, dtype=x.dtype)
        weights = torch.zeros_like(result)
        for top in tops:
            for left in lefts:
                out = model(x[..., top: top + tile, left: left + tile].to(like.device))
                window = (..., slice(top * scale, (top + tile) * scale), slice(left * scale, (left + tile) * scale))
                result[window] += out
                weights[window] += 1
        return from_bgr_tensor(result / weights)


__all__ = ["from_bgr_tensor", "grid_upscale", "run_model", "tensor_upscale", "to_bgr_tensor"]
