"""The rotated quantizer (`distq.comm.rotation`): the transform against the Hadamard matrix, codes
against a brute-force encoder, unbiasedness (over the rotation for the deterministic variant, over
the rounding noise for the stochastic one), its error per bit against the Gaussian theory, the
batched calls against payload-by-payload ones, and the exchange across real gloo processes."""

from __future__ import annotations

import math
import os

import pytest
import torch

from distq.comm import ExchangeSettings, Key
from distq.comm.rotation import RotatedQuantizer, hadamard, hadamard_factors
from distq.theory.rotation import lloyd_max, lloyd_max_distortion
from tests.distributed import run_workers


def sylvester(width: int) -> torch.Tensor:
    """The Walsh–Hadamard matrix by Sylvester's construction (Kronecker powers of H_2)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < width:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("width", [8, 64, 512, 4096])
def test_the_transform_is_the_hadamard_matrix_and_exact_on_integers(width):
    """H_a ⊗ H_b by two products equals Sylvester's matrix; on integers below 2^24/w it is exact,
    so any batch of rows (another kernel blocking) gives the very same bits."""
    outer, inner = hadamard_factors(width)
    x = torch.randn(5, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    assert torch.allclose(hadamard(x, outer.double(), inner.double()), x @ sylvester(width).T)
    g = torch.Generator().manual_seed(1)
    integers = torch.randint(-(2**24) // width, 2**24 // width, (37, width), generator=g).float()
    exact = (integers.double() @ sylvester(width).T).float()
    assert torch.equal(hadamard(integers, outer, inner), exact)
    assert torch.equal(hadamard(integers[3:4], outer, inner), exact[3:4])


def test_the_wire_levels_are_lloyd_max_to_within_their_grid():
    for bits in (1, 2, 3, 4):
        q = RotatedQuantizer(bits, 4096)
        exact = torch.tensor(lloyd_max(bits)[0])
        grid = q.levels[0] / q.integer_levels[0]
        assert grid <= 2**-9 and (torch.tensor(q.levels) - exact).abs().max() <= grid / 2 + 1e-7


def brute_force(x: torch.Tensor, q: RotatedQuantizer, key: Key) -> torch.Tensor:
    """EDEN's deterministic variant written out with the matrix: rotate, nearest Lloyd–Max level,
    unbiasing scale, rotate back (float64)."""
    width = q.wire.bucket_size
    rotation = sylvester(width) * q.signs(key).double() / math.sqrt(width)  # H·D/√w
    levels = torch.tensor(q.levels, dtype=torch.float64)  # Lloyd–Max's, on the wire's grid
    out = []
    for bucket in x.double().view(-1, width):
        y = rotation @ bucket
        sigma = y.norm() / math.sqrt(width)
        c = levels[(y[:, None] / sigma - levels[None, :]).abs().argmin(dim=1)]
        out.append(rotation.T @ (c * y.dot(y) / y.dot(c)))
    return torch.cat(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_deterministic_codes_equal_the_brute_force_encoder(bits):
    q = RotatedQuantizer(bits, 64)
    x = torch.randn(64 * 6, generator=torch.Generator().manual_seed(bits))
    key = Key(seed=3, step=bits, rank=1, slot=2)
    decoded = q.decompress(q.compress(x, key), x.numel(), key)
    assert torch.allclose(decoded.double(), brute_force(x, q, key), atol=1e-4)


def test_every_rank_and_phase_rotates_alike_and_steps_differ():
    q = RotatedQuantizer(2, 512)
    base = q.signs(Key(seed=1, step=4, rank=0, slot=2))
    assert torch.equal(base, q.signs(Key(seed=1, step=4, rank=7, slot=2, phase=1)))
    assert not torch.equal(base, q.signs(Key(seed=1, step=5, rank=0, slot=2)))
    assert not torch.equal(base, q.signs(Key(seed=1, step=4, rank=0, slot=3)))
    assert set(base.tolist()) == {-1.0, 1.0} and abs(float(base.mean())) < 0.2


def vnmse(q: RotatedQuantizer, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """(mean of the decoded x over `steps` keys, mean ‖x̂ − x‖²/‖x‖²)."""
    total, error = torch.zeros_like(x, dtype=torch.float64), 0.0
    for step in range(steps):
        key = Key(seed=5, step=step)
        decoded = q.decompress(q.compress(x, key), x.numel(), key).double()
        total += decoded
        error += float((decoded - x).square().sum() / x.double().square().sum())
    return total / steps, error / steps


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_deterministic_error_per_bit_is_the_gaussian_law_and_unbiased(bits):
    """vNMSE on a Gaussian vector within 10% of D_b/(1 − D_b) (a finite-width approximation); the
    mean over 400 rotations approaches x (its error falls as 1/steps for an unbiased code)."""
    x = torch.randn(64 * 64, generator=torch.Generator().manual_seed(0))
    q = RotatedQuantizer(bits, 64)
    mean, measured = vnmse(q, x, 400)
    law = lloyd_max_distortion(bits) / (1 - lloyd_max_distortion(bits))
    assert measured == pytest.approx(law, rel=0.10)
    bias = float((mean - x).square().sum() / x.double().square().sum())
    assert bias < 3 * measured / 400  # an unbiased mean of 400 draws: E = vNMSE/400


def test_stochastic_variant_is_unbiased_for_a_fixed_rotation():
    """Ranks share the rotation but not the rounding noise: over 3000 ranks of one step the mean
    code equals x within 4 standard errors of the exact per-element variance."""
    q = RotatedQuantizer(2, 64, stochastic=True)
    x = torch.randn(128, generator=torch.Generator().manual_seed(1)) * 3
    draws = torch.stack(
        [q.decompress(q.compress(x, Key(seed=2, step=9, rank=r)), x.numel(), Key(seed=2, step=9))
         for r in range(3000)]
    ).double()  # fmt: skip
    standard_error = draws.std(dim=0) / math.sqrt(draws.shape[0])
    z = (draws.mean(dim=0) - x.double()) / standard_error.clamp_min(1e-9)
    assert z.abs().max() < 4.5
    assert (draws.std(dim=0) > 0).sum() > 100  # it does draw


def test_stochastic_beats_max_scaled_stochastic_per_bit():
    """At 2 bits the rotated stochastic code's vNMSE on a Student-t(3) vector is below the
    unrotated max-scaled quantizer's (the rotation flattens the heavy tail)."""
    from distq.comm import StochasticQuantizer

    torch.manual_seed(4)
    x = torch.distributions.StudentT(3.0).sample((512 * 16,))
    _, rotated = vnmse(RotatedQuantizer(2, 512, stochastic=True), x, 20)
    plain = StochasticQuantizer(2, 512)
    error = 0.0
    for step in range(20):
        decoded = plain.decompress(plain.compress(x, Key(seed=5, step=step)), x.numel())
        error += float((decoded - x).square().sum() / x.square().sum()) / 20
    assert rotated < error / 3


