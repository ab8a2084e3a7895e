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
    G: ArrayLike, D: ArrayLike, d: ArrayLike, alpha: ArrayLike, delta_w: ArrayLike
) -> float | np.ndarray:
    """Error floor of training with quantized weights: G·D·√(D² + d·α²·Δ_w²/4).

    In the paper's notation G bounds the gradient (‖∇f‖ ≤ G) and L is the Lipschitz constant of
    the gradient, which this floor does not use. Derivation (our reconstruction of the ICLR 2019
    paper's theorem for quantized weights and full-precision gradients): for convex f the
    average regret at the quantized weights ŵ is bounded through f(ŵ) − f(w*) ≤ ⟨∇f(ŵ), ŵ − w*⟩
    ≤ ‖∇f(ŵ)‖·‖ŵ − w*‖ ≤ G·‖ŵ − w*‖ (Cauchy–Schwarz). Write ŵ − w* = (w − w*) + (ŵ − w):
    ‖w − w*‖ ≤ D (domain diameter), and rounding to levels spaced α·Δ_w apart moves each of the
    d coordinates by at most α·Δ_w/2, so ‖ŵ − w‖² ≤ d·α²·Δ_w²/4. Adding the squares (the rounding
    error taken as orthogonal to w − w*, as the paper's form does; without that assumption the
    triangle inequality gives D + √d·αΔ_w/2 instead) gives ‖ŵ − w*‖ ≤ √(D² + d·α²Δ_w²/4), hence
    G·D·√(·) with the D-factor of the regret bound's step-size choice. It does not vanish with
    more steps: it is the price of the weight resolution Δ_w at scale α.

    Δ_w for binary weights: distq uses Δ_w = 2 (the gap between −α and +α), the paper writes
    Δ_w = 1 for S_w = {−1, +1}. A weight at 0 is α away from both levels, so ‖ŵ − w‖ per
    coordinate reaches α = α·Δ_w/2 only with Δ_w = 2: the rounding step above holds with 2 and
    fails with 1. Vectorized over all arguments.
    """
    G, D = _as_array("G", G, 0, False), _as_array("D", D, 0, False)
    d = _as_array("d", d, 1, False)
    alpha, delta_w = _as_array("alpha", alpha, 0, False), _as_array("delta_w", delta_w, 0, False)
    return _result(G * D * np.sqrt(D**2 + d * alpha**2 * delta_w**2 / 4))


def grad_blowup_unclipped(d: ArrayLike, delta_g: ArrayLike) -> float | np.ndarray:
    """Bound on E‖Q(g)‖²/‖g‖² for stochastic quantization with one scale s = ‖g‖_∞ over d
    elements: 1 + ((1 + √d)/2)·Δ_g.

    Derivation (our reconstruction, §3 of the paper): Q is unbiased, so
    E‖Q(g)‖² = ‖g‖² + E‖Q(g) − g‖² ≤ ‖g‖² + Δ_g‖g‖_∞‖g‖₁ (Lemma 3, `lemma3_variance_bound`).
    Then ‖g‖_∞‖g‖₁ ≤ ((1 + √d)/2)·‖g‖²: put the largest entry at 1 and the other d − 1 entries'
    2-norm at x, so ‖g‖₁ ≤ 1 + √(d−1)·x and ‖g‖² = 1 + x²; max over x of (1 + bx)/(1 + x²) is
    (1 + √(1 + b²))/2 = (1 + √d)/2 for b = √(d−1), attained by g = (1, t, …, t), t = 1/(1 + √d).

    This is a worst case over all g, so it is a bound, not a prediction: it grows like √d. With
    one scale per bucket of d elements it holds bucket by bucket, so it bounds any gradient's
    blow-up with d = the bucket size (`distq.monitor` shows it so). For g with i.i.d. Gaussian
    entries ‖g‖₁ ≈ √(2/π)·d·σ and ‖g‖² ≈ d·σ², so Lemma 3's right side is about
    Δ_g·√(2/π)·(‖g‖_∞/σ)·‖g‖², with ‖g‖_∞/σ ≈ √(2 ln d) for large d: it grows with d, far
    more slowly than √d. Lemma 3 itself is loose above 2 bits. Measured on 200 draws of
    N(0, 1)^4096, one scale (2026-12-06): ‖Q(g) − g‖²/‖g‖² = 2.03, 0.276, 0.050 at 2, 3, 4
    bits, against Lemma 3's right side 3.03, 1.02, 0.43 (at 2 bits the two differ by exactly
    1, as E‖Q(g)‖² equals the bound there) and this bound's 32.5, 10.8, 4.64.
    Vectorized over d and Δ_g.
    """
    d = _as_array("d", d, 1, False)
    delta_g = _as_array("delta_g", delta_g, 0, True)
    return _result(1 + (1 + np.sqrt(d)) / 2 * delta_g)


