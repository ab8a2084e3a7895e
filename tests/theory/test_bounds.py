"""The theory's terms against Monte Carlo with a numpy model of distq's stochastic quantizer."""

import itertools
import math

import numpy as np
import pytest

from distq.theory import (
    clip_bias_per_element,
    clip_bias_relative,
    grad_blowup_clipped,
    grad_blowup_clipped_bound,
    grad_blowup_unclipped,
    lemma3_variance_bound,
    level_spacing,
    sign_blowup_bound,
    weight_error_floor,
)


def bucket_rows(g, bucket):
    """g as [buckets, width] rows, zero-padded (one row when bucket is None)."""
    width = g.size if bucket is None else bucket
    return np.pad(g, (0, -g.size % width)).reshape(-1, width)


def quantize(g, bits, bucket, rng, trials):
    """`trials` draws of Q(g): levels r/k, k = 2^(bits−1) − 1, scale max|g| per bucket,
    unbiased stochastic rounding between the two nearest levels. Shape [trials, g.size]."""
    k = 2 ** (bits - 1) - 1
    rows = bucket_rows(g, bucket)
    s = np.abs(rows).max(axis=1, keepdims=True)
    s = np.where(s > 0, s, 1.0)
    x = np.abs(rows) / s * k
    low = np.floor(x)
    up = rng.random((trials, *rows.shape)) < (x - low)
    q = np.sign(rows) * (low + up) * s / k
    return q.reshape(trials, -1)[:, : g.size]


def exact_variance(g, bits, bucket):
    """E‖Q(g) − g‖² in closed form: Σ p(1 − p)·(s/k)² over elements."""
    k = 2 ** (bits - 1) - 1
    rows = bucket_rows(g, bucket)
    s = np.abs(rows).max(axis=1, keepdims=True)
    s = np.where(s > 0, s, 1.0)
    x = np.abs(rows) / s * k
    p = x - np.floor(x)
    return float(np.sum(p * (1 - p) * (s / k) ** 2))


DISTRIBUTIONS = ("gaussian", "heavy-tailed", "sparse")


def distribution(name, d, rng):
    if name == "gaussian":
        return rng.standard_normal(d)
    if name == "heavy-tailed":
        return rng.standard_t(df=2, size=d)
    return rng.standard_normal(d) * (rng.random(d) < 0.05)  # sparse: 95% zeros


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("bucket", [None, 256, 300])
def test_lemma3_holds(bits, dist, bucket):
    rng = np.random.default_rng([bits, DISTRIBUTIONS.index(dist), bucket or 0])
    g = distribution(dist, 3000, rng)
    bound = lemma3_variance_bound(g, level_spacing(bits), bucket)
    exact = exact_variance(g, bits, bucket)
    assert exact <= bound * (1 + 1e-12)
    if bits == 2:  # levels {−s, 0, s}: E‖Q(g)‖² = ‖g‖² + exact attains the bound
        assert exact + (g**2).sum() == pytest.approx(bound, rel=1e-9)

    errors = ((quantize(g, bits, bucket, rng, 400) - g) ** 2).sum(axis=1)
    mean, stderr = errors.mean(), errors.std() / math.sqrt(errors.size)
    assert abs(mean - exact) <= 5 * stderr + 1e-12  # the numpy quantizer is the model
    assert mean <= bound + 5 * stderr


def test_lemma3_is_unbiased_model():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(200)
    q = quantize(g, 3, 64, rng, 20000)
    assert np.abs(q.mean(axis=0) - g).max() < 5 * q.std(axis=0).max() / math.sqrt(20000)


def test_lemma3_bucket_sum_and_padding():
    g = np.array([3.0, -1.0, 0.0, 2.0, -4.0])
    # one bucket: 1 · 4 · 10; buckets of 2: 3·4 + 2·2 + 4·4
    assert lemma3_variance_bound(g, 1.0) == 40.0
    assert lemma3_variance_bound(g, 0.5, bucket_size=2) == pytest.approx(0.5 * 32)
    assert lemma3_variance_bound(g.reshape(5, 1), 1.0) == 40.0  # flattened
    assert lemma3_variance_bound(np.array([]), 1.0) == 0.0


