"""The convergence terms of quantized training, as functions (pure math: Python and numpy).

Source: Hou, Zhang, Kwok, "Analysis of Quantized Models", ICLR 2019. The paper's formulas did not
survive in our copy; the forms here are our reconstructions, each derived in its docstring and
checked against Monte Carlo in tests/theory. Notation: d elements, m bits, k = 2^(m−1) − 1
levels each side of zero, Δ_g = 1/k the level spacing relative to the scale s = max|g|.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

_erfc = np.vectorize(math.erfc, otypes=[float])


def _as_array(name: str, value: ArrayLike, lowest: float, strict: bool) -> np.ndarray:
    """value as a float array, every element > lowest (strict) or ≥ lowest, finite."""
    a = np.asarray(value, dtype=float)
    ok = np.isfinite(a) & ((a > lowest) if strict else (a >= lowest))
    if not np.all(ok):
        relation = ">" if strict else "≥"
        raise ValueError(f"{name}={value!r}; allowed: finite numbers {relation} {lowest:g}")
    return a


def _result(a: np.ndarray) -> float | np.ndarray:
    """A Python float for a scalar result, the array otherwise."""
    return float(a) if a.ndim == 0 else a


def level_spacing(bits: int) -> float:
    """Δ_g = 1/k with k = 2^(bits−1) − 1: the spacing of the levels r/k, r ∈ {−k..k}, relative to
    the scale s (DESIGN §4, comm/compressors.py `StochasticQuantizer`).

    Defined for 2..8 bits: the 1-bit stochastic sign code has k = 0 and no Lemma 3 bound.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}; allowed: an int in 2..8 (1 bit has no level spacing)")
    return 1.0 / (2 ** (bits - 1) - 1)


def weight_error_floor(
    L: ArrayLike, D: ArrayLike, d: ArrayLike, alpha: ArrayLike, delta_w: ArrayLike
) -> float | np.ndarray:
    """Error floor of training with quantized weights: L·D·√(D² + d·α²·Δ_w²/4).

    Derivation (our reconstruction of the ICLR 2019 paper's theorem for quantized weights and
    full-precision gradients): the average regret of convex f evaluated at the quantized weights
    ŵ is bounded by ⟨∇f(ŵ), ŵ − w*⟩ ≤ L·‖ŵ − w*‖ with ‖∇f‖ ≤ L. Write ŵ − w* = (w − w*) + (ŵ − w):
    ‖w − w*‖ ≤ D (domain diameter), and rounding to levels spaced α·Δ_w apart moves each of the
    d coordinates by at most α·Δ_w/2, so ‖ŵ − w‖² ≤ d·α²·Δ_w²/4. Adding the squares (the rounding
    error taken as uncorrelated with w − w*, as the paper's form does) gives
    ‖ŵ − w*‖ ≤ √(D² + d·α²Δ_w²/4), hence the floor. It does not vanish with more steps: it is
    the price of the weight resolution Δ_w at scale α. Vectorized over all arguments.
    """
    L, D = _as_array("L", L, 0, False), _as_array("D", D, 0, False)
    d = _as_array("d", d, 1, False)
    alpha, delta_w = _as_array("alpha", alpha, 0, False), _as_array("delta_w", delta_w, 0, False)
    return _result(L * D * np.sqrt(D**2 + d * alpha**2 * delta_w**2 / 4))


def grad_blowup_unclipped(d: ArrayLike, delta_g: ArrayLike) -> float | np.ndarray:
    """Bound on E‖Q(g)‖²/‖g‖² for stochastic quantization with one scale s = ‖g‖_∞ over d
    elements: 1 + ((1 + √d)/2)·Δ_g.

    Derivation (our reconstruction, §3 of the paper): Q is unbiased, so
    E‖Q(g)‖² = ‖g‖² + E‖Q(g) − g‖² ≤ ‖g‖² + Δ_g‖g‖_∞‖g‖₁ (Lemma 3, `lemma3_variance_bound`).
    Then ‖g‖_∞‖g‖₁ ≤ ((1 + √d)/2)·‖g‖²: put the largest entry at 1 and the other d − 1 entries'
    2-norm at x, so ‖g‖₁ ≤ 1 + √(d−1)·x and ‖g‖² = 1 + x²; max over x of (1 + bx)/(1 + x²) is
    (1 + √(1 + b²))/2 = (1 + √d)/2 for b = √(d−1), attained by g = (1, t, …, t), t = 1/(1 + √d).

    This is a worst case over all g, so it is a bound, not a prediction: it grows like √d. For g
    with i.i.d. Gaussian entries ‖g‖₁ ≈ √(2/π)·d·σ and ‖g‖² ≈ d·σ², so the typical value is
    about 1 + Δ_g·√(2/π)·‖g‖_∞/σ, with ‖g‖_∞/σ ≈ √(2 ln d) for large d: it still grows with d,
    far more slowly.
    Vectorized over d and Δ_g.
    """
    d = _as_array("d", d, 1, False)
    delta_g = _as_array("delta_g", delta_g, 0, True)
    return _result(1 + (1 + np.sqrt(d)) / 2 * delta_g)


