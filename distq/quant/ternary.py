"""Ternary weights α·{−1, 0, +1}: the exact and approximate loss-aware solvers, two scales, TWN,
unscaled TernaryConnect.

Exact (LATe, Hou & Kwok ICLR 2018): for a support S the optimal α is Σ_S d|w| / Σ_S d and the
error is Σ d w² − (Σ_S d|w|)² / Σ_S d. At the optimum an entry is in S iff |w| > α/2, so S is a
top-k set by |w|: sorting |w| once and scanning all k = 1..n (k = n included, which the authors'
reference code misses) finds the global optimum in O(n log n). The prefix sums are float64:
near k* the scores of neighbouring k differ by less than float32's rounding, and a float32
scan of 19,200 weights picked k* off by up to 5 (tests/quant/test_exact.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from distq.quant.base import always, register, safe_ratio
from distq.quant.reduction import LOCAL, active, agree, row_mean, row_sums

APPROX_ROUNDS = 10
APPROX_TOL = 1e-6
TWN_THRESHOLD = 0.7


def exact_support(a: Tensor, d: Tensor, caps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Optimal scale and support for magnitudes `a` ≥ 0 with curvature `d`, row by row.

    Returns (alpha [G], mask [G, n] bool): support = the top-k* entries of `a`. With `caps`
    ([G] ints) only k ≤ caps[g] is scanned: the best top-k set under a non-zero budget. Inside
    `distq.quant.reduction.reducing` the reducer solves it (a sharded one across its ranks).
    """
    reducer = active()
    if reducer is not LOCAL:
        return reducer.exact_support(a, d, caps)
    return sorted_support(a, d, caps)


def sorted_support(a: Tensor, d: Tensor, caps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`exact_support` on rows held whole: sort each row once, scan every k (module docstring)."""
    order = a.argsort(dim=1, descending=True, stable=True)
    a_sorted, d_sorted = a.gather(1, order).double(), d.gather(1, order).double()
    P = (d_sorted * a_sorted).cumsum(1)  # float64: F(k) near k* differs below float32's ulp
    Q = d_sorted.cumsum(1)
    score = safe_ratio(P * P, Q)
    if caps is not None:  # scores are ≥ 0, so −1 rules a support size out
        sizes = torch.arange(1, a.shape[1] + 1, device=a.device).expand_as(score)
        score = torch.where(sizes <= caps[:, None], score, -1.0)
    k = score.argmax(dim=1)
    alpha = safe_ratio(P.gather(1, k[:, None]), Q.gather(1, k[:, None]))[:, 0].to(a.dtype)
    ranks = torch.arange(a.shape[1], device=a.device).expand_as(a)
    mask = torch.zeros_like(a, dtype=torch.bool).scatter_(1, order, ranks <= k[:, None])
    return alpha, mask & (a > 0)


@register("ternary", bits=(2,), loss_aware=True, capped_exact=always,
          summary="LATe: exact, sort-based over all k")  # fmt: skip
def ternary(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    alpha, mask = exact_support(w.abs(), d)
    return alpha[:, None] * torch.sign(w) * mask, alpha


@register(
    "ternaryconnect", bits=(2,), loss_aware=False, summary="TernaryConnect: {−1, 0, +1}, no scale"
)
def ternaryconnect(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The nearest of {−1, 0, +1} to each weight, with no scale (α ≡ 1): deterministic
    TernaryConnect (Lin et al., 2016), the unscaled ternary baseline of Hou et al. (NeurIPS 2019)
    as BinaryConnect is the binary one. Ties at |w| = ½ round to zero."""
    return torch.sign(w) * (w.abs() > 0.5), torch.ones(w.shape[0], dtype=w.dtype, device=w.device)


@register(
    "ternary-approx", bits=(2,), loss_aware=True, summary="LATa: alternate α and b (≤ 10 rounds)"
)
def ternary_approx(
    w: Tensor, d: Tensor, bits: int, alpha_init: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Alternate α = ‖b⊙d⊙w‖₁/‖b⊙d‖₁ and b = sign(w)·1[|w| > α/2] until α moves < 1e-6.

    Starts from `alpha_init` (the previous step's α: a warm start) or from TWN's threshold.
    """
    a = w.abs()
    if alpha_init is None:
        mask = a > TWN_THRESHOLD * row_mean(a)[:, None]
    else:
        mask = a > alpha_init.reshape(-1, 1).to(a.dtype) / 2
    alpha = safe_ratio(*row_sums(d * a * mask, d * mask))
    for _ in range(APPROX_ROUNDS):
        mask = a > alpha[:, None] / 2
        new_alpha = safe_ratio(*row_sums(d * a * mask, d * mask))
        converged = agree(bool(((new_alpha - alpha).abs() < APPROX_TOL).all()))
        alpha = new_alpha
        if converged:
            break
    mask = a > alpha[:, None] / 2
    return alpha[:, None] * torch.sign(w) * mask, alpha


@register("ternary2", bits=(2,), loss_aware=True, summary="LAT2: exact, separate α⁺ and α⁻")
def ternary2(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """{−α⁻, 0, +α⁺}: the exact solver run on the positive and the negative entries apart."""
    alpha_pos, mask_pos = exact_support(w.clamp_min(0), d)
    alpha_neg, mask_neg = exact_support((-w).clamp_min(0), d)
    q = alpha_pos[:, None] * mask_pos - alpha_neg[:, None] * mask_neg
    return q, torch.stack([alpha_pos, alpha_neg], dim=1)


def _threshold_is_exact(opts: Mapping[str, object]) -> bool:
    """TWN's exact threshold is the ternary solver with d ≡ 1, so its capped form is too."""
    return opts.get("threshold") == "exact"


@register("twn", bits=(2,), loss_aware=False, capped_exact=_threshold_is_exact,
          summary="TWN baseline: Δ = 0.7·mean|w|")  # fmt: skip
def twn(w: Tensor, d: Tensor, bits: int, threshold: str = "approx") -> tuple[Tensor, Tensor]:
    """Ternary weight networks (Li & Liu 2016): support |w| > Δ, α = mean|w| over it.

    threshold="approx" uses Δ = 0.7·mean|w|; "exact" solves TWN's own objective
    max_Δ (Σ_{|w|>Δ}|w|)²/|{|w|>Δ}|, which is the loss-aware ternary solver with d ≡ 1.
    """
    if threshold not in ("approx", "exact"):
        raise ValueError(f"twn threshold={threshold!r}; allowed: 'approx', 'exact'")
    if threshold == "exact":
        return ternary(w, torch.ones_like(w), bits)
    a = w.abs()
    mask = a > TWN_THRESHOLD * row_mean(a)[:, None]
    total, count = row_sums(a * mask, mask)
    alpha = safe_ratio(total, count.to(a.dtype))
    return alpha[:, None] * torch.sign(w) * mask, alpha
