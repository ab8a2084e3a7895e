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

COLLECTIVES = ("allgather", "scatter", "hierarchical")
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


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def _compress(
    x: Tensor, compressor: Compressor, key: Key, group, traffic: Traffic, start: int = 0
) -> Tensor:
    """Compress x (element `start` of its tensor); with a shared-scale wire format the scales
    are max-reduced across the group."""
    if not compressor.wire.shared_scale:
        return compressor.compress(x, key, start=start)
    scales = group_scales(compressor.scales(x, key), group)
    n = group_size(group)
    traffic.sent += 2 * (n - 1) * scales.numel() * 4 // n
    traffic.received += 2 * (n - 1) * scales.numel() * 4 // n
    return compressor.compress(x, key, scales, start=start)


def group_scales(scales: Tensor, group) -> Tensor:
    """Per-bucket scales max-reduced over the group (TernGrad's shared scale); a NaN on any
    rank stays NaN (MAX drops NaN, so it travels as inf)."""
    scales = torch.where(torch.isnan(scales), torch.inf, scales)
    dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=group)
    return torch.where(torch.isinf(scales), torch.nan, scales)


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
    group=None,
    buffers: dict | None = None,
    segment: int | None = None,
) -> tuple[Tensor, Traffic]:
    """Σ over ranks of Q(x_rank), by all-gathering every rank's payload. Overwrites x with it.

    With `segment`, x goes in segments of about that many elements: segment i+1 is encoded
    while segment i is on the wire and decoded while segment i+2 is, with the same codes as
    in one piece (the noise is indexed by element)."""
    traffic = Traffic()
    n = group_size(group)
    if not pipelined(compressor):
        segment = None
    in_flight: list = []

    def finish(gathered: Tensor, work, piece: Tensor, _payload: Tensor) -> None:
        work.wait()
        compressor.decode_sum_into(gathered.view(n, -1), piece)

    start = 0
    lengths = segment_lengths(x.numel(), compressor.wire.chunk_unit(), segment)
    for i, piece in enumerate(x.split(lengths)):
        payload = _compress(piece, compressor, key, group, traffic, start)
        start += piece.numel()
        gathered = _buffer(buffers, f"allgather-{i}", payload, n * payload.numel())
        work = dist.all_gather_single(gathered, payload, group=group, async_op=True)
        traffic.sent += (n - 1) * payload.numel()
        traffic.received += (n - 1) * payload.numel()
        in_flight.append((gathered, work, piece, payload))  # the payload lives until it is sent
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
    """One segment of a pipelined `scatter_sum` between its stages, with the tensors its
    in-flight collective reads or writes (kept alive until that completes)."""

    index: int
    start: int  # offset of the segment in the padded tensor
    piece: Tensor  # the segment: n chunks, the result is decoded into it
    sent: Tensor
    received: Tensor
    work: dist.Work


