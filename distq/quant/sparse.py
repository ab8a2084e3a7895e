"""Joint quantization + sparsification: projections onto α·S with at most K non-zeros.

distq's formulation (the thesis' is not public; this one is ours): with sparsity κ, the
fraction of zeros, add ‖ŵ‖₀ ≤ K = ⌈(1−κ)n⌉ per scale group to the set S and solve

    ŵ = argmin_{ŵ ∈ α·S, ‖ŵ‖₀ ≤ K} ‖ŵ − w‖²_D.

Ternary and binary (a binary code with zeros is ternary: the schemes whose record says
`capped_exact`) use the exact ternary solver with its support size limited to k ≤ K, then
alternate the two exact half-steps (α for the support; the best support of size ≤ K for α, the
top-K entries by the gain d·(2|w| − α)) until nothing changes. With a uniform curvature (d
constant in the group: BWN, TWN-exact, SGD) the gain orders entries by |w|, so the top-k scan is
the global optimum. With a varying d the capped optimum is not a top-k set by |w| in general
(tests show a case), and the alternation is a descent method that starts from the best such set
and never ends worse than it.

Other schemes (m-bit, ternary-approx, ternary2, TWN's 0.7 threshold, BinaryConnect): project
without the cap, zero the non-zeros whose zeroing raises the D-weighted error least
(d·q·(2w − q)), then solve the scheme again on the entries kept, with the pruned ones zero.

κ follows a schedule: constant, or cubic from κ₀ to κ_final between two steps (Zhu & Gupta
2017). Masks come from replicated state (latent weights, curvature, step), so every rank
derives the same mask without communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from distq.quant.base import Scheme, safe_ratio
from distq.quant.ternary import exact_support

REFINE_ROUNDS = 20
SCHEDULES = ("constant", "cubic")
SCOPES = ("tensor", "global")


def max_nonzeros(n: int, sparsity: float) -> int:
    """K = ⌈(1−κ)n⌉, the most non-zeros a group of n entries may keep (at least 1)."""
    check_sparsity(sparsity)
    return max(1, math.ceil(round((1.0 - sparsity) * n, 9)))


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity={sparsity!r}; allowed: a number in [0, 1)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}; allowed: 0 <= sparsity < 1 (the share of zeros)")


def solve_capped(
    spec: Scheme, w: Tensor, d: Tensor, bits: int, sparsity: float, **opts
) -> tuple[Tensor, Tensor]:
    """The scheme's projection of each row of w with at most ⌈(1−κ)n⌉ non-zeros: the capped
    ternary solver where the scheme's record says it is exact (`Scheme.capped_exact`)."""
    caps = torch.full((w.shape[0],), max_nonzeros(w.shape[1], sparsity), device=w.device)
    if spec.capped_exact(opts):
        return capped_ternary(w, d, caps)
    return prune_then_solve(spec.solver, w, d, bits, caps, **opts)


def capped_ternary(w: Tensor, d: Tensor, caps: Tensor) -> tuple[Tensor, Tensor]:
    """α·{−1, 0, +1} codes with at most caps[g] non-zeros in row g, D-weighted (see module)."""
    a = w.abs()
    alpha, mask = exact_support(a, d, caps)
    error = _ternary_error(a, d, alpha, mask)
    for _ in range(REFINE_ROUNDS):
        new_mask = _best_support(a, d, alpha, caps)
        new_alpha = safe_ratio((d * a * new_mask).sum(1), (d * new_mask).sum(1))
        new_error = _ternary_error(a, d, new_alpha, new_mask)
        better = new_error < error
        if not bool(better.any()):
            break
        alpha = torch.where(better, new_alpha, alpha)
        mask = torch.where(better[:, None], new_mask, mask)
        error = torch.where(better, new_error, error)
    return alpha[:, None] * torch.sign(w) * mask, alpha


def _best_support(a: Tensor, d: Tensor, alpha: Tensor, caps: Tensor) -> Tensor:
    """For a fixed α, the ≤ caps[g] entries with the largest positive gain d·(2|w| − α)."""
    gain = d * (2 * a - alpha[:, None])
    order = gain.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(a.shape[1], device=a.device).expand_as(order)
    )
    return (ranks < caps[:, None]) & (gain > 0)


def _ternary_error(a: Tensor, d: Tensor, alpha: Tensor, mask: Tensor) -> Tensor:
    return (d * (a - alpha[:, None] * mask) ** 2).sum(1)


def prune_then_solve(
    solver: Callable[..., tuple[Tensor, Tensor]],
    w: Tensor,
    d: Tensor,
    bits: int,
    caps: Tensor,
    **opts,
) -> tuple[Tensor, Tensor]:
    """Any scheme under a cap: zero the cheapest non-zeros, then re-solve on the rest."""
    q, _ = solver(w, d, bits, **opts)
    increase = torch.where(q != 0, d * q * (2 * w - q), -torch.inf)  # error added by zeroing
    order = increase.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(w.shape[1], device=w.device).expand_as(order)
    )
    keep = (ranks < caps[:, None]) & (q != 0)
    q, alpha = solver(w, d * keep, bits, **opts)  # pruned entries no longer pull on α
    return q * keep, alpha


@dataclass(frozen=True)
class SparsitySchedule:
    """κ over training: constant `final`, or a cubic ramp from `initial` at step `begin` to
    `final` at step `end` (Zhu & Gupta 2017), constant outside the ramp."""

    final: float = 0.0
    kind: str = "constant"
    initial: float = 0.0
    begin: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"sparsity schedule {self.kind!r}; allowed: {', '.join(SCHEDULES)}")
        check_sparsity(self.final)
        check_sparsity(self.initial)
        if self.kind == "cubic" and not 0 <= self.begin < self.end:
            raise ValueError(
                f"cubic sparsity schedule needs 0 <= begin < end; got begin={self.begin}, "
                f"end={self.end}"
            )

    def at(self, step: int) -> float:
        """κ at optimizer step `step` (0-based count of steps taken)."""
        if self.kind == "constant" or step >= self.end:
            return self.final
        if step <= self.begin:
            return self.initial
        remaining = 1.0 - (step - self.begin) / (self.end - self.begin)
        return self.final + (self.initial - self.final) * remaining**3


def global_split(
    latents: Mapping[str, Tensor], curvatures: Mapping[str, Tensor], sparsity: float
) -> dict[str, float]:
    """Per-tensor sparsities for one global κ: keep the ⌈(1−κ)N⌉ entries with the largest
    D-weighted magnitude d·w² over all tensors; each tensor's κ_t is the share it loses."""
    check_sparsity(sparsity)
    scores = {n: (curvatures[n] * w**2).flatten() for n, w in latents.items()}
    everything = torch.cat(list(scores.values()))
    keep = max_nonzeros(everything.numel(), sparsity)
    threshold = everything.topk(keep).values[-1]
    counts = {n: int((s > threshold).sum()) for n, s in scores.items()}
    taken = sum(counts.values())
    for name, s in scores.items():  # ties at the threshold: fill the budget exactly, in order
        extra = min(int((s == threshold).sum()), keep - taken)
        counts[name] += extra
        taken += extra
    return {n: 1.0 - max(c, 1) / scores[n].numel() for n, c in counts.items()}
