"""FSDP2 with distq's quantized reduce-scatter (`distq.comm.fsdp`), on real gloo groups of 2 and 4
processes: shards bit-identical to a recomputation from every rank's inputs, bytes as the wire
format says, unbiased, AVG = SUM, bad ops and non-finite gradients refused alike, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from distq.comm.exchange import ExchangeSettings
from distq.comm.fsdp import QuantizedReduceScatter, Segment, shard_model
from distq.comm.noise import Key
from tests.distributed import run_workers


class Recorder(ReduceScatter):
    """Delegates to a QuantizedReduceScatter and keeps each call's input, output and key step."""

    def __init__(self, inner: QuantizedReduceScatter) -> None:
        self.inner, self.calls = inner, []

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        step = self.inner.exchange.steps.get(self.inner.slot, 0)
        x = input_tensor.clone()
        self.inner(output_tensor, input_tensor, group, op, async_op)
        self.calls.append((x, output_tensor.clone(), step, op))


def _mlp(width: int = 300) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, width), nn.ReLU(), nn.Linear(width, 10))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 24, generator=g)
    return x, x[:, :10].argmax(1)


def _loss(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = _batch(rank, step)
    return nn.functional.cross_entropy(model(x), y)


def _gather(t: torch.Tensor, n: int) -> torch.Tensor:
    out = t.new_empty(n * t.numel())
    dist.all_gather_into_tensor(out, t.reshape(-1))
    return out.view(n, *t.shape)


def _reference(inputs, layout, settings, compressor, step, slot, n, segments):
    """Every shard recomputed from all ranks' inputs: each parameter's columns clipped at
    clip·‖column block‖/√numel, rows padded to whole chunks, segment s holding columns
    c0..c0 + w at element offset `base`, chunk j of rank i ≠ j encoded at base + j·w under
    Key(seed, step, i, slot), decoded and added in rank order to x_j[j], divided by n."""
    length = inputs.shape[1] // n
    unit = compressor.wire.chunk_unit()
    padded = -(-length // unit) * unit
    xs = []
    for i in range(n):
        x = torch.zeros(n, padded)
        x[:, :length] = inputs[i].view(n, length)
        a = 0
        for seg in layout:
            b = a + seg.length
            r = torch.linalg.vector_norm(x[:, a:b], dtype=torch.float64) / math.sqrt(seg.numel)
            limit = settings.clip * float(r)
            x[:, a:b] = torch.clamp(x[:, a:b], -limit, limit)
            a = b
        xs.append(x)
    widths = [padded] if segments is None else segments
    shards = torch.empty(n, padded)
    for j in range(n):
        base = c0 = 0
        for w in widths:
            piece = xs[j][j, c0 : c0 + w].clone()
            rows = torch.zeros(n, compressor.wire.payload_nbytes(w), dtype=torch.uint8)
            for i in range(n):
                if i != j:
                    key = Key(settings.seed, step, i, slot)
                    rows[i] = compressor.compress(xs[i][j, c0 : c0 + w], key, start=base + j * w)
            key = Key(settings.seed, step, j, slot)
            compressor.decode_sum_into(rows, piece, skip=j, accumulate=True, key=key)
            shards[j, c0 : c0 + w] = piece.div_(n)
            base += n * w
            c0 += w
    return shards[:, :length]


def _replicates(rank, n, compressor, bits, segment, segments):
    options = dict(compressor=compressor, bits=bits, min_numel=0, seed=5, segment=segment)
    model, exchange = shard_model(_mlp(), **options)
    recorders = {}
    for name, rs in exchange.reduce_scatters.items():
        recorders[name] = Recorder(rs)
        model.get_submodule(name).set_custom_reduce_scatter(recorders[name])
    assert sorted(recorders) == ["0", "2"]  # the two Linear layers; the root has no parameters
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        loss = _loss(model, rank, step)
        loss.backward()
        opt.step()
        if step < 7:  # the last step's gradients are checked below
            opt.zero_grad()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    settings, comp = exchange.settings, exchange.compressor
    expected_sent = expected_fp32 = 0
    for name, rec in recorders.items():
        rs, module = rec.inner, model.get_submodule(name)
        assert len(rec.calls) == 8 and [c[2] for c in rec.calls] == list(range(8))
        for x, out, step, _ in rec.calls[:2] + rec.calls[-1:]:
            inputs, outputs = _gather(x, n), _gather(out, n)
            ref = _reference(inputs, rs.layout, settings, comp, step, rs.slot, n, segments(out))
            for j in range(n):
                assert torch.equal(ref[j], outputs[j]), (name, step, j)
        length = rec.calls[0][1].numel()
        unit = comp.wire.chunk_unit()
        padded = -(-length // unit) * unit
        chunks = segments(rec.calls[0][1]) or [padded]
        expected_sent += 8 * (n - 1) * sum(comp.wire.payload_nbytes(w) for w in chunks)
        expected_fp32 += 8 * (n - 1) * 4 * length
        # FSDP's sharded gradients (the last step's) are the output, parameter by parameter
        at, last = 0, rec.calls[-1][1]
        for seg, p in zip(rs.layout, module.parameters(), strict=True):
            grad = p.grad.to_local().reshape(-1)
            assert torch.equal(grad, last[at : at + grad.numel()])
            at += seg.length
        assert at == last.numel()
    stats = exchange.stats
    assert stats.bytes_sent == stats.bytes_received == expected_sent
    assert stats.fp32_reduce_scatter_bytes == expected_fp32
    assert stats.steps == 8 and stats.uncompressed_bytes_sent == 0


def _no_segments(out):
    return None


def _segments_of_512(out):
    """Column widths of the segments when segment=4·512 at 4 ranks of 512-element buckets."""
    length = out.numel()
    padded = -(-length // 512) * 512
    return [512] * (padded // 512)


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, compressor, bits, segment, segments",
    [(2, "quantize", 3, None, _no_segments), (4, "rotated", 2, 4 * 512, _segments_of_512)],
    ids=["2-ranks-quantize-3bit", "4-ranks-rotated-2bit-segmented"],
)
def test_shards_replicate_the_math_and_bytes(n, compressor, bits, segment, segments):
    """An MLP trains 8 Adam steps under shard_model; at three steps every rank's shard of both
    layers is bit-identical to the recomputation from all ranks' inputs (clip, keys, element
    offsets, rank-order decode, ÷ n), and the counted bytes are the wire format's payloads."""
    run_workers(_replicates, n, compressor, bits, segment, segments)


def _gradients(rank, n, force_sum):
    group = dist.group.WORLD if force_sum else None  # a process group, or FSDP's default mesh
    model, exchange = shard_model(_mlp(), mesh_or_group=group, bits=2, min_numel=0, seed=1)
    if force_sum:
        for name in exchange.reduce_scatters:
            model.get_submodule(name).set_force_sum_reduction_for_comms(True)
    _loss(model, rank, 0).backward()
    return [p.grad.to_local().clone() for p in model.parameters()]


def _ops_and_policies(rank, n):
    # AVG (FSDP's default) and SUM (force_sum_reduction: FSDP divides) give the same gradients
    avg, summed = _gradients(rank, n, False), _gradients(rank, n, True)
    assert all(torch.equal(a, b) for a, b in zip(avg, summed, strict=True))
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(rank)
    length = 2000
    x = (torch.randn(n * length, generator=g) * torch.linspace(0.1, 3, n * length)).contiguous()
    exact = _gather(x, n).double().sum(0).view(n, length)[rank] / n
    # refused reduce ops name themselves
    rs = QuantizedReduceScatter(ExchangeSettings(bits=2, clip=None, min_numel=0))
    out = torch.empty(length)
    with pytest.raises(ValueError, match="reduce op MAX; allowed: AVG, SUM"):
        rs(out, x, group, dist.ReduceOp.MAX)
    with pytest.raises(ValueError, match="PREMUL_SUM"):
        rs(out, x, group, dist._make_nccl_premul_sum(0.5))
    # unbiased: the error of the mean over K keys falls as 1/√K (E‖mean_K − exact‖² = e²/K), with
    # this rank's row exact (per-bucket scales) or quantized too (shared or per-chunk scales)
    for options in (dict(bits=2), dict(compressor="terngrad"), dict(bits=4, bucket_size=None)):
        probe = QuantizedReduceScatter(ExchangeSettings(clip=None, min_numel=0, **options))
        draws = []
        for _ in range(100):
            probe(out, x, group, dist.ReduceOp.AVG)
            draws.append(out.double().clone())
        draws = torch.stack(draws)
        single = float((draws - exact).pow(2).sum(1).mean().sqrt())
        ratios = {}
        for k in (4, 25, 100):
            ratios[k] = float((draws[:k].mean(0) - exact).norm()) * math.sqrt(k) / single
        assert all(0.75 < r < 1.25 for r in ratios.values()), (options, ratios)
    # under min_numel: fp32 reduce-scatter, counted as uncompressed
    fp32 = QuantizedReduceScatter(ExchangeSettings(min_numel=10**9))
    fp32(out, x, group, dist.ReduceOp.AVG)
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)
    assert fp32.exchange.stats.uncompressed_bytes_sent == (n - 1) * length * 4
    assert fp32.exchange.stats.bytes_sent == 0
    # a non-finite gradient on one rank: every rank raises, or every shard is NaN
    bad = x.clone()
    if rank == 1:
        bad[3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        rs(out, bad, group, dist.ReduceOp.AVG)
    propagate = QuantizedReduceScatter(ExchangeSettings(min_numel=0, nonfinite="propagate"))
    propagate(out, bad, group, dist.ReduceOp.AVG)
    assert torch.isnan(out).all()
    # 2 bits on a 256 → 512 layer: ≥ 12× fewer bytes than an fp32 reduce-scatter
    torch.manual_seed(0)
    model, exchange = shard_model(nn.Linear(256, 512), bits=2, min_numel=0)
    model(torch.randn(8, 256)).sum().backward()
    ratio = exchange.stats.fp32_reduce_scatter_bytes / exchange.stats.bytes_sent
    assert ratio >= 12, ratio
    # FSDP's divide factor turns the op into PREMUL_SUM: refused with the way out named
    model.set_gradient_divide_factor(4.0)
    with pytest.raises(ValueError, match="set_force_sum_reduction_for_comms"):
        model(torch.randn(8, 256)).sum().backward()


@pytest.mark.slow
def test_ops_unbiased_nonfinite_and_ratio():
    """2 ranks: AVG = SUM through FSDP (default mesh, and a mesh of the group); MAX and
    PREMUL_SUM refused by name; error of the mean over K keys × √K / single-draw error within
    0.75..1.25 for K = 4, 25, 100 (quantize, terngrad, one scale per chunk); the fp32 path below
    min_numel; a NaN on one rank raises on both (or NaNs both shards); 2-bit ≥ 12×."""
    run_workers(_ops_and_policies, 2)


def test_settings_refused_by_name():
    for options, named in (
        (dict(bits="auto"), "bits='auto'"),
        (dict(collective="allgather"), "collective='allgather'"),
        (dict(error_feedback=True), "error_feedback=True"),
        (dict(bits_by_name={"0.weight": 4}), "bits_by_name"),
    ):
        with pytest.raises(ValueError, match=named):
            QuantizedReduceScatter(ExchangeSettings(**options))
    with pytest.raises(TypeError, match="unknown exchange option 'bitz'"):
        shard_model(nn.Linear(2, 2), bitz=2)


def test_layout_must_cover_the_rows():
    rs = QuantizedReduceScatter(ExchangeSettings(), layout=[Segment("w", 3, 6)])
    with pytest.raises(ValueError, match=r"layout covers 3 elements a row .*rows have 4"):
        rs._limits(torch.zeros(2, 4))
