"""The truncated power-law fit against samples of known laws, a brute-force likelihood, and
hand-counted degrees."""

import math

import numpy as np
import pytest

from distq.theory import (
    PowerLawFit,
    degree_report,
    fit_truncated_power_law,
    format_degree_report,
    plot_degree_distribution,
    unit_degrees,
)

K_MIN, K_MAX, N = 1, 200, 5000
GAMMAS = (1.5, 2.0, 2.7)


def sample_power_law(gamma, n, rng, k_min=K_MIN, k_max=K_MAX):
    """n draws of p(k) ∝ k^(−γ) on k_min..k_max by inverse CDF: the first k with F(k) > u."""
    k = np.arange(k_min, k_max + 1)
    cdf = np.cumsum(k ** (-gamma))
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return k[np.minimum(idx, k.size - 1)]


def log_likelihood(gamma, k, k_min, k_max):
    """ℓ(γ) written out directly: −γ·Σ ln k_i − n·ln Σ_{j=k_min}^{k_max} j^(−γ); γ may be a grid."""
    gamma = np.asarray(gamma, dtype=float)
    support = np.arange(k_min, k_max + 1, dtype=float)
    z = (support[None, :] ** -gamma.reshape(-1, 1)).sum(axis=1)
    out = -gamma.reshape(-1) * np.log(k).sum() - k.size * np.log(z)
    return out.reshape(gamma.shape)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_recovers_gamma_and_its_standard_error(gamma):
    rng = np.random.default_rng([7, int(gamma * 10)])
    fits = [
        fit_truncated_power_law(sample_power_law(gamma, N, rng), K_MIN, K_MAX) for _ in range(50)
    ]
    estimates = np.array([f.gamma for f in fits])
    stderrs = np.array([f.stderr for f in fits])
    assert all(f.n == N and f.n_excluded_zero == 0 and f.n_excluded_range == 0 for f in fits)
    assert abs(fits[0].gamma - gamma) <= 3 * fits[0].stderr
    # the mean over 50 fits has standard error sd/√50
    assert abs(estimates.mean() - gamma) <= 3 * estimates.std(ddof=1) / math.sqrt(50)
    # the Fisher-information standard error predicts the spread over repeated samples
    assert estimates.std(ddof=1) == pytest.approx(stderrs.mean(), rel=0.3)
    assert stderrs.std() < 0.05 * stderrs.mean()  # and barely varies from sample to sample


@pytest.mark.parametrize("gamma", GAMMAS)
def test_mle_matches_brute_force_grid(gamma):
    rng = np.random.default_rng([11, int(gamma * 10)])
    k = sample_power_law(gamma, N, rng)
    fit = fit_truncated_power_law(k, K_MIN, K_MAX)
    grid = np.arange(0.5, 4.0, 1e-4)
    values = log_likelihood(grid, k, K_MIN, K_MAX)
    assert abs(fit.gamma - grid[values.argmax()]) <= 1e-4
    direct = float(log_likelihood(fit.gamma, k, K_MIN, K_MAX))
    assert fit.log_likelihood == pytest.approx(direct, rel=1e-12)
    assert fit.log_likelihood >= values.max() - 1e-9 * abs(values.max())
    # stderr = 1/√(−ℓ''(γ̂)): against a central second difference of the direct ℓ
    h = 1e-3
    second = (
        log_likelihood(fit.gamma + h, k, K_MIN, K_MAX)
        - 2 * direct
        + log_likelihood(fit.gamma - h, k, K_MIN, K_MAX)
    ) / h**2
    assert fit.stderr == pytest.approx(1 / math.sqrt(-second), rel=1e-4)


