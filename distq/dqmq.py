"""DQMQ bit-width search: per-tensor weight widths under an average-bits budget, learned end to end.

What is the paper's (Wang et al., "Data Quality-aware Mixed-precision Quantization via Hybrid
Reinforcement Learning", arXiv 2302.04453 / IEEE TNNLS 2024; chapter of Wang, PolyU 2024,
"Towards sample bias-aware deep neural network compression"): layer-wise bit widths are a policy
whose discrete sampling is relaxed to a continuous distribution encoded by a few learnable
parameters, so the choice is differentiable and is optimized end to end, jointly with
quantization training, on a hybrid objective of task performance and quantization benefit.
The source used is the paper's abstract: every formula below is ours.

What is not taken: the paper conditions the widths on each input's quality (a policy network
reads the sample). This module is the budgeted, input-independent version: one distribution per
tensor, the same for every input, and the chosen widths are fixed afterwards.

What is ours (following the differentiable-architecture-search practice the paper's relaxation
belongs to):

* Per quantized tensor t, logits θ_t over the candidate widths M (e.g. {2, 3, 4}). Each step
  draws π_t = softmax((θ_t + g)/τ), g i.i.d. Gumbel(0, 1) (Gumbel-softmax), and the forward pass
  uses ŵ_t = Σ_m π_{t,m}·(w_t + sg(Q_m(w_t) − w_t)), Q_m the m-bit projection of distq.quant
  (`scheme`, by default "linear": α·{0, ±1/k, …, ±1}, k = 2^(m−1) − 1; d ≡ 1, the optimizer's
  scale layout) and sg stop-gradient, so ∂ŵ/∂w = I (straight through) and ∂ŵ/∂π_m = Q_m(w).
* Size: E[b̄] = Σ_t n_t Σ_m p_{t,m}·m / Σ_t n_t with p_t = softmax(θ_t) (the distribution the
  Gumbel-max draw samples from) and n_t = numel; loss = task + λ·(E[b̄] − B)². The penalty is
  two-sided: the budget is meant to be spent, and the task loss alone always asks for more bits.
* τ anneals geometrically from τ₀ to τ₁ over the steps. θ gets Adam at `lr`; copies of the
  weights the model trains (never the model's own) get Adam at `weight_lr`, the paper's joint
  quantization training (0: frozen, the widths are chosen for the given weights).
* Result: the most probable widths under the final p_t that satisfy Σ n_t m_t ≤ ⌊B·Σ n_t⌋
  (`fit_budget`: integer bits, B read as the decimal it is written as, the knapsack solved by
  distq.bit_allocation, the sensitivity baseline's solver), then upgrades while one fits in the
  bits left: argmax_m θ_{t,m} whenever that fits and leaves no room for an upgrade. At B = min M
  every tensor gets min M, at B = max M every tensor gets max M.

Bits count weights only (a scale per group is not counted), as `QuantizedOptimizer.stored_bits`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from distq.bit_allocation import allocate, capacity_of
from distq.quant import blocks_of, get_scheme, project, resolve_bits
from distq.selection import quantizable, select_quantized, unwrap

log = logging.getLogger(__name__)

Batch = tuple[object, Tensor]


@dataclass(frozen=True)
class BitSearch:
    """What the search chose and why.

    bits: {parameter name: width}, Σ n_t·bits_t ≤ ⌊budget·Σ n_t⌋ (`fit_budget`). probs: each
    tensor's final p_t = softmax(θ_t) over `candidates` (ascending). sizes: n_t (numel).
    average_bits: the chosen widths' size-weighted mean; expected_bits: E[b̄] under the final p.
    changed: how many tensors the budget step moved off their argmax. seconds: the search's wall
    time.
    """

    bits: dict[str, int]
    probs: dict[str, tuple[float, ...]]
    sizes: dict[str, int]
    candidates: tuple[int, ...]
    budget: float
    average_bits: float
    expected_bits: float
    changed: int
    seconds: float


def search_bits(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    budget: float,
    **options: Any,
) -> dict[str, int]:
    """{parameter name: weight bits} chosen by DQMQ under `budget` average bits per weight:
    `search(...).bits`, with `search`'s keyword options (candidates, steps, lr, weight_lr, names,
    seed, penalty, tau, scheme, per_channel)."""
    return search(model, batches, loss_fn, budget=budget, **options).bits


def search(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    budget: float,
    candidates: Sequence[int] = (2, 3, 4),
    steps: int = 200,
    lr: float = 0.05,
    weight_lr: float = 1e-3,
    names: Sequence[str] | None = None,
    seed: int = 0,
    penalty: float = 10.0,
    tau: tuple[float, float] = (1.0, 0.1),
    scheme: str = "linear",
    per_channel: bool = False,
) -> BitSearch:
    """Learn per-tensor widths from `candidates` for the weights `names` of `model` (module doc).

    batches: (input, target) pairs, read in order and re-iterated when exhausted (a list or a
    DataLoader; a one-shot generator must hold `steps` batches); the loss is
    loss_fn(model(input), target). names: the tensors to quantize (None: distq.selection's
    default, the quantizable weights less the first and last layer). budget: B, average bits per
    weight over those tensors, min(candidates) ≤ B ≤ max(candidates). seed: the Gumbel draws.
    The model is called through torch.func.functional_call on copies of its parameters and
    buffers: its weights, buffers (BatchNorm statistics) and gradients are left as they were.
    Raises ValueError naming a bad argument and what is allowed.
    """
    started = time.perf_counter()
    model = unwrap(model)
    widths = _check_candidates(candidates, scheme)
    _check_options(budget, widths, steps, lr, weight_lr, penalty, tau)
    chosen = _check_names(model, names)
    params = dict(model.named_parameters())
    sizes = {n: params[n].numel() for n in chosen}
    blocks = _blocks(model, chosen)

    train = weight_lr > 0  # the copies of the weights the model trains (requires_grad)
    weights = {
        n: p.detach().clone().requires_grad_(train and p.requires_grad) for n, p in params.items()
    }
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    theta = torch.zeros(len(chosen), len(widths), dtype=torch.float64, requires_grad=True)
    optimizers = [torch.optim.Adam([theta], lr=lr)]
    trained = [w for w in weights.values() if w.requires_grad]
    if trained:
        optimizers.append(torch.optim.Adam(trained, lr=weight_lr))
    share = torch.tensor([sizes[n] for n in chosen], dtype=torch.float64) / sum(sizes.values())
    levels = torch.tensor(widths, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    alphas: dict[tuple[str, int], Tensor] = {}
    warm = get_scheme(scheme).warm_start
    stream = _batches(batches)
    log_every = max(1, steps // 10)

    for step in range(steps):
        temperature = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
        uniform = torch.rand(theta.shape, generator=generator, dtype=theta.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
        pi = torch.softmax((theta + gumbel) / temperature, dim=1)
        state = dict(weights)
        for i, name in enumerate(chosen):
            w = weights[name]
            mixed = torch.zeros_like(w)
            for j, m in enumerate(widths):
                opts = {"alpha_init": alphas[name, m]} if warm and (name, m) in alphas else {}
                proj = project(
                    w.detach(), None, scheme, m, per_channel=per_channel, blocks=blocks[name],
                    **opts,
                )
                alphas[name, m] = proj.alpha
                mixed = mixed + pi[i, j].to(w.dtype) * (w + (proj.q - w).detach())
            state[name] = mixed
        inputs, target = next(stream)
        output = functional_call(model, {**state, **buffers}, (inputs,))
        task = loss_fn(output, target)
        expected = (share * (torch.softmax(theta, dim=1) @ levels)).sum()
        loss = task + penalty * (expected - budget) ** 2
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.info(
                "dqmq step %d/%d: tau %.3f, task loss %.4f, expected bits %.3f (budget %g)",
                step + 1, steps, temperature, task.item(), expected.item(), budget,
            )

    with torch.no_grad():
        logp = torch.log_softmax(theta, dim=1)
        expected_bits = float((share * (logp.exp() @ levels)).sum())
    first = dict(zip(chosen, (widths[j] for j in logp.argmax(dim=1).tolist()), strict=True))
    bits = fit_budget(dict(zip(chosen, logp.tolist(), strict=True)), sizes, widths, budget)
    total = sum(sizes.values())
    result = BitSearch(
        bits=bits,
        probs={n: tuple(p) for n, p in zip(chosen, logp.exp().tolist(), strict=True)},
        sizes=sizes,
        candidates=widths,
        budget=budget,
        average_bits=sum(sizes[n] * b for n, b in bits.items()) / total,
        expected_bits=expected_bits,
        changed=sum(first[n] != bits[n] for n in chosen),
        seconds=time.perf_counter() - started,
    )
    log.info(
        "dqmq chose %s: %.4f average bits (budget %g), %d moved by the budget repair, %.1f s",
        bits, result.average_bits, budget, result.changed, result.seconds,
    )
    return result


def fit_budget(
    logp: Mapping[str, Sequence[float]],
    sizes: Mapping[str, int],
    candidates: Sequence[int],
    budget: float,
    *,
    fill: bool = True,
) -> dict[str, int]:
    """The most probable widths within the budget: m_t from `candidates` (ascending) maximizing
    Σ_t ℓ_{t,m_t} (`logp`: each tensor's log-probabilities over candidates) subject to
    Σ n_t·m_t ≤ ⌊budget·Σ n_t⌋ (distq.bit_allocation.capacity_of: integers, the budget read as
    the decimal it is written as).

    The multiple-choice knapsack is distq.bit_allocation.allocate's with costs −ℓ: exact by
    Pareto dynamic programming, or past its state limit the Lagrangian method with its stated
    gap. fill: then, while an upgrade fits in the bits left, the fitting one that loses least ℓ
    per bit added (ties: earlier tensor, then smaller move), so on exit no single upgrade fits.
    """
    widths = list(candidates)
    costs = {n: {m: -row[j] for j, m in enumerate(widths)} for n, row in logp.items()}
    chosen = allocate(costs, sizes, budget).bits
    left = capacity_of(sizes, budget, widths) - sum(sizes[n] * m for n, m in chosen.items())
    order = list(logp)
    while fill:
        moves = [
            ((costs[n][m] - costs[n][chosen[n]]) / (sizes[n] * (m - chosen[n])), order.index(n),
             m - chosen[n], n, m)
            for n in order
            for m in widths
            if m > chosen[n] and sizes[n] * (m - chosen[n]) <= left
        ]
        if not moves:
            break
        *_, n, m = min(moves)
        left -= sizes[n] * (m - chosen[n])
        chosen[n] = m
    return {n: chosen[n] for n in order}


def _batches(batches: Iterable[Batch]) -> Iterator[Batch]:
    """The batches in order, re-iterated when exhausted; ValueError if a pass yields none."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "batches yielded no (input, target) pair; allowed: a non-empty re-iterable "
                "(list, DataLoader) or an iterator holding at least `steps` batches"
            )


