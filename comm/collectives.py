"""Quantized sum-reductions: every rank ends with the same, bit-identical result.

- `allgather`: each rank compresses its tensor once; payloads are all-gathered, decoded and
  summed in rank order. Sent per rank: (n−1)·P, P = payload of the whole tensor.
- `scatter` (bandwidth-optimal): the tensor is cut into n chunks (padded so a chunk is whole
  buckets and whole bytes); chunk j of every rank goes to rank j (all-to-all), which adds the
  decoded chunks in rank order to its own chunk, re-quantizes the sum exactly as its peers will
  decode it, and the owners' payloads are all-gathered. Sent per rank: 2(n−1)·P/n, independent
  of n. The owner's own chunk never crosses the wire, so it enters the sum unquantized (when
  chunks compress independently: `keeps_own_chunk`): 1/n less codec work and first-stage noise.
- `hierarchical`: a full-precision all-reduce inside each node, `scatter` between one leader per
  node, and a broadcast inside the node: only quantized bytes cross between nodes.

Collectives read only the compressor's `WireFormat`, never its class. A NaN/Inf anywhere turns
the affected buckets into NaN on every rank alike (it travels as a NaN scale).
"""

from __future__ import annotations

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
    """Payload bytes this rank sent and received (quantized exchange), and full-precision bytes
    it sent inside its node (hierarchical only)."""

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
    """Per-bucket scales max-reduced over the ranks (TernGrad's shared scale); a NaN on any rank
    stays NaN."""
    traffic.both(transport.max_(scales, f"{name}.scales"))
    return scales


def _compress(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    transport: Transport,
    traffic: Traffic,
    name: str,
    start: int = 0,
) -> Tensor:
    """Compress x (element `start` of its tensor); with a shared-scale wire format the scales
    are max-reduced across the ranks first."""
    if not compressor.wire.shared_scale:
        return compressor.compress(x, key, start=start)
    scales = shared_scales(compressor.scales(x, key), transport, name, traffic)
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
    """Whether a tensor may be exchanged in segments that overlap one another on the wire.

    Not with one scale for the whole tensor (segments would each get their own) nor with error
    feedback (its residual belongs to the whole tensor)."""
    wire = compressor.wire
    return wire.bucket_size is not None and not wire.shared_scale and not compressor.stateful


def segment_lengths(numel: int, unit: int, segment: int | None) -> list[int]:
    """Lengths of consecutive segments covering `numel` elements, each but the last a multiple
    of `unit` of about `segment` elements (None or ≥ numel: one segment)."""
    if segment is None or numel <= segment:
        return [numel]
    step = max(1, segment // unit) * unit
    return [min(step, numel - s) for s in range(0, numel, step)]


def allgather_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    transport: Transport,
    buffers: dict | None = None,
    segment: int | None = None,
    name: str = "distq",
) -> tuple[Tensor, Traffic]:
    """Σ over ranks of Q(x_rank), by all-gathering every rank's payload. Overwrites x with it.

    With `segment`, x goes in segments of about that many elements: segment i+1 is encoded
    while segment i is on the wire and decoded while segment i+2 is, with the same codes as
    in one piece (the noise is indexed by element)."""
    traffic = Traffic()
    n = transport.size
    if not pipelined(compressor):
        segment = None
    in_flight: list[tuple[Pending, Tensor, Tensor]] = []

    def finish(pending: Pending, piece: Tensor, _payload: Tensor) -> None:
        compressor.decode_sum_into(pending.wait().view(n, -1), piece)

    start = 0
    lengths = segment_lengths(x.numel(), compressor.wire.chunk_unit(), segment)
    for i, piece in enumerate(x.split(lengths)):
        payload = _compress(piece, compressor, key, transport, traffic, f"{name}.{i}", start)
        start += piece.numel()
        gathered = _buffer(buffers, f"allgather-{i}", payload, n * payload.numel())
        pending = transport.all_gather(payload, gathered, f"{name}.{i}.allgather")
        traffic.both((n - 1) * payload.numel())
        in_flight.append((pending, piece, payload))  # the payload lives until it is sent
        if len(in_flight) > 1:
            finish(*in_flight.pop(0))
    for job in in_flight:
        finish(*job)
    return x, traffic


def keeps_own_chunk(compressor: Compressor) -> bool:
    """Whether `scatter` compresses chunk by chunk and leaves the owner's own chunk exact: only
    when chunks compress independently (per-bucket scales, none shared, no residual state)."""
    return pipelined(compressor)


