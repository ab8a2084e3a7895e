"""m-bit weights: loss-aware linear (LAQ) and logarithmic quantization, m = 2..8.

Both alternate two exact half-steps (Hou & Kwok, ICLR 2018): codes b for a fixed α by rounding
to the nearest level, then α for fixed b by weighted least squares α = Σ d·b·w / Σ d·b².
The loop ends on an α-step, so the returned α is the weighted LS optimum for the returned codes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from distq.quant.base import levels_per_sign, register, safe_ratio

ROUNDS = 10
REL_TOL = 1e-6
ALPHA_RULES = ("lsq", "reference")


def linear_codes(x: Tensor, k: int) -> Tensor:
    """Nearest of {0, ±1/k, …, ±1} to x (x clipped to [−1, 1])."""
    return torch.round(x.clamp(-1.0, 1.0) * k) / k


def log_codes(x: Tensor, k: int) -> Tensor:
    """Nearest of {0, ±2^−(k−1), …, ±½, ±1} to x, boundaries at the arithmetic midpoints.

    Between 2^j and 2^(j+1) the boundary is 1.5·2^j; between 0 and the smallest level
    2^−(k−1) it is 2^−k. Magnitudes above 1 clip to 1.
    """
    a = x.abs().clamp(max=1.0)
    exponent = (torch.floor(torch.log2(a.clamp_min(2.0**-k) / 1.5)) + 1).clamp(-(k - 1), 0)
    magnitude = torch.where(a < 2.0**-k, 0.0, torch.exp2(exponent))
    return torch.sign(x) * magnitude


def alternate(
    w: Tensor, d: Tensor, k: int, codes: Callable[[Tensor, int], Tensor], alpha_rule: str
) -> tuple[Tensor, Tensor]:
    """Alternate code rounding and the α-step from α = max|w| until α moves < 1e-6 relative."""
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule={alpha_rule!r}; allowed: {', '.join(ALPHA_RULES)}")
    alpha = w.abs().amax(dim=1)
    for _ in range(ROUNDS):
        b = codes(safe_ratio(w, alpha[:, None]), k)
        if alpha_rule == "lsq":
            new_alpha = safe_ratio((d * b * w).sum(1), (d * b * b).sum(1))
        else:  # the authors' reference rule Σd|b||w| / Σd|b|: kept for comparison, worse
            new_alpha = safe_ratio((d * b.abs() * w.abs()).sum(1), (d * b.abs()).sum(1))
        converged = bool(((new_alpha - alpha).abs() <= REL_TOL * alpha).all())
        alpha = new_alpha
        if converged:
            break
    return alpha[:, None] * b, alpha


@register("linear", bits=tuple(range(2, 9)), loss_aware=True, summary="LAQ: α·{0, ±1/k, …, ±1}")
def linear(w: Tensor, d: Tensor, bits: int, alpha_rule: str = "lsq") -> tuple[Tensor, Tensor]:
    return alternate(w, d, levels_per_sign(bits), linear_codes, alpha_rule)


@register("log", bits=tuple(range(2, 9)), loss_aware=True, summary="α·{0, ±2^−(k−1), …, ±1}")
def log(w: Tensor, d: Tensor, bits: int, alpha_rule: str = "lsq") -> tuple[Tensor, Tensor]:
    return alternate(w, d, levels_per_sign(bits), log_codes, alpha_rule)


def log_levels(bits: int) -> Tensor:
    """The documented level set of the log scheme (before scaling by α), ascending."""
    k = levels_per_sign(bits)
    mags = torch.exp2(-torch.arange(k - 1, -1, -1, dtype=torch.float64))
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])