def grad_blowup_clipped(c: ArrayLike, delta_g: ArrayLike) -> float | np.ndarray:
    """E‖Q(Clip(g))‖²/‖g‖² at most about √(2/π)·c·Δ_g + 1 for Gaussian g clipped at c·σ before
    quantizing, independent of d: the paper's form, an approximation for Gaussian entries, not
    a bound for every g (`grad_blowup_clipped_bound` is one).

    Derivation (our reconstruction, §4 of the paper): after clipping the scale is
    s = ‖Clip(g)‖_∞ ≤ c·σ, and |Clip(g_i)| ≤ |g_i|, so Lemma 3 gives
    E‖Q(Clip(g)) − Clip(g)‖² ≤ Δ_g·c·σ·‖g‖₁, while ‖Clip(g)‖² ≤ ‖g‖². For i.i.d. Gaussian
    entries ‖g‖₁ ≈ √(2/π)·d·σ and ‖g‖² ≈ d·σ² (law of large numbers: an approximation, good for
    d in the hundreds and more), so E‖Q(Clip(g))‖² ≲ (1 + √(2/π)·c·Δ_g)·‖g‖². The √d growth of
    `grad_blowup_unclipped` is gone; the price is the bias `clip_bias_relative`. distq clips at
    c·√mean(g²), which is σ for zero-mean g.
    Vectorized over c and Δ_g.
    """
    c = _as_array("c", c, 0, True)
    delta_g = _as_array("delta_g", delta_g, 0, True)
    return _result(math.sqrt(2 / math.pi) * c * delta_g + 1)


def grad_blowup_clipped_bound(c: ArrayLike, delta_g: ArrayLike) -> float | np.ndarray:
    """Bound on E‖Q(Clip(g))‖²/‖g‖² for every g clipped at c·r, r = √mean(g²), when each
    scale's bucket lies inside one clipped tensor: 1 + c·Δ_g.

    Derivation (ours): in a bucket b the scale is s_b = ‖Clip(g)_b‖_∞ ≤ c·r, so Lemma 3 gives
    E‖Q(Clip(g)) − Clip(g)‖² ≤ Δ_g·Σ_b s_b‖Clip(g)_b‖₁ ≤ Δ_g·c·r·‖g‖₁ ≤ Δ_g·c·r·√d·‖g‖
    = Δ_g·c·‖g‖² (Cauchy–Schwarz, and √d·r = ‖g‖), while ‖Clip(g)‖² ≤ ‖g‖². It is not tight
    (Lemma 3 and Cauchy–Schwarz are tight for different g); Gaussian g sit near
    `grad_blowup_clipped`. Where buckets straddle
    tensors of different r (DDP's flat buckets) only `grad_blowup_unclipped` with d = the
    bucket size is proven. Vectorized over c and Δ_g.
    """
    c = _as_array("c", c, 0, True)
    delta_g = _as_array("delta_g", delta_g, 0, True)
    return _result(1 + c * delta_g)


def sign_blowup_bound(bucket: ArrayLike) -> float | np.ndarray:
    """Bound on E‖Q(g)‖²/‖g‖² of the unbiased 1-bit stochastic sign code (±s, s = max|g| of a
    bucket of B elements): B.

    Lemma 3 does not apply (there is no level spacing: Δ_g would be 2 for levels ±s, and the
    variance s² − g_i² of an element near 0 exceeds Δ_g·s·|g_i|). Directly: every code has
    magnitude s_b, so ‖Q(g)_b‖² = B·s_b² ≤ B·‖g_b‖² (s_b² is one of the terms of ‖g_b‖²), and
    summing over buckets E‖Q(g)‖² ≤ B·‖g‖², with equality for one non-zero per bucket. (The
    `sign` compressor, sign(g)·mean|g|, is biased: the theory's blow-up does not describe it.)
    """
    return _result(_as_array("bucket", bucket, 1, False))


def clip_bias_relative(
    c: ArrayLike, mean: ArrayLike = 0.0, sigma: ArrayLike = 1.0
) -> float | np.ndarray:
    """E[(Clip(g) − g)²]/E[g²] for g ~ N(μ, σ²) clipped to [−t, t] at t = c·√(μ² + σ²), i.e.
    at c times the root mean square, as distq clips.

    Derivation (ours): with a = (t − μ)/σ and a' = (t + μ)/σ the two tails give
    σ²·[T(a) + T(a')], T(a) = (1 + a²)·Q(a) − a·φ(a), Q the standard normal tail and φ its
    density (the integral of `clip_bias_per_element`, one side at a time). At μ = 0 it is
    `clip_bias_per_element`(c)/σ², and it falls as |μ|/σ grows (an offset gradient's rms is
    mostly its mean, which clipping at c > 1 never cuts): the zero-mean value is the largest
    over Gaussian means (tests/theory checks a grid). Vectorized over c, μ and σ.
    """
    c = _as_array("c", c, 0, True)
    mean = np.asarray(mean, dtype=float)
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean={mean!r}; allowed: finite numbers")
    sigma = _as_array("sigma", sigma, 0, True)
    t = c * np.sqrt(mean**2 + sigma**2)
    return _result(
        (_normal_tail_square(t - mean, sigma) + _normal_tail_square(t + mean, sigma))
        / (mean**2 + sigma**2)
    )


def _normal_tail_square(t: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[(z − t)₊²] for z ~ N(0, σ²): σ²·[(1 + a²)·Q(a) − a·φ(a)], a = t/σ."""
    a = t / sigma
    tail = _erfc(a / math.sqrt(2)) / 2
    density = np.exp(-(a**2) / 2) / math.sqrt(2 * math.pi)
    return sigma**2 * ((1 + a**2) * tail - a * density)


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
