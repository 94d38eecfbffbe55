"""The weight change ("updown") of one LoRA / LoCon / LoHa / LoKr module, computed as webui v1.10.1's
``network_lora.py``, ``network_hada.py``, ``network_lokr.py``, ``lyco_helpers.py`` and
``network.NetworkModule.finalize_updown`` do, in float32:

* LoRA: ``up.reshape(out, r) @ down.reshape(r, -1)`` reshaped to [out, in(, kh, kw)] (3x3 LoCon: ``down`` is
  [r, in, 3, 3]); with ``lora_mid`` (CP decomposition) ``einsum('n m k l, i n, m j -> i j k l', mid, up, down)``.
* LoHa: ``(w1a @ w1b) * (w2a @ w2b)`` (Hadamard product), or with ``hada_t1`` / ``hada_t2`` the CP form
  ``make_weight_cp(t, wa, wb)``.
* LoKr: ``kron(w1, w2)`` with each factor either stored whole or as ``a @ b`` (``lokr_t2``: CP form).
* Then reshaped to the target weight when the element counts agree, times ``scale`` (the file's ``scale``, else
  ``alpha / dim`` when both exist, else 1), times the multiplier; an inpainting U-Net's 9-channel ``conv_in``
  gets the 4-channel delta zero-padded (webui's ``network_apply_weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritonsd.formats.lora_file import LoraError

LORA_PARTS = {"lora_up.weight", "lora_down.weight", "lora_mid.weight"}
HADA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
COMMON_PARTS = {"alpha", "scale"}
KNOWN_PARTS = LORA_PARTS | HADA_PARTS | LOKR_PARTS | COMMON_PARTS
# other LyCORIS / webui types, named in the error (webui has them; we do not)
OTHER_TYPES = {"weight": "IA3", "on_input": "IA3", "diff": "full", "w_norm": "norm", "b_norm": "norm",
               "a1.weight": "GLoRA", "oft_blocks": "OFT", "oft_diag": "OFT", "dora_scale": "DoRA",
               "bias": "a LyCORIS bias"}


class LoraShapeError(LoraError):
    """A module's delta cannot take the shape of the weight it names (a LoRA for another model)."""


def module_kind(parts: dict) -> str:
    """"lora", "hada" or "lokr", in webui's order of module types; ``LoraError`` for anything else."""
    unknown = sorted(set(parts) - KNOWN_PARTS)
    if unknown:
        kinds = sorted({OTHER_TYPES[p] for p in unknown if p in OTHER_TYPES})
        what = f"{', '.join(kinds)} modules are not supported" if kinds else "unknown tensor kinds"
        raise LoraError(f"{what} ({', '.join(unknown[:4])})")
    if {"lora_up.weight", "lora_down.weight"} <= parts.keys():
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts.keys():
        return "hada"
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts.keys()
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts.keys()
    if has_1 and has_2:
        return "lokr"
    raise LoraError(f"incomplete module: no LoRA / LoHa / LoKr set of tensors in {', '.join(sorted(parts))}")


def module_delta(parts: dict[str, torch.Tensor], target_shape: torch.Size | tuple, multiplier: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The float32 change of a weight of ``target_shape`` (``LoraError`` when it cannot have that shape).

    The shapes are checked first, by running the same computation on meta tensors (shapes only, no memory):
    factors that do not fit together, or whose product would not be the weight's shape, are refused before a
    byte is allocated (an ``up`` of [16384, 1] and a ``down`` of [1, 16384] in a 131 KB file would otherwise
    cost 1 GiB, growing with the square)."""
    kind = module_kind(parts)
    _check_scalars(parts)
    _updown(kind, {k: torch.empty(v.shape, dtype=torch.float32, device="meta") for k, v in parts.items()},
            tuple(target_shape), check=True)
    p = {k: v.to(device=device, dtype=torch.float32) for k, v in parts.items()}
    updown, dim = _updown(kind, p, tuple(target_shape))
    return updown * _scale(p, dim) * multiplier


def _updown(kind: str, p: dict, target: tuple, check: bool = False) -> tuple[torch.Tensor, int | None]:
    """The module's delta fitted to ``target`` and its rank; ``check``: on meta tensors, where any failure of the
    factors' shapes is a ``LoraError`` (one line)."""
    compute = {"lora": _lora, "hada": _hada}.get(kind)
    try:
        updown, dim = compute(p) if compute is not None else _lokr(p, target)
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        if not check:
            raise
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(p.items()))
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraError(f"its {kind} factors do not fit together ({shapes}: {first[:120]})") from None
    return _fit(updown, target), dim


