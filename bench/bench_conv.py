"""Implicit-GEMM conv2d with fused epilogue vs cuDNN (F.conv2d) followed by the torch epilogue, NCHW and
channels_last, at the UNet's and VAE decoder's convolutions."""

from __future__ import annotations

import sys

import torch

from tritonsd.bench.harness import Case, case_generator, run_cases, script_main
from tritonsd.compile.shapes import BATCH, MODELS, VAE_DECODER_LEVELS
from tritonsd.kernels.conv import conv2d_reference, conv2d_triton


TRITON = conv2d_triton  # the kernel, called with a case's inputs
REFERENCE = conv2d_reference  # what it must equal (on float32 inputs)

def cases() -> list[Case]:
    out = []

    def add(model, name, b, c_in, c_out, side, k, stride, pad, emb=False, residual=False):
        side_out = (side + 2 * pad - k) // stride + 1

        def make(dtype):
            g = case_generator()

            def r(*shape, s=1.0):
                return torch.randn(*shape, device="cuda", dtype=dtype, generator=g) * s
            return (r(b, c_in, side, side), r(c_out, c_in, k, k, s=(c_in * k * k) ** -0.5), r(c_out), stride, pad,
                    r(b, c_out) if emb else None, r(b, c_out, side_out, side_out) if residual else None,
                    0.5 if residual else None)
        flops = 2.0 * b * c_out * side_out * side_out * c_in * k * k
        out.append(Case("conv2d", model, name, {"B": b, "C_in": c_in, "C_out": c_out, "H": side, "W": side,
                                                "kernel": k, "stride": stride, "padding": pad, "emb": emb,
                                                "residual": residual}, make, flops, "TFLOP/s"))

    vae = VAE_DECODER_LEVELS
    for spec in MODELS.values():
        model, levels = spec.label, spec.levels()
        for i, (c, side) in enumerate(levels):
            add(model, f"res-conv1+emb-{side}x{side}-c{c}", BATCH, c, c, side, 3, 1, 1, emb=True)
            add(model, f"res-conv2+res-{side}x{side}-c{c}", BATCH, c, c, side, 3, 1, 1, residual=True)
            if i < len(levels) - 1:  # every level but the innermost downsamples
                add(model, f"down-s2-{side}x{side}-c{c}", BATCH, c, c, side, 3, 2, 1)
        c0, s0 = levels[0]
        add(model, f"skip-1x1-{s0}x{s0}-{3 * c0}to{c0}", BATCH, 3 * c0, c0, s0, 1, 1, 0)
        lat = spec.latent
        for (c, scale), (c_next, _) in zip(vae, vae[1:] + vae[-1:]):
            side = lat * scale
            add(model, f"vae-dec-{side}x{side}-c{c}to{c_next}", 1, c, c_next, side, 3, 1, 1)
        add(model, f"vae-enc-down-prepadded-{8 * lat + 1}-c128", 1, 128, 128, 8 * lat + 1, 3, 2, 0)
    return out


def channels_last(fn):
    """fn on channels_last copies of x and weight, made once per input (not timed)."""
    cache = {}

    def run(x, w, *rest):
        key = (x.data_ptr(), w.data_ptr())
        if key not in cache:
            cache.clear()
            cache[key] = (x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last))
        return fn(*cache[key], *rest)
    return run


def bench(dtype: torch.dtype, model: str | None = None) -> list[dict]:
    impls = {
        "triton": conv2d_triton,
        "triton-channels-last": channels_last(conv2d_triton),
        "cudnn+torch-epilogue": conv2d_reference,
        "cudnn-channels-last+epi": channels_last(conv2d_reference),
    }
    return run_cases(cases(), impls, REFERENCE, dtype, model)


if __name__ == "__main__":
    sys.exit(script_main("conv2d", bench))
