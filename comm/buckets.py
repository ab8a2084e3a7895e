"""Gradient buckets for engines without DDP's reducer (DeepSpeed, Horovod): parameters grouped
in a fixed order, flattened into one float32 buffer per bucket and written back after the
exchange, and a scheduler that starts each bucket's exchange during backward as soon as its
gradients are in. The order is the same on every rank, so collectives are issued in the same
order."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from distq.comm.worker import ExchangeWorker

DEFAULT_CAP_MB = 25  # DDP's default bucket size


def plan_buckets(params: Iterable[nn.Parameter], cap_mb: float = DEFAULT_CAP_MB) -> list[list]:
    """Trainable parameters in reverse registration order (roughly the order backward produces
    their gradients, as DDP does), cut into buckets of at most `cap_mb` MB of float32."""
    if not cap_mb > 0:
        raise ValueError(f"bucket_cap_mb={cap_mb!r}; allowed: a positive number of megabytes")
    cap = max(1, int(cap_mb * 2**20) // 4)
    buckets: list[list] = []
    size = cap
    for p in reversed([p for p in params if p.requires_grad]):
        if size + p.numel() > cap and size > 0:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets


def flatten_grads(params: list[nn.Parameter]) -> Tensor:
    """The parameters' gradients as one float32 vector (a missing gradient counts as zeros, as
    DDP treats an unused parameter)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in params
        ]
    )


def write_grads(flat: Tensor, params: list[nn.Parameter]) -> None:
    """Copy `flat` back into the gradients (creating any that were missing)."""
    offset = 0
    for p in params:
        values = flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = values.to(p.dtype, copy=True)
        else:
            p.grad.copy_(values)
        offset += p.numel()


class BucketScheduler:
    """Starts `average(index)` for each bucket, in bucket order, on a worker thread as soon as
    every gradient of it and of the buckets before it has arrived `passes` times (arrivals count
    only while `counting()`), or inline in `finish()` without overlap; `finish()` starts the rest
    (unused parameters), waits, and returns every bucket's average."""

    def __init__(
        self,
        buckets: list[list[nn.Parameter]],
        average: Callable[[int], Tensor],
        overlap: bool,
        passes: int = 1,
        counting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.buckets, self.average, self.passes, self.counting = buckets, average, passes, counting
        self.worker = ExchangeWorker() if overlap else None
        self.arrived: dict[nn.Parameter, int] = {}
        self.futures: list[torch.futures.Future] = []
        self.handles = []
        if overlap:
            self.handles = [
                p.register_post_accumulate_grad_hook(self._on_grad) for b in buckets for p in b
            ]

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self.counting():
            return
        self.arrived[param] = self.arrived.get(param, 0) + 1
        while len(self.futures) < len(self.buckets) and all(
            self.arrived.get(p, 0) >= self.passes for p in self.buckets[len(self.futures)]
        ):
            self._start(len(self.futures))

    def _start(self, index: int) -> None:
        if self.worker is None:
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(self.average(index))
        else:
            future = self.worker.submit(lambda: self.average(index))
        self.futures.append(future)

    def started(self) -> int:
        """How many buckets' exchanges have started."""
        return len(self.futures)

    def finish(self) -> list[Tensor]:
        """Start the buckets not started yet, wait for all, and reset for the next step."""
        for index in range(len(self.futures), len(self.buckets)):
            self._start(index)
        averages = [f.wait() for f in self.futures]
        self.futures, self.arrived = [], {}
        return averages

    def close(self) -> None:
        """Remove the gradient hooks and stop the worker thread."""
        for handle in self.handles:
            handle.remove()
        if self.worker is not None:
            self.worker.close()
