"""Connectivity of a pruned network: unit degrees and their truncated power-law fit.

After joint quantization and sparsification, a layer's weight W (out_features × in_features) is a
bipartite graph: output unit i and input unit j are connected where W[i, j] ≠ 0. The in-degree of
an output unit is its row's non-zero count, the out-degree of an input unit its column's. We fit
the degrees by a discrete power law truncated to a finite support,

    p(k) = k^(−γ) / Z(γ),   Z(γ) = Σ_{k = k_min}^{k_max} k^(−γ),   k ∈ {k_min, …, k_max},

by maximum likelihood with the exact finite normalisation Z (no continuous approximation), and
compare it with a discrete exponential (a geometric law) on the same support, so a user can see
whether the power law is actually preferred. Numpy only; matplotlib is imported by the plot alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

_MAX_ITER = 200


def _to_numpy(value: Any) -> np.ndarray:
    """value as a numpy array; a torch tensor (anything with .detach) via .detach().cpu().numpy(),
    so that this module never imports torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        try:
            value = value.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16): non-zeros survive the cast
            value = value.float().numpy()
    return np.asarray(value)


def unit_degrees(mask_or_weight: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(in_degrees, out_degrees) of a layer: non-zeros per row and per column of its weight.

    mask_or_weight is a boolean mask or a weight of shape (out_features, in_features); a weight
    with more dimensions (a conv weight out × in × kh × kw) is flattened to out × rest, so its
    "input units" are the (input channel, kernel position) pairs. in_degrees[i] counts the inputs
    of output unit i, out_degrees[j] the outputs that input unit j feeds. Any non-zero value
    counts as a connection (NaN included: it is not a pruned weight). Torch tensors are accepted.
    """
    w = _to_numpy(mask_or_weight)
    if w.dtype.kind not in "biufc":
        raise ValueError(f"mask_or_weight has dtype {w.dtype}; allowed: a boolean or numeric array")
    if w.ndim < 2:
        raise ValueError(
            f"mask_or_weight has shape {w.shape}; allowed: ≥ 2 dimensions (out × in, or a conv "
            "weight flattened to out × rest); a bias or norm scale has no connectivity"
        )
    if w.size == 0:
        raise ValueError(f"mask_or_weight has shape {w.shape}; allowed: a non-empty array")
    w = w.reshape(w.shape[0], -1)
    return np.count_nonzero(w, axis=1), np.count_nonzero(w, axis=0)


def _log_partition(theta: float, t: np.ndarray) -> tuple[float, float, float]:
    """(ln Σ exp(−θ·t), E[t], Var[t]) under p(t) ∝ exp(−θ·t) on the points t, stably (the largest
    exponent is factored out, so any finite θ works)."""
    e = -theta * t
    top = e.max()
    w = np.exp(e - top)
    total = w.sum()
    p = w / total
    mean = float(p @ t)
    var = float(p @ (t - mean) ** 2)
    return float(top + math.log(total)), mean, var


def _fit_natural_parameter(t: np.ndarray, target: float) -> float:
    """The θ with E_θ[t] = target for p(t) ∝ exp(−θ·t) on the support points t.

    This is the maximum-likelihood equation of that one-parameter exponential family when target
    is the sample mean of t. E_θ[t] falls strictly with θ (its derivative is −Var_θ[t] < 0), so
    the root is unique; it exists iff min t < target < max t. Solved by Newton's method on
    E_θ[t] − target, kept inside a bracket and falling back to bisection when a step leaves it.
    """
    scale = max(1.0, float(np.abs(t).max()))

    def f(theta: float) -> tuple[float, float]:
        _, mean, var = _log_partition(theta, t)
        return mean - target, var

    lo, hi = -1.0 / scale, 1.0 / scale
    while f(hi)[0] > 0:  # E_θ[t] → min t as θ → +∞, so this ends when target > min t
        lo, hi = hi, 2 * hi
    while f(lo)[0] < 0:
        lo, hi = 2 * lo, lo
    theta = 0.5 * (lo + hi)
    for _ in range(_MAX_ITER):
        g, var = f(theta)
        if g == 0:
            return theta
        if g > 0:
            lo = theta
        else:
            hi = theta
        newton = theta + g / var if var > 0 else math.nan  # θ − g/g', with g' = −Var_θ[t]
        step = newton if lo < newton < hi else 0.5 * (lo + hi)
        if abs(step - theta) <= 1e-13 * max(1.0, abs(theta)):
            return step
        theta = step
    return theta


@dataclass(frozen=True)
class PowerLawFit:
    """A discrete power law p(k) ∝ k^(−γ) on k_min..k_max fitted by maximum likelihood.

    gamma: the exponent γ̂. stderr: its standard error 1/√I from the observed Fisher information
    I = −ℓ''(γ̂) = n·Var_γ̂[ln k]. n: samples used (positive degrees within the cut-offs);
    n_excluded_zero: zero degrees dropped (units pruned away entirely, which a power law cannot
    hold); n_excluded_range: positive degrees outside explicit cut-offs, also dropped.
    log_likelihood: ℓ(γ̂), natural log, summed over the n samples. ks: Kolmogorov–Smirnov distance
    max_k |F_emp(k) − F_fit(k)| over the support (both CDFs are steps at integers, so this is the
    sup over all k).
    The alternative is a discrete exponential p(k) ∝ e^(−λk) (a truncated geometric law) fitted by
    maximum likelihood on the same support: exp_rate is λ̂, exp_log_likelihood its ℓ,
    llr = ℓ_power − ℓ_exp (> 0: power law more likely), llr_p the two-sided p-value of Vuong's
    test that the two fit equally well (both laws have one parameter, so no penalty is needed;
    Clauset, Shalizi, Newman 2009, §5).
    """

    gamma: float
    stderr: float
    k_min: int
    k_max: int
    n: int
    n_excluded_zero: int
    n_excluded_range: int
    log_likelihood: float
    ks: float
    exp_rate: float
    exp_log_likelihood: float
    llr: float
    llr_p: float

    def support(self) -> np.ndarray:
        """The integers k_min..k_max."""
        return np.arange(self.k_min, self.k_max + 1)

    def pmf(self, k: ArrayLike) -> np.ndarray:
        """The fitted p(k); 0 outside the support."""
        k = np.asarray(k, dtype=float)
        log_z, _, _ = _log_partition(self.gamma, np.log(self.support()))
        inside = (k >= self.k_min) & (k <= self.k_max)
        safe = np.where(inside, k, 1.0)
        return np.where(inside, np.exp(-self.gamma * np.log(safe) - log_z), 0.0)

    def ccdf(self, k: ArrayLike) -> np.ndarray:
        """The fitted P(K ≥ k)."""
        support = self.support()
        tail = np.cumsum(self.pmf(support)[::-1])[::-1]  # tail[i] = P(K ≥ support[i])
        idx = np.clip(np.ceil(np.asarray(k, dtype=float)) - self.k_min, 0, None)
        return np.where(idx < support.size, tail[np.minimum(idx, support.size - 1).astype(int)], 0)

    def preferred(self, significance: float = 0.1) -> str:
        """ "power law", "exponential", or "undecided" when Vuong's p-value is ≥ significance
        (0.1 as in Clauset et al.: the sign of llr alone is not evidence)."""
        if self.llr_p >= significance:
            return "undecided"
        return "power law" if self.llr > 0 else "exponential"


def _check_cutoff(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}; allowed: a positive int or None")
    return int(value)


def _as_degrees(degrees: ArrayLike) -> np.ndarray:
    """degrees flattened to an int array; each must be a finite non-negative integer."""
    d = _to_numpy(degrees).ravel()
    if d.dtype.kind not in "biuf":
        raise ValueError(f"degrees have dtype {d.dtype}; allowed: non-negative integers")
    bad = ~np.isfinite(d) | (d < 0) | (d != np.round(d)) if d.dtype.kind == "f" else d < 0
    if np.any(bad):
        raise ValueError(
            f"degree {d[bad][0].item()!r} is not allowed: degrees are non-negative integers"
        )
    return d.astype(np.int64)


def _fitting_sample(
    degrees: ArrayLike, k_min: int | None, k_max: int | None
) -> tuple[np.ndarray, int, int, int, int]:
    """(the degrees fitted, k_min, k_max, zeros excluded, positive degrees outside the cut-offs
    excluded), refusing samples that have no finite maximum-likelihood exponent."""
    d = _as_degrees(degrees)
    positive = d[d > 0]
    n_zero = int(d.size - positive.size)
    if positive.size == 0:
        raise ValueError(
            f"degrees have no positive value ({d.size} given, {n_zero} zero); a power law needs "
            "positive degrees"
        )
    lo = int(positive.min()) if k_min is None else _check_cutoff("k_min", k_min)
    hi = int(positive.max()) if k_max is None else _check_cutoff("k_max", k_max)
    if lo >= hi:
        raise ValueError(
            f"k_min={lo}, k_max={hi}; allowed: k_min < k_max (all degrees equal? a one-point "
            "support has no exponent)"
        )
    k = positive[(positive >= lo) & (positive <= hi)]
    n_range = int(positive.size - k.size)
    if k.size == 0:
        raise ValueError(f"no positive degree lies in k_min={lo}..k_max={hi}")
    if np.all(k == lo) or np.all(k == hi):
        raise ValueError(
            f"all {k.size} degrees in k_min={lo}..k_max={hi} equal {int(k[0])}, a cut-off: the "
            "maximum-likelihood exponent is infinite"
        )

    return k, lo, hi, n_zero, n_range


def fit_truncated_power_law(
    degrees: ArrayLike, k_min: int | None = None, k_max: int | None = None
) -> PowerLawFit:
    """Fit p(k) = k^(−γ)/Z(γ) on the integers k_min..k_max to degrees by maximum likelihood.

    Cut-offs default to the smallest and largest positive degree. Zero degrees are excluded (ln 0
    is undefined: a unit with no connection left is outside any power law) and counted; with
    explicit cut-offs, positive degrees outside them are excluded and counted too.

    The log-likelihood of n samples k_i is ℓ(γ) = −γ·Σ ln k_i − n·ln Z(γ). It is concave in γ:
    ln Z(γ) = ln Σ_k exp(−γ·ln k) is a log-sum-exp of functions linear in γ, hence convex, and
    ℓ''(γ) = −n·Var_γ[ln K] < 0 whenever the support has two or more points (the family is an
    exponential family with natural parameter −γ and sufficient statistic ln k). So the maximum
    is the unique root of ℓ'(γ) = n·(E_γ[ln K] − mean ln k_i), found by safeguarded Newton; it is
    finite iff the samples are not all at k_min (γ̂ → +∞) or all at k_max (γ̂ → −∞), which is
    checked. γ may come out ≤ 1: on a finite support any real γ normalises.
    """
    k, lo, hi, n_zero, n_range = _fitting_sample(degrees, k_min, k_max)
    support = np.arange(lo, hi + 1, dtype=float)
    log_support, log_k = np.log(support), np.log(k.astype(float))
    gamma = _fit_natural_parameter(log_support, float(log_k.mean()))
    log_z, _, var = _log_partition(gamma, log_support)
    log_p = -gamma * log_k - log_z
    n = int(k.size)

    counts = np.bincount(k - lo, minlength=support.size)
    fitted = np.exp(-gamma * log_support - log_z)
    ks = float(np.max(np.abs(np.cumsum(counts) / n - np.cumsum(fitted))))

    rate = _fit_natural_parameter(support, float(k.mean()))
    log_z_exp, _, _ = _log_partition(rate, support)
    log_p_exp = -rate * k - log_z_exp
    diff = log_p - log_p_exp
    llr = float(diff.sum())
    sigma = float(diff.std())
    llr_p = math.erfc(abs(llr) / (sigma * math.sqrt(2 * n))) if sigma > 0 else 1.0

    return PowerLawFit(
        gamma=float(gamma),
        stderr=1.0 / math.sqrt(n * var),
        k_min=lo,
        k_max=hi,
        n=n,
        n_excluded_zero=n_zero,
        n_excluded_range=n_range,
        log_likelihood=float(log_p.sum()),
        ks=ks,
        exp_rate=float(rate),
        exp_log_likelihood=float(log_p_exp.sum()),
        llr=llr,
        llr_p=float(llr_p),
    )


def plot_degree_distribution(
    degrees: ArrayLike, fit: PowerLawFit, path: str | Path, title: str = "Degree distribution"
) -> Path:
    """Write a log-log PNG of the degrees within the fit's support and the fit: left the empirical
    PMF (points) against the fitted k^(−γ)/Z (line), right the complementary CDF P(K ≥ k), whose
    tail is less noisy than the PMF's. The discrete exponential alternative is drawn dashed.

    Uses matplotlib's object API on an Agg canvas (no pyplot, no global backend change), imported
    here so that importing distq.theory stays numpy-only. Parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(fit, PowerLawFit):
        raise ValueError(f"fit={fit!r}; allowed: a PowerLawFit")
    d = _as_degrees(degrees)
    k = d[(d >= fit.k_min) & (d <= fit.k_max)]
    if k.size == 0:
        raise ValueError(f"no degree lies in the fit's support {fit.k_min}..{fit.k_max}")
    support = fit.support()
    counts = np.bincount(k - fit.k_min, minlength=support.size)
    seen = counts > 0
    emp_ccdf = np.cumsum(counts[::-1])[::-1] / k.size
    exp_log = -fit.exp_rate * support
    exp_pmf = np.exp(exp_log - exp_log.max())
    exp_pmf /= exp_pmf.sum()
    exp_ccdf = np.cumsum(exp_pmf[::-1])[::-1]

    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    pmf_ax, ccdf_ax = fig.subplots(1, 2)
    label = f"power law γ = {fit.gamma:.3f} ± {fit.stderr:.3f}"
    pmf_ax.loglog(
        support[seen], counts[seen] / k.size, "o", ms=3, label=f"empirical (n = {k.size})"
    )
    pmf_ax.loglog(support, fit.pmf(support), "-", color="tab:red", label=label)
    pmf_ax.loglog(
        support, exp_pmf, "--", color="tab:gray", label=f"exponential λ = {fit.exp_rate:.3g}"
    )
    pmf_ax.set_ylim(bottom=0.5 / k.size)
    pmf_ax.set_ylabel("P(K = k)")
    ccdf_ax.loglog(support[seen], emp_ccdf[seen], "o", ms=3, label="empirical")
    ccdf_ax.loglog(support, fit.ccdf(support), "-", color="tab:red", label="power law")
    ccdf_ax.loglog(support, exp_ccdf, "--", color="tab:gray", label="exponential")
    ccdf_ax.set_ylim(bottom=0.5 / k.size)
    ccdf_ax.set_ylabel("P(K ≥ k)")
    ccdf_ax.set_title(
        f"KS = {fit.ks:.3f}; LLR vs exp. = {fit.llr:.1f} (p = {fit.llr_p:.2g}): {fit.preferred()}",
        fontsize=9,
    )
    for ax in (pmf_ax, ccdf_ax):
        ax.set_xlabel("degree k")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


@dataclass(frozen=True)
class LayerDegrees:
    """One weight tensor's degrees and fits. in_*: the in-degrees of its output units (rows);
    out_*: the out-degrees of its input units (columns). A fit that cannot be made (e.g. an
    unpruned layer, where every unit has the same degree) is None, with the reason in *_error."""

    name: str
    shape: tuple[int, ...]
    in_degrees: np.ndarray
    out_degrees: np.ndarray
    in_fit: PowerLawFit | None
    out_fit: PowerLawFit | None
    in_error: str | None
    out_error: str | None


def _try_fit(degrees: np.ndarray) -> tuple[PowerLawFit | None, str | None]:
    try:
        return fit_truncated_power_law(degrees), None
    except ValueError as error:
        return None, str(error)


def degree_report(
    named_weights: Mapping[str, Any], plot_dir: str | Path | None = None
) -> dict[str, LayerDegrees]:
    """In- and out-degree fits of every weight with ≥ 2 dimensions (e.g. a model's
    named_parameters(), as a dict); 0-d and 1-d tensors (biases, norm scales) are skipped.

    Values may be numpy arrays or torch tensors. A fit that fails does not stop the report: see
    LayerDegrees. With plot_dir, writes "<name>.in.png" and "<name>.out.png" per fitted tensor
    (characters other than letters, digits, ".", "_" and "-" in the name become "_").
    """
    report = {}
    for name, value in named_weights.items():
        w = _to_numpy(value)
        if w.ndim < 2:
            continue
        in_deg, out_deg = unit_degrees(w)
        in_fit, in_error = _try_fit(in_deg)
        out_fit, out_error = _try_fit(out_deg)
        report[name] = LayerDegrees(
            name, tuple(w.shape), in_deg, out_deg, in_fit, out_fit, in_error, out_error
        )
        if plot_dir is not None:
            stem = re.sub(r"[^\w.-]", "_", name)
            for side, deg, fit in (("in", in_deg, in_fit), ("out", out_deg, out_fit)):
                if fit is not None:
                    path = Path(plot_dir) / f"{stem}.{side}.png"
                    plot_degree_distribution(deg, fit, path, title=f"{name}: {side}-degrees")
    return report


def format_degree_report(report: Mapping[str, LayerDegrees]) -> str:
    """A text table of a degree_report: one line per tensor and side."""
    lines = [
        f"{'tensor':<32} {'side':<4} {'n':>6} {'zero':>5} {'k range':>11} {'gamma':>14} "
        f"{'KS':>6} {'LLR':>9} preferred"
    ]
    for layer in report.values():
        for side, fit, error in (
            ("in", layer.in_fit, layer.in_error),
            ("out", layer.out_fit, layer.out_error),
        ):
            if fit is None:
                lines.append(f"{layer.name:<32} {side:<4} no fit: {error}")
                continue
            gamma = f"{fit.gamma:.3f}±{fit.stderr:.3f}"
            k_range = f"{fit.k_min}..{fit.k_max}"
            lines.append(
                f"{layer.name:<32} {side:<4} {fit.n:>6} {fit.n_excluded_zero:>5} {k_range:>11} "
                f"{gamma:>14} {fit.ks:>6.3f} {fit.llr:>9.1f} {fit.preferred()}"
            )
    return "\n".join(lines)
