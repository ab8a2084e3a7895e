"""Gradient clipping at c times the root mean square per tensor before quantization (ICLR 2019
"Analysis of Quantized Models", §4): bounding the scale max|g| by c·rms removes the √d growth of
the quantization variance for a small bias (`distq.theory.clip_bias_relative`). r = √mean(g²) is
the paper's σ for zero-mean elements and never cuts a constant vector (|g_i| = r < c·r)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Sums of squares below this lose precision to float32 underflow of the squares (< 1.2e-38); outside
# [SAFE_LOW, inf) `root_mean_square` redoes the sum on the segment scaled by its max magnitude.
SAFE_LOW = 1e-20


def clip_by_rms_(
    x: Tensor, c: float, lengths: Sequence[int] | None = None, source: Tensor | None = None
) -> Tensor:
    """Clip flat `x` in place, every segment (`lengths`; None: one) to [−c·r, c·r],
    r = √mean(segment²); returns x. With `source` (x's shape and dtype), x ← source clipped: copy
    and clip in one pass. A segment holding NaN/Inf comes out NaN, for the non-finite check."""
    if not c > 0:
        raise ValueError(f"clip={c!r}; allowed: a positive multiple of the rms, or None")
    if source is not None and (source.shape != x.shape or source.dtype != x.dtype):
        raise ValueError(
            f"source is {tuple(source.shape)} {source.dtype}; needs x's {tuple(x.shape)} {x.dtype}"
        )
    sizes = list(lengths) if lengths else [x.numel()]
    segments = x.split(sizes)
    sources = segments if source is None else source.split(sizes)
    for segment, original in zip(segments, sources, strict=True):
        if original.numel() == 0:
            continue
        limit = c * root_mean_square(original)
        if not original.is_cuda:  # scalar bounds: on CPU a clamp to 0-d tensors is ~10x slower
            limit = float(limit)  # (on a GPU a tensor bound spares a wait for the device)
        torch.clamp(original, -limit, limit, out=segment)
    return x


def root_mean_square(x: Tensor) -> Tensor:
    """√mean(x²) of a flat float tensor as a 0-d float32 tensor, for any finite magnitudes: on
    CPU a float32 dot product, redone on x/max|x| when it over- or underflows; on a GPU summed in
    float64 (no host round trip). NaN/Inf in x give a NaN or Inf r."""
    n = x.numel()
    if x.is_cuda:
        return (torch.linalg.vector_norm(x, dtype=torch.float64) / n**0.5).to(torch.float32)
    squares = torch.dot(x, x)
    if SAFE_LOW <= float(squares) < float("inf"):
        return (squares / n).sqrt()
    m = x.abs().amax()
    if not torch.isfinite(m):
        return m  # inf, or NaN if x holds a NaN: the segment comes out non-finite
    scaled = x / m.clamp_min(torch.finfo(x.dtype).tiny)
    return m * (torch.dot(scaled, scaled) / n).sqrt()
