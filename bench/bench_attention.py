"""Flash attention forward vs torch eager and every SDPA backend, at the real SD shapes."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from tritonsd.bench.harness import Case, case_generator, run_cases, script_main
from tritonsd.compile.shapes import BATCH, MODELS, TEXT_TOKENS, text_towers
from tritonsd.kernels.attention import attention_reference, attention_triton


def TRITON(q, k, v, heads, causal):  # noqa: N802 - the kernel, called with a case's inputs
    return attention_triton(q, k, v, heads, causal=causal)


def REFERENCE(q, k, v, heads, causal):  # noqa: N802 - what it must equal (on float32 inputs)
    return attention_reference(q, k, v, heads, causal=causal)

def cases() -> list[Case]:
    out = []

    def add(model, name, b, n, m, heads, d, causal=False):
        def make(dtype, b=b, n=n, m=m, w=heads * d):
            g = case_generator()
            # q, k, v as chunks of one fused projection, as the model produces them
            if n == m:
                q, k, v = torch.randn(b, n, 3 * w, device="cuda", dtype=dtype, generator=g).chunk(3, -1)
            else:
                q = torch.randn(b, n, w, device="cuda", dtype=dtype, generator=g)
                k, v = torch.randn(b, m, 2 * w, device="cuda", dtype=dtype, generator=g).chunk(2, -1)
            return q, k, v, heads, causal
        flops = 4.0 * b * heads * n * m * d * (0.5 if causal else 1.0)
        out.append(Case("attention", model, name, {"B": b, "N": n, "M": m, "heads": heads, "head_dim": d,
                                                   "causal": causal}, make, flops, "TFLOP/s"))

    for spec in MODELS.values():
        for c, side in spec.attention_levels():
            h = spec.heads(c)
            add(spec.label, f"self-{side}x{side}-c{c}", BATCH, side * side, side * side, h, c // h)
            add(spec.label, f"cross-{side}x{side}-c{c}", BATCH, side * side, TEXT_TOKENS, h, c // h)
        lat = spec.latent
        add(spec.label, f"vae-mid-{lat}x{lat}-c512", 1, lat * lat, lat * lat, 1, 512)
    for tower in text_towers():
        add("text", f"{tower.name}-causal", BATCH, TEXT_TOKENS, TEXT_TOKENS, tower.heads, tower.width // tower.heads,
            causal=True)
    return out


def _heads_first(q, k, v, heads):
    b, n, w = q.shape
    d = w // heads
    # [B, N, H*D] -> [B, H, N, D] (views)
    return (q.view(b, n, heads, d).transpose(1, 2), k.view(b, k.shape[1], heads, d).transpose(1, 2),
            v.view(b, v.shape[1], heads, d).transpose(1, 2))


def torch_eager(q, k, v, heads, causal):
    qh, kh, vh = _heads_first(q, k, v, heads)
    s = (qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    o = s.softmax(-1) @ vh
    return o.transpose(1, 2).reshape(q.shape)


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, heads, causal):
        qh, kh, vh = _heads_first(q, k, v, heads)
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
        return o.transpose(1, 2).reshape(q.shape)
    return run


def implementations() -> dict:
    from torch.nn.attention import SDPBackend

    impls = {"triton": TRITON, "torch-eager": torch_eager}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            impls[f"sdpa-{name.split('_')[0].lower()}"] = sdpa(getattr(SDPBackend, name))
    return impls


def bench(dtype: torch.dtype, model: str | None = None) -> list[dict]:
    impls = implementations()
    return run_cases(cases(), impls, REFERENCE, dtype, model)


if __name__ == "__main__":
    sys.exit(script_main("attention", bench))