def grad_blowup_clipped(c: ArrayLike, delta_g: ArrayLike) -> float | np.ndarray:
    """Approximate bound on E‖Q(Clip(g))‖²/‖g‖² when g is clipped at c·σ before quantizing:
    √(2/π)·c·Δ_g + 1, independent of d.

    Derivation (our reconstruction, §4 of the paper): after clipping the scale is
    s = ‖Clip(g)‖_∞ ≤ c·σ, and |Clip(g_i)| ≤ |g_i|, so Lemma 3 gives
    E‖Q(Clip(g)) − Clip(g)‖² ≤ Δ_g·c·σ·‖g‖₁, while ‖Clip(g)‖² ≤ ‖g‖². For i.i.d. Gaussian
    entries ‖g‖₁ ≈ √(2/π)·d·σ and ‖g‖² ≈ d·σ² (law of large numbers: an approximation, good for
    d in the hundreds and more), so E‖Q(Clip(g))‖² ≤ (1 + √(2/π)·c·Δ_g)·‖g‖². The √d growth of
    `grad_blowup_unclipped` is gone; the price is the bias `clip_bias_per_element`.
    Vectorized over c and Δ_g.
    """
    c = _as_array("c", c, 0, True)
    delta_g = _as_array("delta_g", delta_g, 0, True)
    return _result(math.sqrt(2 / math.pi) * c * delta_g + 1)


def clip_bias_per_element(c: ArrayLike, sigma: ArrayLike = 1.0) -> float | np.ndarray:
    """E[(Clip(g) − g)²] for g ~ N(0, σ²) clipped to [−cσ, cσ]:
    σ²·[(1 + c²)(1 − erf(c/√2)) − c·√(2/π)·e^(−c²/2)].

    Derivation (ours): only the tails contribute, symmetrically, so with g = σz and φ the
    standard normal density, E = 2σ²∫_c^∞ (z − c)² φ(z) dz
    = 2σ²[∫_c^∞ z²φ − 2c∫_c^∞ zφ + c²∫_c^∞ φ]. With Q(c) = ∫_c^∞ φ = (1 − erf(c/√2))/2,
    ∫_c^∞ zφ = φ(c) and (by parts) ∫_c^∞ z²φ = c·φ(c) + Q(c), this is
    2σ²[(1 + c²)·Q(c) − c·φ(c)], and 2c·φ(c) = c·√(2/π)·e^(−c²/2). (1 − erf is computed as erfc,
    accurate in the far tail.) Vectorized over c and σ.
    """
    c = _as_array("c", c, 0, True)
    sigma = _as_array("sigma", sigma, 0, False)
    tails = (1 + c**2) * _erfc(c / math.sqrt(2)) - c * math.sqrt(2 / math.pi) * np.exp(-(c**2) / 2)
    return _result(sigma**2 * tails)


def lemma3_variance_bound(g: ArrayLike, delta_g: float, bucket_size: int | None = None) -> float:
    """Lemma 3: E‖Q(g) − g‖² ≤ Δ_g·‖g‖_∞·‖g‖₁, summed over buckets of `bucket_size` elements
    (None: g is one bucket). g is flattened.

    Derivation (the paper's Lemma 3, re-derived): with scale s = ‖g‖_∞ an element lies between
    levels a·s and (a + Δ_g)·s and rounds up with probability p = (|g_i|/s − a)/Δ_g, so its
    variance is p(1 − p)·Δ_g²s². If a = 0, p(1 − p)Δ_g²s² ≤ pΔ_g²s² = Δ_g·s·|g_i|; if a ≥ Δ_g,
    p(1 − p)Δ_g²s² ≤ Δ_g²s²/4 ≤ Δ_g·s·|g_i|. Summing over i: Δ_g·‖g‖_∞·‖g‖₁. Per bucket the same
    holds with that bucket's own scale, and independent buckets' variances add.
    For 2 bits (Δ_g = 1, levels {−s, 0, s}) the variance is s·‖g‖₁ − ‖g‖² exactly, so
    E‖Q(g)‖² equals the bound.
    """
    delta = _as_array("delta_g", delta_g, 0, True)
    if delta.ndim != 0:
        raise ValueError(f"delta_g={delta_g!r}; allowed: one positive number")
    if bucket_size is not None and (
        isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1
    ):
        raise ValueError(f"bucket_size={bucket_size!r}; allowed: a positive int or None")
    a = np.abs(np.asarray(g, dtype=float).ravel())
    if a.size == 0:
        return 0.0
    width = a.size if bucket_size is None else bucket_size
    rows = np.pad(a, (0, -a.size % width)).reshape(-1, width)
    return float(delta * np.sum(rows.max(axis=1) * rows.sum(axis=1)))
