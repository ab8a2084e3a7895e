"""DDP communication hook: gradients cross the network as 1–8-bit stochastic codes.

    ddp.register_comm_hook(QuantizedCommState(bits=2, clip=2.5), quantized_hook)

A sibling of torch's PowerSGD hook: a small state object plus a plain function. Quantized buckets
are exchanged on a worker thread over a process group of distq's own, one bucket after another in
bucket order (the same order on every rank), so communication overlaps the rest of backward and
no gloo worker thread is ever blocked inside a future callback.
"""

import logging
import queue
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distq.comm.clipping import clip_by_rms_
from distq.comm.collectives import (
    COLLECTIVES,
    SEGMENT_ELEMENTS,
    Traffic,
    group_scales,
    quantized_sum,
    working_length,
)
from distq.comm.compressors import (
    COMPRESSORS,
    Compressor,
    ErrorFeedback,
    compressor_bits,
    make_compressor,
)
from distq.comm.noise import Key
from distq.comm.topology import Topology

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "propagate")
ERROR_SAMPLE = 1 << 20  # elements the relative error is measured on
SLOTS_PER_BUCKET = 16  # noise/error-feedback slots per DDP bucket: one per distinct bit width


@dataclass
class CompressionStats:
    """Counters since the start (or the last checkpoint load) of this rank's hook."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    intra_node_bytes_sent: int = 0
    fp32_allreduce_bytes: int = 0
    uncompressed_bytes_sent: int = 0
    # Measured every `error_every` steps on this rank's own gradient g (before clipping), with
    # x = Clip(g) and Q(x) its codes as sent (the shared scale for TernGrad):
    relative_error: float = float("nan")  # ‖Q(x) − x‖²/‖g‖²
    clipped_norm_ratio: float = float("nan")  # ‖x‖²/‖g‖² (1 without clipping)
    clip_bias: float = float("nan")  # ‖x − g‖²/‖g‖²
    requant_relative_error: float = float("nan")  # scatter's 2nd quantization, ‖Q(s) − s‖²/‖s‖²
    measured_step: int = -1  # the step these were measured at

    @property
    def measured_blowup(self) -> float:
        """‖Q(Clip(g))‖²/‖g‖² of this rank's first quantization, both norms of the unclipped g
        (one draw of the E‖Q(Clip(g))‖²/‖g‖² the theory bounds); NaN before a measurement."""
        return self.clipped_norm_ratio + self.relative_error

    @property
    def second_blowup(self) -> float:
        """1 + ‖Q(s) − s‖²/‖s‖² of `scatter`'s re-quantization of the reduced chunks s; NaN
        where there is none."""
        return 1.0 + self.requant_relative_error

    @property
    def compression_ratio(self) -> float:
        """Bytes a fp32 ring all-reduce would send ÷ bytes this hook sent across the network."""
        sent = self.bytes_sent + self.uncompressed_bytes_sent
        return self.fp32_allreduce_bytes / sent if sent else float("nan")


class _Worker:
    """One thread running submitted exchanges in submission order; each completes a Future.

    The thread is stopped and joined by `close()` or, at the latest, when the interpreter
    exits: a thread that has run asynchronous gloo collectives must not still be alive when
    C++ static destructors run (the process would abort with "terminate called without an
    active exception")."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="distq-comm", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _stop_thread, self._jobs, self._thread)

    def submit(self, job: Callable[[], Tensor]) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        self._jobs.put((job, future))
        return future

    def _loop(self) -> None:
        while True:
            job, future = self._jobs.get()
            if job is None:
                return
            try:
                future.set_result(job())
            except Exception as exc:
                future.set_exception(exc)

    def close(self) -> None:
        self._stop()


