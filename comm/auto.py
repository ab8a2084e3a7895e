"""Bits chosen by measurement (`bits="auto"`): for each bucket, on its first quantized step, the
exchange times what every option costs on this job's own data and link (an fp32 all-reduce, an
fp16 all-reduce, and the compressor at each width it sends: encode + decode of a sample, and the
wire time its bytes take at the fp32 all-reduce's measured rate), measures each width's relative
error on that sample, and picks the fastest option whose added error stays within the budget.
The measurements are max-reduced over the ranks first, so every rank makes the same choice.

Cost model (ours): seconds(width) = q·codec_ns·N + bytes(width)/rate, q the collective's
quantizations (each one encodes and decodes N elements once), rate = fp32 all-reduce bytes /
its measured seconds; seconds(fp32) and seconds(fp16) are measured as they are (casts included).
Error: q·‖Q(x) − x‖²/‖x‖² of one draw on the sample (fp16: its rounding; fp32: 0), against
`budget`, the relative variance the exchange may add to ‖g‖² per step.

A compressed width must be predicted CODEC_MARGIN times faster than fp32 or fp16 to be chosen
over them: its codec runs on the cores backward uses, which timing it alone does not see. On 4
namespace hosts sharing 2 cores over unshaped links the prediction without the margin chose
rotated 2-bit codes, and the step took 1.38× fp32's (benchmarks/README.md, "Rotated 2-bit with
the C kernels"); at 200 Mbit/s fp32 was predicted 2.8× slower than 2-bit codes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.3  # rotated 2-bit `scatter` adds ≈ 2 × 0.133; max-scaled 2-bit ≈ 2 × 0.74
SAMPLE = 1 << 20  # elements the codec is timed and its error measured on
FULL_PRECISION = ("fp32", "fp16")
CODEC_MARGIN = 2.0  # a compressed width's predicted seconds count this many times


@dataclass(frozen=True)
class Option:
    """What one option costs a bucket: predicted seconds per step and added relative error."""

    seconds: float
    error: float


@dataclass(frozen=True)
class Choice:
    """The option chosen for a bucket of `numel` elements, and every option's cost (the why)."""

    name: str  # "fp32", "fp16" or "<bits>-bit"
    numel: int
    options: Mapping[str, Option]

    @property
    def bits(self) -> int | None:
        """The width sent (None: a full-precision all-reduce)."""
        return None if self.name in FULL_PRECISION else int(self.name.split("-")[0])

    def describe(self) -> str:
        """One line: every option's seconds and error, and the choice."""
        parts = ", ".join(
            f"{name} {o.seconds * 1e3:.2f} ms (error {o.error:.3g})"
            for name, o in self.options.items()
        )
        return f"{self.numel} elements: {parts} -> {self.name}"


def choose(options: Mapping[str, Option], budget: float) -> str:
    """The fastest option whose error is within `budget` (fp32, error 0, always qualifies), a
    compressed width's seconds counted CODEC_MARGIN times (module doc); ties go to the earlier
    option in `options`' order."""
    allowed = [name for name, o in options.items() if o.error <= budget or name == "fp32"]

    def cost(name: str) -> float:
        return options[name].seconds * (1.0 if name in FULL_PRECISION else CODEC_MARGIN)

    return min(allowed, key=cost)


def check_budget(budget: float) -> float:
    """`budget` if a positive number; a ValueError naming it otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"auto_budget={budget!r}; allowed: a positive relative variance")
    return float(budget)