def test_a_partial_bucket_is_sent_whole():
    q = RotatedQuantizer(3, 512)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    payload = q.compress(x, Key())
    assert payload.numel() == q.wire.payload_nbytes(1000) == 2 * 512 * 3 // 8 + 2 * 4
    decoded = q.decompress(payload, 1000, Key())
    assert float((decoded - x).square().sum() / x.square().sum()) < 0.1


def test_pieces_get_the_whole_tensors_codes_and_batched_calls_agree():
    """compress of whole-bucket pieces at their `start` equals the slices of the whole payload;
    compress_rows / decode_rows_into / decode_sum_into equal payload-by-payload calls."""
    for stochastic in (False, True):
        q = RotatedQuantizer(2, 64, stochastic=stochastic)
        x = torch.randn(4 * 192, generator=torch.Generator().manual_seed(3))
        key = Key(seed=1, step=2, rank=1)
        rows = q.compress_rows(x, 4, key)
        pieces = [q.compress(piece, key, start=i * 192) for i, piece in enumerate(x.view(4, -1))]
        assert torch.equal(rows, torch.stack(pieces))
        decoded = torch.cat([q.decompress(p, 192, key) for p in pieces])
        assert torch.equal(q.decode_rows_into(rows, torch.empty(4 * 192), key=key), decoded)
        summed = q.decode_sum_into(rows, torch.ones(192), skip=2, accumulate=True, key=key)
        expected = 1 + decoded.view(4, -1)[[0, 1, 3]].sum(dim=0)
        assert torch.allclose(summed, expected, atol=1e-5)


def test_a_non_finite_bucket_decodes_to_nan_and_leaves_the_others():
    q = RotatedQuantizer(2, 64)
    x = torch.randn(192)
    x[70] = float("inf")
    decoded = q.decompress(q.compress(x, Key()), 192, Key())
    assert torch.isnan(decoded[64:128]).all() and torch.isfinite(decoded[:64]).all()
    assert torch.isfinite(decoded[128:]).all()


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"bits=5 for the rotated quantizer; allowed: 1\.\.4"):
        RotatedQuantizer(5)
    with pytest.raises(ValueError, match=r"bucket_size=100 .* power of two"):
        RotatedQuantizer(2, 100)
    with pytest.raises(ValueError, match=r"compressor 'rotated', which sends 1\.\.4 bit"):
        ExchangeSettings(compressor="rotated", bits=8)
    with pytest.raises(ValueError, match="needs the encode call's key"):
        q = RotatedQuantizer(2, 64)
        q.decompress(q.compress(torch.ones(64), Key()), 64)


