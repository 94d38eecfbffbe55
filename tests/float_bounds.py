"""How far apart two float32 runs of one computation may land when only the order of their sums differs: another
batch size or another thread count, for which torch's CPU kernels (oneDNN convolutions, BLAS matmuls) block their
reductions differently. Used by the tests that compare a batch against its rows run alone.

The derivation. Let u = 2^-24, float32's unit roundoff.

1. A sum of n terms, in any order, is n - 1 roundings away from the exact sum. In the worst case every rounding
   goes the same way and the relative error reaches about n·u; modelling the roundings as independent mean-zero
   random variables (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
   Comput. 41(5), 2019) it exceeds λ·sqrt(n)·u with probability below 2·exp(-λ²/2): 3e-8 for λ = 6.
2. A network is a chain of such reductions: a convolution sums C_in·kh·kw terms per output, a linear layer
   in_features, attention the head dimension (scores) and the keys (softmax and the weighted values), a
   normalisation the elements of a group (mean and variance). Their lengths are read from the run itself
   (``Reductions``), per call, so every UNet step and the VAE decode are counted.
3. To first order each reduction's relative error reaches the output at the same relative size (normalisation
   layers rescale every block; residual paths add), and the errors of different reductions are independent, so
   they add in quadrature: one run is within λ·u·sqrt(Σ n) of the exact result, relative to the output's largest
   value, and two runs, each off the exact result by that much, within twice that.
4. Classifier-free guidance, eps_u + s·(eps_c - eps_u), multiplies an error of the UNet's outputs by up to
   |1 - s| + s.

So two runs differing only in summation order agree within 2·(|1 - s| + s)·λ·u·sqrt(Σ n) of the output's scale:
no constant fitted to a machine, only float32's u, the lengths of the sums and the guidance scale.
"""

from __future__ import annotations

import contextlib
import math

import torch

from tritonsd.kernels import dispatch

U = 2.0 ** -24  # float32's unit roundoff
LAMBDA = 6.0  # the probabilistic bound's confidence: exceeded with probability below 2·exp(-18)


class Reductions:
    """Within the block, the length of every reduction ``model`` computes, one entry per reduction per call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.lengths: list[int] = []

    def _module(self, module, args, _output):
        x = args[0]
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            self.lengths.append(module.in_channels // module.groups * kh * kw)
        elif isinstance(module, torch.nn.Linear):
            self.lengths.append(module.in_features)
        elif isinstance(module, torch.nn.GroupNorm):
            self.lengths.append(x[0].numel() // module.num_groups)  # a group: C/G channels x H x W
        elif isinstance(module, torch.nn.LayerNorm):
            self.lengths.append(math.prod(module.normalized_shape))

    @contextlib.contextmanager
    def record(self):
        kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)
        hooks = [m.register_forward_hook(self._module) for m in self.model.modules() if isinstance(m, kinds)]
        attention = dispatch.attention

        def counted(q, k, v, heads, *args, **kwargs):
            # q [B, N, H*D], k and v [B, M, H*D]: scores sum D terms, the softmax and the output M each
            self.lengths += [q.shape[-1] // heads, k.shape[-2], k.shape[-2]]
            return attention(q, k, v, heads, *args, **kwargs)

        dispatch.attention = counted
        try:
            yield self
        finally:
            dispatch.attention = attention
            for h in hooks:
                h.remove()


def reorder_bound(lengths: list[int], cfg_scale: float = 1.0) -> float:
    """The relative bound above (to the output's largest value) for two float32 runs of the reductions LENGTHS
    that differ only in the order of their sums."""
    assert lengths, "no reduction recorded"
    guidance = abs(1.0 - cfg_scale) + cfg_scale
    return 2.0 * guidance * LAMBDA * U * math.sqrt(sum(lengths))
