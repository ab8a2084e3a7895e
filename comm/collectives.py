"""Quantized sum-reductions: every rank ends with the same, bit-identical result.

- `allgather`: every rank's payload P (the whole tensor's) is all-gathered, decoded and summed in
  rank order. Sent per rank: (n−1)·P.
- `scatter` (bandwidth-optimal): chunk j (whole buckets and bytes) of every rank goes to rank j
  (all-to-all), which sums the decoded chunks in rank order, re-quantizes the sum and all-gathers
  it. Sent per rank: 2(n−1)·P/n. With `pipelined` chunks the owner's own chunk never crosses the
  wire and enters the sum unquantized: 1/n less codec work and first-stage noise.
- `hierarchical`: full-precision all-reduce inside each node, `scatter` between the node
  leaders, broadcast inside the node: only quantized bytes cross between nodes.

With a `segment` length and a `pipelined` compressor the stages run segment by segment, so one
segment is on the wire while this rank encodes the next and decodes the one before (the noise is
indexed by element: the codes are the whole tensor's). Collectives read only the `WireFormat`; a
NaN/Inf turns the affected buckets into NaN on every rank alike (a NaN scale travels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from distq.comm.compressors import Compressor
from distq.comm.noise import Key
from distq.comm.topology import Topology
from distq.comm.transport import Pending, TorchTransport, Transport
from distq.theory.exchange import collective as collective_record

SEGMENT_ELEMENTS = 1 << 20  # the DDP hook's default pipeline segment (4 MiB of fp32)


@dataclass
class Traffic:
    """Payload bytes this rank sent and received, and fp32 bytes it sent inside its node."""

    sent: int = 0
    received: int = 0
    intra_node_sent: int = 0

    def add(self, other: Traffic) -> None:
        self.sent += other.sent
        self.received += other.received
        self.intra_node_sent += other.intra_node_sent

    def both(self, nbytes: int) -> None:
        """Count `nbytes` sent and as many received (every exchange here is symmetric)."""
        self.sent += nbytes
        self.received += nbytes


def shared_scales(scales: Tensor, transport: Transport, name: str, traffic: Traffic) -> Tensor:
    """Per-bucket scales max-reduced over the ranks in place (TernGrad); a NaN stays NaN."""
    traffic.both(transport.max_(scales, f"{name}.scales"))
    return scales


def _compress(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    transport: Transport,
    traffic: Traffic,
    name: str,
    start: int,
) -> Tensor:
    """Compress x (element `start` of its tensor), with `shared_scales` if the wire shares them."""
    shared = compressor.wire.shared_scale
    scales = shared_scales(compressor.scales(x, key), transport, name, traffic) if shared else None
    return compressor.compress(x, key, scales, start=start)


def _buffer(buffers: dict | None, name: str, like: Tensor, numel: int) -> Tensor:
    """A receive buffer: reused from `buffers` when one of the right size is cached there."""
    if buffers is None:
        return like.new_empty(numel)
    cached = buffers.get(name)
    if cached is None or cached.numel() != numel:
        cached = buffers[name] = like.new_empty(numel)
    return cached


def pipelined(compressor: Compressor) -> bool:
    """Whether pieces of a tensor compress independently (segments, `scatter`'s chunks): not with
    one scale for the whole tensor nor with error feedback (its residual is the whole tensor's)."""
    wire = compressor.wire
    return wire.bucket_size is not None and not wire.shared_scale and not compressor.stateful


def segment_lengths(numel: int, unit: int, segment: int | None) -> list[int]:
    """Lengths of consecutive segments covering `numel` elements, each but the last a multiple
    of `unit` of about `segment` elements (None or ≥ numel: one segment)."""
    if segment is None or numel <= segment:
        return [numel]
    step = max(1, segment // unit) * unit
    return [min(step, numel - s) for s in range(0, numel, step)]


def chunk_length(numel: int, n: int, compressor: Compressor) -> int:
    """Elements per rank's chunk in `scatter`: ≥ numel/n, a multiple of whole buckets and bytes."""
    unit = compressor.wire.chunk_unit()
    return max(1, -(-numel // (n * unit))) * unit


def working_length(numel: int, n: int, compressor: Compressor, collective: str) -> int:
    """Length of a collective's scratch buffer: `scatter` pads the tensor to n whole chunks."""
    return n * chunk_length(numel, n, compressor) if collective == "scatter" else numel


@dataclass
class _Segment:
    """A segment between two stages; `sent` is what its data movement reads (kept until done)."""

    index: int
    start: int  # offset of the segment in the tensor
    piece: Tensor  # the segment; the result is decoded into it
    sent: Tensor
    pending: Pending


def _pipeline(x: Tensor, lengths: list[int], first: Callable, *stages: Callable) -> None:
    """Run x's segments through `first(index, start, piece)`, then each of `stages`, each stage a
    segment behind the one before it; what is left in flight then drains in order."""
    queues: list[list] = [[] for _ in range(len(stages) + 1)]
    start = 0
    for i, piece in enumerate(x.split(lengths)):
        queues[0].append(first(i, start, piece))
        start += piece.numel()
        for j, stage in enumerate(stages):
            if len(queues[j]) > 1:
                queues[j + 1].append(stage(queues[j].pop(0)))
    for j, stage in enumerate(stages):
        queues[j + 1].extend(stage(seg) for seg in queues[j])


def allgather_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    transport: Transport,
    buffers: dict | None = None,
    segment: int | None = None,
    name: str = "distq",
) -> tuple[Tensor, Traffic]:
    """Σ over ranks of Q(x_rank), by all-gathering every rank's payload. Overwrites x with it."""
    traffic, n = Traffic(), transport.size

    def send(i: int, start: int, piece: Tensor) -> _Segment:
        payload = _compress(piece, compressor, key, transport, traffic, f"{name}.{i}", start)
        gathered = _buffer(buffers, f"allgather-{i}", payload, n * payload.numel())
        pending = transport.all_gather(payload, gathered, f"{name}.{i}.allgather")
        traffic.both((n - 1) * payload.numel())
        return _Segment(i, start, piece, payload, pending)

    def decode(seg: _Segment) -> None:
        compressor.decode_sum_into(seg.pending.wait().view(n, -1), seg.piece, key=key)

    segment = segment if pipelined(compressor) else None
    _pipeline(x, segment_lengths(x.numel(), compressor.wire.chunk_unit(), segment), send, decode)
    return x, traffic


def scatter_lengths(total: int, n: int, compressor: Compressor, segment: int | None) -> list[int]:
    """`scatter`'s segments of a padded tensor of `total` elements: n whole chunks each (one
    segment unless the compressor is `pipelined`)."""
    unit = n * compressor.wire.chunk_unit()
    return segment_lengths(total, unit, segment if pipelined(compressor) else None)


def scatter_chunks(
    work: Tensor,
    compressor: Compressor,
    key: Key,
    transport: Transport,
    traffic: Traffic,
    owner: Callable,
    *after: Callable,
    buffers: dict | None = None,
    segment: int | None = None,
    name: str = "distq",
) -> None:
    """`scatter`'s first two stages over work's `scatter_lengths` segments: chunk j of each
    segment is encoded and sent to rank j (all-to-all; with a `pipelined` compressor this rank's
    own chunk never leaves and stays exact), then, when the rows arrive,
    `owner(seg, received [n, P], mine, skip)` runs on this rank's chunk `mine` (skip: the row to
    leave out, its own, or None), then each of `after` on what it returns, a stage apart."""
    n, rank, wire = transport.size, transport.rank, compressor.wire
    own_exact = pipelined(compressor)

    def send_chunks(i: int, start: int, piece: Tensor) -> _Segment:
        """Encode the n chunks as [n, P] rows, row j a valid payload of chunk j with the codes it
        has in the whole tensor, and start the all-to-all."""
        chunk = piece.numel() // n
        if own_exact:  # row `rank` stays unset: it only goes to this rank, which keeps it exact
            rows = piece.new_empty((n, wire.payload_nbytes(chunk)), dtype=torch.uint8)
            for lo, hi in ((0, rank), (rank + 1, n)):  # the chunks before and after this rank's
                if hi > lo:
                    part, at = piece[lo * chunk : hi * chunk], start + lo * chunk
                    compressor.compress_rows(part, hi - lo, key, at, out=rows[lo:hi])
        else:
            payload = _compress(piece, compressor, key, transport, traffic, f"{name}.{i}", start)
            codes = payload[: wire.code_nbytes(n * chunk)].view(n, -1)
            scales = payload[wire.code_nbytes(n * chunk) :]
            # bucket_size None: one scale for the whole tensor, and every chunk carries it
            scales = scales.view(n, -1) if wire.bucket_size else scales.view(1, -1).expand(n, -1)
            rows = torch.cat([codes, scales], dim=1)
        received = _buffer(buffers, f"scatter-received-{i}", rows, rows.numel())
        pending = transport.all_to_all(rows.reshape(-1), received, f"{name}.{i}.alltoall")
        traffic.both((n - 1) * rows.shape[1])
        return _Segment(i, start, piece, rows, pending)

    def receive(seg: _Segment):
        chunk = seg.piece.numel() // n
        mine = seg.piece[rank * chunk : (rank + 1) * chunk]
        received = seg.pending.wait().view(n, -1)
        return owner(seg, received, mine, rank if own_exact else None)

    lengths = scatter_lengths(work.numel(), n, compressor, segment)
    _pipeline(work, lengths, send_chunks, receive, *after)


def scatter_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    transport: Transport,
    buffers: dict | None = None,
    errors: dict | None = None,
    segment: int | None = None,
    name: str = "distq",
) -> tuple[Tensor, Traffic]:
    """Σ over ranks of x by `scatter`. Works in x itself when it already has `working_length`
    (overwriting it), else in a padded copy; returns a view of its first x.numel() elements."""
    n, rank, numel = transport.size, transport.rank, x.numel()
    total = working_length(numel, n, compressor, "scatter")
    work = x if numel == total else torch.cat([x, x.new_zeros(total - numel)])
    traffic = Traffic()
    requant = [0.0, 0.0]  # Σ‖Q(s) − s‖², Σ‖s‖² of this rank's owner chunks

    def reduce_own_chunk(seg: _Segment, received: Tensor, mine: Tensor, skip: int | None):
        """Add the received chunks into this rank's, re-quantize the sum, start the all-gather."""
        owner_key = Key(key.seed, key.step, rank, key.slot, phase=1)
        measured = requant if errors is not None else None
        payload = compressor.requantize_sum(
            received, mine, skip, key, owner_key, seg.start, measured
        )
        gathered = _buffer(buffers, f"scatter-gathered-{seg.index}", payload, n * payload.numel())
        pending = transport.all_gather(payload, gathered, f"{name}.{seg.index}.owners")
        traffic.both((n - 1) * payload.numel())
        return _Segment(seg.index, seg.start, seg.piece, payload, pending)

    def decode_all_chunks(seg: _Segment) -> None:
        compressor.decode_rows_into(seg.pending.wait().view(n, -1), seg.piece, key=key)

    scatter_chunks(
        work, compressor, key, transport, traffic, reduce_own_chunk, decode_all_chunks,
        buffers=buffers, segment=segment, name=name,
    )  # fmt: skip
    if errors is not None:
        errors["requant_relative_error"] = requant[0] / requant[1] if requant[1] else 0.0
    return work[:numel], traffic


def hierarchical_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    topology: Topology,
    buffers: dict | None = None,
    errors: dict | None = None,
    segment: int | None = None,
) -> tuple[Tensor, Traffic]:
    """`hierarchical`, in x; torch.distributed only (the node groups are torch process groups)."""
    traffic, local = Traffic(), topology.local_size
    fp_bytes = x.numel() * x.element_size()
    if local > 1:
        dist.all_reduce(x, group=topology.node_group)
        traffic.intra_node_sent += 2 * (local - 1) * fp_bytes // local
    if topology.is_leader and topology.num_nodes > 1:  # one node: nothing crosses a slow link
        leaders = TorchTransport(topology.leader_group)
        reduced, inter = scatter_sum(x, compressor, key, leaders, buffers, errors, segment)
        x.copy_(reduced)
        traffic.add(inter)
    if local > 1:
        dist.broadcast(x, src=topology.leader, group=topology.node_group)
        if topology.is_leader:
            traffic.intra_node_sent += (local - 1) * fp_bytes
    return x, traffic


def quantized_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    collective: str,
    group: dist.ProcessGroup | None = None,
    topology: Topology | None = None,
    *,
    inplace: bool = False,
    buffers: dict | None = None,
    errors: dict | None = None,
    segment: int | None = None,
    transport: Transport | None = None,
    name: str = "distq",
) -> tuple[Tensor, Traffic]:
    """The bit-identical Σ over ranks of (quantized) x by the named collective.

    Bytes move over `transport` (default: torch.distributed on `group`; `hierarchical` needs
    torch.distributed, over `topology` or one discovered on `group`). inplace=True lets it work in
    x (with `working_length(...)` elements nothing else of its size is allocated); `buffers`
    caches receive buffers; a dict `errors` gets scatter's "requant_relative_error"; `segment`
    pipelines (None: one piece); `name` prefixes the operations' names (unique per call in flight).
    """
    collective_record(collective)  # refuses an unknown name
    if not inplace:
        x = x.clone()
    if collective == "hierarchical":
        if transport is not None and not isinstance(transport, TorchTransport):
            raise ValueError("collective 'hierarchical' needs torch.distributed process groups")
        topology = topology or Topology.discover(group)
        return hierarchical_sum(x, compressor, key, topology, buffers, errors, segment)
    transport = transport or TorchTransport(group)
    if collective == "allgather":
        return allgather_sum(x, compressor, key, transport, buffers, segment, name)
    return scatter_sum(x, compressor, key, transport, buffers, errors, segment, name)
