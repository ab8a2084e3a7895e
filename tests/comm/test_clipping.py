"""clip_by_std_: per-tensor limits against a float64 brute force, the copying form (`source`)
equal to the in-place one bit for bit, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from distq.comm.clipping import clip_by_std_


def brute_force(x: torch.Tensor, c: float, lengths: list[int]) -> torch.Tensor:
    """Each segment clamped to ±c·σ with σ the float64 population std."""
    parts = []
    for segment in x.double().split(lengths):
        limit = c * segment.std(unbiased=False) if segment.numel() > 1 else torch.inf
        parts.append(segment.clamp(-limit, limit))
    return torch.cat(parts)


@pytest.mark.parametrize("lengths", [[1000], [300, 1, 699], [1, 1]])
def test_clip_matches_float64_brute_force(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    x = torch.randn(sum(lengths), generator=g) * torch.linspace(0.1, 5, sum(lengths)) + 0.3
    expected = brute_force(x, 1.5, lengths)
    clipped = clip_by_std_(x.clone(), 1.5, lengths)
    assert torch.allclose(clipped.double(), expected, rtol=1e-5, atol=1e-6)
    if sum(lengths) > 2:
        assert (clipped != x).any()  # something was clipped: the test could fail


@pytest.mark.parametrize("lengths", [None, [400, 1, 599]])
def test_source_form_equals_in_place_bit_for_bit(lengths):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 4
    in_place = clip_by_std_(x.clone(), 2.0, lengths)
    out = torch.full_like(x, 7.0)
    result = clip_by_std_(out, 2.0, lengths, source=x)
    assert result is out and torch.equal(out, in_place)
    assert not torch.equal(x, in_place)  # the source is left alone


def test_bad_arguments_are_named():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="clip=0"):
        clip_by_std_(x, 0)
    with pytest.raises(ValueError, match=r"source is \(9,\)"):
        clip_by_std_(x, 1.0, source=torch.randn(9))
    with pytest.raises(ValueError, match="float64"):
        clip_by_std_(x, 1.0, source=x.double())
