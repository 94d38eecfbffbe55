"""GroupNorm (+SiLU) vs torch eager (the float32 reference path and native half-precision F.group_norm)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tritonsd.bench.harness import Case, case_generator, run_cases, script_main
from tritonsd.compile.shapes import BATCH, MODELS, VAE_DECODER_LEVELS
from tritonsd.kernels.group_norm import group_norm_reference, group_norm_triton


def TRITON(x, w, b):  # noqa: N802 - the kernel, called with a case's inputs
    return group_norm_triton(x, w, b, 32, 1e-5, silu=True)


def REFERENCE(x, w, b):  # noqa: N802 - what it must equal (on float32 inputs)
    return group_norm_reference(x, w, b, 32, 1e-5, silu=True)

def cases() -> list[Case]:
    out = []

    def add(model, name, b, c, side, channels_last=False):
        def make(dtype):
            g = case_generator()
            x = torch.randn(b, c, side, side, device="cuda", dtype=dtype, generator=g)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w = torch.randn(c, device="cuda", dtype=dtype, generator=g)
            bias = torch.randn(c, device="cuda", dtype=dtype, generator=g)
            return x, w, bias
        numel = b * c * side * side
        out.append(Case("group_norm", model, name, {"B": b, "C": c, "H": side, "W": side, "groups": 32,
                                                    "silu": True, "channels_last": channels_last},
                        make, 2.0 * numel * 2, "GB/s", {"bytes_per_element_assumed": 2}))

    for spec in MODELS.values():
        model, levels = spec.label, spec.levels()
        for c, side in levels:
            add(model, f"unet-{side}x{side}-c{c}", BATCH, c, side)
        c0, s0 = levels[0]
        add(model, f"unet-up-concat-{s0}x{s0}-c{3 * c0}", BATCH, 3 * c0, s0)
        add(model, f"unet-{s0}x{s0}-c{c0}-channels-last", BATCH, c0, s0, channels_last=True)
        for c, scale in VAE_DECODER_LEVELS:
            side = spec.latent * scale
            add(model, f"vae-{side}x{side}-c{c}", 1, c, side)
    return out


def bench(dtype: torch.dtype, model: str | None = None) -> list[dict]:
    impls = {
        "triton": TRITON,
        "torch-eager-fp32-stats": lambda x, w, b: group_norm_reference(x, w, b, 32, 1e-5, silu=True),
        "torch-eager-native": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-5)),
    }
    return run_cases(cases(), impls, REFERENCE, dtype, model)


if __name__ == "__main__":
    sys.exit(script_main("group_norm", bench))
