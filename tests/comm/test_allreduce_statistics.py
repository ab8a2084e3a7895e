"""`distq.comm.allreduce` across real gloo processes: unbiased for the mean over ranks with the
variance the theory predicts, bit-identical on every rank, clipping, dtypes and zeros.

One spawn per world size runs every scenario and saves each rank's outputs; the tests assert on
them in this process. Bounds are Bernstein's inequality at failure probability δ = 1e-9 per
element (see tests/comm/test_compressors.py): |Ȳ − EY| ≤ √(2VL/T) + 2ML/(3T), L = ln(2/δ), for T
iid outputs with variance ≤ V and |Y − EY| ≤ M. Keys vary with the step, so calls are iid.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from distq.comm import Key, StochasticQuantizer
from distq.comm.collectives import chunk_length
from tests.distributed import run_workers

pytestmark = pytest.mark.slow

BITS, BUCKET, K = 2, 512, 1  # allreduce's defaults: k = 2^(bits−1) − 1 = 1, levels {−s, 0, s}
NUMEL = 2000
T = 400  # allreduce calls per collective
T_CLIP = 200
CLIP = 2.5
WORLD_SIZES = (2, 3, 4)
EXTRAS = (2, 3)  # world sizes that also run the clip and dtype scenarios
DELTA = 1e-9
L = math.log(2 / DELTA)
EPS32 = 2.0**-24
TINY = 2.0**-19  # float32 slack relative to the scales summed (see test_compressors.py)
SHAPE = (30, 17)
COLLECTIVES = ("allgather", "scatter", "hierarchical")


def inputs(world_size: int) -> list[torch.Tensor]:
    """A different fixed tensor per rank: other spread, offset and outlier positions."""
    xs = []
    for r in range(world_size):
        g = torch.Generator().manual_seed(100 + r)
        x = torch.randn(NUMEL, generator=g) * (0.5 + 0.5 * r) + 0.2 * r
        x[r::97] *= 6.0  # outliers: bucket scales differ, and clipping has work to do
        x[11 + r :: 200] = 0.0
        xs.append(x)
    return xs


def worker(rank, world_size, out_dir, xs, extras):
    os.environ["DISTQ_COMPILE"] = "0"  # thousands of small calls: eager kernels are faster
    torch.set_num_threads(1)  # world_size processes share 2 cores
    from distq.comm import Key, allreduce

    x = xs[rank]
    before = x.clone()
    out = {}
    for coll in ("allgather", "scatter"):
        out[coll] = torch.stack(
            [
                allreduce(x, BITS, BUCKET, collective=coll, key=Key(step=t, rank=rank))
                for t in range(T)
            ]
        )
        if not extras:
            continue
        out[f"{coll}-clip"] = torch.stack(
            [
                allreduce(x, clip=CLIP, collective=coll, key=Key(seed=1, step=t, rank=rank))
                for t in range(T_CLIP)
            ]
        )
    out["hierarchical"] = torch.stack(
        [allreduce(x, collective="hierarchical", key=Key(step=t, rank=rank)) for t in range(2)]
    )
    for dtype in (torch.float32, torch.float16, torch.bfloat16) if extras else ():
        xd = x[: SHAPE[0] * SHAPE[1]].reshape(SHAPE).to(dtype)
        xd_before = xd.clone()
        for i, coll in enumerate(COLLECTIVES):
            key = Key(seed=2, step=i, rank=rank)
            out[f"{dtype}-{coll}"] = allreduce(xd, collective=coll, key=key)
            out[f"{dtype}-{coll}-zeros"] = allreduce(
                torch.zeros(SHAPE, dtype=dtype), collective=coll, key=key
            )
        out[f"{dtype}-untouched"] = torch.equal(xd, xd_before)
    out["untouched"] = torch.equal(x, before)
    torch.save(out, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results(world_size) -> (inputs, [outputs of rank 0, 1, ...]); one spawn per world size."""
    cache = {}

    def get(world_size):
        if world_size not in cache:
            out_dir = tmp_path_factory.mktemp(f"world{world_size}")
            xs = inputs(world_size)
            run_workers(worker, world_size, out_dir, xs, world_size in EXTRAS)
            cache[world_size] = (
                xs,
                [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)],
            )
        return cache[world_size]

    return get


# ----------------------------------------------------------------------------- theory helpers


def scales(x: torch.Tensor) -> torch.Tensor:
    """Per element: the max |x| of its bucket (float64)."""
    s = torch.stack([c.abs().max() for c in x.split(BUCKET)])
    return s.repeat_interleave(BUCKET)[: x.numel()].double()