def test_default_cutoffs_zeros_and_range_exclusion():
    k = np.array([0, 0, 0, 1, 1, 2, 3, 5, 8, 8, 13])
    fit = fit_truncated_power_law(k)
    assert (fit.k_min, fit.k_max, fit.n, fit.n_excluded_zero, fit.n_excluded_range) == (
        1,
        13,
        8,
        3,
        0,
    )
    assert fit.gamma == pytest.approx(fit_truncated_power_law(k[k > 0]).gamma, rel=1e-14)
    narrow = fit_truncated_power_law(k, k_min=2, k_max=8)
    assert (narrow.n, narrow.n_excluded_zero, narrow.n_excluded_range) == (5, 3, 3)
    grid = np.arange(-3.0, 5.0, 1e-4)
    inside = k[(k >= 2) & (k <= 8)]
    assert abs(narrow.gamma - grid[log_likelihood(grid, inside, 2, 8).argmax()]) <= 1e-4


def test_ks_and_fitted_law_on_a_small_case():
    k = np.array([1, 1, 1, 2, 2, 3, 4])
    fit = fit_truncated_power_law(k)
    support = np.arange(1, 5)
    pmf = support ** (-fit.gamma) / (support ** (-fit.gamma)).sum()
    np.testing.assert_allclose(fit.pmf(support), pmf, rtol=1e-12)
    assert fit.pmf(0) == 0 and fit.pmf(5) == 0
    np.testing.assert_allclose(fit.ccdf([0, 1, 2, 3, 4, 5]), [1, 1, *(1 - np.cumsum(pmf))[:3], 0])
    emp_cdf = np.array([3, 5, 6, 7]) / 7
    assert fit.ks == pytest.approx(np.abs(emp_cdf - np.cumsum(pmf)).max(), rel=1e-12)
    # the MLE matches the mean of ln k: E_γ̂[ln K] = mean ln k_i
    assert pmf @ np.log(support) == pytest.approx(np.log(k).mean(), rel=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_power_law_preferred_on_power_law_samples(gamma):
    rng = np.random.default_rng([13, int(gamma * 10)])
    fit = fit_truncated_power_law(sample_power_law(gamma, N, rng))
    assert fit.llr > 0
    assert fit.preferred() == "power law"
    assert fit.ks < 1.36 / math.sqrt(N)  # inside the 5% KS band: the law fits


@pytest.mark.parametrize("p", [0.05, 0.15, 0.4])
def test_exponential_preferred_on_geometric_samples(p):
    rng = np.random.default_rng([17, int(p * 100)])
    fit = fit_truncated_power_law(rng.geometric(p, N))
    assert fit.llr < 0
    assert fit.preferred() == "exponential"
    assert fit.exp_rate == pytest.approx(-math.log(1 - p), rel=0.05)  # P(k) ∝ (1 − p)^k
    assert fit.ks > 1.36 / math.sqrt(N)  # and the power law alone is rejected by KS


def test_small_samples_are_undecided():
    fit = fit_truncated_power_law([1, 2, 2, 3])
    assert fit.llr_p > 0.1
    assert fit.preferred() == "undecided"


def test_unit_degrees_hand_counted():
    mask = np.array(
        [
            [1, 0, 1, 1],
            [0, 0, 0, 1],
            [1, 1, 0, 1],
        ],
        dtype=bool,
    )
    in_deg, out_deg = unit_degrees(mask)
    assert in_deg.tolist() == [3, 1, 3]
    assert out_deg.tolist() == [2, 1, 1, 3]
    weight = np.where(mask, np.array([-0.5, 2.0, 1e-30, 7.0]), 0.0)
    assert [d.tolist() for d in unit_degrees(weight)] == [[3, 1, 3], [2, 1, 1, 3]]
    conv = weight.reshape(3, 2, 1, 2)  # out × in × kh × kw flattens to out × (in·kh·kw)
    assert [d.tolist() for d in unit_degrees(conv)] == [[3, 1, 3], [2, 1, 1, 3]]


def test_unit_degrees_of_a_torch_tensor():
    torch = pytest.importorskip("torch")
    weight = torch.tensor([[0.0, 1.0], [2.0, 3.0]], requires_grad=True, dtype=torch.bfloat16)
    assert [d.tolist() for d in unit_degrees(weight)] == [[1, 2], [1, 2]]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.ones(3), r"shape \(3,\)"),
        (np.float64(1.0), r"shape \(\)"),
        (np.zeros((0, 4)), r"shape \(0, 4\).*non-empty"),
        (np.array([["a", "b"]]), "dtype <U1"),
    ],
)
def test_unit_degrees_bad_input(value, match):
    with pytest.raises(ValueError, match=match):
        unit_degrees(value)


