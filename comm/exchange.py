"""The gradient exchange every engine shares: clip → noise key → compress → exchange → decode →
count bytes → non-finite check → divide, for the gradient buckets an adapter (DDP hook, DeepSpeed,
Horovod) lays out and writes back."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from distq.comm.auto import (
    DEFAULT_BUDGET,
    SAMPLE,
    Choice,
    Option,
    StepTrial,
    bits_of,
    check_budget,
    predict,
)
from distq.comm.clipping import clip_by_rms_
from distq.comm.collectives import (
    SEGMENT_ELEMENTS,
    Traffic,
    chunk_length,
    quantized_sum,
    shared_scales,
    working_length,
)
from distq.comm.compressors import Compressor
from distq.comm.feedback import ErrorFeedback, ResidualMemory
from distq.comm.noise import Key
from distq.comm.registry import COMPRESSORS, compressor_record
from distq.comm.topology import Topology
from distq.comm.transport import TorchTransport, Transport
from distq.selection import widths_by_name
from distq.theory.exchange import collective as collective_record
from distq.theory.exchange import fp32_allreduce_bytes

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "propagate")
AUTO = "auto"
ERROR_SAMPLE = 1 << 20  # elements the relative error is measured on
SLOTS_PER_BUCKET = 16  # noise/error-feedback slots per bucket: one per distinct bit width


@dataclass
class CompressionStats:
    """This rank's counters since the start (or the last checkpoint load)."""

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
    choices: dict[int, str] = field(default_factory=dict)  # bits="auto": bucket → choice, why

    @property
    def measured_blowup(self) -> float:
        """‖Q(Clip(g))‖²/‖g‖² of this rank's first quantization (one draw of what the theory
        bounds); NaN before a measurement."""
        return self.clipped_norm_ratio + self.relative_error

    @property
    def second_blowup(self) -> float:
        """1 + ‖Q(s) − s‖²/‖s‖² of `scatter`'s re-quantization of the sums s (NaN: none)."""
        return 1.0 + self.requant_relative_error

    @property
    def compression_ratio(self) -> float:
        """Bytes a fp32 ring all-reduce would send ÷ bytes this rank sent across the network."""
        sent = self.bytes_sent + self.uncompressed_bytes_sent
        return self.fp32_allreduce_bytes / sent if sent else float("nan")

    def count(self, traffic: Traffic) -> None:
        self.bytes_sent += traffic.sent
        self.bytes_received += traffic.received
        self.intra_node_bytes_sent += traffic.intra_node_sent


