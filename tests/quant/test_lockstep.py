"""Sharded projections run together (`distq.quant.lockstep.in_lockstep`) on real gloo groups:
the same results as one after another, far fewer all-reduces carrying the same floats, and a
bad shard raised on every rank without leaving any rank waiting."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distq.quant import lockstep
from distq.quant.lockstep import in_lockstep
from distq.quant.sharded import project_shard, shard_rows
from tests.distributed import run_workers

# (rows, columns, scheme, options): the exact support's rounds, the approximate solver's row
# sums, a per-channel job without collectives, a gathered sparse one and row blocks
TENSORS = (
    (64, 300, "ternary", {}),
    (37, 29, "ternary", {}),
    (48, 20, "ternary-approx", {}),
    (40, 16, "linear", {"bits": 3, "blocks": 4}),
    (33, 12, "ternary", {"per_channel": True}),
    (30, 10, "ternary", {"sparsity": 0.5}),
    (3, 50, "ternary", {}),  # on 4 ranks the last shard is empty
)


# a transformer block's weights (q, k, v, out, fc, proj), exact ternary: every collective a sum
BLOCK = tuple((rows, cols, "ternary", {}) for rows, cols in [(64, 64)] * 4 + [(256, 64), (64, 256)])


def _jobs(rank: int, world: int, bad: int | None = None, tensors=TENSORS) -> list:
    """One projection job per `tensors` entry (this rank's shard); tensor `bad` holds a NaN on
    rank 1."""
    jobs = []
    for i, (rows, cols, scheme, options) in enumerate(tensors):
        g = torch.Generator().manual_seed(100 + i)
        w = torch.randn(rows, cols, generator=g) * 0.3
        d = torch.rand(rows, cols, generator=g) ** 2 + 1e-3
        if i == bad and rank == 1:
            w[-1, -1] = float("nan")  # in rank 1's rows
        start, stop = shard_rows(rows, rank, world)
        piece, curvature = w[start:stop], d[start:stop]
        opts = dict(options)
        bits = opts.pop("bits", None)
        jobs.append(
            lambda p=piece, c=curvature, s=scheme, b=bits, o=opts, r=rows: project_shard(
                p, c, s, b, rows=r, **o
            )
        )
    return jobs


def _counted(calls: list[int], run):
    """run() with dist.all_reduce recording each call's element count in `calls`."""
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        return run()
    finally:
        dist.all_reduce = original


def _together_as_apart(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    per_job = [[] for _ in TENSORS]
    apart = [_counted(calls, job) for calls, job in zip(per_job, _jobs(rank, world), strict=True)]
    together_calls: list[int] = []
    together = _counted(together_calls, lambda: in_lockstep(_jobs(rank, world)))
    for i, (a, b) in enumerate(zip(apart, together, strict=True)):
        if world == 2:  # two addends: every float64 sum is the same whichever buffer holds it
            assert torch.equal(a.q, b.q) and torch.equal(a.alpha, b.alpha), (rank, TENSORS[i])
        else:  # ring all-reduces of other lengths add in another order: α to rounding
            assert torch.equal(torch.sign(a.q), torch.sign(b.q)), (rank, TENSORS[i])
            assert torch.allclose(a.alpha, b.alpha, rtol=1e-6, atol=1e-12), (rank, TENSORS[i])
    assert sum(together_calls) == sum(map(sum, per_job))  # the same floats travel
    # a round per collective of the longest job, an all-reduce per op (sum, max, min) in it
    longest = max(map(len, per_job))
    assert longest <= len(together_calls) <= 2 * longest
    assert len(together_calls) < sum(map(len, per_job))

    per_job = [[] for _ in BLOCK]
    for calls, job in zip(per_job, _jobs(rank, world, tensors=BLOCK), strict=True):
        _counted(calls, job)
    together_calls = []
    _counted(together_calls, lambda: in_lockstep(_jobs(rank, world, tensors=BLOCK)))
    assert len(together_calls) == max(map(len, per_job)), (together_calls, per_job)


@pytest.mark.parametrize("world", [2, 4])
def test_projections_together_equal_projections_apart_in_fewer_all_reduces(world):
    run_workers(_together_as_apart, world)


def _bad_shard(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match=r"non-finite|other rank"):
        in_lockstep(_jobs(rank, world, bad=1))
    # the group is still usable and in step: the next round of projections agrees
    results = in_lockstep(_jobs(rank, world))
    alpha = results[0].alpha.clone()
    everyone = [torch.empty_like(alpha) for _ in range(world)]
    dist.all_gather(everyone, alpha)
    assert all(torch.equal(a, alpha) for a in everyone)


def test_a_bad_shard_is_raised_on_every_rank_and_the_others_finish():
    run_workers(_bad_shard, 2)


def test_outside_a_group_jobs_run_in_order_and_errors_keep_their_order():
    order: list[int] = []

    def job(i: int):
        def run():
            order.append(i)
            if i in (2, 4):
                raise KeyError(i)
            return i * i

        return run

    assert in_lockstep([job(0)]) == [0]
    with pytest.raises(KeyError) as raised:
        in_lockstep([job(i) for i in range(6)])
    assert raised.value.args == (2,)  # the first failing job's error, not the first to fail
    assert sorted(order) == [0, 0, 1, 2, 3, 4, 5]


def test_gradient_mode_follows_the_caller():
    x = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        out = in_lockstep([lambda: x * 2, lambda: x * 3])
    assert not any(t.requires_grad for t in out)
    out = in_lockstep([lambda: x * 2, lambda: x * 3])
    assert all(t.requires_grad for t in out)


def test_a_failed_merged_collective_is_raised_and_every_job_ends():
    """Outside a process group the merged all-reduce fails: the caller gets torch's error and
    every job waiting on that round ends (none is left blocked)."""
    assert not dist.is_initialized()
    ended: list[str] = []

    def job(i: int):
        def run():
            try:
                lockstep.all_reduce(torch.ones(i + 1))
            except RuntimeError as exc:  # the round's failure, in each job
                ended.append(type(exc.__cause__).__name__)
                raise

        return run

    with pytest.raises(ValueError, match="process group"):
        in_lockstep([job(i) for i in range(3)])
    assert ended == ["ValueError"] * 3