@pytest.mark.parametrize(
    ("degrees", "kwargs", "match"),
    [
        ([1, 2, -3], {}, "degree -3 "),
        ([1, 2.5, 3], {}, "degree 2.5 "),
        ([1, float("nan"), 3], {}, "degree nan "),
        ([], {}, r"no positive value \(0 given"),
        ([0, 0], {}, r"no positive value \(2 given, 2 zero\)"),
        ([4, 4, 4], {}, "k_min=4, k_max=4"),
        ([1, 2, 3], {"k_min": 3, "k_max": 2}, "k_min=3, k_max=2"),
        ([1, 2, 3], {"k_min": 0}, "k_min=0"),
        ([1, 2, 3], {"k_max": 2.5}, "k_max=2.5"),
        ([1, 2, 3], {"k_min": True}, "k_min=True"),
        ([1, 2, 3], {"k_min": 10, "k_max": 20}, r"no positive degree lies in k_min=10\.\.k_max=20"),
        ([2, 2, 9], {"k_min": 2, "k_max": 5}, r"all 2 degrees in k_min=2\.\.k_max=5 equal 2"),
        ([1, 5, 5], {"k_min": 2, "k_max": 5}, "equal 5, a cut-off"),
        (["a"], {}, "dtype <U1"),
    ],
)
def test_fit_bad_input(degrees, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_truncated_power_law(degrees, **kwargs)


def test_plot_is_written(tmp_path):
    rng = np.random.default_rng(3)
    k = sample_power_law(2.0, 2000, rng)
    fit = fit_truncated_power_law(k)
    path = plot_degree_distribution(k, fit, tmp_path / "sub" / "degrees.png", title="test")
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    with pytest.raises(ValueError, match="fit=None"):
        plot_degree_distribution(k, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"support 1\.\.4"):
        plot_degree_distribution([7, 8], fit_truncated_power_law([1, 2, 4]), tmp_path / "x.png")


def test_degree_report(tmp_path):
    rng = np.random.default_rng(5)
    # a pruned layer whose rows keep a power-law number of inputs
    rows = sample_power_law(2.0, 300, rng, 1, 150)
    pruned = np.zeros((300, 150))
    for i, r in enumerate(rows):
        pruned[i, rng.choice(150, size=r, replace=False)] = rng.standard_normal(r)
    weights = {
        "fc1.weight": pruned,
        "fc1.bias": np.ones(300),  # skipped: no connectivity
        "fc2.weight": np.ones((4, 6)),  # dense: every degree equal, no fit
        "conv.weight": (rng.random((8, 3, 3, 3)) < 0.3).astype(float),
    }
    report = degree_report(weights, plot_dir=tmp_path)
    assert list(report) == ["fc1.weight", "fc2.weight", "conv.weight"]
    fc1 = report["fc1.weight"]
    assert fc1.shape == (300, 150)
    np.testing.assert_array_equal(fc1.in_degrees, rows)
    assert fc1.in_fit.gamma == fit_truncated_power_law(rows).gamma
    assert isinstance(fc1.out_fit, PowerLawFit) and fc1.in_error is None
    assert fc1.out_degrees.sum() == rows.sum()
    fc2 = report["fc2.weight"]
    assert fc2.in_fit is None and "k_min=6, k_max=6" in fc2.in_error
    assert fc2.out_fit is None and "k_min=4, k_max=4" in fc2.out_error
    assert report["conv.weight"].in_degrees.size == 8
    assert report["conv.weight"].out_degrees.size == 27
    assert (tmp_path / "fc1.weight.in.png").stat().st_size > 0
    assert (tmp_path / "fc1.weight.out.png").stat().st_size > 0
    assert not (tmp_path / "fc2.weight.in.png").exists()
    table = format_degree_report(report)
    assert len(table.splitlines()) == 1 + 2 * 3
    assert "fc2.weight                       in   no fit: k_min=6, k_max=6" in table