def stage_variance(x: torch.Tensor) -> torch.Tensor:
    """Exact Var Q(x) per element for k = 1: s²·p(1−p), p = |x|/s, i.e. |x|(s − |x|)."""
    s, a = scales(x), x.abs().double()
    return torch.where(s > 0, a * (s - a), 0.0)


def owners(world_size: int) -> torch.Tensor:
    """Per element: the rank whose `scatter` chunk holds it."""
    chunk = chunk_length(NUMEL, world_size, StochasticQuantizer(BITS, BUCKET))
    return torch.arange(NUMEL) // chunk


def peer_variance(xs: list[torch.Tensor]) -> torch.Tensor:
    """scatter's first-stage variance of the mean: Σ over ranks but the element's owner of
    Var Q_r, / n² (the owner adds its own chunk unquantized)."""
    n = len(xs)
    var = torch.stack([stage_variance(x) for x in xs])
    var[owners(n), torch.arange(NUMEL)] = 0.0
    return var.sum(dim=0) / n**2


def scatter_reference(xs: list[torch.Tensor], step: int) -> torch.Tensor:
    """scatter's result computed in one process: owner j adds its peers' decoded chunks to its
    own exact chunk in rank order, re-quantizes the sum (phase 1), and everyone decodes it."""
    n, q = len(xs), StochasticQuantizer(BITS, BUCKET)
    chunk = chunk_length(NUMEL, n, q)
    padded = [torch.cat([x, x.new_zeros(n * chunk - NUMEL)]) for x in xs]
    out = []
    for j in range(n):
        part = slice(j * chunk, (j + 1) * chunk)
        m = padded[j][part].clone()
        for r in range(n):
            if r != j:
                codes = q.compress(padded[r][part], Key(0, step, r), start=j * chunk)
                m += q.decompress(codes, chunk)
        out.append(q.decompress(q.compress(m, Key(0, step, j, 0, phase=1)), chunk))
    return torch.cat(out)[:NUMEL] / n


def bernstein(var, bound, t):
    return torch.sqrt(2 * var * L / t) + 2 * bound * L / (3 * t)


def theory(xs: list[torch.Tensor], collective: str, t: int):
    """(exact mean, Bernstein half-width, exact variance or None) of the average of t outputs.

    allgather: Y = (1/n)Σ_r Q_r(x_r), so Var Y = (1/n²)Σ_r Var Q_r and |Y − EY| ≤ (1/n)Σ_r s_r.
    scatter: the owner re-quantizes m = x_owner + Σ_{r≠owner} Q_r(x_r), whose bucket max is at
    most S = Σ_r s_r, so Var Y ≤ (1/n²)(Σ_r Var Q_r + S²/4) and |Y − EY| ≤ 2S/n (exact variance
    unknown: None).
    """
    n = len(xs)
    mu = torch.stack([x.double() for x in xs]).mean(dim=0)
    S = torch.stack([scales(x) for x in xs]).sum(dim=0)
    var1 = torch.stack([stage_variance(x) for x in xs]).sum(dim=0) / n**2
    tiny = TINY * S
    if collective == "allgather":
        return mu, bernstein(var1, S / n, t) + tiny, var1
    return mu, bernstein(var1 + (S / K) ** 2 / 4 / n**2, 2 * S / (K * n), t) + tiny, None


