"""GEGLU gate vs torch eager (chunk + exact GELU + multiply), at the feed-forward shapes (F = 4 * channels)."""

from __future__ import annotations

import sys

import torch

from tritonsd.bench.harness import Case, case_generator, run_cases, script_main
from tritonsd.compile.shapes import BATCH, MODELS
from tritonsd.kernels.geglu import geglu_reference, geglu_triton


TRITON = geglu_triton  # the kernel, called with a case's inputs
REFERENCE = geglu_reference  # what it must equal (on float32 inputs)

def cases() -> list[Case]:
    out = []
    for spec in MODELS.values():
        for c, side in spec.attention_levels():
            n, f = side * side, 4 * c

            def make(dtype, n=n, f=f):
                g = case_generator()
                return (torch.randn(BATCH, n, 2 * f, device="cuda", dtype=dtype, generator=g),)
            out.append(Case("geglu", spec.label, f"ff-{side}x{side}-F{f}", {"B": BATCH, "N": n, "F": f}, make,
                            3.0 * BATCH * n * f * 2, "GB/s", {"bytes_per_element_assumed": 2}))
    return out


def bench(dtype: torch.dtype, model: str | None = None) -> list[dict]:
    impls = {"triton": geglu_triton, "torch-eager": geglu_reference}
    try:
        compiled = torch.compile(geglu_reference)
        impls["torch-compile"] = compiled
    except Exception:  # noqa: BLE001 - torch.compile is an optional peer
        pass
    return run_cases(cases(), impls, REFERENCE, dtype, model)


if __name__ == "__main__":
    sys.exit(script_main("geglu", bench))
