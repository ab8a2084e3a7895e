"""clip_by_rms_: per-tensor limits against a float64 brute force, offset and constant gradients
kept whole, extreme magnitudes without overflow, the copying form (`source`) equal to the in-place
one bit for bit, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from distq.comm.clipping import clip_by_rms_, root_mean_square


def brute_force(x: torch.Tensor, c: float, lengths: list[int]) -> torch.Tensor:
    """Each segment clamped to ±c·r with r the float64 root mean square."""
    parts = []
    for segment in x.double().split(lengths):
        limit = c * segment.square().mean().sqrt()
        parts.append(segment.clamp(-limit, limit))
    return torch.cat(parts)


@pytest.mark.parametrize("lengths", [[1000], [300, 1, 699], [1, 1]])
def test_clip_matches_float64_brute_force(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    x = torch.randn(sum(lengths), generator=g) * torch.linspace(0.1, 5, sum(lengths)) + 0.3
    expected = brute_force(x, 1.5, lengths)
    clipped = clip_by_rms_(x.clone(), 1.5, lengths)
    assert torch.allclose(clipped.double(), expected, rtol=1e-5, atol=1e-6)
    if sum(lengths) > 2:
        assert (clipped != x).any()  # something was clipped: the test could fail


def test_offset_gradient_keeps_its_mean():
    """3 + 0.1·noise: a std around the mean with a clamp around zero sent its mean to ~0.25."""
    x = 3.0 + 0.1 * torch.randn(4096, generator=torch.Generator().manual_seed(0))
    clipped = clip_by_rms_(x.clone(), 2.5)
    assert torch.equal(clipped, x)


@pytest.mark.parametrize("c", [1.01, 1.5, 2.5])
def test_constant_vector_is_never_cut(c):
    x = torch.full((1000,), -0.7)
    assert torch.equal(clip_by_rms_(x.clone(), c), x)


def test_zero_mean_gaussian_clipped_at_c_sigma():
    """For zero-mean gradients r is the paper's σ: about 1.2% of N(0, 1) lies beyond 2.5σ."""
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    clipped = clip_by_rms_(x.clone(), 2.5)
    assert abs(clipped.abs().max().item() - 2.5) < 0.02
    assert 0.009 < (clipped != x).double().mean().item() < 0.016


@pytest.mark.parametrize("scale", [1e30, 1e19, 1e-12, 1e-25, 1e-38])
def test_extreme_magnitudes_give_the_float64_result(scale):
    """Sums of squares that over- or underflow float32 are redone on the scaled segment: a
    vector holding a finite 1e30 used to come back all NaN."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    x[17] = 40.0
    x = x * scale
    assert torch.isfinite(x).all()
    expected = brute_force(x, 2.5, [x.numel()])
    clipped = clip_by_rms_(x.clone(), 2.5)
    assert torch.isfinite(clipped).all()
    assert torch.allclose(clipped.double(), expected, rtol=1e-5, atol=0.0)
    assert clipped[17] < x[17]  # the outlier was clipped


def test_non_finite_segment_stays_non_finite():
    for bad in (float("nan"), float("inf")):
        x = torch.randn(100)
        x[3] = bad
        assert not torch.isfinite(clip_by_rms_(x, 2.5)).all()
    assert not torch.isfinite(root_mean_square(torch.tensor([1.0, float("nan")])))


@pytest.mark.parametrize("lengths", [None, [400, 1, 599]])
def test_source_form_equals_in_place_bit_for_bit(lengths):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 4
    in_place = clip_by_rms_(x.clone(), 2.0, lengths)
    out = torch.full_like(x, 7.0)
    result = clip_by_rms_(out, 2.0, lengths, source=x)
    assert result is out and torch.equal(out, in_place)
    assert not torch.equal(x, in_place)  # the source is left alone


def test_bad_arguments_are_named():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="clip=0"):
        clip_by_rms_(x, 0)
    with pytest.raises(ValueError, match=r"source is \(9,\)"):
        clip_by_rms_(x, 1.0, source=torch.randn(9))
    with pytest.raises(ValueError, match="float64"):
        clip_by_rms_(x, 1.0, source=x.double())