def clipped(x: torch.Tensor) -> torch.Tensor:
    limit = CLIP * x.double().square().mean().sqrt().float()
    return x.clamp(-limit, limit)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("collective", ["allgather", "scatter"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_unbiased_mean_over_ranks(results, world_size, collective):
    xs, outs = results(world_size)
    y = outs[0][collective].double()  # [T, NUMEL]
    assert y.shape == (T, NUMEL)
    mu, limit, var = theory(xs, collective, T)
    mean = y.mean(dim=0)
    err = (mean - mu).abs()
    assert (err <= limit).all(), (
        f"worst excess {(err - limit).max():.3g} at {(err - limit).argmax()}"
    )
    if var is not None:  # allgather: z against the exact variance
        sd = torch.sqrt(var / T)
    else:  # scatter: z against the empirical spread of the T outputs
        sd = y.std(dim=0) / math.sqrt(T)
        # the variance is at least the first stage's and below the conservative bound
        var1 = theory(xs, "allgather", T)[2]
        S = torch.stack([scales(x) for x in xs]).sum(dim=0)
        emp = y.var(dim=0).sum()
        assert emp >= 0.9 * peer_variance(xs).sum()
        assert emp <= 1.1 * (var1 + (S / K) ** 2 / 4 / world_size**2).sum()
    noisy = sd > 10 * TINY * torch.stack([scales(x) for x in xs]).sum(dim=0)
    assert noisy.sum() >= 0.9 * NUMEL
    z2 = ((mean - mu)[noisy] / sd[noisy]) ** 2
    assert 0.75 <= z2.mean() <= 1.25, z2.mean()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_scatter_is_the_owners_exact_chunk_plus_peers_codes_requantized(results, world_size):
    """The documented algorithm, recomputed in one process: the owner's own chunk enters its sum
    unquantized (quantizing it too, as before, changes whole levels of the output)."""
    xs, outs = results(world_size)
    for step in range(3):
        expected = scatter_reference(xs, step)
        tol = 1e-5 * expected.abs().max()
        assert torch.allclose(outs[0]["scatter"][step], expected, rtol=0, atol=tol), step


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_call_is_bit_identical_on_all_ranks(results, world_size):
    _, outs = results(world_size)
    for key in outs[0]:
        for r in range(1, world_size):
            a, b = outs[0][key], outs[r][key]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (key, r)
    # the rounding noise changes from call to call
    assert len(outs[0]["scatter"].unique(dim=0)) == T
    assert all(o["untouched"] for o in outs)  # allreduce never writes into its input


@pytest.mark.parametrize("collective", ["allgather", "scatter"])
@pytest.mark.parametrize("world_size", EXTRAS)
def test_clip_gives_unbiased_mean_of_clipped_tensors(results, world_size, collective):
    xs, outs = results(world_size)
    y = outs[0][f"{collective}-clip"].double()
    cs = [clipped(x) for x in xs]
    assert all((c != x).sum() > 10 for c, x in zip(cs, xs, strict=True))
    mu_c, limit, _ = theory(cs, collective, T_CLIP)
    err = (y.mean(dim=0) - mu_c).abs()
    assert (err <= limit).all(), f"worst excess {(err - limit).max():.3g}"
    # the test can tell: the unclipped mean is far outside the bound on the clipped elements
    mu = torch.stack([x.double() for x in xs]).mean(dim=0)
    assert ((y.mean(dim=0) - mu).abs() > limit).sum() >= 10
    # clipping happened before quantization: every output within Σ_r max|clipped x_r| / n
    assert (y.abs().amax(dim=0) <= sum(c.abs().max() for c in cs) / world_size * (1 + 1e-6)).all()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_hierarchical_on_one_host_is_full_precision(results, world_size):
    xs, outs = results(world_size)
    h = outs[0]["hierarchical"].double()
    assert torch.equal(h[0], h[1])  # no rounding noise: the key does not matter
    stacked = torch.stack([x.double() for x in xs])
    mu = stacked.mean(dim=0)
    tol = 2 * world_size * EPS32 * stacked.abs().sum(dim=0) / world_size
    assert ((h[0] - mu).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world_size", EXTRAS)
def test_dtype_shape_and_zeros(results, world_size, dtype):
    xs, outs = results(world_size)
    small = [x[: SHAPE[0] * SHAPE[1]].reshape(SHAPE).to(dtype) for x in xs]
    total_scale = sum(x.abs().max().double() for x in small) / world_size
    for coll in COLLECTIVES:
        for suffix in ("", "-zeros"):
            res = outs[0][f"{dtype}-{coll}{suffix}"]
            assert res.dtype == dtype and res.shape == SHAPE, (coll, suffix)
            assert torch.isfinite(res).all()
        assert (outs[0][f"{dtype}-{coll}-zeros"] == 0).all(), coll
        res = outs[0][f"{dtype}-{coll}"].double()
        # an average of values decoded within each rank's scale (plus the dtype's rounding)
        assert (res.abs() <= total_scale * (1 + 2.0**-7)).all(), coll
        assert res.abs().max() > 0
    # on one host `hierarchical` is a float32 all-reduce: the exact mean up to the float32 sum
    # and one rounding to the output dtype (unit roundoff u; fp16 also has subnormals)
    stacked = torch.stack([x.double() for x in small])
    exact = stacked.mean(dim=0)
    hier = outs[0][f"{dtype}-hierarchical"].double()
    u = {torch.float32: EPS32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    tol = u * exact.abs() + 2 * EPS32 * stacked.abs().sum(dim=0) + 2.0**-25
    assert ((hier - exact).abs() <= tol).all()
    assert all(o[f"{dtype}-untouched"] for o in outs)