WORLD = 3
SETTINGS = {"rotated-2": (2, False), "rotated-4": (4, False), "rotated-stochastic-2": (2, True)}


def exchange_worker(rank, world_size, out_dir):
    os.environ["DISTQ_COMPILE"] = "0"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch import nn

    from distq.comm import QuantizedCommState, quantized_hook, quantized_sum

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5000, generator=g) * (1 + rank)
    out = {"x": x}
    for name, (bits, stochastic) in SETTINGS.items():
        q = RotatedQuantizer(bits, 256, stochastic=stochastic)
        for coll in ("allgather", "scatter"):
            for segment in (None, 1536):
                y, traffic = quantized_sum(x, q, Key(step=1, rank=rank), coll, segment=segment)
                out[f"{name}-{coll}-{segment}"] = (y, traffic.sent)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 90), nn.Tanh(), nn.Linear(90, 5))
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    state = QuantizedCommState(compressor="rotated", min_numel=64, error_every=1)
    ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        ddp(torch.randn(16, 40, generator=g)).square().mean().backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    out["ddp"] = (gathered, state.stats.relative_error, state.stats.requant_relative_error)
    state.close()
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("rotated")
    run_workers(exchange_worker, WORLD, str(out_dir))
    return [torch.load(out_dir / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
def test_collectives_agree_bit_for_bit_and_sum_the_ranks(exchanged):
    """On 3 gloo ranks, allgather and scatter (one piece and segments) give every rank the very
    same sum, within 1.5x the error one quantization per stage of the exact sum makes (a rank
    missing from it would be 9/14 of the sum), with the bytes the wire format says."""
    exact = sum(out["x"] for out in exchanged)
    for name, (bits, stochastic) in SETTINGS.items():
        q = RotatedQuantizer(bits, 256, stochastic=stochastic)
        single = float((q.decompress(q.compress(exact, Key()), 5000, Key()) - exact).square().sum())
        single /= float(exact.square().sum())
        for coll, stages in (("allgather", 1), ("scatter", 2)):
            for segment in (None, 1536):
                results = [out[f"{name}-{coll}-{segment}"] for out in exchanged]
                assert all(torch.equal(results[0][0], r[0]) for r in results[1:])
                relative = float((results[0][0] - exact).square().sum() / exact.square().sum())
                assert relative < 1.5 * stages * single, (name, coll, segment, relative, single)
        if not stochastic:
            assert results[0][1] < (WORLD - 1) * q.wire.payload_nbytes(5000)  # scatter
        sent = exchanged[0][f"{name}-allgather-None"][1]
        assert sent == (WORLD - 1) * q.wire.payload_nbytes(5000)


@pytest.mark.slow
def test_the_ddp_hook_keeps_replicas_identical_and_measures_the_error(exchanged):
    replicas, first, second = exchanged[0]["ddp"]
    assert all(torch.equal(replicas[0], r) for r in replicas[1:])
    law = lloyd_max_distortion(2) / (1 - lloyd_max_distortion(2))
    assert 0.5 * law < first < 2 * law and 0.5 * law < second < 2 * law, (first, second)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [2, 3])
def test_the_owner_requantizes_in_the_rotated_domain(bits, stochastic):
    """`requantize_sum` sums the received ŷ and the owner's rotated chunk without un-rotating:
    the same codes as decoding, adding and encoding again (the generic path) up to float
    rounding, the same measured error, and `mine` left as it was."""
    from distq.comm.compressors import Compressor

    q = RotatedQuantizer(bits, 64, stochastic=stochastic)
    g = torch.Generator().manual_seed(bits)
    chunks = torch.randn(3, 256, generator=g)
    key, owner = Key(seed=1, step=3, slot=2), Key(seed=1, step=3, rank=1, slot=2, phase=1)
    received = torch.stack([q.compress(c, Key(1, 3, r, 2)) for r, c in enumerate(chunks)])
    mine = chunks[1].clone()
    rotated, generic = [0.0, 0.0], [0.0, 0.0]
    payload = q.requantize_sum(received, mine, 1, key, owner, 0, rotated)
    assert torch.equal(mine, chunks[1])
    expected = Compressor.requantize_sum(q, received, mine.clone(), 1, key, owner, 0, generic)
    ours, theirs = q.decompress(payload, 256, owner), q.decompress(expected, 256, owner)
    assert payload.numel() == expected.numel()
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()
    assert rotated[1] == pytest.approx(generic[1], rel=1e-5)
    assert rotated[0] == pytest.approx(generic[0], rel=1e-3)
