"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with quantized gradients on the reduce-scatter
and palette-coded weights on the all-gather.

    model, exchange = shard_model(model, bits=2, clip=2.5)   # any ExchangeSettings option
    ... loss.backward() ...   # every gradient shard arrives through `QuantizedReduceScatter`
    exchange.stats            # bytes sent, and what an fp32 reduce-scatter would have sent
    exchange.gather_stats     # the same for the weights' all-gather (`PackedAllGather`)

FSDP hands its reduce-scatter this rank's whole gradient of one module's parameters as [n, L]
rows (row j: chunk j of every parameter, dim-0 padded, in FSDP's parameter order); rank j must
end with the reduction of row j. `QuantizedReduceScatter` runs the first two stages of distq's
`scatter` on it (`distq.comm.collectives.scatter_chunks`): row j ≠ rank is clipped, encoded and
sent to rank j by all-to-all, this rank's own row stays exact, and the received rows are decoded
and added in rank order, so every shard is

    out_j = (x_j[j] + Σ_{i ≠ j} decode(Q_i(x_i[j]))) / n   (÷ n for AVG, not for SUM)

with x_i = Clip(rank i's gradient) and Q_i keyed by (seed, step, i, slot): one quantization per
value, unbiased where the compressor is. Sent per rank: (n − 1)·P(L) bytes against
(n − 1)·4·L for an fp32 reduce-scatter.

The weights' all-gather (`distq.comm.fsdp_gather.PackedAllGather`, weights='packed') sends each
parameter shard as its distinct values and packed indices into them (raw where that is not
smaller) and rebuilds FSDP's all-gather output bit for bit on every rank, whatever produced the
values; weights='fp32' leaves FSDP's own all-gather.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from distq.comm.collectives import Traffic, scatter_chunks, scatter_lengths
from distq.comm.compressors import Compressor
from distq.comm.exchange import CompressionStats, ExchangeSettings, nonfinite_error
from distq.comm.fsdp_gather import GatherStats, PackedAllGather, fsdp_params_of, gather_layout
from distq.comm.noise import Key
from distq.comm.transport import TorchTransport
from distq.quant import blocks_of, set_blocks

__all__ = [
    "FSDPExchange",
    "GatherStats",
    "PackedAllGather",
    "QuantizedReduceScatter",
    "Segment",
    "ShardedStats",
    "shard_model",
]

log = logging.getLogger(__name__)

OPS = ("AVG", "SUM")  # the reduce ops FSDP2 passes that this reduce-scatter performs
GRADIENTS = ("quantized", "fp32")  # shard_model's reduce-scatter: QuantizedReduceScatter, FSDP's
WEIGHTS = ("packed", "fp32")  # shard_model's all-gather: PackedAllGather, or FSDP's own
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # shard_model's dtype: FSDP's mp_policy


@dataclass
class ShardedStats(CompressionStats):
    """`CompressionStats` of the reduce-scatter, with the bytes an fp32 reduce-scatter of the
    same inputs would send: (n − 1)/n·4·numel per rank for n·L = numel input elements."""

    fp32_reduce_scatter_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        """Bytes an fp32 reduce-scatter would send ÷ bytes this rank sent."""
        sent = self.bytes_sent + self.uncompressed_bytes_sent
        return self.fp32_reduce_scatter_bytes / sent if sent else float("nan")


@dataclass(frozen=True)
class Segment:
    """One parameter's place in FSDP's reduce-scatter rows: `length` elements of every row (its
    padded dim-0 shard), `numel` elements in the whole parameter (the rms divides by it)."""

    name: str
    length: int
    numel: int


class FSDPExchange:
    """What the reduce-scatters of one sharded model share: the settings, the compressor, the
    byte counters (`stats`; the `error_every` error measurements are not taken here and stay
    NaN; `gather_stats` for the packed all-gathers), each slot's step (the key's step counts
    that slot's calls), and the float32 scratch buffer (the largest module's padded gradient:
    calls run one at a time). `settings` must be a flat 'scatter' with one fixed width: no
    bits='auto', bits_by_name or error feedback (its residual would be the unsharded
    gradient)."""

    def __init__(self, settings: ExchangeSettings) -> None:
        refused = {
            "bits='auto'": settings.auto,
            f"collective={settings.collective!r}": settings.collective != "scatter",
            "bits_by_name": bool(settings.bits_by_name),
            "error_feedback=True": settings.error_feedback,
        }
        bad = [name for name, on in refused.items() if on]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} with FSDP's reduce-scatter; allowed: collective 'scatter', "
                "one fixed width (bits 1..8 the compressor sends), error_feedback=False"
            )
        self.settings = settings
        self.compressor: Compressor = settings.build(settings.bits)
        self.stats = ShardedStats()
        self.steps: dict[int, int] = {}
        self.reduce_scatters: dict[str, QuantizedReduceScatter] = {}  # by module name
        self.gather_stats = GatherStats()
        self.all_gathers: dict[str, PackedAllGather] = {}  # by module name (weights='packed')
        self._transports: dict[Any, TorchTransport] = {}
        self._scratch: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a bit-exact resume needs: each slot's step (the rounding noise's key)."""
        return {"steps": dict(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = {int(slot): int(step) for slot, step in state["steps"].items()}

    def transport(self, group: dist.ProcessGroup) -> TorchTransport:
        """The (cached) transport over the group FSDP reduces over."""
        transport = self._transports.get(group)
        if transport is None:
            transport = self._transports[group] = TorchTransport(group)
        return transport

    def key(self, slot: int, rank: int) -> Key:
        """The key of slot's next call on this rank; advances the slot's step."""
        step = self.steps.get(slot, 0)
        self.steps[slot] = step + 1
        self.stats.steps = max(self.stats.steps, step + 1)
        return Key(self.settings.seed, step, rank, slot)

    def scratch(self, numel: int, like: Tensor) -> Tensor:
        """The first `numel` elements of the shared float32 scratch buffer (grown as needed)."""
        scratch = self._scratch
        if scratch is None or scratch.numel() < numel or scratch.device != like.device:
            scratch = self._scratch = torch.empty(numel, device=like.device, dtype=torch.float32)
        return scratch[:numel]


class QuantizedReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter through distq's quantized `scatter` stages (module doc), for one
    FSDP module (`slot`: its index; keys and counters are `exchange`'s).

    Clipping: with the module's `layout` (`Segment`s in FSDP's order), each parameter is clipped
    at clip·rms of its whole gradient on this rank (the rms of its columns over all n rows), as
    the DDP exchange clips each tensor; without one, the whole input is clipped as one tensor.
    Inputs smaller than `min_numel` go by an fp32 reduce-scatter. Non-finite gradients: every
    rank learns by a 4-byte all-reduce (not counted) whether any shard is non-finite, then raises
    FloatingPointError alike (nonfinite='raise') or fills its whole shard with NaN
    ('propagate')."""

    def __init__(
        self,
        exchange: FSDPExchange | ExchangeSettings,
        slot: int = 0,
        layout: Sequence[Segment] | None = None,
    ) -> None:
        self.exchange = exchange if isinstance(exchange, FSDPExchange) else FSDPExchange(exchange)
        self.slot = slot
        self.layout = list(layout) if layout is not None else None

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> None:
        divide = _divides(op)
        if async_op:
            raise ValueError("async_op=True; allowed: False (FSDP2 reduce-scatters in line)")
        exchange = self.exchange
        transport = exchange.transport(group)
        n, length = transport.size, output_tensor.numel()
        if input_tensor.numel() != n * length:
            raise ValueError(
                f"reduce-scatter input has {input_tensor.numel()} elements; {n} ranks × "
                f"{length} output elements need {n * length}"
            )
        rows = input_tensor.view(n, length)
        stats = exchange.stats
        stats.fp32_reduce_scatter_bytes += (n - 1) * length * 4
        if input_tensor.numel() < exchange.settings.min_numel or n == 1:
            self._full_precision(output_tensor, input_tensor, group, n)
        else:
            key = exchange.key(self.slot, transport.rank)
            self._quantized(output_tensor, rows, transport, key, divide)
            divide = False  # done on the float32 sums
        if divide:
            output_tensor.div_(n)
        self._check_finite(output_tensor, group)
        return None

    def _full_precision(self, output: Tensor, input: Tensor, group: Any, n: int) -> None:
        """output ← Σ over ranks of row `rank`, by torch's reduce-scatter."""
        dist.reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=group)
        sent = (n - 1) * output.numel() * input.element_size()
        self.exchange.stats.uncompressed_bytes_sent += sent

    def _quantized(
        self, output: Tensor, rows: Tensor, transport: TorchTransport, key: Key, divide: bool
    ) -> None:
        """output ← this rank's own (clipped) row + the decoded rows of the others, in rank order,
        ÷ n if `divide`, computed in float32."""
        exchange = self.exchange
        compressor, settings = exchange.compressor, exchange.settings
        n, length = transport.size, rows.shape[1]
        unit = compressor.wire.chunk_unit()
        padded = -(-length // unit) * unit
        lengths = scatter_lengths(n * padded, n, compressor, settings.segment)
        work = exchange.scratch(n * padded, rows)
        self._lay_out(work, rows, [s // n for s in lengths])

        columns = []  # each segment's first column
        for s in lengths:
            columns.append(columns[-1] + s // n if columns else 0)

        def reduce_own(seg: Any, received: Tensor, mine: Tensor, skip: int | None) -> None:
            compressor.decode_sum_into(received, mine, skip, skip is not None, key=key)
            if divide:
                mine.div_(n)
            c0 = columns[seg.index]
            c1 = min(length, c0 + mine.numel())
            if c1 > c0:
                output[c0:c1].copy_(mine[: c1 - c0])

        traffic = Traffic()
        scatter_chunks(
            work, compressor, key, transport, traffic, reduce_own,
            segment=settings.segment, name=f"distq.fsdp.{self.slot}",
        )  # fmt: skip
        exchange.stats.count(traffic)

    def _lay_out(self, work: Tensor, rows: Tensor, widths: list[int]) -> None:
        """work ← the rows clipped (float32), padded with zeros to n·padded, segment by segment:
        segment s holds columns c0..c0 + widths[s] of every row, row after row, so its chunk j is
        row j's piece (what `scatter_chunks` sends to rank j)."""
        n, length = rows.shape
        limits = self._limits(rows)
        at = c0 = 0
        for width in widths:
            block = work[at : at + n * width].view(n, width)
            c1 = min(length, c0 + width)
            block[:, max(0, c1 - c0) :].zero_()
            for a, b, limit in limits:  # the parameters' columns within this segment
                a, b = max(a, c0), min(b, c1)
                if b > a:
                    target = block[:, a - c0 : b - c0].copy_(rows[:, a:b])
                    if limit is not None:
                        target.clamp_(-limit, limit)
            at += n * width
            c0 += width

    def _limits(self, rows: Tensor) -> list[tuple[int, int, float | None]]:
        """(first column, end column, clip limit or None) of each parameter (module doc)."""
        n, length = rows.shape
        clip = self.exchange.settings.clip
        layout = self.layout or [Segment("input", length, n * length)]
        if sum(s.length for s in layout) != length:
            raise ValueError(
                f"the layout covers {sum(s.length for s in layout)} elements a row "
                f"({', '.join(f'{s.name}: {s.length}' for s in layout)}); FSDP's rows have {length}"
            )
        limits, a = [], 0
        for segment in layout:
            b = a + segment.length
            limit = None
            if clip is not None and b > a:
                norm = torch.linalg.vector_norm(rows[:, a:b], dtype=torch.float64)
                limit = clip * float(norm) / math.sqrt(max(1, segment.numel))
            limits.append((a, b, limit))
            a = b
        return limits

    def _check_finite(self, output: Tensor, group: Any) -> None:
        """Agree over the group whether any shard is non-finite; then raise or fill with NaN."""
        finite = torch.tensor(
            [float(torch.isfinite(output.sum(dtype=torch.float32)))], device=output.device
        )
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
        if finite.item() == 1:
            return
        if self.exchange.settings.nonfinite == "raise":
            raise nonfinite_error(f"in FSDP's reduce-scatter (slot {self.slot})")
        output.fill_(float("nan"))


def _divides(op: Any) -> bool:
    """Whether the reduce-scatter must divide by the ranks (AVG) or not (SUM); others refused."""
    if op == dist.ReduceOp.AVG:
        return True
    if op == dist.ReduceOp.SUM:
        return False
    name = getattr(op, "name", None) or "PREMUL_SUM (a ReduceOp object)"
    raise ValueError(
        f"reduce op {name}; allowed: {', '.join(OPS)} (FSDP passes PREMUL_SUM after "
        "set_gradient_divide_factor: use set_force_sum_reduction_for_comms(True) instead)"
    )


def layout_of(module: FSDPModule) -> list[Segment]:
    """The `Segment`s of an FSDP module's reduce-scatter rows, in FSDP's parameter order (from
    FSDP2's private parameter group, `fsdp_params_of`); the reduce-scatter checks it against the
    rows it gets."""
    return [
        Segment(
            getattr(fp, "_param_fqn", None) or fp._module_info.param_name,
            fp.padded_sharded_param_size.numel(),
            fp._orig_size.numel(),
        )
        for fp in fsdp_params_of(module)
    ]


SHARD_WHOLE = "distq_shard_whole"  # class attribute: shard_model keeps the module's tree one unit


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules `shard_model` shards one by one, parents before children: each holding
    parameters of its own, except inside a module whose class sets `SHARD_WHOLE` (it reads its
    children's weights in its own forward, as an unrolled LSTM layer does: FSDP gathers a
    module's parameters only around that module's call), which is one unit with them."""
    if getattr(model, SHARD_WHOLE, False):
        return []
    units, whole = [], []
    for name, module in model.named_modules():
        if any(name.startswith(f"{w}.") for w in whole):
            continue
        if getattr(module, SHARD_WHOLE, False) and name:
            whole.append(name)
            units.append((name, module))
        elif name and any(True for _ in module.parameters(recurse=False)):
            units.append((name, module))
    return units


def shard_model(
    model: nn.Module,
    *,
    mesh_or_group: Any = None,
    weights: str = "packed",
    gradients: str = "quantized",
    dtype: str = "float32",
    **exchange: Any,
) -> tuple[FSDPModule, FSDPExchange]:
    """Apply `fully_shard` bottom-up to every submodule that holds parameters of its own (leaves
    with parameters, and parents with direct ones), then to the root; register a
    `QuantizedReduceScatter` (`**exchange`: `ExchangeSettings` options) on every FSDP module
    that has parameters, and with weights='packed' (the default: lossless for any values, so
    nothing to opt into) a `PackedAllGather`; weights='fp32' keeps FSDP's all-gather.
    `mesh_or_group`: a DeviceMesh, a process group, or None (FSDP's default mesh over the
    world). gradients='fp32' keeps FSDP's reduce-scatter (the baseline runs). dtype='bfloat16':
    FSDP's MixedPrecisionPolicy(param_dtype=reduce_dtype=bfloat16), the fp32 shards cast to
    bf16 before the all-gather and gradients reduce-scattered in bf16 (FSDP2's bf16 baseline).
    Returns (the root FSDP module, the shared `FSDPExchange`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; allowed: {', '.join(map(repr, WEIGHTS))}")
    if gradients not in GRADIENTS:
        raise ValueError(f"gradients={gradients!r}; allowed: {', '.join(map(repr, GRADIENTS))}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(map(repr, DTYPES))}")
    low = DTYPES[dtype]
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=low)
    state = FSDPExchange(ExchangeSettings.of(**exchange))
    mesh = mesh_or_group
    if isinstance(mesh_or_group, dist.ProcessGroup):
        from torch.distributed.device_mesh import DeviceMesh

        device = "cpu" if dist.get_backend(mesh_or_group) == "gloo" else "cuda"
        mesh = DeviceMesh.from_group(mesh_or_group, device_type=device)
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no parameters to shard")
    blocks = {n: blocks_of(p) for n, p in model.named_parameters() if blocks_of(p) > 1}
    owners = _units(model)
    for _, module in reversed(owners):  # children before their parents
        fully_shard(module, mesh=mesh, mp_policy=policy)
    root = fully_shard(model, mesh=mesh, mp_policy=policy)
    for name, param in model.named_parameters():  # FSDP made new Parameters: mark them again
        if name in blocks:
            set_blocks(param, blocks[name])
    slot = 0
    for name, module in [*owners, ("", root)]:
        layout = layout_of(module)
        if not layout:
            continue
        if gradients == "quantized":
            reduce_scatter = QuantizedReduceScatter(state, slot, layout)
            module.set_custom_reduce_scatter(reduce_scatter)
            state.reduce_scatters[name] = reduce_scatter
        if weights == "packed":
            all_gather = PackedAllGather(gather_layout(module), state.gather_stats)
            module.set_custom_all_gather(all_gather)
            state.all_gathers[name] = all_gather
        slot += 1
    log.info(
        "distq FSDP: %d modules reduce-scatter %s gradients (%s), all-gather %s weights, %s",
        slot, gradients, state.compressor.wire, weights, dtype,
    )  # fmt: skip
    return root, state
