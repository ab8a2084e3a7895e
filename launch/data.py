"""Deterministic sharded batches over an in-memory dataset.

Each epoch draws one permutation from (seed, epoch), identical on every rank, and gives rank r
the r-th slice of every global batch; the tail that does not fill a global batch is dropped, so
every rank takes the same number of steps (no rank waits in a collective for another).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ShardedBatches:
    """Index batches for one rank: `for idx in batches.epoch(e, start=k)` resumes at step k."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world_size, self.seed = (
            n,
            batch_size,
            rank,
            world_size,
            seed,
        )
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={batch_size} x world_size={world_size} exceeds the {n} training "
                "examples: not one step per epoch; lower batch_size"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def epoch(self, epoch: int, start: int = 0) -> list[Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=generator)
        global_batch = self.batch_size * self.world_size
        first = self.rank * self.batch_size
        return [
            order[s * global_batch + first : s * global_batch + first + self.batch_size]
            for s in range(start, self.steps_per_epoch)
        ]
