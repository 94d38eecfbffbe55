"""Flash attention forward. (Triton kernel: to be written; the reference is final.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head. q: [B, N, H*D], k, v: [B, M, H*D] -> [B, N, H*D]."""
    b, n, hd = q.shape
    m = k.shape[1]
    d = hd // heads
    # [B, N, H*D] -> [B, H, N, D]
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, m, heads, d).transpose(1, 2)
    vh = v.reshape(b, m, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
    # [B, H, N, D] -> [B, N, H*D]
    return out.transpose(1, 2).reshape(b, n, hd)


def attention_triton(q, k, v, heads, causal=False):
    raise NotImplementedError("Triton attention is not written yet")
