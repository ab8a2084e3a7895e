"""The theory of the rotated gradient quantizer (DRIVE, NeurIPS'21; EDEN, ICML'22): the Lloyd–Max
quantizer of a standard normal and the variance laws of quantizing a randomly rotated bucket.
Torch-free, like all of theory/; comm/rotation.py takes its levels from here.

Notation: a bucket of w = 2^p elements x, random ±1 signs D, H the w×w Hadamard matrix,
y = H·D·x/√w (orthonormal: ‖y‖ = ‖x‖ and ‖x̂ − x‖ = ‖ŷ − y‖), σ = ‖y‖/√w, b bits, q the
Lloyd–Max quantizer of N(0, 1) with levels c (top level c_top), D_b = E(Z − q(Z))².
vNMSE = E‖x̂ − x‖²/‖x‖² for one quantization.

Assumption of both laws: y has i.i.d. Gaussian entries. Exact when x does (an orthonormal map
of i.i.d. N(0, s²) is i.i.d. N(0, s²)); otherwise an approximation: given x each y_i = Σ±x_j/√w
is a Rademacher sum, whose excess kurtosis −2·Σx_j⁴/‖x‖⁴ is negative, so y's tails are lighter
than Gaussian, the more so the more of x's energy sits in few coordinates. Then z = y/σ is
uniform on the sphere ‖z‖² = w: the law of g ~ N(0, I_w) given ‖g‖² = w.

Deterministic (EDEN): c_i = q(z_i), ŷ = S·c with S = ‖y‖²/⟨y, c⟩. As S·⟨y, c⟩ = ‖y‖²,
‖ŷ − y‖² = S²‖c‖² − ‖y‖², so per bucket vNMSE = B/C² − 1, B = ‖c‖²/w, C = ⟨z, c⟩/w (exact).
As w → ∞ both tend to E q(Z)² = E[Z·q(Z)] = 1 − D_b (each level is its cell's mean): the law
D_b/(1 − D_b). At finite w, expanding B/C² to second order about (1 − D_b, 1 − D_b) adds K_b/w:
(i) the sphere's marginal density ∝ (1 − z²/w)^((w−3)/2) = φ(z)·(1 − He₄(z)/(4w)) + O(w⁻²),
He₄ = z⁴ − 6z² + 3, shifts E B and E C by δ_h = −E[h·He₄]/(4w) (h = q², Z·q); (ii) given
‖g‖² = w the covariance of (B, C) is, to O(w⁻²), the Gaussian covariance of (q², Z·q) less its
regression on Z² (Var Z² = 2), over w. With M = 1 − D_b,
K_b/w = (δ_B − 2δ_C)/M² + (3·Var C − 2·Cov(B, C))/M³: K_b = −0.4518, −0.3261, −0.1376,
−0.0460 at 1..4 bits. Dropped: O(w⁻²) terms, which is why widths under 64 are refused (at
w = 8 the 4-bit law is 43% below Monte Carlo, at 32 3.3%).

Stochastic: S = max|y|/c_top, u = y/S, each u_i rounded to the adjacent c_lo ≤ u_i < c_hi,
unbiased, variance V(u_i) = (c_hi − u_i)(u_i − c_lo); so given y, E‖ŷ − y‖² = S²·Σ V(u_i)
(exact). u does not depend on ‖y‖: with m = max|g_i|, vNMSE = E[N/G], N = (m/c_top)²·Σ V(u_i),
G = ‖g‖². Given m, the entry at ±m sits on ±c_top (V = 0) and the other n = w − 1 are taken
i.i.d. N(0, 1) cut to |g| < m (N/G is scale-free, so the unconditioned Gaussian serves); V is
quadratic in g on each cell [c_j·m/c_top, c_{j+1}·m/c_top], so E N, E G, Var G and Cov(N, G)
given m are Gaussian partial moments, and E[N/G | m] ≈ (E N/E G)·(1 − Cov(N, G)/(E N·E G)
+ Var G/(E G)²) (second order in the sums' fluctuations). That is averaged over the max's
density 2w·φ(m)·(2Φ(m) − 1)^(w−1) by the trapezoid rule on m ∈ [0.001, 10] (step 0.01; a 16×
finer grid moves it by < 3e-10). It grows with w through m ≈ √(2 ln w); at 1 bit the code is
the max-scaled sign (5.91 at w = 64, 13.55 at 4096).

Measured (tests/theory/test_rotation.py's numpy simulation of the whole algorithm, 2^23
elements per case, 2026-12-07): Gaussian x, w = 64, 512, 4096, both variants, 1..4 bits:
within 0.9% of the laws (0.4% but for 4 bits at w = 64), where D_b/(1 − D_b) alone is 1.2–7.2%
high at w = 64. Other x, measured/law: Student-t(3) 0.92–0.99; 1% non-zeros: 0 at w = 64 (one
non-zero, |y_i| all equal, coded exactly), 0.26–0.78 at 512, 0.85–0.97 at 4096; constant x
(y on a lattice of step 2/√w) 0.98–1.13 at 64 (1.13: 4 bits, deterministic), 0.97–1.05 at
512, within 0.2% at 4096.
"""

from __future__ import annotations

import math
from functools import cache
from itertools import pairwise

import numpy as np

_SQRT2 = math.sqrt(2.0)
_DENSITY = 1.0 / math.sqrt(2.0 * math.pi)
_erfc = np.vectorize(math.erfc, otypes=[float])
_MAX_GRID = np.linspace(1e-3, 10.0, 1001)  # the bucket's max |y|/σ: P(max > 10) < w·1.6e-23


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