def first_stage_rows(
    piece: Tensor, n: int, chunk: int, compressor: Compressor, key: Key, start: int, own: int
) -> Tensor:
    """[n, P] payload rows of `piece`'s n chunks for the all-to-all, row j a valid payload of
    chunk j with the codes it has in the whole tensor (`start` is piece's offset there). Row
    `own` is left unset: it only goes to this rank, which keeps that chunk exact."""
    rows = torch.empty(
        n, compressor.wire.payload_nbytes(chunk), dtype=torch.uint8, device=piece.device
    )
    for first, end in ((0, own), (own + 1, n)):  # the chunks before and after this rank's
        if end > first:
            compressor.compress_rows(
                piece[first * chunk : end * chunk],
                end - first,
                key,
                start + first * chunk,
                out=rows[first:end],
            )
    return rows


def chunk_length(numel: int, n: int, compressor: Compressor) -> int:
    """Elements per rank's chunk in `scatter`: ≥ numel/n, a multiple of whole buckets and bytes."""
    unit = compressor.wire.chunk_unit()
    return max(1, -(-numel // (n * unit))) * unit


def working_length(numel: int, n: int, compressor: Compressor, collective: str) -> int:
    """Length of the scratch buffer a collective works in without copying: for `scatter`, the
    tensor padded to n whole chunks; otherwise the tensor itself."""
    return n * chunk_length(numel, n, compressor) if collective == "scatter" else numel


def _chunk_payloads(payload: Tensor, n: int, chunk: int, compressor: Compressor) -> Tensor:
    """[n, P] rows, row j a valid payload of chunk j (its codes and its buckets' scales)."""
    wire = compressor.wire
    codes = payload[: wire.code_nbytes(n * chunk)].view(n, -1)
    scales = payload[wire.code_nbytes(n * chunk) :]
    # bucket_size None: one scale for the whole tensor, and every chunk carries it
    scales = scales.view(1, -1).expand(n, -1) if wire.bucket_size is None else scales.view(n, -1)
    return torch.cat([codes, scales], dim=1)


@dataclass
class _ScatterSegment:
    """One segment of a pipelined `scatter_sum` between its stages, with the payload its
    in-flight data movement reads (kept alive until that completes)."""

    index: int
    start: int  # offset of the segment in the padded tensor
    piece: Tensor  # the segment: n chunks, the result is decoded into it
    sent: Tensor
    pending: Pending


class _Scatter:
    """One `scatter_sum` call: its three stages (all-to-all of chunk payloads; sum, re-quantize
    and all-gather of this rank's chunk; decode of every chunk), run as a pipeline over
    segments."""

    def __init__(
        self,
        compressor: Compressor,
        key: Key,
        transport: Transport,
        buffers: dict | None,
        errors: dict | None,
        name: str,
    ) -> None:
        self.compressor, self.key, self.transport = compressor, key, transport
        self.buffers, self.errors, self.name = buffers, errors, name
        self.traffic = Traffic()
        self.own_exact = keeps_own_chunk(compressor)
        self.requant = [0.0, 0.0]  # Σ‖Q(s) − s‖², Σ‖s‖² of this rank's owner chunks

    def send_chunks(self, i: int, start: int, piece: Tensor) -> _ScatterSegment:
        """Encode the segment's n chunks and start the all-to-all."""
        n, rank, compressor = self.transport.size, self.transport.rank, self.compressor
        chunk = piece.numel() // n
        if self.own_exact:
            send = first_stage_rows(piece, n, chunk, compressor, self.key, start, rank)
        else:
            payload = _compress(
                piece, compressor, self.key, self.transport, self.traffic, f"{self.name}.{i}",
                start,
            )  # fmt: skip
            send = _chunk_payloads(payload, n, chunk, compressor)
        received = _buffer(self.buffers, f"scatter-received-{i}", send, send.numel())
        pending = self.transport.all_to_all(send.reshape(-1), received, f"{self.name}.{i}.alltoall")
        self.traffic.both((n - 1) * send.shape[1])
        return _ScatterSegment(i, start, piece, send, pending)

    def reduce_own_chunk(self, seg: _ScatterSegment) -> _ScatterSegment:
        """Wait for the all-to-all, sum this rank's chunk, re-quantize it, start all-gather."""
        n, rank, compressor = self.transport.size, self.transport.rank, self.compressor
        received = seg.pending.wait().view(n, -1)
        chunk = seg.piece.numel() // n
        mine = seg.piece[rank * chunk : (rank + 1) * chunk]
        compressor.decode_sum_into(
            received, mine, skip=rank if self.own_exact else None, accumulate=self.own_exact
        )
        key = self.key
        owner_payload = compressor.compress(
            mine, Key(key.seed, key.step, rank, key.slot, phase=1), start=seg.start
        )
        if self.errors is not None:
            self._measure_requantization(mine, owner_payload)
        gathered = _buffer(
            self.buffers, f"scatter-gathered-{seg.index}", owner_payload,
            n * owner_payload.numel(),
        )  # fmt: skip
        pending = self.transport.all_gather(
            owner_payload, gathered, f"{self.name}.{seg.index}.owners"
        )
        self.traffic.both((n - 1) * owner_payload.numel())
        return _ScatterSegment(seg.index, seg.start, seg.piece, owner_payload, pending)

    def _measure_requantization(self, mine: Tensor, owner_payload: Tensor) -> None:
        """The second quantization's error on this rank's chunk (decoded by the kernel the
        all-gather stage uses: nothing new to compile)."""
        decoded = self.compressor.decode_rows_into(
            owner_payload.view(1, -1), torch.empty_like(mine)
        )
        decoded.sub_(mine)
        self.requant[0] += float(torch.dot(decoded, decoded))
        self.requant[1] += float(torch.dot(mine, mine))

    def decode_all_chunks(self, seg: _ScatterSegment) -> None:
        self.compressor.decode_rows_into(
            seg.pending.wait().view(self.transport.size, -1), seg.piece
        )


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
    """Σ over ranks of x by quantized reduce-scatter (all-to-all), re-quantize, all-gather; the
    owner's own chunk stays exact where `keeps_own_chunk` allows.

    Works in x itself when it already has `working_length` (overwriting it), else in a padded
    copy; returns a view of the first x.numel() elements. With `segment`, the padded tensor is
    cut into segments of about that many elements (whole chunks of every rank) that move
    through the three stages as a pipeline: while one segment is on the wire, this rank
    encodes the next one and decodes the one before, so the codec's time hides behind the
    network's. The first encode's codes are those of the unsegmented tensor.
    """
    n, numel = transport.size, x.numel()
    total = working_length(numel, n, compressor, "scatter")
    work = x if numel == total else torch.cat([x, x.new_zeros(total - numel)])
    unit = n * compressor.wire.chunk_unit()
    lengths = segment_lengths(total, unit, segment if pipelined(compressor) else None)
    stages = _Scatter(compressor, key, transport, buffers, errors, name)
    exchanging: list[_ScatterSegment] = []
    gathering: list[_ScatterSegment] = []
    start = 0
    for i, piece in enumerate(work.split(lengths)):
        exchanging.append(stages.send_chunks(i, start, piece))
        start += piece.numel()
        if len(exchanging) > 1:
            gathering.append(stages.reduce_own_chunk(exchanging.pop(0)))
        if len(gathering) > 1:
            stages.decode_all_chunks(gathering.pop(0))
    gathering.extend(stages.reduce_own_chunk(seg) for seg in exchanging)
    for seg in gathering:
        stages.decode_all_chunks(seg)
    if errors is not None:
        done, norm = stages.requant
        errors["requant_relative_error"] = done / norm if norm else 0.0
    return work[:numel], stages.traffic


def hierarchical_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    topology: Topology,
    buffers: dict | None = None,
    errors: dict | None = None,
    segment: int | None = None,
) -> tuple[Tensor, Traffic]:
    """Full-precision sum inside the node, quantized `scatter` across node leaders, broadcast.
    Overwrites x. torch.distributed only (the node groups are torch process groups)."""
    traffic = Traffic()
    node_sum = x
    local = topology.local_size
    if local > 1:
        dist.all_reduce(node_sum, group=topology.node_group)
        fp_bytes = node_sum.numel() * node_sum.element_size()
        traffic.intra_node_sent += 2 * (local - 1) * fp_bytes // local
    if topology.is_leader and topology.num_nodes > 1:  # one node: nothing crosses a slow link
        leaders = TorchTransport(topology.leader_group)
        reduced, inter = scatter_sum(node_sum, compressor, key, leaders, buffers, errors, segment)
        node_sum.copy_(reduced)
        traffic.add(inter)
    if local > 1:
        dist.broadcast(node_sum, src=topology.leader, group=topology.node_group)
        if topology.is_leader:
            traffic.intra_node_sent += (local - 1) * node_sum.numel() * node_sum.element_size()
    return node_sum, traffic


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

    The bytes move over `transport` (default: torch.distributed on `group`; `hierarchical` is
    torch.distributed only, over `topology` or one discovered on `group`). inplace=True lets the
    collective use x as its scratch space (x is overwritten and the result may share its
    memory): with `working_length(...)` elements nothing else of the gradient's size is
    allocated but one decoded row at a time. `buffers` caches the receive buffers between calls.
    If `errors` is a dict, the relative error of the second quantization (scatter's owner step)
    is stored in it as "requant_relative_error". `segment` (elements) pipelines the exchange:
    see `scatter_sum`; None sends x in one piece. `name` prefixes the operations' names (unique
    per call in flight, for engines that match operations by name).
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
