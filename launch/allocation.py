"""Per-tensor weight widths in `distq train` (--weight-bits-budget): chosen once, at step
allocate_after, by the sensitivity allocator (distq/bit_allocation.py) or DQMQ's search
(distq/dqmq.py), then kept for the rest of the run and across resumes.

Where the widths are recorded: the checkpoint's optimizer state (`tensor_bits`, what a resume
restores) and its `quantized` export specs (each tensor's `bits`, what `distq export` packs);
and out_dir/bit_widths.json (BIT_WIDTHS_NAME: the step, method, budget, candidates, widths,
sizes and every tensor's cost S_i(m) per candidate), what `distq report` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from distq.bit_allocation import Allocation, Search, allocate_bits
from distq.launch import config, recipes
from distq.launch.environment import DistEnv
from distq.optim import QuantizedOptimizer

BIT_WIDTHS_NAME = "bit_widths.json"


def check_allocation_step(weights: config.Weights, total_steps: int) -> None:
    """A budget's allocation must fall inside the run: ConfigError naming both otherwise."""
    if weights.weight_bits_budget is not None and weights.allocate_after > total_steps:
        raise config.ConfigError(
            f"allocate_after={weights.allocate_after} is past the run's {total_steps} steps; "
            f"allowed: 1..{total_steps}"
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
