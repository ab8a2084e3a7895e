"""Per-tensor weight widths under a model-size budget, chosen by measured sensitivity.

The loss-aware baseline of issue 24 item 3 (ours; DQMQ is distq/dqmq.py's). For quantized tensor
i with n_i elements and candidate width m, the cost is the error of projecting its latent w at
that width, weighted by the empirical Fisher's diagonal,

    S_i(m) = Σ v̂ ⊙ (ŵ_m − w)²,   ŵ_m = argmin_{α·S_m} ‖ŵ − w‖²_D,   d = √v̂ + ε,

v̂ the squared gradients the optimizer averages (`QuantizedOptimizer.second_moment`; v̂ ≡ 1 for
SGD or with loss_aware off): ½·S_i(m) is the second-order estimate of the loss the width costs,
with the Fisher standing in for the Hessian. ŵ_m is the projection the optimizer itself would
make (the proximal Newton step's, D-weighted). Why v̂ and not d: Σ d ⊙ (ŵ − w)² is in units of
loss × weight, not loss, so it compares tensors of different gradient scales wrongly. Rescaling
one layer by s and the next by 1/s (the same function through a ReLU) multiplies its d-weighted
cost by s and leaves the Fisher-weighted one unchanged (tests/test_bit_allocation.py). On the
char LM with every matrix quantized, the d weighting left the softmax layer at 3 bits in 3 of 4
seeds; v̂ gives it 4 in all 4 (benchmarks/README.md, "Per-layer mixed precision").

The widths solve the multiple-choice knapsack

    minimize Σ_i S_i(m_i)   subject to   Σ_i n_i·m_i ≤ B = ⌊budget·Σ_i n_i⌋,  m_i ∈ candidates,

exactly by dynamic programming over Pareto-optimal (bits, cost) pairs (Nemhauser–Ullmann:
after each tensor only the states no other state beats on both bits and cost are kept; exact,
exponential in the worst case but a few thousand states for tens of tensors), or, when the
states would exceed `max_states`, by the Lagrangian relaxation: the lower convex hull of each
tensor's (n_i·m, S_i(m)) points, increments taken by decreasing cost saved per bit while they
fit (the LP optimum but for its one fractional increment, whose LP share gives the lower bound
`lower_bound`), then a fill step that spends the bits left on the best upgrades that fit. The
fill's result is within `cost − lower_bound` of the optimum, and is the optimum when the LP's
solution is integral (the budget ends on a hull breakpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from distq.optim import QuantizedOptimizer
from distq.quant import get_scheme

log = logging.getLogger(__name__)

MAX_STATES = 200_000  # Pareto states per tensor before the Lagrangian method takes over
METHODS = ("sensitivity", "dqmq")


@dataclass(frozen=True)
class Allocation:
    """The widths chosen per tensor and what they cost: Σ S_i(m_i) (`cost`), Σ n_i·m_i
    (`total_bits`) against the ⌊budget·Σ n_i⌋ allowed (`capacity`), a lower bound on the
    optimal cost (= cost when `exact`), and the costs and sizes they were chosen from."""

    bits: dict[str, int]
    cost: float
    total_bits: int
    capacity: int
    lower_bound: float
    exact: bool  # the least Σ S within the budget (a search's widths: whether they reach it)
    costs: dict[str, dict[int, float]]
    numel: dict[str, int]

    @property
    def average_bits(self) -> float:
        """Σ n_i·m_i / Σ n_i: the average bits per quantized weight."""
        return self.total_bits / sum(self.numel.values())

    def record(self) -> dict:
        """A JSON-ready record (what bit_widths.json of a run holds besides its settings)."""
        return {
            "bits": self.bits,
            "numel": self.numel,
            "average_bits": self.average_bits,
            "total_bits": self.total_bits,
            "capacity_bits": self.capacity,
            "cost": self.cost,
            "lower_bound": self.lower_bound,
            "exact": self.exact,
            "costs": {n: {str(m): c for m, c in by.items()} for n, by in self.costs.items()},
        }

    def table(self, cost: str = "S", per: str = "weight") -> str:
        """One line per tensor (elements, width, its `cost` at each candidate), then the totals
        (bits per `per`)."""
        width = max(len(n) for n in self.bits)
        candidates = sorted(next(iter(self.costs.values())))
        head = f"{'tensor':<{width}}  {'numel':>9}  bits  " + "  ".join(
            f"{f'{cost}({m})':>10}" for m in candidates
        )
        lines = [head]
        for name, bits in self.bits.items():
            row = "  ".join(f"{self.costs[name][m]:>10.4g}" for m in candidates)
            lines.append(f"{name:<{width}}  {self.numel[name]:>9}  {bits:>4}  {row}")
        lines.append(
            f"average {self.average_bits:.4f} bits per {per} ({self.total_bits} of "
            f"{self.capacity} bits allowed); cost {self.cost:.6g}"
            + ("" if self.exact else f" (optimum >= {self.lower_bound:.6g})")
        )
        return "\n".join(lines)


def capacity_of(numel: Mapping[str, int], budget: float, candidates: Sequence[int]) -> int:
    """B = ⌊budget·Σ n_i⌋ (the budget read as the decimal it was written as, so 2.3 allows
    exactly 2.3 bits a weight); ValueError when the budget is outside [min, max] of the
    candidates or a candidate or size is not a positive integer."""
    check_candidates(candidates)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in numel.values()):
        raise ValueError(f"tensor sizes must be positive integers, got {dict(numel)}")
    low, high = min(candidates), max(candidates)
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and low <= budget <= high):
        raise ValueError(
            f"bits budget {budget!r} is outside the candidate widths {sorted(candidates)}: "
            f"allowed: an average in [{low}, {high}] bits per weight"
        )
    return math.floor(Fraction(repr(float(budget))) * sum(numel.values()))


def check_candidates(candidates: Sequence[int]) -> None:
    """Candidates: distinct positive integers, at least one; ValueError naming them otherwise."""
    bad = [c for c in candidates if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if not candidates or bad or len(set(candidates)) != len(candidates):
        raise ValueError(
            f"bit candidates {list(candidates)}: allowed: distinct positive integers, at least one"
        )


def allocate(
    costs: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    budget: float,
    max_states: int = MAX_STATES,
) -> Allocation:
    """The widths minimizing Σ_i costs[i][m_i] subject to Σ_i numel[i]·m_i ≤ ⌊budget·Σ numel⌋:
    exact (Pareto dynamic programming) while the states stay within `max_states`, else the
    Lagrangian method with its stated gap (module docstring)."""
    if set(costs) != set(numel) or not costs:
        raise ValueError(f"costs name {sorted(costs)} but sizes name {sorted(numel)}")
    candidates = sorted(next(iter(costs.values())))
    if any(sorted(c) != candidates for c in costs.values()):
        raise ValueError("every tensor needs a cost for each candidate width")
    capacity = capacity_of(numel, budget, candidates)
    exact = _pareto(costs, numel, capacity, max_states)
    if exact is not None:
        return _result(exact, costs, numel, capacity, None)
    log.info("bit allocation: over %d Pareto states, the Lagrangian method takes over", max_states)
    chosen, bound = _lagrangian(costs, numel, capacity)
    return _result(chosen, costs, numel, capacity, bound)


def _result(
    chosen: dict[str, int],
    costs: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    capacity: int,
    bound: float | None,
) -> Allocation:
    cost = sum(costs[n][m] for n, m in chosen.items())
    return Allocation(
        dict(chosen),
        cost,
        sum(numel[n] * m for n, m in chosen.items()),
        capacity,
        cost if bound is None else min(bound, cost),
        bound is None,
        {n: dict(c) for n, c in costs.items()},
        dict(numel),
    )


def _pareto(
    costs: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    capacity: int,
    max_states: int,
) -> dict[str, int] | None:
    """The optimal widths by dynamic programming over (bits, cost) states that no other state
    dominates; None when a stage would hold more than `max_states` states."""
    names = list(costs)
    floor = min(next(iter(costs.values())))
    rest = [sum(numel[n] for n in names[i + 1 :]) * floor for i in range(len(names))]
    states: list[tuple[int, float, tuple]] = [(0, 0.0, ())]  # bits, cost, choices (linked)
    for i, name in enumerate(names):
        grown = [
            (bits + numel[name] * m, cost + costs[name][m], (m, choices))
            for bits, cost, choices in states
            for m in costs[name]
            if bits + numel[name] * m + rest[i] <= capacity
        ]
        grown.sort(key=lambda s: (s[0], s[1]))
        states = []
        for state in grown:  # keep a state only if it costs less than every cheaper-in-bits one
            if not states or state[1] < states[-1][1]:
                states.append(state)
        if len(states) > max_states:
            return None
    best = min(states, key=lambda s: s[1])
    chosen, link = [], best[2]
    while link:
        chosen.append(link[0])
        link = link[1]
    return dict(zip(names, reversed(chosen), strict=True))


def _lagrangian(
    costs: Mapping[str, Mapping[int, float]], numel: Mapping[str, int], capacity: int
) -> tuple[dict[str, int], float]:
    """Greedy over the lower convex hulls (the LP relaxation's optimum, rounded down), then a
    fill with the bits left; returns the widths and the LP's lower bound on the optimum."""
    chosen = {n: min(c) for n, c in costs.items()}
    steps = []  # (cost saved per bit, name, width after, bits it takes, cost saved)
    for name, by_width in costs.items():
        hull = _lower_hull([(numel[name] * m, by_width[m], m) for m in sorted(by_width)])
        for (b0, c0, _), (b1, c1, m1) in itertools.pairwise(hull):
            steps.append(((c0 - c1) / (b1 - b0), name, m1, b1 - b0, c0 - c1))
    steps.sort(key=lambda s: -s[0])
    used = sum(numel[n] * m for n, m in chosen.items())
    cost = sum(costs[n][m] for n, m in chosen.items())
    bound = None
    for rate, name, width, bits, saved in steps:  # hull slopes fall: in order within a tensor
        if used + bits > capacity:
            bound = cost - rate * (capacity - used)  # the LP takes a share of this increment
            break
        chosen[name], used, cost = width, used + bits, cost - saved
    if bound is None:
        bound = cost
    _fill(chosen, costs, numel, capacity - used)
    return chosen, bound


def _lower_hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The points (bits, cost, width) on the lower-left convex hull from the fewest bits,
    cost strictly falling (a width that costs no less than a narrower one is never worth it)."""
    hull: list[tuple[int, float, int]] = []
    for p in points:
        if hull and p[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):  # hull[-1] not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _fill(
    chosen: dict[str, int],
    costs: Mapping[str, Mapping[int, float]],
    numel: Mapping[str, int],
    left: int,
) -> None:
    """Spend `left` bits on the upgrade that saves the most cost and fits, until none does."""
    while True:
        options = [
            (costs[n][chosen[n]] - c, n, m)
            for n, by_width in costs.items()
            for m, c in by_width.items()
            if m > chosen[n] and numel[n] * (m - chosen[n]) <= left and c < costs[n][chosen[n]]
        ]
        if not options:
            return
        _, name, width = max(options)
        left -= numel[name] * (width - chosen[name])
        chosen[name] = width


@torch.no_grad()
def sensitivity_costs(
    optimizer: QuantizedOptimizer, candidates: Sequence[int]
) -> dict[str, dict[int, float]]:
    """S_i(m) = Σ v̂ ⊙ (ŵ_m − w)² for every quantized tensor and candidate width: a cold
    projection of the latent w with the optimizer's curvature, scale layout and current κ,
    its error weighted by the empirical Fisher v̂ (module doc)."""
    spec = get_scheme(optimizer.scheme)
    check_candidates(candidates)
    refused = [m for m in candidates if m not in spec.bits]
    if refused:
        raise ValueError(
            f"bit candidates {refused} are not widths of scheme {optimizer.scheme!r}; allowed: "
            f"{spec.bits[0]}..{spec.bits[-1]}"
        )
    params = optimizer.quantized_parameters()
    curvatures = {n: optimizer.curvature(p) for n, p in params.items()}
    sparsities = optimizer.current_sparsities(curvatures)
    costs = {}
    for name, p in params.items():
        w, d, fisher = optimizer.latent[name], curvatures[name], optimizer.second_moment(p)
        weight = torch.ones_like(w) if fisher is None else fisher
        costs[name] = {
            m: float(
                (weight * (optimizer.project_at(name, m, d, sparsities[name]).q - w).square()).sum()
            )
            for m in candidates
        }
    return costs


Search = Callable[[list[str], float, Sequence[int]], Mapping[str, int]]


def allocate_bits(
    optimizer: QuantizedOptimizer,
    budget: float,
    candidates: Sequence[int],
    method: str = "sensitivity",
    search: Search | None = None,
    switch: bool = True,
) -> Allocation:
    """Each quantized tensor's width for an average of `budget` bits per weight from
    `candidates`, by `method`: "sensitivity" (this module), or "dqmq", which calls
    `search(names, budget, candidates)` (e.g. distq.dqmq.search_bits over the model and
    batches) with the latent weights in the model; its widths are then scored by S and
    `lower_bound` is the least Σ S within the budget. switch: set the optimizer to them
    (`QuantizedOptimizer.set_bits`); False leaves it as it was."""
    if method not in METHODS:
        raise ValueError(f"bit allocation {method!r}; allowed: {', '.join(METHODS)}")
    if method == "dqmq" and search is None:
        raise ValueError(
            "bit allocation 'dqmq' needs search=: a callable (names, budget, candidates) -> "
            "{name: bits}, e.g. distq.dqmq.search_bits over the model and training batches"
        )
    costs = sensitivity_costs(optimizer, candidates)
    numel = {n: p.numel() for n, p in optimizer.quantized_parameters().items()}
    best = allocate(costs, numel, budget)
    chosen = best if method == "sensitivity" else _searched(optimizer, search, best, budget)
    if switch:
        optimizer.set_bits(chosen.bits)
    return chosen


def _searched(
    optimizer: QuantizedOptimizer, search: Search, best: Allocation, budget: float
) -> Allocation:
    """The search's widths scored by S against the sensitivity optimum `best`."""
    costs, numel, candidates = best.costs, best.numel, sorted(next(iter(best.costs.values())))
    with latent_in_model(optimizer):
        bits = dict(search(list(optimizer.names), budget, list(candidates)))
    if set(bits) != set(numel) or any(m not in candidates for m in bits.values()):
        raise ValueError(
            f"the search returned widths {bits}; expected a candidate per {list(numel)}"
        )
    chosen = _result(bits, costs, numel, best.capacity, best.cost)
    if chosen.total_bits > chosen.capacity:
        raise ValueError(
            f"the search's widths take {chosen.total_bits} bits, over the {chosen.capacity} allowed"
        )
    return dataclasses.replace(chosen, exact=chosen.cost <= best.cost)


@contextlib.contextmanager
def latent_in_model(optimizer: QuantizedOptimizer) -> Iterator[None]:
    """The latent full-precision w in the quantized parameters for the block, ŵ back after it
    (a search reads the model's weights, which hold ŵ between steps)."""
    params = optimizer.quantized_parameters()
    kept = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(optimizer.latent[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])
