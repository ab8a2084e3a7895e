"""DeepSpeed, Horovod and Lightning train the same quantized model with distq's exchange: 2
real ranks each, replicas bit-identical, loss tracking the plain-DDP distq run, bytes counted."""

from __future__ import annotations

import pytest
import torch

from distq.comm import StochasticQuantizer
from distq.comm.collectives import chunk_length

from .conftest import need, run_worker

pytestmark = pytest.mark.slow
WORLD = 2
STEPS = 30


def scatter_bytes_per_step(numel: int) -> int:
    """Bytes one rank sends per step for one bucket of `numel` elements: distq's packed 2-bit
    payload (codes + one fp32 scale per 512) of a chunk, twice (all-to-all, all-gather)."""
    compressor = StochasticQuantizer(2, 512)
    chunk = chunk_length(numel, WORLD, compressor)
    return 2 * (WORLD - 1) * compressor.wire.payload_nbytes(chunk)


def assert_identical_replicas(ranks: list[dict]) -> None:
    first, second = (r["state"] for r in ranks)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"replicas differ in {different}"


def assert_tracks(ranks: list[dict], reference: list[dict]) -> None:
    """Loss falls, and its last 10 steps stay within 10% of the DDP run's (rank 0's losses)."""
    losses, ref = ranks[0]["losses"], reference[0]["losses"]
    assert len(losses) == len(ref) == STEPS
    tail, ref_tail = sum(losses[-10:]) / 10, sum(ref[-10:]) / 10
    assert tail < 0.8 * losses[0]
    assert abs(tail - ref_tail) < 0.1 * ref_tail, (tail, ref_tail)


def assert_bytes(ranks: list[dict], quantized_steps: int) -> None:
    for r in ranks:
        stats, (numel,) = r["stats"], r["buckets"]
        assert stats["steps"] == quantized_steps
        assert stats["uncompressed_bytes_sent"] == 0
        assert stats["bytes_sent"] == quantized_steps * scatter_bytes_per_step(numel)
        assert stats["bytes_sent"] * 15 < quantized_steps * 2 * (WORLD - 1) * numel * 4 // WORLD


def test_ddp_reference(ddp_reference):
    assert_identical_replicas(ddp_reference)
    assert_bytes(ddp_reference, STEPS - 2)  # 2 fp32 warm-up steps while DDP rebuilds buckets


def test_deepspeed_stage0_trains_like_ddp(tmp_path, ddp_reference):
    need("deepspeed")
    ranks = run_worker("deepspeed", tmp_path)  # fails if the engine's own all-reduce runs
    assert_identical_replicas(ranks)
    assert_tracks(ranks, ddp_reference)
    assert_bytes(ranks, STEPS - 2)  # QuantizedCommState's start_iter=2 holds here too
    # one exchange thread: the buckets' (the DDP hook's own thread used to idle beside it)
    assert [r["comm_threads"] for r in ranks] == [1, 1]


def test_deepspeed_accumulation_and_clipping_act_on_the_averaged_gradient(tmp_path):
    need("deepspeed")
    clip = 0.05
    ranks = run_worker(
        "deepspeed-check", tmp_path, "--steps", "4", "--accumulation", "2",
        "--grad-clip", str(clip),
    )  # fmt: skip
    assert_identical_replicas(ranks)
    for r in ranks:
        # fp32 warm-up steps are exact; 8-bit steps are close to the fp32 mean over ranks
        # and micro-batches (so the accumulation averaged, and the exchange ran once a step)
        assert max(r["errors"][:2]) < 1e-5 and max(r["errors"][2:]) < 0.1, r["errors"]
        assert min(r["norms"]) > clip  # clipping was active ...
        assert max(r["clip_errors"]) < 1e-4  # ... and scaled the averaged gradient


def test_horovod_trains_like_ddp(tmp_path, ddp_reference):
    need("horovod.torch")
    ranks = run_worker("horovod", tmp_path)
    assert_identical_replicas(ranks)
    assert_tracks(ranks, ddp_reference)
    assert_bytes(ranks, STEPS - 2)  # start_iter=2: two fp32 warm-up steps, as under DDP


def test_horovod_has_the_hooks_features_and_overlaps_backward(tmp_path):
    """bits_by_name, keep masks, error sampling, gradient accumulation and the non-finite
    policy through Horovod; with overlap every bucket's exchange has started when backward
    returns (none without), and the result is bit-identical either way."""
    need("horovod.torch")
    ranks = run_worker("horovod-features", tmp_path, "--steps", "5")
    for overlapped in (True, False):
        states = [r[overlapped]["state"] for r in ranks]
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    for r in ranks:
        on, off = r[True], r[False]
        assert all(torch.equal(on["state"][k], off["state"][k]) for k in on["state"])
        assert on["buckets"] > 1 and on["started"] == [on["buckets"]] * 5
        assert off["started"] == [0] * 5
        assert 0 < on["relative_error"] < 2 and 0 < on["requant"] < 2
        assert on["bytes_sent"] == off["bytes_sent"] > 0
        assert on["raised"] and off["raised"]
        assert on["unsent_rows_unchanged"]  # the keep mask left them off the wire


@pytest.mark.parametrize("engine", ["lightning", "lightning-strategy"])
def test_lightning_ddp_strategy_trains_like_ddp(tmp_path, ddp_reference, engine):
    """QuantizedCommHook(**options) with DDPStrategy(), and DDPStrategy(ddp_comm_state=...,
    ddp_comm_hook=quantized_hook) itself, whose hook Lightning drops on CPU but the callback
    registers."""
    need("pytorch_lightning")
    ranks = run_worker(engine, tmp_path)
    assert_identical_replicas(ranks)
    assert_tracks(ranks, ddp_reference)
    assert_bytes(ranks, STEPS - 2)


def test_horovod_optimizer_refuses_contradictory_bits():
    """compressor='sign' sent 1 bit whatever `bits` said (checked before Horovod starts)."""
    need("horovod.torch")
    from distq.comm.horovod import DistributedOptimizer

    layer = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="bits=4 with compressor 'sign'"):
        DistributedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), bits=4, compressor="sign")
