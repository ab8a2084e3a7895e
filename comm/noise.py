"""Keys of the counter-based rounding noise u_i = hash(i, key) (`kernels.hash_uniform`): the same
on any machine, thread count and resume; independent across ranks, steps and buckets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distq.comm.kernels import MASK32, hash_uniform

U64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Key:
    """What one encode call is: run seed, step, rank, bucket slot, and phase (0: a rank's own
    gradient; 1: the re-quantization of reduced data). It seeds the rounding noise."""

    seed: int = 0
    step: int = 0
    rank: int = 0
    slot: int = 0
    phase: int = 0

    def value(self) -> int:
        """The key folded into 32 bits (splitmix64-style mixing, plain Python ints)."""
        h = 0x243F6A8885A308D3
        for part in (self.seed, self.step, self.rank, self.slot, self.phase):
            h = ((h ^ (part & U64)) * 0xBF58476D1CE4E5B9) & U64
            h ^= h >> 31
        return h & MASK32

    def tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """The folded key as a 0-d int64 tensor (compiled kernels never respecialize on it)."""
        return torch.tensor(self.value(), dtype=torch.int64, device=device)

    def uniform(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """The n uniforms in [0, 1) this key's encode call uses."""
        return hash_uniform(torch.arange(n, dtype=torch.int64, device=device), self.tensor(device))