def _check_scalars(parts: dict) -> None:
    """``alpha`` and ``scale`` are single numbers; every factor has at least one dimension and no empty one."""
    for name, t in parts.items():
        if name in COMMON_PARTS:
            if t.numel() != 1:
                raise LoraError(f"{name} must hold one number, got shape {list(t.shape)}")
        elif t.dim() == 0 or 0 in t.shape:
            raise LoraError(f"{name} has shape {list(t.shape)}; a factor needs at least one non-empty dimension")


def _scale(p: dict, dim: int | None) -> float:
    """``NetworkModule.calc_scale``: the file's ``scale``, else alpha / dim, else 1."""
    if "scale" in p:
        return p["scale"].item()
    if dim is not None and "alpha" in p:
        return p["alpha"].item() / dim
    return 1.0


def _fit(updown: torch.Tensor, target: tuple) -> torch.Tensor:
    """``finalize_updown``'s reshape to the weight, plus the inpainting pad of ``network_apply_weights``."""
    if updown.numel() == _numel(target):
        return updown.reshape(target)
    if len(target) == 4 and target[1] == 9 and updown.dim() == 4 and updown.shape[1] < 9 \
            and updown.shape[0] == target[0] and updown.shape[2:] == target[2:]:
        return F.pad(updown, (0, 0, 0, 0, 0, 9 - updown.shape[1]))  # [out, 4, k, k] -> [out, 9, k, k]
    raise LoraShapeError(f"its delta has shape {list(updown.shape)}, the weight {list(target)}")


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _lora(p: dict) -> tuple[torch.Tensor, int]:
    up, down = p["lora_up.weight"], p["lora_down.weight"]
    out_shape = [up.shape[0], down.shape[1]] if down.dim() > 1 else [up.shape[0]]
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)  # [out, r], [r, in * kh * kw]
    if "lora_mid.weight" in p:
        mid = p["lora_mid.weight"]  # [r, r, kh, kw]
        updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up2, down2)
    else:
        if down.dim() == 4:
            out_shape += list(down.shape[2:])
        updown = (up2 @ down2).reshape(out_shape)
    return updown, down.shape[0]


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """lyco_helpers.make_weight_cp: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _conventional(up: torch.Tensor, down: torch.Tensor, shape: list) -> torch.Tensor:
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _hada(p: dict) -> tuple[torch.Tensor, int]:
    w1a, w1b, w2a, w2b = p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"]
    shape = [w1a.shape[0], w1b.shape[1]]
    if "hada_t1" in p:
        t1 = p["hada_t1"]
        shape = [w1a.shape[1], w1b.shape[1]] + list(t1.shape[2:])
        updown1 = make_weight_cp(t1, w1a, w1b)
    else:
        if w1b.dim() == 4:
            shape += list(w1b.shape[2:])
        updown1 = _conventional(w1a, w1b, shape)
    if "hada_t2" in p:
        updown2 = make_weight_cp(p["hada_t2"], w2a, w2b)
    else:
        updown2 = _conventional(w2a, w2b, shape)
    if updown1.shape != updown2.shape:  # a product that broadcasts could be far larger than either side
        raise ValueError(f"the two Hadamard factors have shapes {list(updown1.shape)} and {list(updown2.shape)}")
    return updown1 * updown2, w1b.shape[0]


def _lokr(p: dict, target_shape) -> tuple[torch.Tensor, int | None]:
    dim = None
    if "lokr_w1" in p:
        w1 = p["lokr_w1"]
    else:
        w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
        dim = p["lokr_w1_b"].shape[0]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = make_weight_cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if "lokr_w2_b" in p:
        dim = p["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]  # [a, b] -> [a, b, 1, 1]: kron gives [a*c, b*d, kh, kw]
    updown = torch.kron(w1, w2.contiguous())
    if len(target_shape) == 4 and updown.numel() == _numel(tuple(target_shape)):
        updown = updown.reshape(tuple(target_shape))
    return updown, dim
