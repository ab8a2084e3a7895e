"""Properties every projection keeps: values in α·S, invariances, baselines, per-channel, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distq.quant import SCHEMES, get_scheme, levels_per_sign, project

BITS = {"linear": 3, "log": 3, "shared": 3}
LOSS_AWARE = [s for s in SCHEMES if get_scheme(s).loss_aware]


def allowed_values(scheme, alpha, bits):
    """The finite set α·S a scheme may output, for checking membership."""
    if scheme in ("binary", "bwn"):
        return torch.stack([-alpha, alpha])
    if scheme == "binaryconnect":
        return torch.tensor([-1.0, 1.0])
    if scheme == "ternaryconnect":
        return torch.tensor([-1.0, 0.0, 1.0])
    if scheme == "ternary2":
        return torch.stack([-alpha[1], torch.zeros(()), alpha[0]])
    if scheme in ("ternary", "ternary-approx", "twn", "absmean"):
        return torch.stack([-alpha, torch.zeros(()), alpha])
    if get_scheme(scheme).codebook:
        return alpha  # the codebook itself
    k = levels_per_sign(bits)
    if scheme == "linear":
        return alpha * (torch.arange(-k, k + 1) / k)
    mags = torch.exp2(-torch.arange(k, dtype=torch.float32))
    return alpha * torch.cat([-mags, torch.zeros(1), mags])


@settings(max_examples=30, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.integers(1, 400),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-4, 1e3),
)
def test_every_output_lies_in_alpha_times_the_set(scheme, n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * scale
    d = torch.rand(n, generator=g) + 1e-3
    bits = BITS.get(scheme)
    p = project(w, d, scheme, bits)
    assert p.q.shape == w.shape and p.q.dtype == w.dtype
    values = allowed_values(scheme, p.alpha, bits)
    assert torch.isin(p.q, values.to(p.q.dtype)).all()
    if scheme not in ("log", "shared"):  # signs are kept wherever the code is non-zero
        nonzero = p.q != 0
        assert (torch.sign(p.q[nonzero]) == torch.sign(w[nonzero]) + (w[nonzero] == 0)).all()


@pytest.mark.parametrize("scheme", LOSS_AWARE)
def test_alpha_is_unchanged_when_d_is_scaled(scheme):
    g = torch.Generator().manual_seed(1)
    w, d = torch.randn(500, generator=g, dtype=torch.float64), torch.rand(500, generator=g) + 0.1
    d = d.double()
    bits = BITS.get(scheme)
    base = project(w, d, scheme, bits)
    for c in (4.0, 0.125, 3.7):
        scaled = project(w, c * d, scheme, bits)
        assert torch.allclose(scaled.alpha, base.alpha, rtol=1e-12, atol=0)
        assert torch.equal(scaled.q != 0, base.q != 0)


def test_unit_curvature_reproduces_bwn():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(project(w, None, "binary").q, project(w, None, "bwn").q)
    assert torch.equal(project(w, torch.ones_like(w), "binary").q, project(w, None, "bwn").q)


def test_unit_curvature_reproduces_twn_exact_objective():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = project(w, torch.ones_like(w), "ternary")
    assert torch.equal(exact.q, project(w, None, "twn", threshold="exact").q)
    # TWN's own objective max_Δ (Σ_{|w|>Δ}|w|)² / |{|w|>Δ}|, brute force over every threshold.
    a = w.abs().sort(descending=True).values
    scores = a.cumsum(0) ** 2 / torch.arange(1, len(a) + 1)
    k = int(scores.argmax()) + 1
    assert int((exact.q != 0).sum()) == k
    assert exact.alpha.item() == pytest.approx(a[:k].mean().item(), rel=1e-12)


def test_twn_uses_point_seven_mean_threshold():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    p = project(w, None, "twn")
    support = w.abs() > 0.7 * w.abs().mean()
    assert torch.equal(p.q != 0, support)
    assert p.alpha.item() == pytest.approx(w.abs()[support].mean().item(), rel=1e-6)


def test_binaryconnect_is_plain_sign():
    w = torch.tensor([0.3, -2.0, 0.0])
    assert project(w, scheme="binaryconnect").q.tolist() == [1.0, -1.0, 1.0]


def test_ternaryconnect_rounds_to_the_nearest_unscaled_level():
    w = torch.tensor([0.7, -0.2, -0.9, 0.5, -0.51, 3.0])
    p = project(w, torch.rand(6) + 0.1, scheme="ternaryconnect")
    assert p.q.tolist() == [1.0, 0.0, -1.0, 0.0, -1.0, 1.0]
    assert p.alpha.item() == 1.0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_per_channel_equals_projecting_each_row(scheme):
    g = torch.Generator().manual_seed(5)
    w, d = torch.randn(6, 3, 4, generator=g), torch.rand(6, 3, 4, generator=g) + 0.1
    bits = BITS.get(scheme)
    p = project(w, d, scheme, bits, per_channel=True)
    assert p.alpha.shape[0] == 6
    for row in range(6):
        single = project(w[row], d[row], scheme, bits)
        assert torch.equal(p.q[row], single.q)


def test_half_precision_input_keeps_its_dtype():
    w = torch.randn(64, dtype=torch.float16)
    p = project(w, None, "ternary")
    assert p.q.dtype == torch.float16
    assert len(p.q.unique()) <= 3


def test_all_zero_weights_give_zero_without_nan():
    for scheme in SCHEMES:
        if scheme == "binaryconnect":
            continue
        p = project(torch.zeros(10), None, scheme, BITS.get(scheme))
        assert torch.equal(p.q, torch.zeros(10)), scheme
        assert not torch.isnan(p.alpha).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"w": torch.tensor([1.0, math.nan])}, "non-finite"),
        ({"w": torch.tensor([1.0, math.inf])}, "non-finite"),
        ({"w": torch.tensor([1.0, 2.0]), "d": torch.tensor([1.0, math.nan])}, "d has non-finite"),
        ({"w": torch.tensor([1.0, 2.0]), "d": torch.tensor([1.0, -1.0])}, "negative"),
        ({"w": torch.tensor([1.0, 2.0]), "d": torch.tensor([1.0])}, "shape"),
        ({"w": torch.tensor([1.0, 2.0]), "d": torch.zeros(2)}, "all zeros"),
        ({"w": torch.empty(0)}, "empty"),
        ({"w": torch.tensor([1, 2])}, "floating-point"),
        ({"w": torch.ones(3), "scheme": "quaternary"}, "allowed: absmean, binary"),
        ({"w": torch.ones(3), "scheme": "linear"}, "needs bits"),
        ({"w": torch.ones(3), "scheme": "linear", "bits": 9}, "allowed: 2..8"),
        ({"w": torch.ones(3), "scheme": "linear", "bits": 1}, "allowed: 2..8"),
        ({"w": torch.ones(3), "scheme": "ternary", "bits": 3}, "allowed: 2"),
        ({"w": torch.ones(3), "scheme": "ternary", "gamma": 1}, "unknown option"),
        ({"w": torch.ones(3), "scheme": "linear", "bits": 3, "alpha_rule": "x"}, "lsq"),
    ],
)
def test_bad_input_is_a_value_error_that_says_what(kwargs, message):
    with pytest.raises(ValueError, match=message):
        project(**kwargs)