def _check_candidates(candidates: Sequence[int], scheme: str) -> tuple[int, ...]:
    allowed = get_scheme(scheme).bits
    if len(candidates) == 0:
        raise ValueError(f"candidates is empty; allowed: widths of scheme {scheme!r}, {allowed}")
    for m in candidates:
        resolve_bits(get_scheme(scheme), m)  # ValueError naming m and the scheme's widths
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates {tuple(candidates)} repeat a width; allowed: distinct widths")
    return tuple(sorted(candidates))


def _check_options(
    budget: float,
    widths: tuple[int, ...],
    steps: int,
    lr: float,
    weight_lr: float,
    penalty: float,
    tau: tuple[float, float],
) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
        widths[0] <= budget <= widths[-1]
    ):
        raise ValueError(
            f"budget={budget!r}; allowed: average bits in [{widths[0]}, {widths[-1]}], the range "
            f"of candidates {widths}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; allowed: a positive integer")
    for label, value, positive in (
        ("lr", lr, True), ("weight_lr", weight_lr, False), ("penalty", penalty, False)
    ):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
            rule = "a finite number > 0" if positive else "a finite number >= 0"
            raise ValueError(f"{label}={value!r}; allowed: {rule}")
    if (
        len(tau) != 2
        or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in tau)
        or not tau[0] >= tau[1] > 0
    ):
        raise ValueError(f"tau={tau!r}; allowed: (start, end) with start >= end > 0")


