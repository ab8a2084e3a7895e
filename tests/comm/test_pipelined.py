"""Pipelined (segmented) exchanges across real gloo processes: `allgather` in segments gives the
very codes of one piece, `scatter` in segments stays unbiased, bit-identical on every rank and
sends the same bytes, and the DDP hook keeps replicas identical with small segments."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_workers

pytestmark = pytest.mark.slow

WORLD = 3
NUMEL = 7000  # padded to 3 chunks of 2560: segments of 1536 elements, the last one shorter
SEGMENT = 1024  # rounded up to one chunk unit of every rank: 3 x 512
T = 300


def inputs(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(NUMEL, generator=g) * (1 + rank)
    x[rank::113] *= 5.0
    return x


def worker(rank, world_size, out_dir):
    os.environ["DISTQ_COMPILE"] = "0"  # many small calls: eager kernels are faster
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch import nn

    from distq.comm import Key, QuantizedCommState, StochasticQuantizer, quantized_sum
    from distq.comm.hook import quantized_hook

    x = inputs(rank)
    out = {}
    for bits in (2, 8):
        q = StochasticQuantizer(bits, 512)
        for coll in ("allgather", "scatter"):
            for segment in (None, SEGMENT):
                runs, sent = [], []
                for t in range(T if bits == 2 else 1):
                    y, traffic = quantized_sum(x, q, Key(step=t, rank=rank), coll, segment=segment)
                    runs.append(y)
                    sent.append(traffic.sent)
                out[f"{bits}-{coll}-{segment}"] = torch.stack(runs)
                out[f"{bits}-{coll}-{segment}-sent"] = sent

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 90), nn.Tanh(), nn.Linear(90, 5))
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    state = QuantizedCommState(bits=2, min_numel=64, segment=SEGMENT, error_every=1)
    ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        opt.zero_grad()
        ddp(torch.randn(16, 40, generator=g)).square().mean().backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    out["ddp-replicas"] = gathered
    out["ddp-requant-error"] = state.stats.requant_relative_error
    state.close()
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("pipelined")
    run_workers(worker, WORLD, str(out_dir))
    return [torch.load(out_dir / f"{r}.pt") for r in range(WORLD)]


def test_segmented_allgather_gives_the_same_codes(outputs):
    for out in outputs:
        assert torch.equal(out[f"2-allgather-{SEGMENT}"], out["2-allgather-None"])


@pytest.mark.parametrize("coll", ["allgather", "scatter"])
def test_segments_send_the_same_bytes_and_agree_across_ranks(outputs, coll):
    for out in outputs:
        assert out[f"2-{coll}-{SEGMENT}-sent"] == out[f"2-{coll}-None-sent"]
    for out in outputs[1:]:
        assert torch.equal(out[f"2-{coll}-{SEGMENT}"], outputs[0][f"2-{coll}-{SEGMENT}"])


def test_segmented_scatter_puts_every_chunk_in_place(outputs):
    """8 bits: the sum is exact to within two quantizations of 1/127 of a bucket's scale."""
    total = sum(inputs(r) for r in range(WORLD))
    got = outputs[0][f"8-scatter-{SEGMENT}"][0]
    scale = max(inputs(r).abs().max() for r in range(WORLD))
    assert (got - total).abs().max() <= WORLD * scale / 127 + total.abs().max() / 127


def test_segmented_scatter_is_unbiased(outputs):
    """If E y = Σx, the mean of T iid calls misses it by ‖e‖²/T on average (e = one call's
    error); a bias b adds ‖b‖², which the factor-3 margin would not absorb."""
    total = sum(inputs(r) for r in range(WORLD))
    runs = outputs[0][f"2-scatter-{SEGMENT}"]
    per_call = (runs - total).square().sum(dim=1).mean()
    of_mean = (runs.mean(dim=0) - total).square().sum()
    assert of_mean <= 3 * per_call / T
    assert of_mean >= per_call / T / 3  # the calls really are independent draws


def test_ddp_hook_with_small_segments_keeps_replicas_identical(outputs):
    replicas = outputs[0]["ddp-replicas"]
    assert all(torch.equal(replicas[0], r) for r in replicas[1:])
    assert 0 < outputs[0]["ddp-requant-error"] < 4  # measured over every segment's chunk
