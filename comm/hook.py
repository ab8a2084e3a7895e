"""DDP communication hook: gradients cross the network as 1–8-bit stochastic codes.

    ddp.register_comm_hook(QuantizedCommState(bits=2, clip=2.5), quantized_hook)

A sibling of torch's PowerSGD hook: a small state object plus a plain function. The state is the
DDP adapter of `distq.comm.exchange.GradientExchange`: it knows DDP's buckets, its warm-up
and its parameter names; the exchange knows what crosses the wire. Quantized buckets are
exchanged on a worker thread over a process group of distq's own, one bucket after another in
bucket order (the same order on every rank), so communication overlaps the rest of backward and
no gloo worker thread is ever blocked inside a future callback.
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distq.comm.collectives import SEGMENT_ELEMENTS
from distq.comm.compressors import Compressor
from distq.comm.exchange import (
    SLOTS_PER_BUCKET,
    CompressionStats,
    ExchangeSettings,
    GradientExchange,
    keep_mask,
    parameter_widths,
)
from distq.comm.topology import Topology
from distq.comm.transport import TorchTransport
from distq.comm.worker import ExchangeWorker

__all__ = [
    "SLOTS_PER_BUCKET",
    "CompressionStats",
    "QuantizedCommState",
    "prime_buckets",
    "quantized_hook",
]


class QuantizedCommState:
    """State of `quantized_hook`.

    Args:
        process_group: the group DDP reduces over (None: the default group).
        bits: bits per gradient element, 1..8 (None: the compressor's own, 2 for 'quantize').
            2 (levels {0, ±1}·scale) cuts traffic ~15×; 4 is the safe choice for sensitive
            layers. Override per parameter with bits_by_name.
        bucket_size: elements per scale. Smaller buckets lower the variance (the scale tracks
            local magnitudes) and add 4 bytes per bucket: 512 costs 32/512 = 1/16 bit per
            element. None: one scale per DDP bucket (the paper's per-tensor setting).
        clip: clip each gradient tensor at clip·r, r = √mean(g²) (the paper's σ for zero-mean
            gradients), before quantizing; a constant or offset gradient is never cut. 2.5 is
            a good default (the paper used 1–3). Clipping bounds the scale, which removes the
            √d growth of the error, at a small bias; None disables it.
        collective: 'scatter' (bandwidth-optimal, two quantizations), 'allgather' (one
            quantization, traffic grows with ranks), 'hierarchical' (full precision inside a
            node, 'scatter' between nodes).
        error_feedback: keep each rank's compression error (in the exchange's
            `ResidualMemory`) and add it to the next gradient. Needed for biased compressors
            ('sign'); costs one gradient-sized buffer per rank.
        start_iter: iterations reduced in full precision first. DDP rebuilds its buckets after
            iteration 1, so per-bucket state is only valid from 2 on (values < 2 are refused).
        min_numel: buckets smaller than this go uncompressed (tiny buckets gain nothing).
        bits_by_name: {name or regex: bits} for parameters of `model` that need other widths.
        model: the model (or DDP module) whose parameter names bits_by_name refers to.
        compressor: a name from `distq.comm.registry.COMPRESSORS`: 'quantize' (stochastic
            m-bit), 'terngrad' (bits=2 only), 'sign' (bits=1 only); or a `Compressor` object
            (its width is `bits`; bits_by_name widths come from its `with_bits`). A width the
            compressor cannot send is refused.
        seed: seeds the rounding noise (with step, rank and bucket).
        nonfinite: 'raise': when any rank's gradient holds NaN/Inf, `loss.backward()` raises
            FloatingPointError on every rank alike, after DDP has finished its backward (so the
            model stays usable: zero the gradients and go on); or 'propagate' the NaN to every
            rank alike (so an optimizer or AMP scaler skips the step everywhere).
        overlap: run exchanges on a worker thread while backward continues (False: inline).
        error_every: measure the quantization errors and clipping bias every this many steps
            (on the first 1 M elements of the bucket; one extra encode and decode).
        segment: elements per pipeline segment: a bucket goes on the wire in segments, the
            next one encoded and the previous one decoded while one is in flight, so the
            codec's time hides behind the network's. None: a bucket in one piece.

    The state may be built before `torch.distributed` is initialized (as torch's PowerSGDState
    is, e.g. for Lightning's `DDPStrategy(ddp_comm_state=...)`): its process groups are
    resolved when the hook first runs.

    `set_keep_mask(fn)` leaves gradient entries off the wire: fn(parameter) gives a bool tensor
    of the entries to exchange (None: all), and every rank must give the same masks (as
    QuantizedOptimizer.mask_of does for pruned weights); the others come back as zeros.
    """

    __slots__ = (
        "_exchange",
        "_keep_mask",
        "_nonfinite_at",
        "_priming",
        "_widths",
        "_worker",
        "iter",
        "overlap",
        "process_group",
        "settings",
        "start_iter",
        "stats",
    )

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        bits: int | None = None,
        bucket_size: int | None = 512,
        clip: float | None = 2.5,
        collective: str = "scatter",
        error_feedback: bool = False,
        start_iter: int = 2,
        min_numel: int = 1024,
        bits_by_name: Mapping[str, int] | None = None,
        model: nn.Module | None = None,
        compressor: str | Compressor = "quantize",
        seed: int = 0,
        nonfinite: str = "raise",
        overlap: bool = True,
        error_every: int = 10,
        segment: int | None = SEGMENT_ELEMENTS,
    ) -> None:
        if start_iter < 2:
            raise ValueError(f"start_iter={start_iter}; allowed: >= 2 (DDP rebuilds buckets at 1)")
        if bits_by_name and model is None:
            raise ValueError("bits_by_name needs model= to resolve parameter names")
        self.settings = ExchangeSettings(
            compressor, bits, bucket_size, clip, collective, error_feedback, min_numel, seed,
            nonfinite, error_every, segment, bits_by_name or {},
        )  # fmt: skip
        self.process_group = process_group
        self.start_iter = start_iter
        self.overlap = overlap
        self.iter = 0
        self.stats = CompressionStats()
        self._priming = False
        self._keep_mask: Callable[[nn.Parameter], Tensor | None] | None = None
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._widths = (
            parameter_widths(module.named_parameters(), self.settings.bits_by_name)
            if module is not None
            else {}
        )
        self._nonfinite_at: tuple[int, int] | None = None  # (bucket, step) of a NaN/Inf average
        self._exchange: GradientExchange | None = None  # made by bind()
        self._worker = ExchangeWorker() if overlap else None
        if dist.is_initialized():
            self.bind()

    def __getattr__(self, name: str) -> Any:
        """The exchange settings read as attributes (state.bits, state.collective, …)."""
        if name in ExchangeSettings.__dataclass_fields__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def exchange(self) -> GradientExchange:
        """The gradient exchange (made on first use, once torch.distributed is up)."""
        self.bind()
        assert self._exchange is not None
        return self._exchange

    def bind(self) -> None:
        """Resolve the process groups (once; the hook calls it on its first run). Every rank
        of the group must call it in the same order: it creates distq's own group, so distq's
        collectives never interleave with DDP's or the user's."""
        if self._exchange is not None:
            return
        if not dist.is_initialized():
            raise RuntimeError(
                "QuantizedCommState is used before torch.distributed is initialized: call "
                "dist.init_process_group(...) (or start under torchrun) first"
            )
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        group = dist.new_group(ranks)
        topology = Topology.discover(group) if self.settings.collective == "hierarchical" else None
        self._exchange = GradientExchange(
            self.settings, TorchTransport(group), topology, self.stats
        )

    def set_keep_mask(self, fn: Callable[[nn.Parameter], Tensor | None] | None) -> None:
        """Exchange only the entries fn(parameter) marks (see the class docstring)."""
        if fn is not None and self.settings.error_feedback:
            raise ValueError(
                "a keep mask cannot be combined with error_feedback=True: the residuals would "
                "move between entries as the mask changes"
            )
        self._keep_mask = fn

    # -- the bucket layout an adapter hands the exchange ---------------------------------------
    def widths_of(self, params: list[nn.Parameter]) -> list[int]:
        """Each parameter's gradient width (bits_by_name, else `bits`)."""
        return [self._widths.get(p, self.settings.bits) for p in params]

    def keep_of(self, params: list[nn.Parameter]) -> Tensor | None:
        """The bucket's flat mask of entries to exchange (None: all of them)."""
        return keep_mask(params, self._keep_mask)

    def quantizations(self) -> int:
        """How many times a gradient value is quantized on its way: 1 (allgather), 2 (scatter,
        and hierarchical across nodes), 0 (hierarchical on one node: full precision)."""
        return self.exchange.quantizations()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's hook state: step counter, settings, error-feedback residuals."""
        exchange = self.exchange
        return {
            "iter": self.iter,
            "world_size": exchange.transport.size,
            "rank": dist.get_rank(),
            "config": self.config(),
            "residuals": exchange.residuals(),
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
        exchange = self.exchange
        self.iter = int(state["iter"])
        exchange.reset_residuals()
        world, rank = exchange.transport.size, dist.get_rank()
        if (state["world_size"], state["rank"]) != (world, rank):
            if state["residuals"]:
                warnings.warn(
                    f"hook state from world size {state['world_size']} (rank {state['rank']}) "
                    f"loaded at world size {world} (rank {rank}): error-feedback residuals reset",
                    stacklevel=2,
                )
            return
        exchange.load_residuals(state["residuals"])

    def config(self) -> dict[str, Any]:
        """Settings that must match for a checkpoint to resume bit-exactly."""
        return self.settings.config()

    def compression_stats(self) -> CompressionStats:
        """Bytes sent and received, ratio to fp32 all-reduce, last measured relative error."""
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
    if last and not state._priming:
        state.iter += 1
    if step < state.start_iter or state._priming:  # DDP's buckets not rebuilt yet: plain all-reduce
        work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
        world = dist.get_world_size(state.process_group)
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))

    lengths = [g.numel() for g in bucket.gradients()]
    widths = state.widths_of(bucket.parameters())
    index = bucket.index()
    keep = state.keep_of(bucket.parameters())
    exchange = state.exchange
    if last and state.settings.nonfinite == "raise":
        _raise_after_backward_if_nonfinite(state)

    def job() -> Tensor:
        result = exchange.average(buffer.detach(), lengths, widths, index, step, keep, out=buffer)
        if last:
            state.stats.steps += 1
        # the same on every rank, so every rank records (and later raises) alike
        if state._nonfinite_at is None and not exchange.is_finite(result):
            state._nonfinite_at = (index, step)
        # Written into DDP's own bucket, like an in-place all-reduce: the scratch buffer is
        # free for the next bucket instead of being held by the future until backward ends.
        return result

    if state._worker is None:
        future: torch.futures.Future = torch.futures.Future()
        try:
            future.set_result(job())
        except Exception as exc:
            future.set_exception(exc)
        return future
    return state._worker.submit(job)


def prime_buckets(ddp: nn.Module, state: QuantizedCommState, *inputs: Any) -> None:
    """Make a fresh DDP model rebuild its buckets before training resumes.

    DDP reduces its first iteration in one bucket and rebuilds its buckets afterwards, so a run
    resumed from a checkpoint would quantize its first step in another layout than the run it
    continues (other scales, other noise). One zero-loss forward/backward on `inputs`, reduced
    in full precision and not counted as a step, triggers the rebuild; buffers (BatchNorm
    statistics), gradients and the RNG state are restored, so the resumed run is bit-exact.
    """
    module = ddp.module if isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    rng = torch.get_rng_state()
    state._priming = True
    try:
        output = ddp(*inputs)
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        sum(o.float().sum() for o in outputs if torch.is_tensor(o)).mul(0.0).backward()
    finally:
        state._priming = False
    for p in ddp.parameters():
        p.grad = None
    with torch.no_grad():
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    torch.set_rng_state(rng)


def _raise_after_backward_if_nonfinite(state: QuantizedCommState) -> None:
    """Have this backward raise FloatingPointError once DDP has finished it, if an average was
    NaN/Inf. A future that fails reaches the user as DDP's RuntimeError("Unable to cast …") and
    an exception inside the hook leaves DDP's reducer half-finished; an autograd-engine callback
    queued from another callback runs after DDP's own (which waits for every bucket), and its
    exception reaches `loss.backward()`'s caller with its type."""
    engine = torch.autograd.Variable._execution_engine

    def check() -> None:
        failure, state._nonfinite_at = state._nonfinite_at, None
        if failure is not None:
            index, step = failure
            raise FloatingPointError(
                f"non-finite gradient in DDP bucket {index} at step {step} on some rank (every "
                "rank raises alike; nonfinite='propagate' hands the NaN to the optimizer)"
            )

    engine.queue_callback(lambda: engine.queue_callback(check))
