"""Per-tensor widths in `distq train`, chosen once and then kept for the rest of the run and
across resumes.

Weights (--weight-bits-budget): at step allocate_after, by the sensitivity allocator
(distq/bit_allocation.py) or DQMQ's search (distq/dqmq.py). Recorded in the checkpoint's
optimizer state (`tensor_bits`, what a resume restores) and its `quantized` export specs (each
tensor's `bits`, what `distq export` packs), and in out_dir/bit_widths.json (BIT_WIDTHS_NAME: the
step, method, budget, candidates, widths, sizes and every tensor's cost S_i(m) per candidate),
what `distq report` reads.

Gradients (--grad-bits-budget): at step grad_allocate_after every rank takes its own gradient of
the run's objective on grad_calibration batches, outside DDP; `gradient_costs_across` sums the
costs C_i(m) over the ranks (comm/gradient_bits.py) and the same exact allocator picks the
widths, which the DDP hook sends from the next step on. Recorded in the hook's checkpoint state
and out_dir/grad_bit_widths.json (GRAD_BIT_WIDTHS_NAME).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distq.bit_allocation import Allocation, Search, allocate_bits
from distq.comm import QuantizedCommState
from distq.comm.gradient_bits import allocate_gradient_bits, gradient_costs_across
from distq.launch import config, recipes, rng
from distq.launch.environment import DistEnv
from distq.optim import QuantizedOptimizer

BIT_WIDTHS_NAME = "bit_widths.json"
GRAD_BIT_WIDTHS_NAME = "grad_bit_widths.json"

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def check_allocation_steps(cfg: config.TrainConfig, total_steps: int) -> None:
    """A budget's allocation must fall inside the run: ConfigError naming both otherwise."""
    weights, grads = cfg.weights, cfg.gradients
    for name, budget, step in (
        ("allocate_after", weights.weight_bits_budget, weights.allocate_after),
        ("grad_allocate_after", grads.bits_budget, grads.allocate_after),
    ):
        if budget is not None and step > total_steps:
            raise config.ConfigError(
                f"{name}={step} is past the run's {total_steps} steps; allowed: 1..{total_steps}"
            )


def allocate_widths(
    cfg: config.TrainConfig,
    env: DistEnv,
    optimizer: QuantizedOptimizer,
    model: nn.Module,
    data: recipes.Split,
    step: int,
    say: Callable[[str], None],
) -> Allocation | None:
    """At step allocate_after (once: a resumed run keeps the widths it chose), choose the
    widths on every rank, take rank 0's (replicas hold the same w and d, so they agree; the
    broadcast makes sure), switch the optimizer, say the table and write bit_widths.json."""
    weights = cfg.weights
    if weights.weight_bits_budget is None or step != weights.allocate_after or optimizer.allocated:
        return None
    search = _dqmq_search(cfg, optimizer, model, data) if weights.bit_allocation == "dqmq" else None
    try:
        allocation = allocate_bits(
            optimizer,
            weights.weight_bits_budget,
            weights.bit_candidates,
            weights.bit_allocation,
            search,
            switch=False,  # rank 0's widths, below
        )
    except ValueError as exc:  # e.g. DQMQ's search refusing the scheme
        raise config.ConfigError(f"bit allocation at step {step}: {exc}") from None
    bits = [allocation.bits]
    if env.distributed:
        dist.broadcast_object_list(bits, src=0)
    optimizer.set_bits(bits[0])
    say(
        f"step {step}: weight widths by {weights.bit_allocation} for an average of "
        f"{weights.weight_bits_budget} bits from {sorted(weights.bit_candidates)}:\n"
        + allocation.table()
    )
    if env.is_main:
        record = {
            "step": step,
            "method": weights.bit_allocation,
            "budget": weights.weight_bits_budget,
            "candidates": sorted(weights.bit_candidates),
            **allocation.record(),
        }
        path = Path(cfg.run.out_dir) / BIT_WIDTHS_NAME
        path.write_text(json.dumps(record, indent=2) + "\n")
    return allocation


