"""DDP communication hook: gradients cross the network as 1–8-bit stochastic codes.

    ddp.register_comm_hook(QuantizedCommState(bits=2, clip=2.5), quantized_hook)

A state object plus a plain function, as torch's PowerSGD hook; buckets are exchanged in order on
a worker thread over distq's own process group, so communication overlaps the rest of backward.
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distq.comm.exchange import (
    CompressionStats,
    ExchangeSettings,
    GradientExchange,
    nonfinite_error,
    parameter_widths,
)
from distq.comm.topology import Topology
from distq.comm.transport import TorchTransport
from distq.comm.worker import ExchangeWorker, completed

__all__ = ["QuantizedCommState", "prime_buckets", "quantized_hook"]


class QuantizedCommState:
    """State of `quantized_hook`, the DDP adapter of a `GradientExchange` (`**exchange`:
    `ExchangeSettings`'s options) for DDP's `process_group` (None: the default group).
    `start_iter` iterations are reduced in full precision first (DDP rebuilds its buckets after
    iteration 1, so at least 2); `model` resolves the names of `bits_by_name`; `overlap=False`
    exchanges inline instead of on a worker thread.

    With nonfinite='raise', `loss.backward()` raises FloatingPointError on every rank alike after
    DDP has finished its backward, so the model stays usable. The state may be built before
    torch.distributed is initialized (as PowerSGDState, e.g. for Lightning's `DDPStrategy`): its
    process group is made when the hook first runs.
    """

    __slots__ = (
        "_allocated",
        "_exchange",
        "_named",
        "_nonfinite_at",
        "_worker",
        "iter",
        "overlap",
        "process_group",
        "start_iter",
    )

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        start_iter: int = 2,
        model: nn.Module | None = None,
        overlap: bool = True,
        **exchange: Any,
    ) -> None:
        if start_iter < 2:
            raise ValueError(f"start_iter={start_iter}; allowed: >= 2 (DDP rebuilds buckets at 1)")
        settings = ExchangeSettings.of(**exchange)
        if settings.bits_by_name and model is None:
            raise ValueError("bits_by_name needs model= to resolve parameter names")
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._named = dict(module.named_parameters()) if module is not None else {}
        self._allocated: dict[str, int] | None = None  # widths set mid-run (`allocate`)
        widths = parameter_widths(self._named.items(), settings.bits_by_name)
        self._exchange = GradientExchange(settings, widths=widths)
        self.process_group = process_group
        self.start_iter = start_iter
        self.overlap = overlap
        self.iter = 0
        self._nonfinite_at: tuple[int, int] | None = None  # (bucket, step) of a NaN/Inf average
        self._worker = ExchangeWorker() if overlap else None
        if dist.is_initialized():
            self.bind()

    def __getattr__(self, name: str) -> Any:
        """The exchange settings read as attributes (state.bits, state.collective, …)."""
        if name in ExchangeSettings.__dataclass_fields__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def settings(self) -> ExchangeSettings:
        return self._exchange.settings

    @property
    def stats(self) -> CompressionStats:
        """Bytes sent and received, ratio to fp32 all-reduce, last measured errors."""
        return self._exchange.stats

    @property
    def exchange(self) -> GradientExchange:
        """The gradient exchange, connected to distq's process group on first use."""
        self.bind()
        return self._exchange

    def bind(self) -> None:
        """Create distq's own process group once (every rank alike; the hook does on its first
        run), so distq's collectives never interleave with DDP's or the user's."""
        if self._exchange.transport is not None:
            return
        if not dist.is_initialized():
            raise RuntimeError(
                "QuantizedCommState is used before torch.distributed is initialized: call "
                "dist.init_process_group(...) (or start under torchrun) first"
            )
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        group = dist.new_group(ranks)
        topology = Topology.discover(group) if self.settings.collective == "hierarchical" else None
        self._exchange.connect(TorchTransport(group), topology)

    def set_keep_mask(self, fn: Callable[[nn.Parameter], Tensor | None] | None) -> None:
        self._exchange.set_keep_mask(fn)

    def quantizations(self) -> int:
        """How many times a gradient value is quantized on its way (0: full precision)."""
        return self.exchange.quantizations()

    def allocate(self, bits_by_name: Mapping[str, int]) -> None:
        """Send the named parameters' gradients at these widths from the next step on (a width
        allocation chosen mid-run, e.g. `distq train --grad-bits-budget`): the same on every
        rank, kept in `state_dict`. Needs `model=`; a name that matches nothing is refused."""
        if not self._named:
            raise ValueError("allocate needs model= to resolve parameter names")
        for name, bits in bits_by_name.items():
            self.settings.width(bits, f"width of {name!r}")
        self._exchange.widths = parameter_widths(self._named.items(), bits_by_name)
        self._allocated = dict(bits_by_name)

    @property
    def allocated(self) -> dict[str, int] | None:
        """The widths `allocate` set, by name (None: the settings' widths throughout)."""
        return None if self._allocated is None else dict(self._allocated)

    def narrowest_bits(self) -> int:
        """The fewest bits any parameter's gradient is sent at: the width whose error bounds
        hold for every tensor."""
        widths = self._exchange.widths
        return min((widths.get(p, self.settings.bits) for p in self._named.values()),
                   default=self.settings.bits)  # fmt: skip

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's hook state: step counter, settings, error-feedback residuals, widths
        chosen by measurement (`auto`'s per bucket, `allocate`'s per tensor)."""
        exchange = self.exchange
        return {
            "iter": self.iter,
            "world_size": exchange.transport.size,
            "rank": dist.get_rank(),
            "config": self.config(),
            "residuals": exchange.residuals(),
            "choices": exchange.choices_state(),
            "allocated": self.allocated,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: same step counter (so the same rounding noise) and, if the world size and
        rank match, the error-feedback residuals; otherwise those reset with a warning."""
        saved, mine = state["config"], self.config()
        different = [
            f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}"
            for k in mine
            if saved.get(k) != mine[k]
        ]
        if different:
            raise ValueError("hook state was saved with other settings: " + "; ".join(different))
        self.iter = int(state["iter"])
        self.exchange.load_choices(state.get("choices", {}))
        if state.get("allocated") is not None:
            self.allocate(state["allocated"])
        world, rank = self.exchange.transport.size, dist.get_rank()
        same = (state["world_size"], state["rank"]) == (world, rank)
        self.exchange.load_residuals(state["residuals"] if same else {})
        if not same and state["residuals"]:
            warnings.warn(
                f"hook state from world size {state['world_size']} (rank {state['rank']}) "
                f"loaded at world size {world} (rank {rank}): error-feedback residuals reset",
                stacklevel=2,
            )

    def config(self) -> dict[str, Any]:
        """Settings that must match for a checkpoint to resume bit-exactly."""
        return self.settings.config()

    def compression_stats(self) -> CompressionStats:
        return self.stats

    def close(self) -> None:
        """Stop the worker thread (also done at interpreter exit: it is a daemon)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("QuantizedCommState holds process groups and a thread; save state_dict()")


# No `from __future__ import annotations` here: DDP compares these annotations to the real
# dist.GradBucket and Future[Tensor] objects when the hook is registered.
def quantized_hook(
    state: "QuantizedCommState", bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged over ranks through quantized codes."""
    state.bind()
    buffer = bucket.buffer()
    step, last = state.iter, bucket.is_last()
    if last:
        state.iter += 1
    if step < state.start_iter:  # DDP's buckets not rebuilt yet: plain all-reduce
        work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
        world = dist.get_world_size(state.process_group)
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))

    index, params, exchange = bucket.index(), bucket.parameters(), state.exchange
    if last and state.settings.nonfinite == "raise":
        _raise_after_backward_if_nonfinite(state)

    def job() -> Tensor:
        # written into DDP's own bucket, like an in-place all-reduce: the scratch buffer is
        # free for the next bucket instead of held by the future until backward ends
        result = exchange.average_params(params, buffer.detach(), index, step, out=buffer)
        if last:
            state.stats.steps += 1
        if state._nonfinite_at is None and not exchange.is_finite(result):
            state._nonfinite_at = (index, step)  # alike on every rank
        return result

    return completed(job) if state._worker is None else state._worker.submit(job)


