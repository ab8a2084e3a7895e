"""The exact quantities of benchmarks/theory_linear_regression.py against brute force."""

import itertools

import pytest
import torch

from benchmarks.theory_linear_regression import NOISE, binary_floor, population_loss


@pytest.mark.parametrize("seed", range(5))
def test_binary_floor_is_the_best_over_every_sign_vector(seed):
    d = 8
    w_star = torch.rand(d, generator=torch.Generator().manual_seed(seed)).double() - 0.5
    best = float("inf")
    for signs in itertools.product((-1.0, 1.0), repeat=d):
        b = torch.tensor(signs, dtype=torch.float64)
        alpha = max((b @ w_star).item() / d, 0.0)  # the best α ≥ 0 for this b
        best = min(best, population_loss(alpha * b, w_star))
    assert binary_floor(w_star) == pytest.approx(best, rel=1e-12)


def test_population_loss_matches_sampled_loss():
    g = torch.Generator().manual_seed(7)
    d, n = 20, 400_000
    w_star = torch.rand(d, generator=g, dtype=torch.float64) - 0.5
    w = torch.rand(d, generator=g, dtype=torch.float64) - 0.5
    x = torch.rand(n, d, generator=g, dtype=torch.float64) - 0.5
    y = x @ w_star + NOISE * torch.randn(n, generator=g, dtype=torch.float64)
    sampled = (x @ w - y).square().mean().item() / 2
    assert population_loss(w, w_star) == pytest.approx(sampled, rel=0.01)
