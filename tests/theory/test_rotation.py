"""The rotated quantizer's theory: Lloyd–Max levels against quadrature."""

import math
from itertools import pairwise

import numpy as np
import pytest

from distq.theory.rotation import lloyd_max, lloyd_max_distortion

GRID = np.linspace(-12, 12, 480_001)
DENSITY = np.exp(-(GRID**2) / 2) / math.sqrt(2 * math.pi)


def quantize_levels(z, bits):
    """z rounded to the nearest Lloyd–Max level (numpy, from the thresholds)."""
    levels, thresholds = lloyd_max(bits)
    return np.asarray(levels)[np.searchsorted(thresholds, z)]


def quadrature(values):
    """∫ values·φ over GRID (Riemann sum; the tails beyond ±12 are below 1e-30)."""
    return float(np.sum(values * DENSITY) * (GRID[1] - GRID[0]))


# Max (1960), Table I; its 16-level entry 0.009497 is 4e-6 below the optimum: its own levels
# give 0.0095010 by quadrature, as do ours, and a direct minimization over thresholds agrees.
@pytest.mark.parametrize(
    ("bits", "published", "tol"),
    [(1, 0.3634, 5e-5), (2, 0.1175, 5e-5), (3, 0.03455, 5e-6), (4, 0.009501, 5e-7)],
)
def test_distortion_matches_table_and_quadrature(bits, published, tol):
    d = lloyd_max_distortion(bits)
    assert abs(d - published) < tol
    assert d == pytest.approx(quadrature((GRID - quantize_levels(GRID, bits)) ** 2), abs=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_levels_are_the_optimal_quantizer(bits):
    levels, thresholds = lloyd_max(bits)
    c = np.asarray(levels)
    assert len(levels) == 2**bits and len(thresholds) == 2**bits - 1
    assert np.all(np.diff(c) > 0) and np.allclose(c, -c[::-1], rtol=0, atol=1e-15)
    assert np.allclose(thresholds, (c[1:] + c[:-1]) / 2, rtol=0, atol=1e-15)
    # Centroid condition by quadrature: each level is the mean of Z over its cell.
    edges = (-12.0, *thresholds, 12.0)
    for level, (a, b) in zip(levels, pairwise(edges), strict=True):
        z = np.linspace(a, b, 100_001)
        weight = np.exp(-(z**2) / 2)
        assert level == pytest.approx(
            np.trapezoid(z * weight, z) / np.trapezoid(weight, z), abs=1e-8
        )
    # Moving any level (thresholds kept at the midpoints) raises the distortion.
    best = lloyd_max_distortion(bits)
    for j in range(len(levels)):
        for step in (-1e-3, 1e-3):
            moved = c.copy()
            moved[j] += step
            mid = (moved[1:] + moved[:-1]) / 2
            err = quadrature((GRID - moved[np.searchsorted(mid, GRID)]) ** 2)
            assert err > best


def test_one_bit_levels_are_mean_absolute_normal():
    assert lloyd_max(1) == ((-math.sqrt(2 / math.pi), math.sqrt(2 / math.pi)), (0.0,))


@pytest.mark.parametrize("bits", [0, 5, 2.5, True, "2", None])
def test_bad_bits_are_named(bits):
    for fn in (lloyd_max, lloyd_max_distortion):
        with pytest.raises(ValueError, match=rf"bits={bits!r}; allowed: 1\.\.4"):
            fn(bits)