def _stop_thread(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put((None, None))
    thread.join(timeout=10)


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
        error_feedback: keep each rank's compression error and add it to the next gradient.
            Needed for biased compressors ('sign'); costs one gradient-sized buffer per rank.
        start_iter: iterations reduced in full precision first. DDP rebuilds its buckets after
            iteration 1, so per-bucket state is only valid from 2 on (values < 2 are refused).
        min_numel: buckets smaller than this go uncompressed (tiny buckets gain nothing).
        bits_by_name: {name or regex: bits} for parameters of `model` that need other widths.
        model: the model (or DDP module) whose parameter names bits_by_name refers to.
        compressor: 'quantize' (stochastic m-bit), 'terngrad' (bits=2 only), or 'sign'
            (bits=1 only); a width the compressor cannot send is refused.
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
        "_buffers",
        "_compressors",
        "_group",
        "_keep_mask",
        "_nonfinite_at",
        "_priming",
        "_rank",
        "_scratch",
        "_topology",
        "_widths",
        "_worker",
        "_world_size",
        "bits",
        "bits_by_name",
        "bucket_size",
        "clip",
        "collective",
        "compressor_kind",
        "error_every",
        "error_feedback",
        "iter",
        "min_numel",
        "nonfinite",
        "overlap",
        "process_group",
        "seed",
        "segment",
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
        compressor: str = "quantize",
        seed: int = 0,
        nonfinite: str = "raise",
        overlap: bool = True,
        error_every: int = 10,
        segment: int | None = SEGMENT_ELEMENTS,
    ) -> None:
        _check_choice("collective", collective, COLLECTIVES)
        _check_choice("compressor", compressor, COMPRESSORS)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        bits = compressor_bits(compressor, bits)
        _check_bits(bits)
        if start_iter < 2:
            raise ValueError(f"start_iter={start_iter}; allowed: >= 2 (DDP rebuilds buckets at 1)")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip={clip!r}; allowed: a positive float or None")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size={bucket_size}; allowed: a positive int or None")
        if bits_by_name and model is None:
            raise ValueError("bits_by_name needs model= to resolve parameter names")
        for pattern, width in (bits_by_name or {}).items():
            _check_bits(width, f"bits_by_name[{pattern!r}]")
            compressor_bits(compressor, width, f"bits_by_name[{pattern!r}]")
        self.process_group = process_group
        self.bits, self.bucket_size, self.clip = bits, bucket_size, clip
        self.collective, self.error_feedback = collective, error_feedback
        self.start_iter, self.min_numel = start_iter, min_numel
        self.bits_by_name = dict(bits_by_name or {})
        self.compressor_kind, self.seed, self.nonfinite = compressor, seed, nonfinite
        self.overlap = overlap
        if error_every < 1:
            raise ValueError(f"error_every={error_every}; allowed: a positive number of steps")
        self.error_every = error_every
        if segment is not None and segment < 1:
            raise ValueError(f"segment={segment}; allowed: a positive number of elements or None")
        self.segment = segment
        self.iter = 0
        self._priming = False
        self._keep_mask: Callable[[nn.Parameter], Tensor | None] | None = None
        self.stats = CompressionStats()
        self._widths = _parameter_widths(model, self.bits_by_name)
        self._compressors: dict[int, Compressor] = {}
        self._buffers: dict[int, dict[str, Tensor]] = {}  # receive buffers per slot, reused
        self._scratch: Tensor | None = None  # the work buffer, reused by every bucket
        self._nonfinite_at: tuple[int, int] | None = None  # (bucket, step) of a NaN/Inf average
        self._group: dist.ProcessGroup | None = None  # resolved by bind()
        self._world_size = self._rank = -1
        self._topology: Topology | None = None
        self._worker = _Worker() if overlap else None
        if dist.is_initialized():
            self.bind()

    def bind(self) -> None:
        """Resolve the process groups (once; the hook calls it on its first run). Every rank
        of the group must call it in the same order: it creates distq's own group, so distq's
        collectives never interleave with DDP's or the user's."""
        if self._group is not None:
            return
        if not dist.is_initialized():
            raise RuntimeError(
                "QuantizedCommState is used before torch.distributed is initialized: call "
                "dist.init_process_group(...) (or start under torchrun) first"
            )
        group = self.process_group
        self._world_size = dist.get_world_size(group)
        self._rank = dist.get_rank()
        self._group = dist.new_group(dist.get_process_group_ranks(group or dist.group.WORLD))
        if self.collective == "hierarchical":
            self._topology = Topology.discover(self._group)

    def set_keep_mask(self, fn: Callable[[nn.Parameter], Tensor | None] | None) -> None:
        """Exchange only the entries fn(parameter) marks (see the class docstring)."""
        if fn is not None and self.error_feedback:
            raise ValueError(
                "a keep mask cannot be combined with error_feedback=True: the residuals would "
                "move between entries as the mask changes"
            )
        self._keep_mask = fn

    def _bucket_keep(self, bucket: dist.GradBucket) -> Tensor | None:
        """The bucket's flat mask of entries to exchange (None: all of them)."""
        if self._keep_mask is None:
            return None
        masks = [self._keep_mask(p) for p in bucket.parameters()]
        if all(m is None for m in masks):
            return None
        return torch.cat(
            [
                (m if m is not None else torch.ones_like(p, dtype=torch.bool)).reshape(-1)
                for m, p in zip(masks, bucket.parameters(), strict=True)
            ]
        )

    # -- compression ----------------------------------------------------------------------------
    def compressor_for(self, bits: int) -> Compressor:
        """The (cached) compressor of one bit width; error-feedback residuals live in it."""
        if bits not in self._compressors:
            self._compressors[bits] = make_compressor(
                self.compressor_kind,
                bits,
                self.bucket_size,
                self.error_feedback,
                inplace_feedback=True,
            )
        return self._compressors[bits]

    def reduce(
        self,
        buffer: Tensor,
        lengths: list[int],
        widths: list[int],
        index: int,
        step: int,
        keep: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Average one DDP bucket over ranks; runs on the worker thread.

        The clipping, the exchange and the division all work in one float32 scratch buffer
        (padded for `scatter`), kept between steps and shared by all buckets (they are reduced
        one at a time), so no step pays for fresh pages: distq holds one largest bucket for
        good, and within a step the codec adds one decoded block at a time. With `keep` only
        the marked entries are exchanged, the rest are zero. The average is written into `out`
        if given (it may be `buffer` itself: the division and the write-back are then one
        pass) and returned.
        """
        self.bind()
        n, numel = self._world_size, buffer.numel()
        self.stats.fp32_allreduce_bytes += 2 * (n - 1) * numel * 4 // n
        if keep is None:
            return self._average(buffer, lengths, widths, index, step, out)
        kept = [int(part.sum()) for part in keep.split(lengths)]
        average = self._average(buffer[keep], kept, widths, index, step, None)
        if out is None:
            out = torch.zeros(numel, dtype=torch.float32, device=buffer.device)
        else:
            out.zero_()
        out[keep] = average.to(out.dtype)
        return out

    def _average(
        self, buffer: Tensor, lengths: list[int], widths: list[int], index: int, step: int,
        out: Tensor | None,
    ) -> Tensor:  # fmt: skip
        n, numel = self._world_size, buffer.numel()
        if numel < self.min_numel:
            work = buffer.to(torch.float32, copy=True)
            dist.all_reduce(work, group=self._group)
            self.stats.uncompressed_bytes_sent += 2 * (n - 1) * numel * 4 // n
            return _divided(work, n, out)
        groups = _groups_by_width(lengths, widths, buffer.device)
        if len(groups) > 1:
            return _divided(self._reduce_mixed(buffer, lengths, groups, index, step), n, out)
        compressor = self.compressor_for(groups[0][0])
        work = self._work_buffer(working_length(numel, n, compressor, self.collective), buffer)
        work[numel:].zero_()  # scatter's padding
        x = work[:numel]
        measure = step % self.error_every == 0 and self._quantizes_here()
        original = None
        if measure and self.clip is not None:
            original = _error_sample(buffer, compressor).to(torch.float32, copy=True)
        if self.clip is None:
            x.copy_(buffer)
        elif buffer.dtype == torch.float32:  # copy and clip in one pass
            clip_by_rms_(x, self.clip, lengths, source=buffer)
        else:  # the rms of half-precision sums is too coarse: clip the float32 copy
            clip_by_rms_(x.copy_(buffer), self.clip, lengths)
        slot = index * SLOTS_PER_BUCKET
        if measure:
            self._measure(x, original, compressor, Key(self.seed, step, self._rank, slot=slot))
        target = work if self.collective == "scatter" else x
        summed = self._exchange(target, compressor, slot, step, measure)
        return _divided(summed[:numel], n, out)

    def _measure(
        self, x: Tensor, original: Tensor | None, compressor: Compressor, key: Key
    ) -> None:
        """Record the first quantization's error and the clipping bias of this step, all
        relative to ‖g‖² of the unclipped gradient (`original`; None: x is unclipped), on the
        first ERROR_SAMPLE elements, with the scales and noise the exchange sends."""
        sample = _error_sample(x, compressor)
        g = sample if original is None else original
        norm = float(torch.dot(g, g))
        error = _quantization_error(x, sample, _plain(compressor), key, self._group)
        stats = self.stats
        stats.measured_step = key.step
        if norm == 0:
            stats.relative_error, stats.clip_bias, stats.clipped_norm_ratio = 0.0, 0.0, 1.0
            return
        stats.relative_error = error / norm
        stats.clipped_norm_ratio = float(torch.dot(sample, sample)) / norm
        moved = g - sample
        stats.clip_bias = float(torch.dot(moved, moved)) / norm

    def _work_buffer(self, numel: int, like: Tensor) -> Tensor:
        """The first `numel` elements of the shared scratch buffer (grown as needed)."""
        scratch = self._scratch
        if scratch is None or scratch.numel() < numel or scratch.device != like.device:
            scratch = self._scratch = torch.empty(numel, device=like.device)
        return scratch[:numel]

    def _exchange(
        self, x: Tensor, compressor: Compressor, slot: int, step: int, measure: bool = False
    ) -> Tensor:
        """Σ over ranks of the quantized x (overwritten), keyed by step, rank and slot; with
        `measure`, the second quantization's error is recorded."""
        key = Key(self.seed, step, self._rank, slot=slot)
        if isinstance(compressor, ErrorFeedback) and compressor.discard_mismatched(slot, x.numel()):
            log.warning("DDP bucket layout changed: error-feedback residual %d reset", slot)
        errors = {} if measure else None
        summed, traffic = quantized_sum(
            x,
            compressor,
            key,
            self.collective,
            self._group,
            self._topology,
            inplace=True,
            buffers=self._buffers.setdefault(slot, {}),
            errors=errors,
            segment=self.segment,
        )
        if errors:
            self.stats.requant_relative_error = errors["requant_relative_error"]
        self._count(traffic)
        return summed

    def _reduce_mixed(
        self, buffer: Tensor, lengths: list[int], groups: list, index: int, step: int
    ) -> Tensor:
        """A bucket whose parameters have different widths (bits_by_name): one exchange per
        width over its elements (this path copies each group, beyond the 2x bound)."""
        flat = buffer.to(torch.float32, copy=True)
        if self.clip is not None:
            clip_by_rms_(flat, self.clip, lengths)
        for part, (width, mask) in enumerate(groups):  # errors are measured on 1-width buckets
            flat[mask] = self._exchange(
                flat[mask], self.compressor_for(width), index * SLOTS_PER_BUCKET + part, step
            )
        return flat

    def quantizations(self) -> int:
        """How many times a gradient value is quantized on its way: 1 (allgather), 2 (scatter,
        and hierarchical across nodes), 0 (hierarchical on one node: full precision)."""
        if self.collective == "allgather":
            return 1
        self.bind()
        if self._topology is not None and self._topology.num_nodes == 1:
            return 0
        return 2

    def _quantizes_here(self) -> bool:
        """Whether this rank's exchange quantizes (hierarchical: only node leaders, and only
        with more than one node), so its errors are worth measuring."""
        if self._topology is None:
            return True
        return self._topology.is_leader and self._topology.num_nodes > 1

    def _count(self, traffic: Traffic) -> None:
        self.stats.bytes_sent += traffic.sent
        self.stats.bytes_received += traffic.received
        self.stats.intra_node_bytes_sent += traffic.intra_node_sent

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's hook state: step counter, settings, error-feedback residuals."""
        self.bind()
        residuals = {
            f"{bits}/{slot}": r.clone()
            for bits, c in self._compressors.items()
            if isinstance(c, ErrorFeedback)
            for slot, r in c.residuals.items()
        }
        return {
            "iter": self.iter,
            "world_size": self._world_size,
            "rank": self._rank,
            "config": self.config(),
            "residuals": residuals,
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
        self.bind()
        self.iter = int(state["iter"])
        for compressor in self._compressors.values():
            if isinstance(compressor, ErrorFeedback):
                compressor.reset()
        if (state["world_size"], state["rank"]) != (self._world_size, self._rank):
            if state["residuals"]:
                warnings.warn(
                    f"hook state from world size {state['world_size']} (rank {state['rank']}) "
                    f"loaded at world size {self._world_size} (rank {self._rank}): "
                    "error-feedback residuals reset",
                    stacklevel=2,
                )
            return
        for name, residual in state["residuals"].items():
            bits, slot = (int(v) for v in name.split("/"))
            compressor = self.compressor_for(bits)
            assert isinstance(compressor, ErrorFeedback)
            compressor.residuals[slot] = residual.clone()

    def config(self) -> dict[str, Any]:
        """Settings that must match for a checkpoint to resume bit-exactly."""
        return {
            "bits": self.bits,
            "bucket_size": self.bucket_size,
            "clip": self.clip,
            "collective": self.collective,
            "error_feedback": self.error_feedback,
            "compressor": self.compressor_kind,
            "seed": self.seed,
            "bits_by_name": self.bits_by_name,
            "min_numel": self.min_numel,
            "segment": self.segment,
        }

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
    widths = [state._widths.get(p, state.bits) for p in bucket.parameters()]
    index = bucket.index()
    keep = state._bucket_keep(bucket)
    if last and state.nonfinite == "raise":
        _raise_after_backward_if_nonfinite(state)

    def job() -> Tensor:
        result = state.reduce(buffer.detach(), lengths, widths, index, step, keep, out=buffer)
        if last:
            state.stats.steps += 1
        # A float32 sum is NaN/Inf iff an element is (or it overflows 3e38, as unusable);
        # unlike isfinite(result).all() it allocates nothing of the bucket's size (and summed
        # in float16 it would overflow on finite gradients). The average is the same on every
        # rank, so every rank records (and later raises) alike.
        if state._nonfinite_at is None and not torch.isfinite(result.sum(dtype=torch.float32)):
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


# -- helpers -----------------------------------------------------------------------------------
def _divided(total: Tensor, n: int, out: Tensor | None) -> Tensor:
    """total / n, in place, or written into `out` in the same pass (any float dtype)."""
    if out is None:
        return total.div_(n)
    if out.dtype == total.dtype:
        return torch.div(total, n, out=out)
    return out.copy_(total.div_(n))


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


def _check_bits(bits: int, name: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{name}={bits!r}; allowed: an int in 1..8")


def _parameter_widths(model: nn.Module | None, bits_by_name: Mapping[str, int]) -> dict:
    """{parameter tensor: bits} for parameters matched by bits_by_name (exact name or regex)."""
    if model is None or not bits_by_name:
        return {}
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    widths, used = {}, set()
    for name, p in module.named_parameters():
        for pattern, bits in bits_by_name.items():
            if pattern == name or re.fullmatch(pattern, name):
                widths[p] = bits
                used.add(pattern)
                break
    unused = sorted(set(bits_by_name) - used)
    if unused:
        names = [n for n, _ in module.named_parameters()]
        raise ValueError(f"bits_by_name entries {unused} match no parameter; names: {names}")
    return widths


def _groups_by_width(
    lengths: list[int], widths: list[int], device
) -> list[tuple[int, Tensor | None]]:
    """(bits, element mask) per distinct width in a bucket; mask None when the bucket has one."""
    distinct = sorted(set(widths))
    if len(distinct) == 1:
        return [(distinct[0], None)]
    per_element = torch.repeat_interleave(
        torch.tensor(widths, device=device), torch.tensor(lengths, device=device)
    )
    return [(w, per_element == w) for w in distinct]


def _plain(compressor: Compressor) -> Compressor:
    return compressor.inner if isinstance(compressor, ErrorFeedback) else compressor


def _error_sample(x: Tensor, compressor: Compressor) -> Tensor:
    """The leading whole buckets of x, at most ERROR_SAMPLE elements (a view; all of x when it
    is shorter than a bucket): whole buckets encode with the kernels the exchange has compiled
    already, where a partial one would compile the element-order kernels at this step."""
    bucket = compressor.wire.bucket_size
    if not bucket:
        return x[:ERROR_SAMPLE]
    whole = min(ERROR_SAMPLE, x.numel()) // bucket * bucket
    return x[: whole or x.numel()]


def _quantization_error(
    x: Tensor, sample: Tensor, compressor: Compressor, key: Key, group: dist.ProcessGroup
) -> float:
    """‖Q(sample) − sample‖² for the leading `sample` of x, with the codes the exchange sends:
    the same noise, and the scales of x's buckets (one scale: x's own; shared scales: max-reduced
    over `group`, a collective every rank makes at the same steps)."""
    wire = compressor.wire
    if wire.bucket_size is not None and not wire.shared_scale:  # the sample's own scales
        payload = compressor.compress(sample, key)
    else:
        scales = compressor.scales(x if wire.bucket_size is None else sample, key)
        if wire.shared_scale:
            scales = group_scales(scales, group)
        payload = compressor.compress(sample, key, scales=scales)
    # decoded by the kernel scatter's all-gather stage uses: no extra compile at this step
    diff = compressor.decode_rows_into(payload.view(1, -1), torch.empty_like(sample))
    diff.sub_(sample)
    return float(torch.dot(diff, diff))
