"""Weight quantizers: projections of a weight tensor onto binary, ternary and m-bit sets.

`project(w, d)` returns the ŵ ∈ α·S closest to w in the D-weighted norm ‖ŵ − w‖²_D (the
proximal Newton step of loss-aware quantization, Hou & Kwok); d = None means d ≡ 1.

>>> import torch
>>> p = project(torch.tensor([0.9, -0.1, -1.1, 0.05]), scheme="ternary")
>>> p.q.tolist(), round(p.alpha.item(), 3)
([1.0, 0.0, -1.0, 0.0], 1.0)
"""

from __future__ import annotations

import inspect

from torch import Tensor

from distq.quant import binary, mbit, shared, ternary  # noqa: F401  (registers the schemes)

# isort: split
from distq.quant import absmean  # noqa: F401  (registered last: listed after the paper's schemes)
from distq.quant.base import (
    Projection,
    Scheme,
    as_groups,
    blocks_of,
    check_blocks,
    check_weights,
    get_scheme,
    levels_per_sign,
    resolve_bits,
    set_blocks,
)
from distq.quant.base import scheme_names as _scheme_names
from distq.quant.sparse import check_sparsity, solve_capped

SCHEMES: tuple[str, ...] = _scheme_names()

__all__ = [
    "SCHEMES",
    "Projection",
    "Scheme",
    "blocks_of",
    "get_scheme",
    "level_spacing",
    "levels_per_sign",
    "project",
    "scheme_bits",
    "set_blocks",
]


def scheme_bits(scheme: str, bits: int | None = None) -> int:
    """Bits per weight that `scheme` stores (validating `bits` against what it accepts)."""
    return resolve_bits(get_scheme(scheme), bits)


def level_spacing(scheme: str, bits: int | None = None) -> float:
    """Δ_w: the largest gap between adjacent levels of the scheme's set, in units of α
    (binary 2, ternary 1, m-bit linear 1/k with k = 2^(m−1) − 1, m-bit log ½; Scheme)."""
    spec = get_scheme(scheme)
    return spec.level_spacing(resolve_bits(spec, bits))


def project(
    w: Tensor,
    d: Tensor | None = None,
    scheme: str = "ternary",
    bits: int | None = None,
    *,
    per_channel: bool = False,
    blocks: int = 1,
    sparsity: float = 0.0,
    **opts,
) -> Projection:
    """Project `w` onto the scheme's set with curvature `d` (None: d ≡ 1).

    per_channel=True gives every output channel (first dimension) its own scale; blocks=B
    splits the first dimension into B equal blocks with a scale each (an LSTM's gate matrices:
    alpha then has shape (B,)). sparsity=κ
    keeps at most ⌈(1−κ)n⌉ non-zeros per scale group (distq.quant.sparse; binary codes then become
    ternary: zero is a level). Extra keyword
    options go to the scheme's solver (ternary-approx, shared: alpha_init; linear/log:
    alpha_rule; twn: threshold); the shared scheme's alpha is its codebook (Projection).
    Raises ValueError on bad input, naming the value and what is allowed.
    """
    spec = get_scheme(scheme)
    m = resolve_bits(spec, bits)
    check_weights(w, d)
    check_sparsity(sparsity)
    if sparsity and spec.codebook:
        raise ValueError(
            f"scheme {scheme!r} fits a codebook of {2**m} values per group and takes no "
            f"sparsity (got sparsity={sparsity}): a forced zero would be one value more"
        )
    check_blocks(tuple(w.shape), blocks)
    allowed = [p for p in inspect.signature(spec.solver).parameters if p not in ("w", "d", "bits")]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for scheme {scheme!r}; allowed: {allowed or 'none'}"
        )
    w2 = as_groups(w, per_channel, blocks)
    d2 = as_groups(d, per_channel, blocks) if (d is not None and spec.loss_aware) else None
    if d2 is None:
        d2 = w2.new_ones(())
        d2 = d2.expand_as(w2)
    if sparsity:
        q2, alpha = solve_capped(spec, w2, d2, m, sparsity, **opts)
    else:
        q2, alpha = spec.solver(w2, d2, m, **opts)
    if not per_channel and blocks == 1:
        alpha = alpha[0]
    q = (q2 + 0.0).reshape(w.shape).to(w.dtype)  # + 0.0 turns −0.0 into +0.0
    return Projection(q=q, alpha=alpha)