def _dqmq_search(
    cfg: config.TrainConfig, optimizer: QuantizedOptimizer, model: nn.Module, data: recipes.Split
) -> Search:
    """DQMQ's search over the training batches in an order seeded by the run's seed (the same
    on every rank), with the run's loss, scheme and scale layout."""
    from distq.dqmq import search_bits

    run = cfg.run
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(run.seed))
    order = order.to(data.train_y.device)
    batches = [
        (data.train_x[idx], data.train_y[idx])
        for idx in order.split(run.batch_size)
        if len(idx) == run.batch_size
    ]

    def search(names: list[str], budget: float, candidates: Sequence[int]) -> dict[str, int]:
        return search_bits(
            model,
            batches,
            nn.functional.cross_entropy,
            budget=budget,
            candidates=candidates,
            steps=cfg.weights.dqmq_steps,
            names=names,
            seed=run.seed,
            scheme=optimizer.scheme,
            per_channel=optimizer.per_channel,
        )

    return search


def allocate_gradient_widths(
    cfg: config.TrainConfig,
    comm: QuantizedCommState,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    data: recipes.Split,
    objective: Objective,
    step: int,
    rank: int,
    say: Callable[[str], None],
) -> Allocation | None:
    """At step grad_allocate_after (once: a resumed run keeps the widths it chose), the widths
    minimizing Σ C_i(m_i) within grad_bits_budget, from every rank's own gradients (module
    docstring), rank 0's on every rank; the hook sends them from the next step on. Says the
    table and writes grad_bit_widths.json."""
    grads = cfg.gradients
    if grads.bits_budget is None or step != grads.allocate_after or comm.allocated is not None:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    own = own_gradients(model, named, objective, data, cfg.run, step, rank, grads.calibration)
    quantized = isinstance(optimizer, QuantizedOptimizer)  # else d ≡ 1
    curvature = {n: optimizer.curvature(p) if quantized else None for n, p in named}
    costs = gradient_costs_across(
        own, curvature, grads.bit_candidates, comm.settings, grads.metric, comm.process_group
    )
    allocation = allocate_gradient_bits(costs, {n: p.numel() for n, p in named}, grads.bits_budget)
    bits = [allocation.bits]
    dist.broadcast_object_list(bits, src=0, group=comm.process_group)
    comm.allocate(bits[0])
    weighting = ("1/d" if grads.metric == "loss" else "1/d²") if quantized else "d = 1"
    say(
        f"step {step}: gradient widths for an average of {grads.bits_budget} bits from "
        f"{sorted(grads.bit_candidates)} (cost: the exchange's error weighted by {weighting}, "
        f"{grads.calibration} batches per rank), sent from step {step + 1}:\n"
        + allocation.table(cost="C", per="element")
    )
    if rank == 0:
        record = {
            "step": step,
            "budget": grads.bits_budget,
            "candidates": sorted(grads.bit_candidates),
            "metric": grads.metric if quantized else "d = 1",
            "calibration": grads.calibration,
            **allocation.record(),
        }
        path = Path(cfg.run.out_dir) / GRAD_BIT_WIDTHS_NAME
        path.write_text(json.dumps(record, indent=2) + "\n")
    return allocation


def own_gradients(
    model: nn.Module,
    named: Sequence[tuple[str, nn.Parameter]],
    objective: Objective,
    data: recipes.Split,
    run: config.Run,
    step: int,
    rank: int,
    batches: int,
) -> list[dict[str, torch.Tensor]]:
    """This rank's gradients of `objective` on `batches` batches drawn by (seed, step, rank),
    through the unwrapped model, so nothing is exchanged; the buffers (batch-norm statistics),
    the random generators and the gradients are put back, so training goes on as without it."""
    generator = torch.Generator().manual_seed(run.seed * 1_000_003 + step * 1009 + rank)
    draws = torch.randint(len(data.train_y), (batches, run.batch_size), generator=generator)
    buffers = [b.clone() for b in model.buffers()]
    states, saved = rng.capture(), [p.grad for _, p in named]
    own = []
    try:
        for idx in draws.to(data.train_y.device):
            for _, p in named:
                p.grad = None
            objective(model, data.train_x[idx], data.train_y[idx]).backward()
            own.append({
                n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in named
            })  # fmt: skip
    finally:
        rng.restore(states)
        with torch.no_grad():
            for b, value in zip(model.buffers(), buffers, strict=True):
                b.copy_(value)
        for (_, p), grad in zip(named, saved, strict=True):
            p.grad = grad
    return own
