"""How payload bytes move between ranks: the four operations the collectives are written against,
for torch.distributed here and Horovod in `distq.comm.horovod`; data movements are asynchronous
(`Pending`), so the pipelined exchange overlaps transfers with the codec on every engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Pending:
    """A data movement in flight; `wait()` blocks until it is done and returns what arrived."""

    wait: Callable[[], Tensor]


class Transport(ABC):
    """Moves 1-D tensors among `size` ranks; this process is `rank`. Every rank issues the same
    operations in the same order; `name` is unique among those in flight (Horovod matches by
    it)."""

    rank: int
    size: int

    @abstractmethod
    def all_gather(self, payload: Tensor, out: Tensor, name: str) -> Pending:
        """Every rank's equal-sized `payload` in rank order (into `out` where the engine can)."""

    @abstractmethod
    def all_to_all(self, send: Tensor, out: Tensor, name: str) -> Pending:
        """Slice j of `send` to rank j; what arrives, in rank order (into `out` where it can)."""

    @abstractmethod
    def max_(self, values: Tensor, name: str) -> int:
        """`values` ← their maximum over ranks, in place (a NaN anywhere stays NaN); returns the
        bytes this rank sent for it (as many arrive)."""

    @abstractmethod
    def sum_(self, values: Tensor, name: str) -> None:
        """`values` ← their sum over ranks, in place, in full precision."""


class TorchTransport(Transport):
    """torch.distributed collectives on `group` (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, payload: Tensor, out: Tensor, name: str) -> Pending:
        work = dist.all_gather_single(out, payload, group=self.group, async_op=True)
        return Pending(lambda: (work.wait(), out)[1])

    def all_to_all(self, send: Tensor, out: Tensor, name: str) -> Pending:
        work = dist.all_to_all_single(out, send, group=self.group, async_op=True)
        return Pending(lambda: (work.wait(), out)[1])

    def max_(self, values: Tensor, name: str) -> int:
        # MAX drops NaN: it travels as inf (a scale is never inf otherwise) and comes back NaN
        values.copy_(torch.where(torch.isnan(values), torch.inf, values))
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        values.copy_(torch.where(torch.isinf(values), torch.nan, values))
        n = self.size
        return 2 * (n - 1) * values.numel() * values.element_size() // n

    def sum_(self, values: Tensor, name: str) -> None:
        dist.all_reduce(values, group=self.group)
