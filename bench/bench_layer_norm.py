"""LayerNorm over the last dim vs F.layer_norm, at the transformer blocks' and text towers' shapes."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tritonsd.bench.harness import Case, case_generator, run_cases, script_main
from tritonsd.compile.shapes import BATCH, MODELS, TEXT_TOKENS, text_towers
from tritonsd.kernels.layer_norm import layer_norm_reference, layer_norm_triton


TRITON = layer_norm_triton  # the kernel, called with a case's inputs
REFERENCE = layer_norm_reference  # what it must equal (on float32 inputs)

def cases() -> list[Case]:
    out = []

    def add(model, name, rows, width):
        def make(dtype):
            g = case_generator()
            x = torch.randn(BATCH, rows, width, device="cuda", dtype=dtype, generator=g)
            return x, torch.randn(width, device="cuda", dtype=dtype, generator=g), \
                torch.randn(width, device="cuda", dtype=dtype, generator=g)
        out.append(Case("layer_norm", model, name, {"B": BATCH, "N": rows, "C": width}, make,
                        2.0 * BATCH * rows * width * 2, "GB/s", {"bytes_per_element_assumed": 2}))

    for spec in MODELS.values():
        for c, side in spec.attention_levels():
            add(spec.label, f"unet-{side}x{side}-c{c}", side * side, c)
    for tower in text_towers():
        add("text", tower.name, TEXT_TOKENS, tower.width)
    return out


def bench(dtype: torch.dtype, model: str | None = None) -> list[dict]:
    impls = {"triton": layer_norm_triton,
             "torch-eager": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)}
    return run_cases(cases(), impls, REFERENCE, dtype, model)


if __name__ == "__main__":
    sys.exit(script_main("layer_norm", bench))