def prime_buckets(ddp: nn.Module, state: QuantizedCommState, *inputs: Any) -> None:
    """Make a fresh DDP model rebuild its buckets before training resumes, so the resumed run
    quantizes in the layout of the run it continues (DDP reduces its first iteration in one
    bucket): one zero-loss forward/backward on `inputs` as a full-precision warm-up iteration,
    not counted; buffers, gradients and the RNG state are restored, so the resume is bit-exact."""
    module = ddp.module if isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    rng, step = torch.get_rng_state(), state.iter
    state.iter = 0  # below start_iter: the hook all-reduces in full precision
    try:
        output = ddp(*inputs)
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        sum(o.float().sum() for o in outputs if torch.is_tensor(o)).mul(0.0).backward()
    finally:
        state.iter = step
    for p in ddp.parameters():
        p.grad = None
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    torch.set_rng_state(rng)


def _raise_after_backward_if_nonfinite(state: QuantizedCommState) -> None:
    """Have this backward raise FloatingPointError after DDP's own callback if an average was
    NaN/Inf: a callback queued from a callback runs last and reaches `loss.backward()` with its
    type (a failed future becomes DDP's "Unable to cast" error; raising in the hook leaves DDP's
    reducer half-finished)."""
    engine = torch.autograd.Variable._execution_engine

    def check() -> None:
        failure, state._nonfinite_at = state._nonfinite_at, None
        if failure is not None:
            raise nonfinite_error(f"in DDP bucket {failure[0]} at step {failure[1]}")

    engine.queue_callback(lambda: engine.queue_callback(check))