def blowups(d, clip, rng, trials):
    """Measured E‖Q(g)‖²/‖g‖² for 2-bit, one scale a tensor, g ~ N(0, 1)^d (clipped at
    clip·σ, σ = the draw's std, before quantizing when clip is given)."""
    ratios = []
    for _ in range(trials):
        g = rng.standard_normal(d)
        x = g if clip is None else np.clip(g, -clip * g.std(), clip * g.std())
        q = quantize(x, 2, None, rng, 1)[0]
        ratios.append((q**2).sum() / (g**2).sum())
    return float(np.mean(ratios))


def test_blowup_grows_with_d_unclipped_and_not_clipped():
    rng = np.random.default_rng(1)
    dims = [100, 1000, 10_000, 100_000]
    delta = level_spacing(2)
    unclipped = [blowups(d, None, rng, max(20, 400_000 // d)) for d in dims]
    clipped = [blowups(d, 2.5, rng, max(20, 400_000 // d)) for d in dims]
    # the max|g| scale grows like √(2 ln d): the measured blow-up grows with d
    assert all(b - a > 0.2 for a, b in itertools.pairwise(unclipped))
    assert unclipped[-1] - unclipped[0] > 1.0
    # clipped at 2.5σ: the scale is ≤ 2.5σ whatever d, the blow-up stays put
    assert max(clipped) - min(clipped) < 0.15
    for d, u, c in zip(dims, unclipped, clipped, strict=True):
        assert u <= grad_blowup_unclipped(d, delta)
        assert c <= grad_blowup_clipped(2.5, delta)


def test_unclipped_blowup_is_the_worst_case():
    """‖g‖_∞‖g‖₁ ≤ ((1 + √d)/2)‖g‖², with equality at g = (1, t, …, t), t = 1/(1 + √d)."""
    rng = np.random.default_rng(2)
    for d in (1, 2, 10, 1000):
        g = np.r_[1.0, np.full(d - 1, 1 / (1 + math.sqrt(d)))]
        worst = 1 + np.abs(g).max() * np.abs(g).sum() / (g**2).sum()
        assert worst == pytest.approx(grad_blowup_unclipped(d, 1.0), rel=1e-12)
        for _ in range(50):
            h = rng.standard_t(df=1, size=d)
            ratio = np.abs(h).max() * np.abs(h).sum() / (h**2).sum()
            assert 1 + ratio <= grad_blowup_unclipped(d, 1.0) * (1 + 1e-12)


@pytest.fixture(scope="module")
def normal_samples():
    return np.random.default_rng(3).standard_normal(2 * 10**7)


@pytest.mark.parametrize("c", [1.0, 1.5, 2.0, 2.5, 3.0])
def test_clip_bias_matches_simulation(c, normal_samples):
    sigma = 0.7
    g = sigma * normal_samples
    simulated = float(np.mean((np.clip(g, -c * sigma, c * sigma) - g) ** 2))
    predicted = clip_bias_per_element(c, sigma)
    assert abs(simulated - predicted) / predicted < 0.05


def test_clip_bias_matches_quadrature():
    z = np.linspace(0, 40, 400_001)
    for c in (0.1, 1.0, 2.5, 5.0):
        integrand = (
            np.where(z > c, (z - c) ** 2, 0.0) * np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
        )
        assert clip_bias_per_element(c) == pytest.approx(2 * np.trapezoid(integrand, z), rel=1e-6)


@pytest.mark.parametrize("c", [1.5, 2.5])
@pytest.mark.parametrize("mean", [0.0, 0.5, 2.0, -3.0])
def test_rms_clip_bias_matches_simulation(c, mean, normal_samples):
    """distq clips at c·√mean(g²): offset gradients lose less than zero-mean ones."""
    sigma = 0.7
    g = mean + sigma * normal_samples
    limit = c * math.sqrt(mean**2 + sigma**2)
    simulated = float(np.mean((np.clip(g, -limit, limit) - g) ** 2) / np.mean(g**2))
    predicted = clip_bias_relative(c, mean, sigma)
    assert abs(simulated - predicted) <= 0.05 * predicted + 1e-7
    if mean == 0.0:
        assert predicted == pytest.approx(clip_bias_per_element(c, sigma) / sigma**2, rel=1e-12)


def test_zero_mean_is_the_largest_rms_clip_bias():
    means = np.linspace(-5, 5, 201)
    for c in (1.0, 1.5, 2.5, 3.0):
        values = clip_bias_relative(c, means)
        assert np.all(values <= clip_bias_relative(c) * (1 + 1e-12))


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipped_bound_holds_for_every_gradient(dist, bits):
    """1 + c·Δ_g bounds E‖Q(Clip(g))‖²/‖g‖² (exact expectation) for any g, clipped at c·rms."""
    rng = np.random.default_rng(bits)
    for c in (1.0, 2.5):
        for bucket in (None, 64):
            g = distribution(dist, 4096, rng) + (0.3 if dist == "gaussian" else 0.0)
            limit = c * math.sqrt(np.mean(g**2))
            x = np.clip(g, -limit, limit)
            blowup = ((x**2).sum() + exact_variance(x, bits, bucket)) / (g**2).sum()
            assert blowup <= grad_blowup_clipped_bound(c, level_spacing(bits)) + 1e-12


def test_stochastic_sign_bound_is_the_bucket_size():
    """±max|g| codes: E‖Q(g)‖² = B·Σ s_b² ≤ B·‖g‖², equal for one non-zero per bucket (the
    Lemma 3 form gave 12.8 at B = 512 where 236.8 was measured)."""
    rng = np.random.default_rng(4)
    for bucket in (8, 512):
        for name in DISTRIBUTIONS:
            g = distribution(name, 4096, rng)
            s = np.abs(bucket_rows(g, bucket)).max(axis=1)
            assert bucket * (s**2).sum() / (g**2).sum() <= sign_blowup_bound(bucket)
        one_hot = np.zeros(bucket)
        one_hot[3] = -2.0
        assert bucket * 4.0 / (one_hot**2).sum() == sign_blowup_bound(bucket)


def test_limits_and_known_values():
    assert weight_error_floor(2, 3, 4, 1, 1) == pytest.approx(6 * math.sqrt(10))
    assert weight_error_floor(2, 3, 100, 0.5, 0) == pytest.approx(2 * 3 * 3)  # Δ_w = 0: G·D²
    assert grad_blowup_unclipped(1, 0.5) == 1.5
    assert grad_blowup_clipped(2.5, 1.0) == pytest.approx(1 + 2.5 * math.sqrt(2 / math.pi))
    assert clip_bias_per_element(1e-9, 2.0) == pytest.approx(4.0)  # c → 0: all of σ²
    assert clip_bias_per_element(40.0) == 0.0
    assert [level_spacing(b) for b in (2, 3, 4, 8)] == [1.0, 1 / 3, 1 / 7, 1 / 127]


def test_vectorized():
    d = np.array([1.0, 4.0, 9.0])
    np.testing.assert_allclose(grad_blowup_unclipped(d, 1.0), [2.0, 2.5, 3.0])
    c = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(clip_bias_per_element(c), [clip_bias_per_element(x) for x in c])
    np.testing.assert_allclose(
        grad_blowup_clipped(c, 0.5), [grad_blowup_clipped(x, 0.5) for x in c]
    )
    assert weight_error_floor(1, 1, d, 1, 1).shape == (3,)
    assert isinstance(clip_bias_per_element(2.0), float)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: level_spacing(1), "bits=1"),
        (lambda: level_spacing(9), "bits=9"),
        (lambda: level_spacing(2.0), "bits=2.0"),
        (lambda: weight_error_floor(-1, 1, 1, 1, 1), "G=-1"),
        (lambda: weight_error_floor(1, 1, 0, 1, 1), "d=0"),
        (lambda: weight_error_floor(1, 1, 1, 1, math.nan), "delta_w=nan"),
        (lambda: grad_blowup_unclipped(0, 1.0), "d=0"),
        (lambda: grad_blowup_unclipped(10, 0.0), "delta_g=0.0"),
        (lambda: grad_blowup_unclipped(np.array([4, -1]), 1.0), r"d=array\(\[ 4, -1\]\)"),
        (lambda: grad_blowup_clipped(0.0, 1.0), "c=0.0"),
        (lambda: grad_blowup_clipped(math.inf, 1.0), "c=inf"),
        (lambda: clip_bias_per_element(-1.0), "c=-1.0"),
        (lambda: clip_bias_per_element(1.0, -2.0), "sigma=-2.0"),
        (lambda: lemma3_variance_bound(np.ones(3), 0.0), "delta_g=0.0"),
        (lambda: lemma3_variance_bound(np.ones(3), [1.0, 2.0]), "one positive number"),
        (lambda: lemma3_variance_bound(np.ones(3), 1.0, 0), "bucket_size=0"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
