"""Quantized sum-reductions: every rank ends with the same, bit-identical result.

- `allgather`: each rank compresses its tensor once; payloads are all-gathered, decoded and
  summed in rank order. Sent per rank: (n−1)·P, P = payload of the whole tensor.
- `scatter` (bandwidth-optimal): the tensor is cut into n chunks (padded so a chunk is whole
  buckets and whole bytes); chunk j of every rank goes to rank j (all-to-all), which decodes and
  sums it in rank order, re-quantizes the sum exactly as its peers will decode it, and the
  owners' payloads are all-gathered. Sent per rank: 2(n−1)·P/n, independent of n.
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


def _compress(x: Tensor, compressor: Compressor, key: Key, group, traffic: Traffic) -> Tensor:
    """Compress x; with a shared-scale wire format the scales are max-reduced across the group."""
    if not compressor.wire.shared_scale:
        return compressor.compress(x, key)
    scales = compressor.scales(x, key)
    scales = torch.where(torch.isnan(scales), torch.inf, scales)  # MAX drops NaN: carry it as inf
    dist.all_reduce(scales, op=dist.ReduceOp.MAX, group=group)
    n = group_size(group)
    traffic.sent += 2 * (n - 1) * scales.numel() * 4 // n
    traffic.received += 2 * (n - 1) * scales.numel() * 4 // n
    return compressor.compress(x, key, torch.where(torch.isinf(scales), torch.nan, scales))


def _decode_sum(rows: Tensor, compressor: Compressor, numel: int) -> Tensor:
    """Σ_i decode(rows[i]) accumulated in row (rank) order."""
    total = compressor.decompress(rows[0], numel)
    for row in rows[1:]:
        total += compressor.decompress(row, numel)
    return total


def allgather_sum(
    x: Tensor, compressor: Compressor, key: Key, group=None
) -> tuple[Tensor, Traffic]:
    """Σ over ranks of Q(x_rank), by all-gathering every rank's payload."""
    traffic = Traffic()
    n = group_size(group)
    payload = _compress(x, compressor, key, group, traffic)
    gathered = payload.new_empty(n * payload.numel())
    dist.all_gather_single(gathered, payload, group=group)
    traffic.sent += (n - 1) * payload.numel()
    traffic.received += (n - 1) * payload.numel()
    return _decode_sum(gathered.view(n, -1), compressor, x.numel()), traffic


def chunk_length(numel: int, n: int, compressor: Compressor) -> int:
    """Elements per rank's chunk in `scatter`: ≥ numel/n, a multiple of whole buckets and bytes."""
    unit = compressor.wire.chunk_unit()
    return max(1, -(-numel // (n * unit))) * unit


def _chunk_payloads(payload: Tensor, n: int, chunk: int, compressor: Compressor) -> Tensor:
    """[n, P] rows, row j a valid payload of chunk j (its codes and its buckets' scales)."""
    wire = compressor.wire
    codes = payload[: wire.code_nbytes(n * chunk)].view(n, -1)
    scales = payload[wire.code_nbytes(n * chunk) :]
    # bucket_size None: one scale for the whole tensor, and every chunk carries it
    scales = scales.view(1, -1).expand(n, -1) if wire.bucket_size is None else scales.view(n, -1)
    return torch.cat([codes, scales], dim=1)


def scatter_sum(x: Tensor, compressor: Compressor, key: Key, group=None) -> tuple[Tensor, Traffic]:
    """Σ over ranks of x by quantized reduce-scatter (all-to-all), re-quantize, all-gather."""
    traffic = Traffic()
    n, rank = group_size(group), dist.get_rank(group)
    chunk = chunk_length(x.numel(), n, compressor)
    padded = torch.cat([x, x.new_zeros(n * chunk - x.numel())])
    send = _chunk_payloads(_compress(padded, compressor, key, group, traffic), n, chunk, compressor)
    row_bytes = send.shape[1]
    received = torch.empty_like(send)
    dist.all_to_all_single(received.view(-1), send.reshape(-1), group=group)
    traffic.sent += (n - 1) * row_bytes
    traffic.received += (n - 1) * row_bytes

    mine = _decode_sum(received, compressor, chunk)
    owner_key = Key(key.seed, key.step, rank, key.slot, phase=1)
    owner_payload = compressor.compress(mine, owner_key)
    gathered = owner_payload.new_empty(n * owner_payload.numel())
    dist.all_gather_single(gathered, owner_payload, group=group)
    traffic.sent += (n - 1) * owner_payload.numel()
    traffic.received += (n - 1) * owner_payload.numel()
    rows = gathered.view(n, -1)
    total = torch.cat([compressor.decompress(rows[j], chunk) for j in range(n)])
    return total[: x.numel()], traffic


def hierarchical_sum(
    x: Tensor, compressor: Compressor, key: Key, topology: Topology
) -> tuple[Tensor, Traffic]:
    """Full-precision sum inside the node, quantized `scatter` across node leaders, broadcast."""
    traffic = Traffic()
    node_sum = x.clone()
    local = topology.local_size
    if local > 1:
        dist.all_reduce(node_sum, group=topology.node_group)
        fp_bytes = node_sum.numel() * node_sum.element_size()
        traffic.intra_node_sent += 2 * (local - 1) * fp_bytes // local
    if topology.is_leader and topology.num_nodes > 1:  # one node: nothing crosses a slow link
        node_sum, inter = scatter_sum(node_sum, compressor, key, topology.leader_group)
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
) -> tuple[Tensor, Traffic]:
    """Dispatch to the named collective: the bit-identical Σ over ranks of (quantized) x."""
    if collective == "allgather":
        return allgather_sum(x, compressor, key, group)
    if collective == "scatter":
        return scatter_sum(x, compressor, key, group)
    if collective == "hierarchical":
        return hierarchical_sum(x, compressor, key, topology or Topology.discover(group))
    raise ValueError(f"collective {collective!r}; allowed: {', '.join(COLLECTIVES)}")
