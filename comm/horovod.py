"""Horovod with distq's quantized gradients: packed 1–8-bit payloads over `hvd.allgather` and
`hvd.alltoall`.

    opt = distq.comm.horovod.DistributedOptimizer(opt, model.named_parameters(), bits=2)

Horovod's own `compression=` hands the compressed tensor to a summing all-reduce: that refuses
uint8 and cannot add packed codes. This optimizer instead encodes each bucket of gradients with
distq's codec and moves the payloads with Horovod's all-gather / all-to-all
(`distq.comm.transport`), so every rank decodes the same sum and replicas stay bit-identical.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from distq.comm.buckets import DEFAULT_CAP_MB, flatten_grads, plan_buckets, write_grads
from distq.comm.clipping import clip_by_rms_
from distq.comm.compressors import COMPRESSORS, Compressor, make_compressor
from distq.comm.extras import require
from distq.comm.hook import SLOTS_PER_BUCKET, CompressionStats
from distq.comm.noise import Key
from distq.comm.transport import TRANSPORT_COLLECTIVES, Transport, transport_sum

hvd = require("horovod.torch")

_OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer`: `step()` first averages the gradients over Horovod ranks through
    `bits`-bit stochastic codes, then steps the wrapped optimizer.

    Args:
        optimizer: any torch optimizer (also distq's QuantizedOptimizer, for low-bit weights).
        named_parameters: the model's (name, parameter) pairs; they fix the bucket order, which
            must be the same on every rank. None: the optimizer's parameters in group order.
        bits, bucket_size, clip, compressor, error_feedback, seed: as in QuantizedCommState.
        collective: 'scatter' (all-to-all, re-quantize, all-gather; bandwidth-optimal) or
            'allgather' (one quantization; traffic grows with the number of ranks).
        bucket_cap_mb: gradient megabytes per exchange.
        min_numel: buckets smaller than this go as fp32 through `hvd.allreduce`.
        start_iter: steps averaged in fp32 through `hvd.allreduce` first (not counted in
            `compression_stats()`), as the DDP hook's warm-up; 0: every step is quantized.

    As with Horovod's own DistributedOptimizer, accumulate gradients over several backward
    passes by calling `step()` once after them; to clip the averaged gradient, call
    `synchronize()`, clip, then `step()` inside `with opt.skip_synchronize():`.
    Broadcast the initial weights first (`hvd.broadcast_parameters`), or seed every rank alike.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
        bits: int | None = None,
        collective: str = "scatter",
        bucket_size: int | None = 512,
        clip: float | None = 2.5,
        compressor: str = "quantize",
        error_feedback: bool = False,
        seed: int = 0,
        bucket_cap_mb: float = DEFAULT_CAP_MB,
        min_numel: int = 1024,
        start_iter: int = 0,
    ) -> None:
        if collective not in TRANSPORT_COLLECTIVES:
            raise ValueError(
                f"collective={collective!r}; allowed: {', '.join(TRANSPORT_COLLECTIVES)} "
                "(hierarchical needs torch.distributed: use the DDP hook)"
            )
        if compressor not in COMPRESSORS:
            raise ValueError(f"compressor={compressor!r}; allowed: {', '.join(COMPRESSORS)}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip={clip!r}; allowed: a positive float or None")
        if start_iter < 0:
            raise ValueError(f"start_iter={start_iter}; allowed: a number of steps >= 0")
        self.optimizer = optimizer
        self.start_iter = start_iter
        for hooks in _OPTIMIZER_HOOKS:  # what torch.optim.Optimizer.__init__ would set up
            setattr(self, hooks, OrderedDict())
        params = (
            [p for _, p in named_parameters]
            if named_parameters is not None
            else [p for g in optimizer.param_groups for p in g["params"]]
        )
        self.buckets = plan_buckets(params, bucket_cap_mb)
        self.collective, self.clip, self.seed, self.min_numel = collective, clip, seed, min_numel
        self.compressor: Compressor = make_compressor(
            compressor, bits, bucket_size, error_feedback, inplace_feedback=True
        )
        self.iter = 0
        self.stats = CompressionStats()
        self._synchronized = False
        self._skip = False
        self._transport = Transport(
            rank=hvd.rank(),
            size=hvd.size(),
            all_gather=lambda t, name: hvd.allgather(t, name=name),
            all_to_all=lambda t, name: hvd.alltoall(t, name=name),
        )

    # The wrapped optimizer's groups, state and defaults, so schedulers and distq's
    # QuantizedOptimizer see the live ones.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Average every gradient over ranks now (every rank must call it, in the same order)."""
        n, warm_up = self._transport.size, self.iter < self.start_iter
        for index, params in enumerate(self.buckets):
            flat = flatten_grads(params)
            if warm_up:
                flat = hvd.allreduce(flat, op=hvd.Sum, name=f"distq.{index}").div_(n)
            else:
                self.stats.fp32_allreduce_bytes += 2 * (n - 1) * flat.numel() * 4 // n
                flat = self._average(flat, params, index)
            write_grads(flat, params)
        if not warm_up:
            self.stats.steps += 1
        self.iter += 1
        self._synchronized = True

    def _average(self, flat: Tensor, params: list[nn.Parameter], index: int) -> Tensor:
        n, name = self._transport.size, f"distq.{index}"
        if flat.numel() < self.min_numel:
            self.stats.uncompressed_bytes_sent += 2 * (n - 1) * flat.numel() * 4 // n
            return hvd.allreduce(flat, op=hvd.Sum, name=name).div_(n)
        if self.clip is not None:
            clip_by_rms_(flat, self.clip, [p.numel() for p in params])
        key = Key(self.seed, self.iter, self._transport.rank, slot=index * SLOTS_PER_BUCKET)
        total, traffic = transport_sum(
            flat, self.compressor, key, self.collective, self._transport, name
        )
        self.stats.bytes_sent += traffic.sent
        self.stats.bytes_received += traffic.received
        if not torch.isfinite(total.sum()):
            raise FloatingPointError(f"non-finite gradient in bucket {index} on some rank")
        return total.div_(n)

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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._skip:
            self.synchronize()
        elif not self._synchronized:
            raise RuntimeError("step() inside skip_synchronize() without synchronize() first")
        self._synchronized = False
        self.optimizer.step()
        return loss

    def compression_stats(self) -> CompressionStats:
        """Bytes sent and received by this rank, and the ratio to an fp32 all-reduce."""
        return self.stats
