"""Several sharded projections run together, their small all-reduces merged round by round.

A sharded solver (distq.quant.sharded) makes about ten small all-reduces per tensor and step
(LATe's branch and bound over thresholds most of them; an iterative m-bit solver up to ~30). A
model's dozen quantized tensors projected one after another make over a hundred all-reduces of
a few hundred bytes each, every one paying a round trip and its protocol overhead.
`in_lockstep(jobs)` runs each job in a thread of its own; a collective a job makes through this
module's `all_reduce` or `all_gather` waits until every unfinished job has made one, and the
calling thread then carries that round: one all-reduce per process group and op for all of
its tensors (float64 carries every dtype it holds exactly), all-gathers one by one, both in job
order.

Every rank must pass the same jobs in the same order, and each job must make the same sequence
of collectives on every rank (the solvers' control flow depends only on reduced values), so
the merged rounds match across ranks. Outside `in_lockstep` the two functions are
torch.distributed's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather", "all_reduce", "in_lockstep"]

T = TypeVar("T")


_IN_FLOAT64 = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int32,
               torch.int16, torch.int8, torch.uint8, torch.bool)  # fmt: skip


@dataclass(eq=False)
class _Reduce:
    tensor: Tensor
    op: dist.ReduceOp.RedOpType
    group: dist.ProcessGroup | None

    def key(self) -> tuple:
        """Reductions with equal keys travel in one all-reduce, in the key's dtype: float64
        for every dtype it holds exactly (a float64 sum of float32s rounds once, not at every
        addend)."""
        exact = self.tensor.dtype in _IN_FLOAT64
        carrier = torch.float64 if exact else self.tensor.dtype
        return (self.group, self.op, carrier, self.tensor.device)


@dataclass(eq=False)
class _Gather:
    pieces: list[Tensor]
    tensor: Tensor
    group: dist.ProcessGroup | None


@dataclass(eq=False)
class _Lockstep:
    """The rounds of one `in_lockstep` call: who waits with which collective, who is done."""

    jobs: Sequence[Callable[[], object]]
    grad_enabled: bool
    results: list = field(init=False)
    errors: list[BaseException | None] = field(init=False)
    waiting: dict[int, _Reduce | _Gather] = field(default_factory=dict)
    failure: BaseException | None = None
    condition: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.jobs)
        self.errors = [None] * len(self.jobs)
        self.unfinished = len(self.jobs)

    def run(self, index: int) -> None:
        """Thread body: job `index`, its collectives routed through this lockstep."""
        _SESSION.set((self, index))
        try:
            with torch.set_grad_enabled(self.grad_enabled):
                self.results[index] = self.jobs[index]()
        except BaseException as exc:  # re-raised by in_lockstep, in job order
            self.errors[index] = exc
        finally:
            with self.condition:
                self.unfinished -= 1
                self.condition.notify_all()

    def wait_for(self, index: int, collective: _Reduce | _Gather) -> None:
        """Block job `index` until the round holding `collective` has been carried."""
        with self.condition:
            if self.failure is None:  # else no round will carry it
                self.waiting[index] = collective
                self.condition.notify_all()
                self.condition.wait_for(lambda: index not in self.waiting)
            if self.failure is not None:
                raise RuntimeError("a merged collective of the lockstep failed") from self.failure

    def drive(self) -> None:
        """Carry rounds until every job has finished (calling thread)."""
        while True:
            with self.condition:
                self.condition.wait_for(lambda: len(self.waiting) == self.unfinished)
                if not self.unfinished:
                    return
                round_ = [self.waiting[i] for i in sorted(self.waiting)]
            try:
                _carry(round_)
            except BaseException as exc:
                with self.condition:
                    self.failure = exc
                    self.waiting.clear()
                    self.condition.notify_all()
                raise
            with self.condition:
                self.waiting.clear()
                self.condition.notify_all()


_SESSION: ContextVar[tuple[_Lockstep, int] | None] = ContextVar("distq_lockstep", default=None)


def in_lockstep(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Each job's result, the jobs run together with their collectives merged (see module); the
    first job's error (in job order) is raised after all have finished."""
    if len(jobs) < 2:
        return [job() for job in jobs]
    lockstep = _Lockstep(jobs, torch.is_grad_enabled())
    threads = [
        threading.Thread(target=lockstep.run, args=(i,), name=f"distq-lockstep-{i}", daemon=True)
        for i in range(len(jobs))
    ]
    for thread in threads:
        thread.start()
    try:
        lockstep.drive()
    finally:
        for thread in threads:
            thread.join()
    for error in lockstep.errors:
        if error is not None:
            raise error
    return lockstep.results


def all_reduce(
    tensor: Tensor,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
) -> None:
    """torch.distributed.all_reduce in place; inside `in_lockstep`, merged into the round."""
    session = _SESSION.get()
    if session is None:
        dist.all_reduce(tensor, op=op, group=group)
    else:
        session[0].wait_for(session[1], _Reduce(tensor, op, group))


def all_gather(
    pieces: list[Tensor], tensor: Tensor, group: dist.ProcessGroup | None = None
) -> None:
    """torch.distributed.all_gather; inside `in_lockstep`, made in the round's job order."""
    session = _SESSION.get()
    if session is None:
        dist.all_gather(pieces, tensor, group=group)
    else:
        session[0].wait_for(session[1], _Gather(pieces, tensor, group))


def _carry(round_: list[_Reduce | _Gather]) -> None:
    """Make one round's collectives: each key's reductions as one flat all-reduce, then the
    gathers, all in the order the round lists them (the same on every rank)."""
    merged: list[tuple[tuple, list[_Reduce]]] = []
    for item in round_:
        if isinstance(item, _Reduce):
            same = next((members for key, members in merged if key == item.key()), None)
            if same is None:
                merged.append((item.key(), [item]))
            else:
                same.append(item)
    for (group, op, carrier, _), members in merged:
        flat = torch.cat([m.tensor.reshape(-1).to(carrier) for m in members])
        dist.all_reduce(flat, op=op, group=group)
        parts = flat.split([m.tensor.numel() for m in members])
        for member, part in zip(members, parts, strict=True):
            member.tensor.copy_(part.view_as(member.tensor))
    for item in round_:
        if isinstance(item, _Gather):
            dist.all_gather(item.pieces, item.tensor, group=item.group)
