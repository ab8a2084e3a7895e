"""Gradient buckets for engines without DDP's reducer (DeepSpeed, Horovod): parameters grouped in
the same order on every rank, each bucket's exchange started during backward as soon as its
gradients are in, and the averages written back into `.grad`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from distq.comm.exchange import GradientExchange, nonfinite_error
from distq.comm.worker import ExchangeWorker, completed

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
    for p, values in zip(params, flat.split([p.numel() for p in params]), strict=True):
        if p.grad is None:
            p.grad = values.view_as(p).to(p.dtype, copy=True)
        else:
            p.grad.copy_(values.view_as(p))


class BucketedExchange:
    """`exchange` over buckets of `params` (`plan_buckets`), at the step `step()` gives (fp32
    before `start_iter`). With `overlap`, a bucket's exchange starts on a worker thread, in
    bucket order, once every gradient of it and of the buckets before it has arrived `passes`
    times (counted while `counting()`); `finish()` starts the rest, waits, and writes `.grad`."""

    def __init__(
        self,
        exchange: GradientExchange,
        params: Iterable[nn.Parameter],
        step: Callable[[], int],
        start_iter: int,
        cap_mb: float = DEFAULT_CAP_MB,
        overlap: bool = True,
        passes: int = 1,
        counting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.gradient_exchange, self.step, self.start_iter = exchange, step, start_iter
        self.buckets = plan_buckets(params, cap_mb)
        self.passes, self.counting = passes, counting
        self.worker = ExchangeWorker() if overlap else None
        self.arrived: dict[nn.Parameter, int] = {}
        self.futures: list[torch.futures.Future] = []
        self.handles = [
            p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b
        ]

    def average_bucket(self, index: int) -> Tensor:
        """Bucket `index`'s gradients averaged over the ranks, in a vector of its own (never a
        view of the exchange's scratch buffer, which the next bucket reuses)."""
        params, step, exchange = self.buckets[index], self.step(), self.gradient_exchange
        flat = flatten_grads(params)
        if step < self.start_iter:
            return exchange.average_fp32(flat, f"distq.{index}.warmup")
        return exchange.average_params(params, flat, index, step, out=flat)

    def _on_grad(self, param: nn.Parameter) -> None:
        if self.worker is None or not self.counting():
            return
        self.arrived[param] = self.arrived.get(param, 0) + 1
        while len(self.futures) < len(self.buckets) and all(
            self.arrived.get(p, 0) >= self.passes for p in self.buckets[len(self.futures)]
        ):
            self._start(len(self.futures))

    def _start(self, index: int) -> None:
        job = functools.partial(self.average_bucket, index)
        self.futures.append(completed(job) if self.worker is None else self.worker.submit(job))

    def started(self) -> int:
        """How many buckets' exchanges have started."""
        return len(self.futures)

    @torch.no_grad()
    def finish(self) -> None:
        """Start the buckets not started yet, wait for all, write the averages into `.grad`,
        and raise on every rank alike under nonfinite='raise' if one is NaN/Inf."""
        for index in range(len(self.futures), len(self.buckets)):
            self._start(index)
        exchange, step, finite = self.gradient_exchange, self.step(), True
        for params, future in zip(self.buckets, self.futures, strict=True):
            flat = future.wait()
            write_grads(flat, params)
            finite = finite and exchange.is_finite(flat)
        self.futures, self.arrived = [], {}
        if step >= self.start_iter:
            exchange.stats.steps += 1
        if not finite and exchange.settings.nonfinite == "raise":
            raise nonfinite_error(f"at step {step}")

    def close(self) -> None:
        """Remove the gradient hooks and stop the worker thread."""
        for handle in self.handles:
            handle.remove()
        if self.worker is not None:
            self.worker.close()
