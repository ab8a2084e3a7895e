"""The facts a scheme's record carries (Δ_w, warm start, capped solver), pinned to what the name
checks they replaced gave, and k = 2^(m−1) − 1 against its table."""

import pytest
import torch

from distq.quant import SCHEMES, get_scheme, level_spacing, levels_per_sign, project
from distq.quant.sparse import capped_ternary, max_nonzeros

SPACING = {  # Δ_w in units of α, per scheme and bit width
    "absmean": {2: 1.0},
    "binary": {1: 2.0},
    "bwn": {1: 2.0},
    "binaryconnect": {1: 2.0},
    "linear": {2: 1.0, 3: 1 / 3, 4: 1 / 7, 5: 1 / 15, 6: 1 / 31, 7: 1 / 63, 8: 1 / 127},
    "log": {2: 1.0, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.5, 7: 0.5, 8: 0.5},
    "shared": {2: 2 / 3, 3: 2 / 7, 4: 2 / 15},  # nominal: 2^m values evenly over [−α, α]
    "ternary": {2: 1.0},
    "ternaryconnect": {2: 1.0},
    "ternary-approx": {2: 1.0},
    "ternary2": {2: 1.0},
    "twn": {2: 1.0},
}


def test_levels_per_sign_counts_the_non_zero_magnitudes_of_a_symmetric_code():
    assert [levels_per_sign(m) for m in range(1, 9)] == [0, 1, 3, 7, 15, 31, 63, 127]


def test_every_scheme_has_its_spacing_pinned_for_every_width_it_accepts():
    assert set(SPACING) == set(SCHEMES)
    for scheme, widths in SPACING.items():
        assert tuple(widths) == get_scheme(scheme).bits, scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_level_spacing_is_the_records_delta_w(scheme):
    for bits, delta in SPACING[scheme].items():
        assert level_spacing(scheme, bits) == delta
        assert get_scheme(scheme).level_spacing(bits) == delta


def test_level_spacing_takes_the_only_width_of_a_fixed_width_scheme():
    assert level_spacing("ternary") == 1.0
    with pytest.raises(ValueError, match="needs bits="):
        level_spacing("linear")


def test_the_iterative_solvers_are_the_warm_started_ones():
    warm = {s for s in SCHEMES if get_scheme(s).warm_start}
    assert warm == {"ternary-approx", "linear", "log", "shared"}


def test_the_capped_ternary_solver_serves_the_schemes_whose_capped_problem_is_ternary():
    capped = {s for s in SCHEMES if get_scheme(s).capped_exact({})}
    assert capped == {"ternary", "binary", "bwn"}
    assert get_scheme("twn").capped_exact({"threshold": "exact"})
    assert not get_scheme("twn").capped_exact({"threshold": "approx"})


def test_twn_with_the_exact_threshold_takes_the_capped_ternary_solver_under_a_budget():
    w = torch.randn(1, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    caps = torch.tensor([max_nonzeros(40, 0.75)])
    q, alpha = capped_ternary(w, torch.ones_like(w), caps)
    p = project(w, scheme="twn", sparsity=0.75, threshold="exact")
    assert torch.equal(p.q, q) and torch.equal(p.alpha, alpha[0])
