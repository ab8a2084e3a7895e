"""`transport_sum` (the Horovod path) over a gloo-backed Transport equals distq's
torch.distributed collectives bit for bit: same codec, chunks, keys and decoding order."""

import os

import pytest
import torch
import torch.distributed as dist

from distq.comm import Key, make_compressor, quantized_sum, terngrad
from distq.comm.transport import Transport, transport_sum
from tests.distributed import run_workers

pytestmark = pytest.mark.slow
os.environ.setdefault("DISTQ_COMPILE", "0")  # spawned workers inherit it: fast start-up


def gloo_transport() -> Transport:
    n = dist.get_world_size()

    def all_gather(t, _name):
        out = t.new_empty(n * t.numel())
        dist.all_gather_single(out, t)
        return out

    def all_to_all(t, _name):
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t)
        return out

    return Transport(dist.get_rank(), n, all_gather, all_to_all)


def worker(rank, world, out_dir):
    transport = gloo_transport()
    x = torch.randn(5000, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
    x[7] = 40.0  # one large entry: clipping-free, stresses the per-bucket scale
    results = {}
    for name, compressor in [
        ("2-bit", make_compressor("quantize", 2, 512)),
        ("3-bit, one scale", make_compressor("quantize", 3, None)),
        ("terngrad", terngrad()),
    ]:
        for collective in ("allgather", "scatter"):
            key = Key(seed=1, step=3, rank=rank, slot=16)
            expected, traffic = quantized_sum(x, compressor, key, collective)
            got, got_traffic = transport_sum(x, compressor, key, collective, transport, "t")
            # a shared scale is all-gathered ((n-1)·4 bytes a scale), not ring-all-reduced
            scales = compressor.wire.buckets(x.numel()) if compressor.wire.shared_scale else 0
            extra = (world - 1) * 4 * scales - 2 * (world - 1) * 4 * scales // world
            results[f"{name}/{collective}"] = (
                torch.equal(got, expected), got_traffic.sent == traffic.sent + extra
            )
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_transport_sum_equals_the_torch_distributed_collectives(tmp_path, world):
    run_workers(worker, world, tmp_path)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        bad = {k: v for k, v in results.items() if v != (True, True)}
        assert not bad, f"rank {rank}: (values equal, bytes equal) = {bad}"
