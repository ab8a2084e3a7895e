"""Weight sharing: k = 2^m shared values per scale group, fitted by D-weighted k-means.

Deep Compression's (Han, Mao & Dally, ICLR 2016) weight sharing clusters a layer's weights with
k-means, minimizing Σᵢ (wᵢ − c_a(i))² over the codebook c₁..c_k and the assignment a, with
Lloyd's iteration (assign each weight to its nearest centroid, move each centroid to the mean of
its weights) started from k values evenly spaced between min w and max w (their "linear"
initialization, which they found keeps the rare large weights best), and stores each weight as
a ⌈log₂ k⌉-bit index into the codebook; their centroids are then fine-tuned by summing the
gradients of the weights that share them.

Ours (distq's loss-aware analogue; the formulation is ours, not Deep Compression's): the
codebook is the set S of the proximal Newton step, so the distance is the curvature-weighted
one of every other distq scheme,

    (ŵ, c) = argmin Σᵢ dᵢ (wᵢ − c_a(i))²     over c ∈ ℝᵏ and a: {1..n} → {1..k},

with d = √v̂ + ε from Adam's second moment (d ≡ 1: plain k-means, exactly). The two half-steps
of Lloyd's iteration stay exact minimizations: for a fixed codebook the nearest centroid does
not depend on dᵢ > 0, and for a fixed assignment the best centroid is the D-weighted mean
c_j = Σ_{a(i)=j} dᵢwᵢ / Σ_{a(i)=j} dᵢ. The latent weights are not fine-tuned through the
centroids: distq refits the codebook after every optimizer step (the proximal step of every
other scheme), warm-started from the previous step's codebook (`alpha_init`), so the codebook
follows training and a step usually settles in a few rounds.

In one dimension a nearest-centroid assignment is contiguous in sorted order, so a call sorts
each group once and keeps prefix sums of d and d·w (float64); a round then costs O(k log n):
the k − 1 cluster boundaries are binary searches for the midpoints between adjacent centroids
(a weight exactly on a midpoint joins the upper cluster), and a cluster's mean is two prefix-sum
differences. The loop stops when the boundaries repeat (then every weight sits at its nearest
centroid and every centroid is the D-weighted mean of its weights: a local optimum, not always
the global one, which tests measure by brute force over all contiguous partitions) or after
MAX_ROUNDS rounds. A cluster left empty (no weight, or Σd = 0) is re-seeded at the weight
with the largest weighted error dᵢ·min_j (wᵢ − c_j)² to the other centroids (k-means++'s
farthest point, D-weighted; one at a time, each seed lowering the next one's errors): the
objective drops by that error, so the iteration stays monotone, and no centroid stays empty
while the group holds at least k distinct values with d > 0 (with fewer, those that cannot be
filled keep their value). A warm codebook with repeated values (a collapsed one, e.g. fitted
to an all-zero tensor) is replaced by the linear initialization for that group.

`Projection.alpha` holds the codebook, ascending: shape (k,) per tensor, (G, k) per channel or
block. Sparsity is not offered: a forced zero would be a (k+1)-th value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distq.quant.base import register

MAX_ROUNDS = 300  # a safety cap; cold starts on 64k Gaussian weights at k = 16 settle sooner


def linear_init(w: Tensor, k: int) -> Tensor:
    """Deep Compression's linear initialization: k values evenly spaced over [min w, max w] per
    row of w (G, n); (G, k)."""
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    t = torch.linspace(0.0, 1.0, k, dtype=w.dtype, device=w.device)
    return lo + (hi - lo) * t


def kmeans(w: Tensor, d: Tensor, k: int, init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """D-weighted Lloyd iteration on each row of w (G, n) with weights d (G, n), k centroids.

    Returns (q, codebook): q (G, n) each weight's centroid, codebook (G, k) ascending. `init`
    (G, k) is the starting codebook (None: linear initialization); see the module docstring.
    """
    G, n = w.shape
    cold = linear_init(w, k)
    if init is None:
        c = cold
    else:
        c = init.to(w.dtype).sort(dim=1).values
        collapsed = (c[:, 1:] == c[:, :-1]).any(dim=1, keepdim=True)
        c = torch.where(collapsed, cold, c)
    values, order = w.sort(dim=1, stable=True)
    weights = d.gather(1, order).to(torch.float64)
    zero = weights.new_zeros(G, 1)
    mass = torch.cat([zero, weights.cumsum(dim=1)], dim=1)  # (G, n + 1) prefix sums of d
    moment = torch.cat([zero, (weights * values.to(torch.float64)).cumsum(dim=1)], dim=1)
    ends = (
        torch.zeros(G, 1, dtype=torch.long, device=w.device),
        torch.full((G, 1), n, dtype=torch.long, device=w.device),
    )
    bounds = None
    for _ in range(MAX_ROUNDS):
        mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
        inner = torch.searchsorted(values, mids)  # first sorted index >= each midpoint
        new_bounds = torch.cat([ends[0], inner, ends[1]], dim=1)  # cluster j: [b_j, b_j+1)
        if bounds is not None and torch.equal(new_bounds, bounds):
            break
        bounds = new_bounds
        m, s = mass.gather(1, bounds), moment.gather(1, bounds)
        cm, cs = m[:, 1:] - m[:, :-1], s[:, 1:] - s[:, :-1]
        mean = cs / cm.clamp_min(torch.finfo(torch.float64).tiny)
        c = torch.where(cm > 0, mean, c.to(torch.float64)).to(w.dtype)
        if not bool((cm > 0).all()):
            c = reseed(values, weights, c, cm > 0)
        c = c.sort(dim=1).values
    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    assignment = torch.searchsorted(mids, w.contiguous(), right=True)  # on a midpoint: upper
    return c.gather(1, assignment), c


def reseed(values: Tensor, weights: Tensor, c: Tensor, live: Tensor) -> Tensor:
    """The codebook c (G, k) with each centroid that is not `live` (an empty cluster) moved to
    the weight of largest dᵢ·min_j (wᵢ − c_j)² over the live and already re-seeded centroids,
    one hole after another; `values` (G, n) sorted, `weights` their d (float64). A hole whose
    group has no live centroid (Σd = 0) or no weight left off the codebook keeps its value."""
    c = c.clone()
    rows = ((~live).any(dim=1) & live.any(dim=1)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return c
    v, d, cc, holes = values[rows], weights[rows], c[rows], ~live[rows]
    v64 = v.to(torch.float64)
    inf = torch.tensor(torch.inf, dtype=torch.float64, device=c.device)
    known = torch.where(holes, inf, cc.to(torch.float64)).sort(dim=1).values
    right = torch.searchsorted(known, v64).clamp_max(known.shape[1] - 1)  # nearest: idx or idx-1
    left = (right - 1).clamp_min(0)
    dist = torch.minimum(
        (v64 - known.gather(1, left)).square(), (v64 - known.gather(1, right)).square()
    )
    for _ in range(int(holes.sum(dim=1).max())):
        error = d * dist  # d = 0: never a seed
        gain, best = error.max(dim=1)
        slot = holes.to(torch.uint8).argmax(dim=1)  # the first hole left in each row
        fill = holes.any(dim=1) & (gain > 0)
        seed = v.gather(1, best[:, None]).squeeze(1)
        picked = torch.arange(len(rows), device=c.device)
        cc[picked[fill], slot[fill]] = seed[fill]
        holes[picked, slot] = False  # filled, or nothing left to gain: keeps its value
        dist = torch.where(
            fill[:, None], torch.minimum(dist, (v64 - seed[:, None].double()).square()), dist
        )
    c[rows] = cc
    return c


@register("shared", bits=(2, 3, 4), loss_aware=True, uniform=False, codebook=True,
          summary="weight sharing: 2^m values per group, D-weighted k-means")  # fmt: skip
def shared(
    w: Tensor, d: Tensor, bits: int, alpha_init: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    k = 1 << bits
    init = None
    if alpha_init is not None:
        if alpha_init.numel() != w.shape[0] * k:
            raise ValueError(
                f"alpha_init has {alpha_init.numel()} values; shared at {bits} bits needs "
                f"{k} per group, {w.shape[0] * k} in all"
            )
        init = alpha_init.reshape(w.shape[0], k)
    return kmeans(w, d, k, init)
