"""UNet at latent sizes the originals' plain torch.cat refuses, against A1111's sd_hijack_unet on the tiny
checkpoints (unet-odd-sizes-{sd1,sdxl}); sizes the original accepts stay bit-identical to a plain cat."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FP32_BOUND
from tritonsd.model.load import load_model
from tritonsd.testing.reference import relative_error

_MODELS: dict[str, torch.nn.Module] = {}


def _model(fixtures, name):
    if name not in _MODELS:
        _MODELS[name] = load_model(fixtures / f"{name}.safetensors", fixtures / f"{name}.yaml", text_heads=2)
    return _MODELS[name]


@pytest.mark.parametrize("ref_name, model_name", [("unet-odd-sizes-sd1", "sd1-tiny"),
                                                  ("unet-odd-sizes-sdxl", "sdxl-tiny")])
def test_odd_latent_sizes_match_a1111(fixtures, reference, ref_name, model_name):
    tensors, meta = reference(ref_name)
    m = _model(fixtures, model_name)
    assert len(meta["cases"]) >= 2
    for case in meta["cases"]:
        n = case["name"]
        y = tensors.get(f"{n}.y")
        with torch.no_grad():
            out = m.apply_model(tensors[f"{n}.x"], tensors[f"{n}.t"], tensors[f"{n}.context"], y)
        assert out.shape == tensors[f"{n}.out"].shape
        err = relative_error(out, tensors[f"{n}.out"])
        assert err < FP32_BOUND, f"{n}: relative error {err}"


def test_resize_happens_only_where_sizes_differ(fixtures, reference, monkeypatch):
    """A size the original accepts (8 divides both latent sides for SD1) never calls interpolate, so it is
    bit-identical to the plain-cat UNet; an odd size resizes exactly where A1111's spy saw it."""
    m = _model(fixtures, "sd1-tiny")
    ctx = reference("sd1-tiny")[0]["unet.context"][:1]
    calls = []
    real = F.interpolate

    def spy(h, size=None, **kw):
        if size is not None:  # the resize; the Upsample layers call it with scale_factor
            calls.append((tuple(h.shape), tuple(size)))
        return real(h, size=size, **kw)

    monkeypatch.setattr(F, "interpolate", spy)
    with torch.no_grad():
        m.apply_model(torch.randn(1, 4, 16, 24), 10, ctx)
        assert calls == []
        tensors, meta = reference("unet-odd-sizes-sd1")
        case = next(c for c in meta["cases"] if c["hijacked_cat_resizes"])
        n = case["name"]
        m.apply_model(tensors[f"{n}.x"], tensors[f"{n}.t"], tensors[f"{n}.context"])
    expected = [(tuple(r["upsampled_h"]), tuple(r["skip"][-2:])) for r in case["hijacked_cat_resizes"]]
    assert calls == expected


@pytest.mark.parametrize("model_name", ["sd1-tiny", "sd2v-tiny", "sdxl-tiny"])
def test_a1111_sizes_run_for_every_family(fixtures, reference, model_name):
    """128x96 (latent 16x12) and a 1360x768-shaped latent at small scale (85x48: odd after one halving)."""
    m = _model(fixtures, model_name)
    ref = reference(model_name)[0]
    ctx = ref["unet.context"][:1]
    y = ref["unet.y"][:1] if "unet.y" in ref else None
    with torch.no_grad():
        for h, w in ((12, 16), (48, 85)):
            out = m.apply_model(torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(h)), 500.0, ctx, y)
            assert out.shape == (1, 4, h, w) and torch.isfinite(out).all()
