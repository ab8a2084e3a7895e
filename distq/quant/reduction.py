"""Row reductions of the solvers: over the local [G, n] view, or across the shards of a group.

Every solver reduces its 2-D view (one row per scale group) through `row_sums`, `row_max`,
`row_mean` and `agree` instead of calling `.sum(1)` itself. By default these reduce the rows
as they are. Inside `reducing(reducer)` they go through the reducer: distq.quant.sharded's adds
the partial sums of the ranks that hold pieces of the same scale group (an FSDP shard of a
tensor), so the iterative solvers (α-steps, code rounding) compute the α of the whole tensor and
stop after the same round on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor


class RowReducer:
    """Reductions over the rows of a [G, n] view held whole by this process."""

    def sums(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """Σ over each row of every x (one [G] tensor per x)."""
        return tuple(x.sum(1) for x in xs)

    def max(self, x: Tensor) -> Tensor:
        """The largest entry of each row (rows must not be empty)."""
        return x.amax(dim=1)

    def mean(self, x: Tensor) -> Tensor:
        """The mean of each row, over the scale group's entries (a shard's padding excluded)."""
        return x.mean(1)

    def agree(self, flag: bool) -> bool:
        """`flag`, held alike by every process that shares the groups (all of them true)."""
        return flag


LOCAL = RowReducer()
_ACTIVE: ContextVar[RowReducer] = ContextVar("distq_row_reducer", default=LOCAL)


@contextmanager
def reducing(reducer: RowReducer) -> Iterator[RowReducer]:
    """Make `reducer` the one the solvers use inside the block."""
    token = _ACTIVE.set(reducer)
    try:
        yield reducer
    finally:
        _ACTIVE.reset(token)


def active() -> RowReducer:
    """The reducer in force: the local one outside `reducing`."""
    return _ACTIVE.get()


def row_sums(*xs: Tensor) -> tuple[Tensor, ...]:
    return _ACTIVE.get().sums(*xs)


def row_sum(x: Tensor) -> Tensor:
    return _ACTIVE.get().sums(x)[0]


def row_max(x: Tensor) -> Tensor:
    return _ACTIVE.get().max(x)


def row_mean(x: Tensor) -> Tensor:
    return _ACTIVE.get().mean(x)


def agree(flag: bool) -> bool:
    return _ACTIVE.get().agree(flag)
