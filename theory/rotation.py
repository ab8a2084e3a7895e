"""The theory of the rotated gradient quantizer (DRIVE, NeurIPS'21; EDEN, ICML'22): the Lloyd–Max
quantizer of a standard normal and the variance laws of quantizing a randomly rotated bucket.
Torch-free, like all of theory/; comm/rotation.py takes its levels from here.

Notation: a bucket of w = 2^p elements x, random ±1 signs D, H the w×w Hadamard matrix,
y = H·D·x/√w (orthonormal, so ‖y‖ = ‖x‖), σ = ‖y‖/√w, b bits, q the Lloyd–Max quantizer of
N(0, 1) with 2^b levels, D_b = E(Z − q(Z))² its distortion.
"""

from __future__ import annotations

import math
from functools import cache
from itertools import pairwise

_SQRT2 = math.sqrt(2.0)
_DENSITY = 1.0 / math.sqrt(2.0 * math.pi)


def _check_bits(bits: int) -> None:
    """A ValueError naming `bits` unless it is an int in 1..4 (bool refused)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4:
        raise ValueError(f"bits={bits!r}; allowed: 1..4")


def _phi(z: float) -> float:
    """The standard normal density φ(z) (0 at z = ∞)."""
    return 0.0 if math.isinf(z) else _DENSITY * math.exp(-z * z / 2)


def _tail(z: float) -> float:
    """Q(z) = P(Z > z) = erfc(z/√2)/2, accurate in the upper tail."""
    return math.erfc(z / _SQRT2) / 2


@cache
def lloyd_max(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The Lloyd–Max (minimum mean-square error) quantizer of Z ~ N(0, 1) with 2^bits levels:
    (levels ascending, symmetric about 0; thresholds, the 2^bits − 1 midpoints of adjacent
    levels). bits in 1..4; cached.

    Lloyd's iteration alternates the two optimality conditions: each threshold is the midpoint
    of its two levels (nearest-level cells), and each level is the mean of Z over its cell,
    E[Z | a < Z < b] = (φ(a) − φ(b))/(Φ(b) − Φ(a)) (∫ₐᵇ zφ(z)dz = φ(a) − φ(b)). By symmetry only
    the positive half is iterated: cells [t₀ = 0, t₁], …, [t_{n−1}, ∞) with n = 2^(bits−1), the
    probabilities Φ(b) − Φ(a) = Q(a) − Q(b) taken from the upper tail Q so the outer cells keep
    their digits. Started at uniformly spaced levels, it stops when no level moves by more than
    1e-15: about 900 rounds at 4 bits, within 2e-14 of the fixed point (unique: the Gaussian
    density is log-concave). At 1 bit the levels are ±E|Z| = ±√(2/π) = ±0.7979.
    """
    _check_bits(bits)
    n = 2 ** (bits - 1)
    levels = [(j + 0.5) * 3.0 / n for j in range(n)]
    for _ in range(100_000):
        edges = [0.0] + [(a + b) / 2 for a, b in pairwise(levels)] + [math.inf]
        new = [(_phi(a) - _phi(b)) / (_tail(a) - _tail(b)) for a, b in pairwise(edges)]
        moved = max(abs(u - v) for u, v in zip(new, levels, strict=True))
        levels = new
        if moved < 1e-15:
            break
    else:  # pragma: no cover - converges in under 1000 rounds at 1..4 bits
        raise RuntimeError(f"Lloyd's iteration at bits={bits} did not converge")
    full = [-c for c in reversed(levels)] + levels
    return tuple(full), tuple((a + b) / 2 for a, b in pairwise(full))


def lloyd_max_distortion(bits: int) -> float:
    """D_b = E(Z − q(Z))² of the Lloyd–Max quantizer q of Z ~ N(0, 1) at `bits` (1..4):
    0.3634, 0.1175, 0.03455, 0.009501.

    Each level c_j is the mean of Z over its cell C_j, so E[Z·q(Z)] = Σ p_j c_j² = E[q(Z)²] and
    D_b = E Z² − 2E[Z·q(Z)] + E[q(Z)²] = 1 − Σ_j p_j c_j², p_j = P(Z ∈ C_j), summed as twice the
    positive half. Max (1960, Table I) prints 0.009497 at 4 bits; the optimum is 0.0095010 (his
    own levels give that by quadrature).
    """
    levels, thresholds = lloyd_max(bits)
    half = len(levels) // 2
    edges = (*thresholds[half - 1 :], math.inf)
    cells = zip(levels[half:], pairwise(edges), strict=True)
    return 1.0 - 2 * sum((_tail(a) - _tail(b)) * c * c for c, (a, b) in cells)