def scatter_sum(
    x: Tensor,
    compressor: Compressor,
    key: Key,
    group=None,
    buffers: dict | None = None,
    errors: dict | None = None,
    segment: int | None = None,
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
    traffic = Traffic()
    n, rank, numel = group_size(group), dist.get_rank(group), x.numel()
    total = working_length(numel, n, compressor, "scatter")
    work = x if numel == total else torch.cat([x, x.new_zeros(total - numel)])
    unit = n * compressor.wire.chunk_unit()
    lengths = segment_lengths(total, unit, segment if pipelined(compressor) else None)
    requant = [0.0, 0.0]  # Σ‖Q(s) − s‖², Σ‖s‖² of this rank's owner chunks
    exchanging: list[_ScatterSegment] = []
    gathering: list[_ScatterSegment] = []

    def reduce_own_chunk(seg: _ScatterSegment) -> _ScatterSegment:
        """Wait for the all-to-all, sum this rank's chunk, re-quantize it, start all-gather."""
        seg.work.wait()
        chunk = seg.piece.numel() // n
        mine = seg.piece[rank * chunk : (rank + 1) * chunk]
        compressor.decode_sum_into(
            seg.received, mine, skip=rank if own_exact else None, accumulate=own_exact
        )
        owner_key = Key(key.seed, key.step, rank, key.slot, phase=1)
        owner_payload = compressor.compress(mine, owner_key, start=seg.start)
        if errors is not None:  # the second quantization's error, on this rank's chunks
            # (decoded by the kernel the all-gather stage uses: nothing new to compile)
            decoded = compressor.decode_rows_into(owner_payload.view(1, -1), torch.empty_like(mine))
            decoded.sub_(mine)
            requant[0] += float(torch.dot(decoded, decoded))
            requant[1] += float(torch.dot(mine, mine))
        gathered = _buffer(
            buffers, f"scatter-gathered-{seg.index}", owner_payload, n * owner_payload.numel()
        )
        handle = dist.all_gather_single(gathered, owner_payload, group=group, async_op=True)
        traffic.sent += (n - 1) * owner_payload.numel()
        traffic.received += (n - 1) * owner_payload.numel()
        return _ScatterSegment(seg.index, seg.start, seg.piece, owner_payload, gathered, handle)

    def decode_all_chunks(seg: _ScatterSegment) -> None:
        seg.work.wait()
        compressor.decode_rows_into(seg.received.view(n, -1), seg.piece)

    start = 0
    own_exact = keeps_own_chunk(compressor)
    for i, piece in enumerate(work.split(lengths)):
        chunk = piece.numel() // n
        if own_exact:
            send = first_stage_rows(piece, n, chunk, compressor, key, start, rank)
        else:
            payload = _compress(piece, compressor, key, group, traffic, start)
            send = _chunk_payloads(payload, n, chunk, compressor)
        received = _buffer(buffers, f"scatter-received-{i}", send, send.numel()).view_as(send)
        handle = dist.all_to_all_single(
            received.view(-1), send.reshape(-1), group=group, async_op=True
        )
        traffic.sent += (n - 1) * send.shape[1]
        traffic.received += (n - 1) * send.shape[1]
        exchanging.append(_ScatterSegment(i, start, piece, send, received, handle))
        start += piece.numel()
        if len(exchanging) > 1:
            gathering.append(reduce_own_chunk(exchanging.pop(0)))
        if len(gathering) > 1:
            decode_all_chunks(gathering.pop(0))
    gathering.extend(reduce_own_chunk(seg) for seg in exchanging)
    for seg in gathering:
        decode_all_chunks(seg)
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
    """Full-precision sum inside the node, quantized `scatter` across node leaders, broadcast.
    Overwrites x."""
    traffic = Traffic()
    node_sum = x
    local = topology.local_size
    if local > 1:
        dist.all_reduce(node_sum, group=topology.node_group)
        fp_bytes = node_sum.numel() * node_sum.element_size()
        traffic.intra_node_sent += 2 * (local - 1) * fp_bytes // local
    if topology.is_leader and topology.num_nodes > 1:  # one node: nothing crosses a slow link
        reduced, inter = scatter_sum(
            node_sum, compressor, key, topology.leader_group, buffers, errors, segment
        )
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
) -> tuple[Tensor, Traffic]:
    """The bit-identical Σ over ranks of (quantized) x by the named collective.

    inplace=True lets the collective use x as its scratch space (x is overwritten and the
    result may share its memory): with `working_length(...)` elements nothing else of the
    gradient's size is allocated but one decoded row at a time. `buffers` caches the receive
    buffers between calls. If `errors` is a dict, the relative error of the second
    quantization (scatter's owner step) is stored in it as "requant_relative_error".
    `segment` (elements) pipelines the exchange: see `scatter_sum`; None sends x in one piece.
    """
    if collective not in COLLECTIVES:
        raise ValueError(f"collective {collective!r}; allowed: {', '.join(COLLECTIVES)}")
    if not inplace:
        x = x.clone()
    if collective == "allgather":
        return allgather_sum(x, compressor, key, group, buffers, segment)
    if collective == "scatter":
        return scatter_sum(x, compressor, key, group, buffers, errors, segment)
    topology = topology or Topology.discover(group)
    return hierarchical_sum(x, compressor, key, topology, buffers, errors, segment)
