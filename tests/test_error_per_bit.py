"""benchmarks/error_per_bit.py measures what it says: the stochastic quantizer's measured vNMSE
matches its exact expectation, sign's is its closed form, PowerSGD's is the error of torch's hook
output on a real gloo DDP bucket, and the Student-t draws have t(3)'s quantiles."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import error_per_bit as epb

N = 1 << 14
KEYS = 40


def _variant(label: str) -> epb.Variant:
    rows, _ = epb.variants((1, 2, 4))
    return next(v for v in rows if v.label == label)


@pytest.mark.parametrize("label", ["quantize", "quantize, clip 2.5"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantize_matches_its_exact_error(label, bits):
    """Mean over keys within 4 standard errors of E‖Q(x) − g‖²/‖g‖² (variance + clip bias²)."""
    g = epb.Vector(epb.gaussian(N, 3), (N // 4, 3 * N // 4))
    variant = _variant(label)
    values = torch.tensor(epb.vnmse(variant, bits, g, KEYS), dtype=torch.float64)
    exact = epb.exact_quantize_vnmse(variant, bits, g)
    standard_error = float(values.std()) / math.sqrt(KEYS)
    assert abs(float(values.mean()) - exact) < 4 * standard_error + 1e-9, (values.mean(), exact)


def test_sign_is_its_closed_form():
    """sign(g)·mean|g| per bucket: vNMSE = 1 − Σ_b (Σ_b|g|)²/n_b / ‖g‖², below 1, ≈ 1 − 2/π."""
    g = epb.Vector(epb.gaussian(N, 4), (N,))
    measured = epb.vnmse(_variant("sign"), 1, g, 2)
    a = g.values.double().abs().view(-1, epb.BUCKET)
    closed = 1 - float((a.sum(1).square() / epb.BUCKET).sum() / a.square().sum())
    assert measured == pytest.approx([closed, closed], rel=1e-5)
    assert abs(closed - (1 - 2 / math.pi)) < 0.02


def test_powersgd_error_is_the_hooks_output_against_its_input():
    """Through a real one-rank gloo DDP: a rank-1 gradient comes back exact from rank 1 (the
    warm-started power iteration), a Gaussian one loses most of its energy, less at rank 4."""
    shapes = [torch.Size([64, 32]), torch.Size([64])]
    u, v = epb.gaussian(64, 1), epb.gaussian(32, 2)

    def rank_one(n, seed):
        return torch.cat([torch.outer(u, v).reshape(-1) * (seed % 7 + 1), epb.gaussian(64, seed)])

    with epb.one_process_group():
        exact = epb.powersgd_on(shapes, rank_one, range(3), [1])
        noise = epb.powersgd_on(shapes, epb.gaussian, range(3), [1, 4])
    assert len(exact.errors[1]) == 3 and max(exact.errors[1]) < 1e-10
    r1, r4 = (sum(noise.errors[r]) / 3 for r in (1, 4))
    assert 0.5 < r1 < 1 and r4 < r1, (r1, r4)
    # 64x32 at rank r sends (64 + 32)·r numbers, the bias its 64: bits per element of 2112
    assert noise.bits_per_element(1) == pytest.approx(32 * (96 + 64) / 2112)


def test_student_t3_quantiles():
    """P(|t₃| < 1) = 0.6090, P(|t₃| < 3) = 0.9423 (t(3)'s CDF), within Monte Carlo error."""
    t = epb.student_t3(1 << 16, 5).abs()
    for x, p in ((1.0, 0.6090), (3.0, 0.9423)):
        assert abs(float((t < x).double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / t.numel())
