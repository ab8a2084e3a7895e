"""The collectives over another `Transport` (Horovod's way of moving bytes, emulated over gloo)
equal them over torch.distributed bit for bit, pipelined or not: the algorithm is written once
and only the data movements are the engine's."""

import os

import pytest
import torch
import torch.distributed as dist

from distq.comm import Key, make_compressor, quantized_sum, terngrad
from distq.comm.transport import Pending, Transport
from tests.distributed import run_workers

pytestmark = pytest.mark.slow
os.environ.setdefault("DISTQ_COMPILE", "0")  # spawned workers inherit it: fast start-up


class GatherTransport(Transport):
    """Horovod's way of moving bytes (`HorovodTransport`: shared scales all-gathered and
    max-reduced locally), over gloo, blocking: what an engine without in-place collectives
    gives the collectives."""

    def __init__(self) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, payload, out, name):
        fresh = payload.new_empty(self.size * payload.numel())
        dist.all_gather_single(fresh, payload)
        return Pending(lambda: fresh)

    def all_to_all(self, send, out, name):
        fresh = torch.empty_like(send)
        dist.all_to_all_single(fresh, send)
        return Pending(lambda: fresh)

    def max_(self, values, name):
        gathered = values.new_empty(self.size * values.numel())
        dist.all_gather_single(gathered, values)
        values.copy_(gathered.view(self.size, -1).amax(dim=0))
        return (self.size - 1) * values.numel() * 4

    def sum_(self, values, name):
        dist.all_reduce(values)


def worker(rank, world, out_dir):
    transport = GatherTransport()
    x = torch.randn(5000, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    x[7] = 40.0  # one large entry: clipping-free, stresses the per-bucket scale
    results = {}
    for name, compressor in [
        ("2-bit", make_compressor("quantize", 2, 512)),
        ("3-bit, one scale", make_compressor("quantize", 3, None)),
        ("terngrad", terngrad()),
    ]:
        for collective in ("allgather", "scatter"):
            for segment in (None, 1024):
                key = Key(seed=1, step=3, rank=rank, slot=16)
                expected, traffic = quantized_sum(x, compressor, key, collective, segment=segment)
                got, got_traffic = quantized_sum(
                    x, compressor, key, collective, segment=segment, transport=transport
                )
                # a shared scale is all-gathered ((n-1)·4 bytes a scale), not ring-all-reduced
                scales = compressor.wire.buckets(x.numel()) if compressor.wire.shared_scale else 0
                extra = (world - 1) * 4 * scales - 2 * (world - 1) * 4 * scales // world
                results[f"{name}/{collective}/{segment}"] = (
                    torch.equal(got, expected),
                    got_traffic.sent == traffic.sent + extra,
                )
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_over_another_transport_equal_torch_distributed(tmp_path, world):
    run_workers(worker, world, tmp_path)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        bad = {k: v for k, v in results.items() if v != (True, True)}
        assert not bad, f"rank {rank}: (values equal, bytes equal) = {bad}"
