"""The projection interface shared by every weight quantizer, its registry and input checks.

Every scheme solves ŵ = argmin_{ŵ ∈ α·S} ‖ŵ − w‖²_D row by row on a 2-D view of the tensor
(one row for a per-tensor scale, one row per output channel otherwise), so solvers are
vectorized over scale groups and never loop over channels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Solver = Callable[..., tuple[Tensor, Tensor]]
CappedTest = Callable[[Mapping[str, object]], bool]


def always(opts: Mapping[str, object]) -> bool:
    """A `capped_exact` test: the capped ternary solver is exact for any solver options."""
    return True


def never(opts: Mapping[str, object]) -> bool:
    """A `capped_exact` test: under a cap the scheme is pruned, then solved again."""
    return False


@dataclass(frozen=True)
class Projection:
    """A projection: `q` has w's shape and dtype, every entry in α·S; `alpha` the scale(s).

    `alpha` has shape () for a per-tensor scale and (C,) per output channel; schemes with two
    scales (ternary2: α⁺, α⁻) add a trailing dimension of 2, a codebook scheme (shared) one of
    its k values: there `alpha` is the codebook itself.
    """

    q: Tensor
    alpha: Tensor


@dataclass(frozen=True)
class Scheme:
    """A registered quantization scheme: its solver, the bit widths it accepts, and the facts
    other modules read from here instead of testing its name.

    uniform: the levels are evenly spaced (±1; 0, ±1; 0, ±1/k, …, ±1), False for the log
    scheme's powers of two; it decides Δ_w (`level_spacing`). warm_start: the solver iterates
    from a starting α and takes the previous step's as `alpha_init` (read off its signature).
    capped_exact(opts): whether, with these solver options, the scheme's problem under a
    non-zero budget is the capped ternary one (a binary code with zeros is ternary), which
    distq.quant.sparse solves exactly for a uniform d; otherwise it prunes, then re-solves.
    codebook: the levels are 2^bits values fitted per group (weight sharing), not α times a
    fixed set; `alpha` holds them, and no sparsity budget applies (a forced zero would be one
    value more than the codes hold).
    """

    name: str
    solver: Solver
    bits: tuple[int, ...]
    loss_aware: bool
    summary: str
    uniform: bool = True
    warm_start: bool = False
    capped_exact: CappedTest = never
    codebook: bool = False

    @property
    def default_bits(self) -> int:
        return self.bits[0]

    def level_spacing(self, bits: int) -> float:
        """Δ_w: the largest gap between adjacent levels at `bits` bits, in units of α.

        ±1: 2; evenly spaced levels: 1/k (ternary: 1); powers of two: ½ (between ½ and 1)
        once there are at least two magnitudes, else 1. A weight within [−α, α] is at most
        α·Δ_w/2 from its nearest level, which is what the theory's weight error floor uses.
        A codebook's gaps are fitted to the data: its Δ_w is nominal, 2/(2^bits − 1), the gap
        of 2^bits evenly spaced values over [−α, α] (α: the largest |value|), not a bound;
        `group_spacing` reads each fitted codebook's own.
        """
        if self.codebook:
            return 2.0 / ((1 << bits) - 1)
        k = levels_per_sign(bits)
        if k == 0:
            return 2.0
        if self.uniform:
            return 1.0 / k
        return 0.5 if k >= 2 else 1.0

    def group_spacing(self, alpha: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        """(α, Δ_w) of each scale group of a projection's `alpha`, α·Δ_w the group's largest gap
        between adjacent levels, so a weight within the levels' range is at most α·Δ_w/2 from
        the nearest one. For α·S: α (each scale of a two-scale scheme apart) and
        `level_spacing(bits)`. For a codebook the gaps are fitted, not the record's: α = the
        group's largest |value| and α·Δ_w = its largest difference between adjacent values
        (shape: alpha's without the trailing k)."""
        if not self.codebook:
            scale = alpha.detach().double().abs()
            return scale, torch.full_like(scale, self.level_spacing(bits))
        values = alpha.detach().double().sort(dim=-1).values
        scale = values.abs().amax(dim=-1)
        return scale, safe_ratio(values.diff(dim=-1).amax(dim=-1), scale)


_REGISTRY: dict[str, Scheme] = {}


def register(
    name: str,
    *,
    bits: tuple[int, ...],
    loss_aware: bool,
    summary: str,
    uniform: bool = True,
    capped_exact: CappedTest = never,
    codebook: bool = False,
) -> Callable[[Solver], Solver]:
    """Class the decorated solver under `name`; `bits` lists the widths it supports, the
    other arguments are the record's facts (`Scheme`)."""

    def wrap(solver: Solver) -> Solver:
        warm_start = "alpha_init" in inspect.signature(solver).parameters
        _REGISTRY[name] = Scheme(
            name, solver, bits, loss_aware, summary, uniform, warm_start, capped_exact, codebook
        )
        return solver

    return wrap


def get_scheme(name: str) -> Scheme:
    """The registered scheme called `name`, or a ValueError listing the allowed names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization scheme {name!r}; allowed: {', '.join(sorted(_REGISTRY))}"
        ) from None


def scheme_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def resolve_bits(scheme: Scheme, bits: int | None) -> int:
    """The bit width to use: `bits` if the scheme supports it, its only width if None."""
    if bits is None:
        if len(scheme.bits) > 1:
            raise ValueError(
                f"scheme {scheme.name!r} needs bits= in {scheme.bits[0]}..{scheme.bits[-1]}"
            )
        return scheme.default_bits
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in scheme.bits:
        allowed = (
            str(scheme.bits[0]) if len(scheme.bits) == 1 else f"{scheme.bits[0]}..{scheme.bits[-1]}"
        )
        raise ValueError(
            f"bits={bits!r} is not supported by scheme {scheme.name!r}; allowed: {allowed}"
        )
    return bits


def check_weights(w: Tensor, d: Tensor | None) -> None:
    """Reject what no projection can be computed from, naming the problem."""
    if not isinstance(w, Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {tuple(w.shape)}); nothing to quantize")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"w has {bad} non-finite (NaN/Inf) entries out of {w.numel()}")
    if d is None:
        return
    if not isinstance(d, Tensor):
        raise ValueError(f"d must be a torch.Tensor or None, got {type(d).__name__}")
    if d.shape != w.shape:
        raise ValueError(f"d has shape {tuple(d.shape)} but w has shape {tuple(w.shape)}")
    if not d.is_floating_point():
        raise ValueError(f"d must be a floating-point tensor, got dtype {d.dtype}")
    if not torch.isfinite(d).all():
        raise ValueError("d has non-finite (NaN/Inf) entries; curvature must be finite")
    if (d < 0).any():
        raise ValueError(
            f"d has negative entries (min {d.min().item():.3g}); curvature must be >= 0"
        )
    if (d.sum() == 0).item():
        raise ValueError("d is all zeros; at least one curvature entry must be positive")


BLOCKS_ATTR = "distq_blocks"


def set_blocks(param: Tensor, blocks: int) -> Tensor:
    """Mark `param` to be quantized with one scale per each of `blocks` equal row blocks along
    its first dimension (an LSTM's 4 gate matrices stacked in one W: blocks=4). Returns param."""
    check_blocks(tuple(param.shape), blocks)
    setattr(param, BLOCKS_ATTR, blocks)
    return param


def blocks_of(param: Tensor) -> int:
    """The number of scale blocks `param` was marked with (1: one scale for the tensor)."""
    return int(getattr(param, BLOCKS_ATTR, 1))


def check_blocks(shape: tuple[int, ...], blocks: int) -> None:
    """Blocks must split the first dimension evenly; ValueError naming the shape otherwise."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks={blocks!r}; allowed: a positive integer")
    if blocks > 1 and (not shape or shape[0] % blocks):
        raise ValueError(
            f"blocks={blocks} does not split the first dimension of shape {shape} evenly"
        )


def as_groups(t: Tensor, per_channel: bool, blocks: int = 1) -> Tensor:
    """2-D view, one row per scale group (the whole tensor, each of `blocks` equal blocks of
    its first dimension, or each output channel; per_channel wins over blocks).

    Half-precision inputs are computed in float32; float32 and float64 stay as they are.
    """
    rows = t.shape[0] if (per_channel and t.dim() > 0) else blocks
    compute = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    return t.reshape(rows, -1).to(compute)


def levels_per_sign(bits: int) -> int:
    """k = 2^(m−1) − 1: the number of non-zero magnitudes of a symmetric m-bit code."""
    return 2 ** (bits - 1) - 1


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num/den with 0 where den is 0 (an all-zero group has scale 0, never NaN)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
