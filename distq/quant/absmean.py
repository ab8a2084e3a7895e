"""BitNet b1.58's ternary quantizer, `absmean` (Ma et al. 2024, "The Era of 1-bit LLMs: All Large
Language Models are in 1.58 Bits"), as a baseline beside the loss-aware ternary solvers.

Per scale group of n weights:

    α = mean|w| = (1/n)·Σ|w_i|,    code_i = clip(round(w_i / α), −1, +1),    ŵ_i = α·code_i.

round is torch.round, half to even, as in BitNet's reference `weight_quant` (w·(1/α) rounded,
clamped to [−1, 1]): a weight at exactly |w| = α/2 gets code 0 (0.5 rounds to 0), one at
|w| = 1.5·α code ±1 (1.5 rounds to 2, clipped). So the support is |w| > α/2. The reference
multiplies by a rounded 1/α where this divides (they can differ by an ulp at an exact tie) and
guards the scale with max(α, 1e-5); here an all-zero group has α = 0 and codes 0, and a group
with 0 < α < 1e-5 keeps its own α.

Against TWN (Li & Liu 2016): both threshold |w| at a multiple of mean|w| over the group, but
absmean's threshold is α/2 = 0.5·mean|w| (TWN: 0.7·mean|w|) and its scale is the mean over
ALL the group's weights, zeros included, where TWN's is mean|w| over the support only, the
least-squares scale of the chosen codes. Absmean's α is therefore at most the least-squares
scale of its own codes (equal only where no weight is zeroed); it minimizes no ‖ŵ − w‖²_D and
ignores the curvature d (a baseline, like TWN and BWN). Under a sparsity cap the scheme is
pruned, then solved again (distq.quant.sparse), its α still the mean over the whole group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distq.quant.base import register, safe_ratio
from distq.quant.reduction import row_mean


@register("absmean", bits=(2,), loss_aware=False,
          summary="BitNet b1.58: α = mean|w|, round(w/α) clipped to {−1, 0, 1}")  # fmt: skip
def absmean(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Rows of `w` ([G, n], one scale group each) to α·{−1, 0, 1} with α = Σ|w| / n per row;
    `d` is not read."""
    alpha = row_mean(w.abs())  # across the shards of a group too (distq.quant.sharded)
    codes = torch.round(safe_ratio(w, alpha[:, None])).clamp(-1, 1)
    return alpha[:, None] * codes, alpha