def _check_names(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    """The tensors to search over, in the model's parameter order; ValueError on an unknown,
    repeated or non-floating name, or on none."""
    params = dict(model.named_parameters())
    if names is None:
        chosen = select_quantized(model)
        if not chosen:
            raise ValueError(
                "distq.selection's default picks no weight of this model (it leaves the first and "
                "last layer full precision); pass names=, allowed: any of "
                f"{[c.name for c in quantizable(model)] or list(params)}"
            )
        return chosen
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(
            f"unknown parameter name(s) {unknown}; allowed: names of model.named_parameters(), "
            f"e.g. its quantizable weights {[c.name for c in quantizable(model)]}"
        )
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names={list(names)}; allowed: a non-empty list of distinct names")
    bad = [n for n in names if not params[n].is_floating_point() or params[n].numel() == 0]
    if bad:
        raise ValueError(f"parameter(s) {bad}: allowed: non-empty floating-point tensors")
    order = list(params)
    return sorted(names, key=order.index)


def _blocks(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Scale blocks per tensor, as QuantizedOptimizer sets them: a `set_blocks` marking, else the
    recurrent layer's gate count (distq.selection), else 1."""
    gates = {c.name: c.blocks for c in quantizable(model)}
    params = dict(model.named_parameters())
    return {n: blocks_of(params[n]) if blocks_of(params[n]) > 1 else gates.get(n, 1) for n in names}
