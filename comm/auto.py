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

An option other than fp32 must be predicted CODEC_MARGIN times faster than fp32 to be chosen
over it outright: a codec (and fp16's casts and summation, which gloo does on the CPU) runs on
the cores backward uses, which timing it alone does not see. On 4 namespace hosts sharing 2
cores over unshaped links the prediction without the margin chose rotated 2-bit codes, and the
step took 1.38× fp32's (benchmarks/README.md, "Rotated 2-bit with the C kernels"); at 200
Mbit/s fp32 was predicted 2.8× slower than 2-bit codes.

Where the margin alone decides (the option fastest as predicted, its "contender", is not the one
chosen with the margin), real steps settle it (`StepTrial`): the next 2·TRIAL_ROUNDS steps
alternate the contenders and the margin's choices, each step timed from its first exchange
call to the next step's. The contenders are kept for the rest of the run if the median over
rounds of (contender step ÷ the margin's step after it) is below 1 − TRIAL_TOLERANCE on every
rank (the ratios are max-reduced, so every rank agrees): a tie goes to the margin's choice,
which adds no more error. Pairing neighbouring steps cancels the drift of a shared machine,
and the median drops a round that held an evaluation or a checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, replace

DEFAULT_BUDGET = 0.3  # rotated 2-bit `scatter` adds ≈ 2 × 0.133; max-scaled 2-bit ≈ 2 × 0.74
SAMPLE = 1 << 20  # elements the codec is timed and its error measured on
FULL_PRECISION = ("fp32", "fp16")
CODEC_MARGIN = 2.0  # the predicted seconds of every option but fp32 count this many times
TRIAL_ROUNDS = 5  # steps timed on each side when the margin alone decides
TRIAL_TOLERANCE = 0.05  # a contender must take this much less time a step to be kept


@dataclass(frozen=True)
class Option:
    """What one option costs a bucket: predicted seconds per step and added relative error."""

    seconds: float
    error: float


def bits_of(name: str) -> int | None:
    """The width an option sends (None: a full-precision all-reduce)."""
    return None if name in FULL_PRECISION else int(name.split("-")[0])


@dataclass(frozen=True)
class Choice:
    """The option chosen for a bucket of `numel` elements, and every option's cost (the why).
    `contender`: the option predicted fastest without the margin while real steps have yet to
    settle between it and `name`; `timed`: what those steps measured, once they have."""

    name: str  # "fp32", "fp16" or "<bits>-bit"
    numel: int
    options: Mapping[str, Option]
    contender: str | None = None
    timed: str = ""

    @property
    def bits(self) -> int | None:
        """The width sent (None: a full-precision all-reduce)."""
        return bits_of(self.name)

    def settled(self, ratio: float) -> Choice:
        """The choice once real steps have timed `contender` at `ratio` times `name`'s step."""
        winner = self.contender if ratio < 1.0 - TRIAL_TOLERANCE else self.name
        timed = f"steps timed: {self.contender} {ratio:.3f}x {self.name}'s"
        return replace(self, name=winner, contender=None, timed=timed)

    def describe(self) -> str:
        """One line: every option's seconds and error, the trial's finding, and the choice."""
        parts = ", ".join(
            f"{name} {o.seconds * 1e3:.2f} ms (error {o.error:.3g})"
            for name, o in self.options.items()
        )
        if self.contender is not None:
            parts += f"; {self.contender} without the codec margin: real steps to time"
        elif self.timed:
            parts += f"; {self.timed}"
        return f"{self.numel} elements: {parts} -> {self.name}"


def choose(options: Mapping[str, Option], budget: float, margin: float = CODEC_MARGIN) -> str:
    """The fastest option whose error is within `budget` (fp32, error 0, always qualifies), a
    seconds of any option but fp32 counted `margin` times (module doc); ties go to the earlier
    option in `options`' order."""
    allowed = [name for name, o in options.items() if o.error <= budget or name == "fp32"]

    def cost(name: str) -> float:
        return options[name].seconds * (1.0 if name == "fp32" else margin)

    return min(allowed, key=cost)


def predict(options: Mapping[str, Option], budget: float, numel: int) -> Choice:
    """The margin's choice, with the prediction without it as the contender where they differ."""
    name, fastest = choose(options, budget), choose(options, budget, margin=1.0)
    return Choice(name, numel, options, contender=None if fastest == name else fastest)


class StepTrial:
    """Real steps timed to settle the choices the margin alone decides: from step `start`, even
    offsets send the contenders and odd ones the margin's choices, `rounds` steps each; a
    step's seconds run from its first exchange call (`stamp`) to the next step's."""

    def __init__(self, start: int, rounds: int = TRIAL_ROUNDS) -> None:
        self.start, self.end = start, start + 2 * rounds
        self.stamps: dict[int, float] = {}

    def contender_at(self, step: int) -> bool:
        """Whether `step` sends the contenders."""
        return self.start <= step < self.end and (step - self.start) % 2 == 0

    def stamp(self, step: int, now: float) -> None:
        """Record the time of `step`'s first exchange call."""
        if self.start <= step <= self.end:
            self.stamps[step] = now

    def ratio(self) -> float:
        """Median over rounds of (contender step ÷ the margin's step after it); inf when no
        round was timed whole (e.g. steps without an exchange)."""
        stamps, ratios = self.stamps, []
        for step in range(self.start, self.end, 2):
            if all(s in stamps for s in (step, step + 1, step + 2)):
                start, middle, end = stamps[step], stamps[step + 1], stamps[step + 2]
                ratios.append((middle - start) / (end - middle))
        return statistics.median(ratios) if ratios else math.inf


def check_budget(budget: float) -> float:
    """`budget` if a positive number; a ValueError naming it otherwise."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"auto_budget={budget!r}; allowed: a positive relative variance")
    return float(budget)
