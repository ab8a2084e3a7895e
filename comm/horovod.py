"""Horovod with distq's quantized gradients: the DDP hook's `GradientExchange` over Horovod's
asynchronous all-gather and all-to-all.

    opt = distq.comm.horovod.DistributedOptimizer(opt, model.named_parameters(), bits=2)

Horovod's own `compression=` hands the compressed tensor to a summing all-reduce, which refuses
uint8 and cannot add packed codes; here every rank decodes the same sum of the payloads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from distq.comm.buckets import DEFAULT_CAP_MB, BucketedExchange
from distq.comm.exchange import (
    CompressionStats,
    ExchangeSettings,
    GradientExchange,
    parameter_widths,
)
from distq.comm.extras import require
from distq.comm.transport import Pending, Transport
from distq.wrapping import OptimizerWrapper, closure_loss

hvd = require("horovod.torch")


class HorovodTransport(Transport):
    """Horovod's asynchronous collectives over all its ranks (operations matched by name)."""

    def __init__(self) -> None:
        self.rank, self.size = hvd.rank(), hvd.size()

    def all_gather(self, payload: Tensor, out: Tensor, name: str) -> Pending:
        handle = hvd.allgather_async(payload, name=name)
        return Pending(lambda: hvd.synchronize(handle).view(-1))

    def all_to_all(self, send: Tensor, out: Tensor, name: str) -> Pending:
        handle = hvd.alltoall_async(send, name=name)
        return Pending(lambda: hvd.synchronize(handle)[0].view(-1))

    def max_(self, values: Tensor, name: str) -> int:
        gathered = hvd.allgather(values, name=name).view(self.size, -1)
        values.copy_(gathered.amax(dim=0))  # amax keeps a NaN: every rank sees it
        return (self.size - 1) * values.numel() * values.element_size()

    def sum_(self, values: Tensor, name: str) -> None:
        values.copy_(hvd.allreduce(values, op=hvd.Sum, name=name))


class DistributedOptimizer(OptimizerWrapper):
    """Wraps `optimizer` (any, QuantizedOptimizer too): `step()` first averages the gradients
    over Horovod ranks through distq's exchange (`**exchange`: `ExchangeSettings`'s options;
    collective 'scatter' or 'allgather'), then steps the wrapped optimizer.

    `named_parameters` fix the bucket order (the same on every rank) and the names of
    `bits_by_name` (None: the optimizer's parameters in group order). `start_iter` steps are
    averaged in fp32 first, as the DDP hook's warm-up. With `overlap`, a bucket's exchange
    starts during backward once each of its gradients has arrived `backward_passes_per_step`
    times (False: all in `step()`). To clip the average: `synchronize()`, clip, then `step()`
    inside `with opt.skip_synchronize():`. Broadcast the initial weights first.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
        start_iter: int = 0,
        bucket_cap_mb: float = DEFAULT_CAP_MB,
        overlap: bool = True,
        backward_passes_per_step: int = 1,
        **exchange: Any,
    ) -> None:
        settings = ExchangeSettings.of(**exchange)
        if settings.collective == "hierarchical":
            raise ValueError(
                "collective='hierarchical'; allowed: scatter, allgather (hierarchical needs "
                "torch.distributed process groups: use the DDP hook)"
            )
        if start_iter < 0:
            raise ValueError(f"start_iter={start_iter}; allowed: a number of steps >= 0")
        if backward_passes_per_step < 1:
            raise ValueError(
                f"backward_passes_per_step={backward_passes_per_step}; allowed: an int >= 1"
            )
        super().__init__(optimizer)
        named = list(named_parameters or [])
        if named_parameters is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            named = [(str(i), p) for i, p in enumerate(params)]
        widths = parameter_widths(named, settings.bits_by_name)
        self.exchange = GradientExchange(settings, HorovodTransport(), widths=widths)
        self.stats: CompressionStats = self.exchange.stats
        self.iter = 0
        self.scheduler = BucketedExchange(
            self.exchange,
            [p for _, p in named],
            lambda: self.iter,
            start_iter,
            bucket_cap_mb,
            overlap,
            backward_passes_per_step,
        )
        self.buckets = self.scheduler.buckets
        self._synchronized = False
        self._skip = False

    def set_keep_mask(self, fn: Callable[[nn.Parameter], Tensor | None] | None) -> None:
        """As `GradientExchange.set_keep_mask`: only the entries fn(parameter) marks are sent."""
        self.exchange.set_keep_mask(fn)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Average every gradient over ranks now (every rank must call it, in the same order)."""
        try:
            self.scheduler.finish()
        finally:
            self.iter += 1
            self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """`step()` inside this block does not exchange (after an explicit `synchronize()`)."""
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Average the gradients (unless already synchronized), then step the wrapped optimizer."""
        loss = closure_loss(closure)
        if not self._skip:
            self.synchronize()
        elif not self._synchronized:
            raise RuntimeError("step() inside skip_synchronize() without synchronize() first")
        self._synchronized = False
        self.optimizer.step()
        return loss

    def compression_stats(self) -> CompressionStats:
        return self.stats

    def close(self) -> None:
        """Remove the gradient hooks and stop the worker thread."""
        self.scheduler.close()
