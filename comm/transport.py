"""distq's `allgather` and `scatter` sums over any engine that can all-gather and all-to-all
uint8 tensors (Horovod), not only torch.distributed.

Same codec, same chunking and the same rank-order decoding as `distq.comm.collectives`, so the
result is bit-identical on every rank and equals what the torch.distributed path computes for
the same keys; only the two data movements are the engine's. A shared-scale wire format
(TernGrad) agrees on its scales by all-gathering them and taking the maximum locally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from distq.comm.collectives import (
    Traffic,
    _chunk_payloads,
    chunk_length,
    first_stage_rows,
    keeps_own_chunk,
)
from distq.comm.compressors import Compressor
from distq.comm.noise import Key

TRANSPORT_COLLECTIVES = ("allgather", "scatter")


@dataclass(frozen=True)
class Transport:
    """How bytes move: `all_gather(t, name)` concatenates every rank's equal-sized 1-D `t` in
    rank order; `all_to_all(t, name)` sends the j-th of `size` equal slices of 1-D `t` to rank j
    and returns what it received in rank order. `name` identifies the operation (Horovod
    matches operations across ranks by name)."""

    rank: int
    size: int
    all_gather: Callable[[Tensor, str], Tensor]
    all_to_all: Callable[[Tensor, str], Tensor]


def _compress(
    x: Tensor, compressor: Compressor, key: Key, transport: Transport, name: str, traffic: Traffic
) -> Tensor:
    if not compressor.wire.shared_scale:
        return compressor.compress(x, key)
    scales = compressor.scales(x, key)
    gathered = transport.all_gather(scales, f"{name}.scales").view(transport.size, -1)
    traffic.sent += (transport.size - 1) * scales.numel() * 4
    traffic.received += (transport.size - 1) * scales.numel() * 4
    return compressor.compress(x, key, gathered.amax(dim=0))  # amax keeps a NaN: all see it


def transport_sum(
    x: Tensor, compressor: Compressor, key: Key, collective: str, transport: Transport, name: str
) -> tuple[Tensor, Traffic]:
    """Σ over ranks of the quantized 1-D float32 x by `collective` ('allgather' or 'scatter');
    bit-identical on every rank. `name` must be the same on every rank and unique per call
    in flight. x is left unchanged."""
    if collective not in TRANSPORT_COLLECTIVES:
        raise ValueError(f"collective {collective!r}; allowed: {', '.join(TRANSPORT_COLLECTIVES)}")
    traffic = Traffic()
    n, numel = transport.size, x.numel()
    if collective == "allgather":
        payload = _compress(x, compressor, key, transport, name, traffic)
        gathered = transport.all_gather(payload, f"{name}.allgather").view(n, -1)
        traffic.sent += (n - 1) * payload.numel()
        traffic.received += (n - 1) * payload.numel()
        return compressor.decode_sum_into(gathered, torch.empty_like(x)), traffic

    rank, chunk = transport.rank, chunk_length(numel, n, compressor)
    work = torch.cat([x, x.new_zeros(n * chunk - numel)])
    own_exact = keeps_own_chunk(compressor)
    if own_exact:
        send = first_stage_rows(work, n, chunk, compressor, key, 0, rank)
    else:
        payload = _compress(work, compressor, key, transport, name, traffic)
        send = _chunk_payloads(payload, n, chunk, compressor)
    received = transport.all_to_all(send.reshape(-1), f"{name}.alltoall").view_as(send)
    traffic.sent += (n - 1) * send.shape[1]
    traffic.received += (n - 1) * send.shape[1]

    mine = work[rank * chunk : (rank + 1) * chunk]
    compressor.decode_sum_into(
        received, mine, skip=rank if own_exact else None, accumulate=own_exact
    )
    owner = compressor.compress(mine, Key(key.seed, key.step, rank, key.slot, phase=1))
    gathered = transport.all_gather(owner, f"{name}.owners").view(n, -1)
    traffic.sent += (n - 1) * owner.numel()
    traffic.received += (n - 1) * owner.numel()
    compressor.decode_rows_into(gathered, work)
    return work[:numel], traffic
