"""`distq.comm.allreduce` on the inputs a user's own loop hands it: offset and extreme values,
integer tensors, one-rank groups, NaN on one rank, contradictory options, subgroups."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from distq.comm import SignCompressor, allreduce
from tests.distributed import run_workers

pytestmark = pytest.mark.slow
os.environ.setdefault("DISTQ_COMPILE", "0")  # spawned workers inherit it: fast start-up


def edges_worker(rank, world, out):
    found = {}
    g = torch.Generator().manual_seed(rank)
    offset = 3.0 + 0.1 * torch.randn(4096, generator=g)
    found["offset_mean"] = allreduce(offset, clip=2.5).mean().item()
    huge = torch.randn(4096, generator=g)
    huge[5] = 1e30
    found["huge_finite"] = bool(torch.isfinite(allreduce(huge, clip=2.5)).all())
    try:
        allreduce(torch.arange(1023))
    except TypeError as exc:
        found["integer"] = str(exc)
    try:
        allreduce(torch.randn(64), bits=4, compressor=SignCompressor())
    except ValueError as exc:
        found["contradiction"] = str(exc)
    found["sign_default_bits"] = allreduce(torch.randn(64), compressor=SignCompressor()).shape
    bad = torch.randn(4096, generator=g)
    if rank == 1:
        bad[7] = float("nan")
    try:
        allreduce(bad)
    except FloatingPointError as exc:
        found["nan_raised"] = str(exc)
    found["nan_propagated"] = bool(torch.isnan(allreduce(bad, nonfinite="propagate")).any())
    singles = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    x = torch.randn(1000, generator=g)
    found["one_rank_exact"] = torch.equal(allreduce(x, group=singles[rank]), x)
    torch.save(found, out / f"rank{rank}.pt")


def test_allreduce_edge_cases(tmp_path):
    run_workers(edges_worker, 2, tmp_path)
    for rank in range(2):
        found = torch.load(tmp_path / f"rank{rank}.pt")
        # clipping at c·std around zero sent the mean of 3 + noise to 0.25
        assert found["offset_mean"] == pytest.approx(3.0, abs=0.02)
        assert found["huge_finite"]  # √(E[x²] − E[x]²) in float32 made it all NaN
        assert "torch.int64" in found["integer"]
        assert "bits=4 contradicts compressor SignCompressor" in found["contradiction"]
        assert found["sign_default_bits"] == (64,)
        assert "non-finite" in found["nan_raised"]
        assert found["nan_propagated"]
        assert found["one_rank_exact"]  # it was quantized: relative error 1.27


def subgroup_worker(rank, world, out, with_subgroup_calls):
    """Ranks 0 and 1 make calls on their own subgroup first (or not): the world call's noise
    must not depend on it."""
    pair = dist.new_group([0, 1])
    if with_subgroup_calls and rank in (0, 1):
        for _ in range(3):
            allreduce(torch.randn(512), group=pair)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(rank))
    torch.save(allreduce(x), out / f"rank{rank}-{with_subgroup_calls}.pt")


def test_default_noise_key_counts_calls_per_group(tmp_path):
    """The default key counted every call of the process, so the world call after subgroup
    calls drew other noise on ranks 0-1 than the same call without them."""
    run_workers(subgroup_worker, 3, tmp_path, True)
    run_workers(subgroup_worker, 3, tmp_path, False)
    for rank in range(3):
        after = torch.load(tmp_path / f"rank{rank}-True.pt")
        alone = torch.load(tmp_path / f"rank{rank}-False.pt")
        assert torch.equal(after, alone)


def test_integer_tensor_refused_before_any_collective():
    with pytest.raises(TypeError, match=r"torch\.int32"):
        allreduce(torch.arange(4, dtype=torch.int32))
