"""The codec's elementwise kernels, compiled with torch.compile when it is available.

Each kernel is a pure torch function so inductor can fuse the hash, the rounding and the cast
into one pass (measured ~100x faster than eager on CPU: see benchmarks/README.md). Set
DISTQ_COMPILE=0 to run them eagerly; both give the same codes on a given machine, and every
rank runs the same mode, so replicas stay identical either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B1
FMIX = (0x85EBCA6B, 0xC2B2AE35)


def hash_uniform(index: Tensor, key: Tensor) -> Tensor:
    """u ∈ [0, 1) from MurmurHash3's fmix32 of (index·φ + key) mod 2³², 24-bit resolution."""
    h = (index * GOLDEN32 + key) & MASK32
    h = h ^ (h >> 16)
    h = (h * FMIX[0]) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX[1]) & MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def _ratio(xb: Tensor, s: Tensor) -> Tensor:
    """x/s per bucket row; 0 where the scale is 0 (or NaN), so zero buckets never give 0/0."""
    sc = s[:, None]
    return torch.where(sc > 0, xb / sc.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def stochastic_codes(xb: Tensor, s: Tensor, key: Tensor, k: int) -> Tensor:
    """Offset codes r·sign + k of stochastic rounding of |x|/s·k to the integers 0..k."""
    index = torch.arange(xb.numel(), dtype=torch.int64, device=xb.device).view_as(xb)
    u = hash_uniform(index, key)
    level = _ratio(xb, s).abs() * k
    lower = level.floor()
    r = (lower + (u < level - lower).to(level.dtype)).clamp(max=k)
    return (torch.copysign(r, xb) + k).to(torch.uint8)


def stochastic_sign_codes(xb: Tensor, s: Tensor, key: Tensor) -> Tensor:
    """1 with probability (1 + x/s)/2, else 0: the unbiased 1-bit code of x ∈ [−s, s]."""
    index = torch.arange(xb.numel(), dtype=torch.int64, device=xb.device).view_as(xb)
    u = hash_uniform(index, key)
    return (u < (1.0 + _ratio(xb, s)) * 0.5).to(torch.uint8)


def level_values(codes: Tensor, s: Tensor, k: int) -> Tensor:
    """(code − k)·s/k per bucket row: the decoded m-bit values."""
    return (codes.to(torch.float32) - k) * (s / k)[:, None]


def sign_values(codes: Tensor, s: Tensor) -> Tensor:
    """(2·code − 1)·s per bucket row: the decoded 1-bit values."""
    return (codes.to(torch.float32) * 2.0 - 1.0) * s[:, None]


def _enabled() -> bool:
    return os.environ.get("DISTQ_COMPILE", "1") != "0"


@cache
def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile (dynamic shapes), or `fn` itself if compiling is off or fails."""
    if not _enabled():
        return fn
    fast = torch.compile(fn, dynamic=True)

    def run(*args):
        nonlocal fast
        try:
            return fast(*args)
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            log.warning("torch.compile failed for %s (%s); using eager kernels", fn.__name__, exc)
            fast = fn
            return fn(*args)

    return run