def rate_distortion_limit(bits: int) -> float:
    """2^(−2·bits): the Gaussian distortion-rate function, the least E(Z − Ẑ)² any code of
    `bits` (a positive int) bits per element reaches for Z ~ N(0, 1), over long blocks.

    It is a biased code's distortion: the optimal code's test channel is Ẑ = (1 − D)·Z + noise
    of variance D(1 − D), so Ẑ/(1 − D) is unbiased given Z with vNMSE D/(1 − D) = 1/(4^bits − 1)
    (0.0667 at 2 bits), the figure to set beside `rotated_vnmse`.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits={bits!r}; allowed: a positive int")
    return 2.0 ** (-2 * bits)


def rotated_vnmse(bits: int, bucket: int, stochastic: bool = False) -> float:
    """The rotated quantizer's vNMSE at `bits` (1..4) on buckets of `bucket` = 2^p ≥ 64
    elements (module doc): deterministic (EDEN), D_b/(1 − D_b) + K_b/w, or `stochastic`, the
    max-scaled law integrated over the bucket's max (cached)."""
    _check_bits(bits)
    if (
        isinstance(bucket, bool)
        or not isinstance(bucket, int)
        or bucket < 64
        or bucket & (bucket - 1)
    ):
        raise ValueError(f"bucket={bucket!r}; allowed: a power of two >= 64")
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic={stochastic!r}; allowed: True or False")
    if stochastic:
        return _stochastic_vnmse(bits, bucket)
    d = lloyd_max_distortion(bits)
    return d / (1 - d) + _finite_width_coefficient(bits) / bucket


def _partial_moments(a: np.ndarray, b: np.ndarray, order: int) -> list[np.ndarray]:
    """E[Zᵏ·1(a < Z < b)] for k = 0..order, Z ~ N(0, 1), elementwise (a, b may be ±∞):
    m₀ = Φ(b) − Φ(a), m₁ = φ(a) − φ(b), m_k = a^(k−1)φ(a) − b^(k−1)φ(b) + (k − 1)·m_(k−2)
    (integration by parts of z^(k−1)·zφ(z))."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    fa, fb = _DENSITY * np.exp(-(a**2) / 2), _DENSITY * np.exp(-(b**2) / 2)
    ta, tb = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
    moments = [(_erfc(a / _SQRT2) - _erfc(b / _SQRT2)) / 2, fa - fb]
    for k in range(2, order + 1):
        moments.append(ta ** (k - 1) * fa - tb ** (k - 1) * fb + (k - 1) * moments[k - 2])
    return moments


@cache
def _finite_width_coefficient(bits: int) -> float:
    """K_b of the deterministic law D_b/(1 − D_b) + K_b/w (`rotated_vnmse`)."""
    levels, thresholds = lloyd_max(bits)
    c = np.asarray(levels)
    edges = np.array([-math.inf, *thresholds, math.inf])
    m = _partial_moments(edges[:-1], edges[1:], 5)

    def e(power: int, k: int) -> float:
        """E[q(Z)^power·Z^k]."""
        return float(np.sum(c**power * m[k]))

    mean = e(2, 0)
    shift_b = -(e(2, 4) - 6 * e(2, 2) + 3 * e(2, 0)) / 4
    shift_c = -(e(1, 5) - 6 * e(1, 3) + 3 * e(1, 1)) / 4
    along_b, along_c = e(2, 2) - mean, e(1, 3) - mean  # covariances with Z²
    v_cc = e(2, 2) - mean**2 - along_c**2 / 2
    v_bc = e(3, 1) - mean**2 - along_b * along_c / 2
    return (shift_b - 2 * shift_c) / mean**2 + (3 * v_cc - 2 * v_bc) / mean**3


@cache
def _stochastic_vnmse(bits: int, bucket: int) -> float:
    """The stochastic variant's law (`rotated_vnmse`), integrated over the bucket's max."""
    c = np.asarray(lloyd_max(bits)[0])
    top, m = c[-1], _MAX_GRID
    a = (top / m)[:, None]
    edges = np.outer(m / top, c)  # row: the cells of g in [−m, m]
    cells = _partial_moments(edges[:, :-1], edges[:, 1:], 4)
    inside, ez2, ez4 = (np.sum(cells[k], axis=1) for k in (0, 2, 4))
    ez2, ez4 = ez2 / inside, ez4 / inside  # moments given |g| < m
    lo, hi = c[:-1], c[1:]

    def v_times_z(k: int) -> np.ndarray:
        """E[V·g^k | |g| < m]: per cell V = −a²g² + a(c_lo + c_hi)·g − c_lo·c_hi."""
        terms = -(a**2) * cells[k + 2] + a * (lo + hi) * cells[k + 1] - lo * hi * cells[k]
        return np.sum(terms, axis=1) / inside

    ev, evz2 = v_times_z(0), v_times_z(2)
    n = bucket - 1
    scale = (m / top) ** 2
    num, den = scale * n * ev, m**2 + n * ez2
    cov, var = scale * n * (evz2 - ev * ez2), n * (ez4 - ez2**2)
    ratio = num / den * (1 - cov / (num * den) + var / den**2)
    density = 2 * bucket * _DENSITY * np.exp(-(m**2) / 2) * inside ** (bucket - 1)
    return float(np.trapezoid(ratio * density, m))