@dataclass(frozen=True)
class ExchangeSettings:
    """What crosses the wire, the same options for every engine; validated on construction, with
    errors that name the bad value and what is allowed.

    compressor: a name from `distq.comm.registry.COMPRESSORS` ('quantize': stochastic m-bit;
        'terngrad': bits=2 only; 'sign': bits=1 only) or a `Compressor` object (its width is
        `bits`; `bits_by_name` widths come from its `with_bits`).
    bits: bits per element, 1..8 (None: the compressor's own, 2 for 'quantize'). 2 bits cut
        traffic ~15×; 4 is the safe choice for sensitive layers. "auto": per bucket, the fastest
        of an fp32 all-reduce, an fp16 one and the compressor's widths whose measured added
        error stays within `auto_budget` (`distq.comm.auto`).
    bucket_size: elements per scale; smaller buckets lower the variance and add 4 bytes each
        (512: 1/16 bit per element). None: one scale per exchanged bucket (the paper's setting).
    clip: clip each gradient tensor at clip·√mean(g²) before quantizing (the paper's σ for
        zero-mean gradients; a constant or offset gradient is never cut): bounds the scale, so
        the error loses its √d growth, at a small bias. None disables it.
    collective: 'scatter' (bandwidth-optimal, two quantizations), 'allgather' (one; traffic
        grows with ranks), 'hierarchical' (full precision inside a node, 'scatter' between).
    error_feedback: keep each rank's compression error and add it to its next gradient (needed
        for the biased 'sign'); one gradient-sized buffer per rank.
    min_numel: buckets smaller than this go uncompressed.
    seed: seeds the rounding noise (with step, rank and bucket).
    nonfinite: 'raise' FloatingPointError on every rank alike when any rank's gradient holds
        NaN/Inf, or 'propagate' the NaN to every rank alike (the optimizer or AMP skips the step).
    error_every: measure the quantization errors and clipping bias every this many steps (on
        the first 1 M elements of a bucket: one extra encode and decode).
    segment: elements per pipeline segment: one is encoded and another decoded while a third is
        on the wire, so the codec's time hides behind the network's. None: one piece.
    bits_by_name: {parameter name or regex: bits} for parameters that need other widths.
    auto_budget: with bits="auto", the relative variance ‖Q(x) − x‖²/‖x‖² of all quantizations
        on the way that an option may add.
    """

    compressor: str | Compressor = "quantize"
    bits: int | str | None = None
    bucket_size: int | None = 512
    clip: float | None = 2.5
    collective: str = "scatter"
    error_feedback: bool = False
    min_numel: int = 1024
    seed: int = 0
    nonfinite: str = "raise"
    error_every: int = 10
    segment: int | None = SEGMENT_ELEMENTS
    bits_by_name: Mapping[str, int] = field(default_factory=dict)
    auto_budget: float = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        collective_record(self.collective)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite={self.nonfinite!r}; allowed: {', '.join(NONFINITE_POLICIES)}"
            )
        if self.bits == AUTO:
            check_budget(self.auto_budget)
            if self.bits_by_name or self.collective == "hierarchical":
                raise ValueError(
                    "bits='auto' chooses one width per bucket over a flat group; allowed with "
                    "it: no bits_by_name, collective 'scatter' or 'allgather'"
                )
        else:
            object.__setattr__(self, "bits", self.width(self.bits))
        for name, value, allowed in (
            ("bucket_size", self.bucket_size, "a positive int or None"),
            ("error_every", self.error_every, "a positive number of steps"),
            ("segment", self.segment, "a positive number of elements or None"),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}; allowed: {allowed}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip={self.clip!r}; allowed: a positive float or None")
        for pattern, width in self.bits_by_name.items():
            self.width(width, f"bits_by_name[{pattern!r}]")
        object.__setattr__(self, "bits_by_name", dict(self.bits_by_name or {}))

    @classmethod
    def of(cls, **options: Any) -> ExchangeSettings:
        """Settings from keyword options; an unknown one is refused with the nearest name."""
        for name in options:
            if name not in cls.__dataclass_fields__:
                near = difflib.get_close_matches(name, cls.__dataclass_fields__, 1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                allowed = ", ".join(cls.__dataclass_fields__)
                raise TypeError(f"unknown exchange option {name!r}{hint}; allowed: {allowed}")
        return cls(**options)

    @property
    def auto(self) -> bool:
        """Whether the width is chosen by measurement."""
        return self.bits == AUTO

    def auto_widths(self) -> list[int]:
        """The widths bits="auto" tries, widest first: those of 8, 4, 2, 1 the compressor sends."""
        widths = []
        for bits in (8, 4, 2, 1):
            try:
                widths.append(self.width(bits))
            except ValueError:
                continue
        return widths

    def width(self, bits: int | None, name: str = "bits") -> int:
        """The width sent for a requested `bits`, checked against the compressor."""
        if isinstance(self.compressor, Compressor):
            own = self.compressor.wire.bits
            bits = own if bits is None else bits
            if bits != own:
                self.compressor.with_bits(bits)  # refuses a width it cannot send
        else:
            bits = compressor_record(self.compressor).bits(bits, name)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            auto = " or 'auto'" if name == "bits" else ""
            raise ValueError(f"{name}={bits!r}; allowed: an int in 1..8{auto}")
        return bits

    def build(self, bits: int) -> Compressor:
        """The plain compressor (no error feedback) of one width."""
        if isinstance(self.compressor, Compressor):
            return self.compressor.with_bits(bits)
        return COMPRESSORS[self.compressor].build(bits, self.bucket_size, torch.float32)

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint records (they must match to resume bit-exactly): all but
        `nonfinite` and `error_every`, a compressor object by its class and wire format."""
        config = {f.name: getattr(self, f.name) for f in fields(self)}
        del config["nonfinite"], config["error_every"]
        if not isinstance(self.compressor, str):
            config["compressor"] = f"{type(self.compressor).__name__}({self.compressor.wire})"
        return config


class GradientExchange:
    """Averages gradient buckets over the ranks of a `Transport` through quantized codes, one at
    a time in one shared float32 scratch buffer (padded for `scatter`), so no step pays for fresh
    pages. `widths`: parameters' `bits_by_name` widths. The transport may come later (`connect`)."""

    def __init__(
        self,
        settings: ExchangeSettings,
        transport: Transport | None = None,
        topology: Topology | None = None,
        widths: Mapping[nn.Parameter, int] | None = None,
    ) -> None:
        self.settings = settings
        self.widths = dict(widths or {})
        self.stats = CompressionStats()
        self.memory = ResidualMemory() if settings.error_feedback else None
        self.keep: Callable[[nn.Parameter], Tensor | None] | None = None
        self._compressors: dict[int, Compressor] = {}  # what is sent, per width
        self._plain: dict[int, Compressor] = {}  # the same without error feedback
        self._buffers: dict[int, dict[str, Tensor]] = {}  # receive buffers per slot, reused
        self._scratch: Tensor | None = None
        self.choices: dict[int, Choice] = {}  # bits="auto": each bucket's measured choice
        self.trial: StepTrial | None = None  # bits="auto": real steps timed, while any
        self._stamped: int | None = None  # the last step whose first auto call was seen
        self.transport, self.topology = transport, topology
        if transport is not None:
            self.connect(transport, topology)

    def connect(self, transport: Transport, topology: Topology | None = None) -> None:
        """The ranks to average over; `hierarchical` also needs the node `topology`."""
        if self.settings.collective == "hierarchical" and topology is None:
            raise ValueError("collective 'hierarchical' needs the node topology")
        self.transport, self.topology = transport, topology

    def set_keep_mask(self, fn: Callable[[nn.Parameter], Tensor | None] | None) -> None:
        """Exchange only the entries fn(parameter) marks (a bool tensor; None: all), the same
        masks on every rank (as QuantizedOptimizer.mask_of); the others come back as zeros."""
        if fn is not None and self.settings.error_feedback:
            raise ValueError(
                "a keep mask cannot be combined with error_feedback=True: the residuals would "
                "move between entries as the mask changes"
            )
        self.keep = fn

    def compressor_for(self, bits: int) -> Compressor:
        """The (cached) compressor of one width, with error feedback when that is on."""
        if bits not in self._compressors:
            plain = self._plain[bits] = self.settings.build(bits)
            self._compressors[bits] = (
                plain if self.memory is None else ErrorFeedback(plain, self.memory, inplace=True)
            )
        return self._compressors[bits]

    def quantizations(self) -> int:
        """How many times a gradient value is quantized on its way (the collective's record)."""
        nodes = self.topology.num_nodes if self.topology is not None else 2
        return collective_record(self.settings.collective).quantizations_on(nodes)

    def quantizes_here(self) -> bool:
        """Whether this rank quantizes (hierarchical: node leaders, with more than one node)."""
        topology = self.topology
        return topology is None or (topology.is_leader and topology.num_nodes > 1)

    # -- averaging ----------------------------------------------------------------------------
    def average(
        self,
        buffer: Tensor,
        lengths: list[int],
        widths: list[int],
        index: int,
        step: int,
        keep: Tensor | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Average one bucket (its tensors' `lengths` and bit `widths`) over the ranks, only the
        entries `keep` marks (the rest are zero), into `out` if given (`buffer` itself makes the
        division and write-back one pass); without `out` the result may be a view of the scratch
        buffer, valid until the next call. `buffer`'s values may be overwritten. Every rank calls
        it with the same `index` and `step` in the same order."""
        n, numel = self.transport.size, buffer.numel()
        self.stats.fp32_allreduce_bytes += fp32_allreduce_bytes(numel, n)
        if keep is not None:
            kept = [int(part.sum()) for part in keep.split(lengths)]
            average = self._sum(buffer[keep], kept, widths, index, step).div_(n)
            out = buffer.new_zeros(numel, dtype=torch.float32) if out is None else out.zero_()
            out[keep] = average.to(out.dtype)
            return out
        total = self._sum(buffer, lengths, widths, index, step)
        if out is None:
            return total.div_(n)
        if out.dtype == total.dtype:  # divide and write back in one pass
            return torch.div(total, n, out=out)
        return out.copy_(total.div_(n))

    def average_params(
        self,
        params: list[nn.Parameter],
        buffer: Tensor,
        index: int,
        step: int,
        out: Tensor | None = None,
    ) -> Tensor:
        """`average` of a bucket of `params`' gradients flattened in `buffer`, at their widths
        and with their keep masks (a parameter without one: all its entries)."""
        widths = [self.widths.get(p, self.settings.bits) for p in params]
        masks = [None if self.keep is None else self.keep(p) for p in params]
        keep = None
        if any(m is not None for m in masks):
            keep = torch.cat(
                [
                    (m if m is not None else torch.ones_like(p, dtype=torch.bool)).reshape(-1)
                    for m, p in zip(masks, params, strict=True)
                ]
            )
        return self.average(buffer, [p.numel() for p in params], widths, index, step, keep, out)

    def average_fp32(self, buffer: Tensor, name: str = "distq.fp32") -> Tensor:
        """buffer ← its plain full-precision average over the ranks (warm-up steps), in place."""
        self.transport.sum_(buffer, name)
        return buffer.div_(self.transport.size)

    def _sum(
        self, buffer: Tensor, lengths: list[int], widths: list[int], index: int, step: int
    ) -> Tensor:
        """Σ over ranks of the bucket's clipped, quantized values (fp32 below `min_numel`); a
        full-precision sum may be taken in `buffer` itself."""
        numel = buffer.numel()
        if numel < self.settings.min_numel:
            return self._full_precision_sum(buffer, index, torch.float32, in_place=True)
        if self.settings.auto:
            name = self._auto_option(buffer, lengths, index, step)
            if bits_of(name) is None:
                dtype = torch.float16 if name == "fp16" else torch.float32
                return self._full_precision_sum(buffer, index, dtype, in_place=True)
            widths = [bits_of(name)] * len(lengths)
        distinct = sorted(set(widths))
        if len(distinct) > 1:
            return self._sum_mixed(buffer, lengths, widths, index, step)
        compressor = self.compressor_for(distinct[0])
        collective = self.settings.collective
        n = self.transport.size
        work = self._work_buffer(working_length(numel, n, compressor, collective), buffer)
        work[numel:].zero_()  # scatter's padding
        x = work[:numel]
        measure = step % self.settings.error_every == 0 and self.quantizes_here()
        original = None
        if measure and self.settings.clip is not None:
            original = _error_sample(buffer, compressor).to(torch.float32, copy=True)
        self._clip_into(x, buffer, lengths)
        slot = index * SLOTS_PER_BUCKET
        if measure:
            self._measure(x, original, compressor, self._key(step, slot))
        target = work if collective == "scatter" else x
        return self._exchange(target, compressor, slot, step, measure)[:numel]

    def _full_precision_sum(
        self, buffer: Tensor, index: int, dtype: torch.dtype, in_place: bool = False
    ) -> Tensor:
        """Σ over ranks of the bucket by a plain all-reduce in `dtype` (fp16: of buffer/n, as
        torch's fp16 hook, so the sum cannot overflow), as float32; `in_place`: a float32
        `buffer` is summed where it is, without a copy (4.28 M elements: 2.7 ms, one core)."""
        n = self.transport.size
        if dtype == torch.float32:
            own = in_place and buffer.dtype == torch.float32
            work = buffer if own else buffer.to(torch.float32, copy=True)
        else:
            work = buffer.to(torch.float32).div(n).to(dtype)
        self.transport.sum_(work, f"distq.{index}.{dtype}")
        element = work.element_size()
        self.stats.uncompressed_bytes_sent += fp32_allreduce_bytes(work.numel(), n, element)
        return work if dtype == torch.float32 else work.to(torch.float32).mul_(n)

    def _auto_option(self, buffer: Tensor, lengths: list[int], index: int, step: int) -> str:
        """What the bucket sends this step under bits="auto": its choice, or while real steps
        are timed (`distq.comm.auto.StepTrial`) the side this step belongs to."""
        self._tick(step)
        choice = self._choose(buffer, lengths, index, step)
        if choice.contender is None:
            return choice.name
        if self.trial is None:  # from the next step, when every bucket has its prediction
            self.trial = StepTrial(step + 1)
        return choice.contender if self.trial.contender_at(step) else choice.name

    def _tick(self, step: int) -> None:
        """On a step's first auto call: stamp it for a running trial, and settle the trial once
        its steps are timed (collective: every rank alike)."""
        if step == self._stamped or self.trial is None:
            self._stamped = step
            return
        self._stamped, trial = step, self.trial
        trial.stamp(step, time.perf_counter())
        if step < trial.end:
            return
        ratio = torch.tensor([trial.ratio()], dtype=torch.float64)
        self.transport.max_(ratio, "distq.auto.trial")  # the same verdict on every rank
        for index, choice in self.choices.items():
            if choice.contender is not None:
                self._record(index, choice.settled(ratio.item()))
        self.trial = None

    def _record(self, index: int, choice: Choice) -> None:
        """Keep a bucket's choice, and say it (stats for the monitor, and the log)."""
        self.choices[index] = choice
        self.stats.choices[index] = choice.describe()
        log.info("distq bits='auto', bucket %d: %s", index, choice.describe())

    def _choose(self, buffer: Tensor, lengths: list[int], index: int, step: int) -> Choice:
        """The bucket's choice under bits="auto", measured on its first quantized step (and
        again if its size changes); collective: every rank calls it alike (module
        `distq.comm.auto`)."""
        numel = buffer.numel()
        cached = self.choices.get(index)
        if cached is not None and cached.numel == numel:
            return cached
        x = buffer.to(torch.float32, copy=True)
        if self.settings.clip is not None:
            clip_by_rms_(x, self.settings.clip, lengths)
        sample = x[:SAMPLE]
        names = ["fp32", "fp16", *(f"{bits}-bit" for bits in self.settings.auto_widths())]
        seconds = [
            _timed(lambda: self._full_precision_sum(x, index, torch.float32))[0],
            _timed(lambda: self._full_precision_sum(x, index, torch.float16))[0],
        ]
        half = sample.to(torch.float16).to(torch.float32)
        errors = [0.0, _relative_error(half, sample)]
        key = self._key(step, index * SLOTS_PER_BUCKET)
        for bits in self.settings.auto_widths():
            per_element, error = _codec_cost(self.settings.build(bits), sample, key)
            seconds.append(per_element)
            errors.append(error)
        measured = torch.tensor(seconds + errors, dtype=torch.float64)
        self.transport.max_(measured, f"distq.{index}.auto")  # the same figures on every rank
        seconds, errors = measured[: len(names)].tolist(), measured[len(names) :].tolist()
        options = self._options(names, seconds, errors, numel)
        self._record(index, predict(options, self.settings.auto_budget, numel))
        return self.choices[index]

    def _options(
        self, names: list[str], seconds: list[float], errors: list[float], numel: int
    ) -> dict[str, Option]:
        """Each option's predicted seconds and added error from the measured figures: fp32 and
        fp16 as timed; a width's codec time per element × q·numel plus its bytes at the fp32
        all-reduce's seconds per byte; its error × q (q: the collective's quantizations)."""
        n, q = self.transport.size, self.quantizations()
        options = {"fp32": Option(seconds[0], 0.0), "fp16": Option(seconds[1], errors[1])}
        per_byte = seconds[0] / max(1, fp32_allreduce_bytes(numel, n))  # the link, measured
        record = collective_record(self.settings.collective)
        for name, per_element, error in zip(names[2:], seconds[2:], errors[2:], strict=True):
            compressor = self.settings.build(int(name.split("-")[0]))
            sent = record.bytes_sent(
                numel, n, 1, compressor.wire.payload_nbytes,
                lambda length, ranks, c=compressor: chunk_length(length, ranks, c),
            )  # fmt: skip
            options[name] = Option(q * per_element * numel + sent * per_byte, q * error)
        return options

    def _clip_into(self, x: Tensor, buffer: Tensor, lengths: list[int]) -> None:
        """x ← buffer clipped per tensor at clip·rms (float32)."""
        clip = self.settings.clip
        if clip is None:
            x.copy_(buffer)
        elif buffer.dtype == torch.float32:  # copy and clip in one pass
            clip_by_rms_(x, clip, lengths, source=buffer)
        else:  # the rms of half-precision sums is too coarse: clip the float32 copy
            clip_by_rms_(x.copy_(buffer), clip, lengths)

    def _sum_mixed(
        self, buffer: Tensor, lengths: list[int], widths: list[int], index: int, step: int
    ) -> Tensor:
        """The sum of a bucket whose tensors have different widths (bits_by_name): one exchange
        per width over its elements (copied; errors are measured on one-width buckets only)."""
        flat = buffer.to(torch.float32, copy=True)
        if self.settings.clip is not None:
            clip_by_rms_(flat, self.settings.clip, lengths)
        device = buffer.device
        per_element = torch.repeat_interleave(
            torch.tensor(widths, device=device), torch.tensor(lengths, device=device)
        )
        for part, width in enumerate(sorted(set(widths))):
            mask = per_element == width
            slot = index * SLOTS_PER_BUCKET + part
            flat[mask] = self._exchange(flat[mask], self.compressor_for(width), slot, step)
        return flat

    def _key(self, step: int, slot: int) -> Key:
        return Key(self.settings.seed, step, self.transport.rank, slot=slot)

    def _exchange(
        self, x: Tensor, compressor: Compressor, slot: int, step: int, measure: bool = False
    ) -> Tensor:
        """Σ over ranks of the quantized x (overwritten), keyed by step, rank and slot; with
        `measure`, the second quantization's error is recorded."""
        if self.memory is not None and self.memory.discard_mismatched(slot, x.numel()):
            log.warning("bucket layout changed: error-feedback residual %d reset", slot)
        errors = {} if measure else None
        summed, traffic = quantized_sum(
            x,
            compressor,
            self._key(step, slot),
            self.settings.collective,
            topology=self.topology,
            inplace=True,
            buffers=self._buffers.setdefault(slot, {}),
            errors=errors,
            segment=self.settings.segment,
            transport=None if self.settings.collective == "hierarchical" else self.transport,
            name=f"distq.{slot}",
        )
        if errors:
            self.stats.requant_relative_error = errors["requant_relative_error"]
        self.stats.count(traffic)
        return summed

    def _work_buffer(self, numel: int, like: Tensor) -> Tensor:
        """The first `numel` elements of the shared scratch buffer (grown as needed)."""
        scratch = self._scratch
        if scratch is None or scratch.numel() < numel or scratch.device != like.device:
            scratch = self._scratch = torch.empty(numel, device=like.device)
        return scratch[:numel]

    # -- telemetry ----------------------------------------------------------------------------
    def _measure(
        self, x: Tensor, original: Tensor | None, compressor: Compressor, key: Key
    ) -> None:
        """Record the first quantization's error ‖Q(x) − x‖² and the clipping bias relative to ‖g‖²
        of the unclipped gradient (`original`; None: x is unclipped), on the first ERROR_SAMPLE
        elements, with the codes the exchange sends: the same noise and scales (one scale: x's;
        shared scales: max-reduced over the ranks, or the node leaders, at the same steps)."""
        plain, wire = self._plain[compressor.wire.bits], compressor.wire
        sample = _error_sample(x, compressor)
        if wire.bucket_size is not None and not wire.shared_scale:  # the sample's own scales
            payload = plain.compress(sample, key)
        else:
            scales = plain.scales(x if wire.bucket_size is None else sample, key)
            if wire.shared_scale:
                topology = self.topology
                over = self.transport if topology is None else TorchTransport(topology.leader_group)
                scales = shared_scales(scales, over, "distq.measure", Traffic())
            payload = plain.compress(sample, key, scales=scales)
        diff = plain.decode_rows_into(payload.view(1, -1), torch.empty_like(sample), key=key)
        diff.sub_(sample)
        error = float(torch.dot(diff, diff))
        g = sample if original is None else original
        norm = float(torch.dot(g, g))
        stats = self.stats
        stats.measured_step = key.step
        if norm == 0:
            stats.relative_error, stats.clip_bias, stats.clipped_norm_ratio = 0.0, 0.0, 1.0
            return
        stats.relative_error = error / norm
        stats.clipped_norm_ratio = float(torch.dot(sample, sample)) / norm
        moved = g - sample
        stats.clip_bias = float(torch.dot(moved, moved)) / norm

    def is_finite(self, average: Tensor) -> bool:
        """Whether an average holds only finite values (alike on every rank): its float32 sum is
        NaN/Inf iff an element is (or it overflows, as unusable), and allocates nothing."""
        return bool(torch.isfinite(average.sum(dtype=torch.float32)))

    # -- checkpoints --------------------------------------------------------------------------
    def residuals(self) -> dict[str, Tensor]:
        """The error-feedback residuals by "bits/slot" (none without error feedback)."""
        return {} if self.memory is None else self.memory.state_dict()

    def load_residuals(self, residuals: Mapping[str, Tensor]) -> None:
        """Replace the residuals (none: reset them)."""
        if self.memory is not None:
            self.memory.load_state_dict(dict(residuals))

    def reset_residuals(self) -> None:
        self.load_residuals({})

    def choices_state(self) -> dict[int, dict[str, Any]]:
        """bits="auto"'s choices as plain data, so a resumed run sends what this one did."""
        return {
            index: {"name": c.name, "numel": c.numel, "contender": c.contender, "timed": c.timed,
                    "options": {k: (o.seconds, o.error) for k, o in c.options.items()}}
            for index, c in self.choices.items()
        }  # fmt: skip

    def load_choices(self, state: Mapping[int, Mapping[str, Any]]) -> None:
        """Replace the choices by those `choices_state` saved (a choice saved while its steps were
        being timed is timed again)."""
        self.trial = None
        self.choices = {
            int(index): Choice(c["name"], int(c["numel"]),
                               {k: Option(*v) for k, v in c["options"].items()},
                               c.get("contender"), c.get("timed", ""))
            for index, c in state.items()
        }  # fmt: skip
        self.stats.choices = {i: c.describe() for i, c in self.choices.items()}


def nonfinite_error(where: str) -> FloatingPointError:
    """The error every rank raises alike under nonfinite='raise'."""
    return FloatingPointError(
        f"non-finite gradient {where} on some rank (every rank raises alike; "
        "nonfinite='propagate' hands the NaN to the optimizer)"
    )


def parameter_widths(
    named_parameters: Iterable[tuple[str, nn.Parameter]], bits_by_name: Mapping[str, int]
) -> dict[nn.Parameter, int]:
    """{parameter: bits} for parameters matched by bits_by_name (exact name, else the first
    regex); an entry that matches nothing is refused with the names there are."""
    by_name = dict(named_parameters)
    return {by_name[n]: bits for n, bits in widths_by_name(by_name, bits_by_name).items()}


def _error_sample(x: Tensor, compressor: Compressor) -> Tensor:
    """The leading whole buckets of x, at most ERROR_SAMPLE elements (all of x if shorter than a
    bucket): they encode with kernels compiled already, where a partial one would compile more."""
    bucket = compressor.wire.bucket_size
    if not bucket:
        return x[:ERROR_SAMPLE]
    whole = min(ERROR_SAMPLE, x.numel()) // bucket * bucket
    return x[: whole or x.numel()]


def _timed(fn: Callable[[], Tensor], repeats: int = 2) -> tuple[float, Tensor]:
    """(the fastest of `repeats` timed calls of fn, in seconds, and its result), after one
    untimed call that compiles kernels and warms caches."""
    result, best = fn(), float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def _codec_cost(compressor: Compressor, sample: Tensor, key: Key) -> tuple[float, float]:
    """(seconds per element of one encode + decode of `sample`, its relative error)."""
    seconds, decoded = _timed(
        lambda: compressor.decompress(compressor.compress(sample, key), sample.numel(), key)
    )
    return seconds / max(1, sample.numel()), _relative_error(decoded, sample)


def _relative_error(decoded: Tensor, x: Tensor) -> float:
    """‖decoded − x‖²/‖x‖² (0 for x = 0)."""
    norm = float(torch.dot(x, x))
    diff = decoded - x
    return float(torch.dot(diff, diff)) / norm if norm > 0 else 0.0
