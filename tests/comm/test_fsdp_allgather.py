"""FSDP2's palette-coded weight all-gather (`distq.comm.fsdp_gather`), on real gloo groups of 2
and 4 processes: every rank's gathered parameters bit-identical to the full tensors (ternary,
m-bit per channel, raw biases/LayerNorm/fp32 layers, uneven and empty dim-0 shards, async),
outputs and gradients equal to FSDP's own all-gather, bytes as the format says, and replicas
that stay bit-identical over training steps with shard-local re-projection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin

from distq.comm.fsdp import shard_model
from distq.comm.fsdp_gather import HEADER, PackedAllGather, Shard, decode, encode
from distq.packing import packed_nbytes
from distq.quant import project
from tests.distributed import run_workers

BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
SETTINGS = dict(bits=2, min_numel=0, seed=3)  # the reduce-scatter both twins share


def _index_bytes(m: int, k: int) -> int:
    """The format's bytes for m palette indices in [0, k): none for k = 1; base-k digits for
    k = 3 (5 a byte), 5 and 6 (3 a byte); ⌈log2 k⌉-bit codes otherwise."""
    if k == 1:
        return 0
    digits = {3: 5, 5: 3, 6: 3}.get(k)
    return -(-m // digits) if digits else packed_nbytes(m, (k - 1).bit_length())


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view(BITS[x.element_size()])


def test_codec_round_trip_is_bit_exact_and_picks_the_smallest_form():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    odd = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -(2.0**-149)] * 9)
    odd[2::7] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)  # NaN payload
    cases = [
        (project(w, scheme="ternary").q, 1, 1),  # one α: one palette of 3
        (project(w, scheme="ternary", per_channel=True).q, 32, 64),  # α per row: row palettes
        (project(w, scheme="linear", bits=3, per_channel=True).q, 32, 64),
        (project(w, scheme="binary").q, 32, 1),  # rows found first, mapped into one palette
        (project(w, scheme="linear", bits=3).q, 32, 1),
        (torch.zeros(100), 1, 1),  # k = 1: no index bytes
        (w, 32, 0),  # 2048 distinct values: raw
        (odd, 1, 1),
        (odd.double(), 1, 1),
        (odd.bfloat16(), 1, 1),
    ]
    for x, row, groups in cases:
        bits = _bits(x)
        got, payload = encode(bits, row)
        out = torch.empty_like(bits)
        decode(payload, got, out)
        assert torch.equal(out, bits) and got == groups, (x.dtype, row, got)
        if got:
            ks = [len(torch.unique(g)) for g in bits.view(got, -1)]  # bit patterns per group
            index = _index_bytes(bits.numel(), max(ks))
            assert payload.numel() == got + sum(ks) * x.element_size() + index
            assert payload.numel() < bits.numel() * x.element_size()
        else:
            assert payload.numel() == bits.numel() * x.element_size()
    with pytest.raises(ValueError, match="palette segment of 14 bytes; its counts say 5"):
        decode(torch.zeros(14, dtype=torch.uint8), 1, torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="packed has 2 bytes but 4 base-3 digits need 1"):
        three = torch.tensor([2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
        decode(three, 1, torch.empty(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="raw segment of 3 bytes for 1 values of 4 bytes"):
        decode(torch.zeros(3, dtype=torch.uint8), 0, torch.empty(1, dtype=torch.int32))
    ag = PackedAllGather([Shard("w", 3, 3), Shard("b", 2, 1)])
    with pytest.raises(ValueError, match=r"layout covers 5 elements \(w: 3, b: 2\).* has 6"):
        ag._segments(6)


def _model() -> nn.Module:
    """A ternary (one α) layer, a LayerNorm, a 3-bit per-channel layer of 7 rows (uneven shards)
    and an fp32 layer of 3 rows (an empty shard at 4 ranks); every bias raw."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(24, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 7), nn.ReLU(), nn.Linear(7, 3)
    )
    with torch.no_grad():
        m[0].weight.copy_(project(m[0].weight, scheme="ternary").q)
        m[3].weight.copy_(project(m[3].weight, scheme="linear", bits=3, per_channel=True).q)
        m[1].weight.normal_()
        m[1].bias.normal_()
    return m


def _capture(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded parameters each FSDP module sees in forward, recorded by a pre-hook."""
    seen = {}
    for i in ("0", "1", "3", "5"):
        layer = model.get_submodule(i)

        def hook(mod, args, i=i):
            for name, p in mod.named_parameters():
                seen[f"{i}.{name}"] = p.detach().clone()

        layer.register_forward_pre_hook(hook)
    return seen


def _agree(ok: bool) -> bool:
    """Whether `ok` holds on every rank: each rank asserts the same, so none is left waiting in
    a collective for a rank that failed."""
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class CountingAllGather(DefaultAllocMixin, AllGather):
    """FSDP's all-gather as torch runs it, counting (n − 1)·input bytes per call."""

    def __init__(self) -> None:
        self.bytes_sent = 0

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.bytes_sent += (group.size() - 1) * input_tensor.numel() * input_tensor.element_size()
        return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


def _same_everywhere(t: torch.Tensor, n: int) -> bool:
    out = t.new_empty(n * t.numel())
    dist.all_gather_single(out, t.reshape(-1).contiguous())
    rows = _bits(out).view(n, -1)
    return all(torch.equal(rows[r], rows[0]) for r in range(n))


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full tensor, built from all shards by DTensor's own all-gather."""
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def _check_step(model, twin, seen, rank, n, step):
    """One forward/backward of both twins: gathered = full tensors, on every rank; outputs and
    gradient shards equal. Returns the loss."""
    full = _full(model)
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(100 * step + rank))
    out, ref = model(x), twin(x)
    assert _agree(torch.equal(out, ref)), step
    for name, t in full.items():
        assert _agree(torch.equal(_bits(seen[name]), _bits(t))), (name, step)
        assert _same_everywhere(seen[name], n), (name, step)
    loss = out.square().mean()
    loss.backward()
    twin_loss = ref.square().mean()
    twin_loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert _agree(torch.equal(p.grad.to_local(), q.grad.to_local())), (name, step)
    return float(loss.detach())


def _exact(rank, n):
    model, exchange = shard_model(_model(), **SETTINGS)
    twin, twin_exchange = shard_model(_model(), weights="fp32", **SETTINGS)
    assert sorted(exchange.all_gathers) == ["0", "1", "3", "5"] and not twin_exchange.all_gathers
    model._set_unshard_async_op(True)  # FSDP's pre-forward/backward all-gathers run async
    seen = _capture(model)
    _check_step(model, twin, seen, rank, n, 0)
    # which form each segment took on this rank: palettes for the quantized weights, raw else
    rows3 = model[3].weight.to_local().shape[0]
    forms = {name: ag.last_groups for name, ag in exchange.all_gathers.items()}
    expected = {"0": [1, 0], "1": [0, 0], "3": [rows3 if rows3 > 1 else 1, 0], "5": [0, 0]}
    assert _agree(forms == expected), forms
    # an explicit async unshard decodes in wait()
    model[3].unshard(async_op=True).wait()
    assert _agree(torch.equal(model[3].weight.detach(), _full(twin)["3.weight"]))
    model[3].reshard()
    # PackedAllGather on its own (whole input one segment), sync and async: the output of
    # torch's all-gather bit for bit, for odd values and bf16 too
    group = dist.group.WORLD
    x = torch.randn(50, generator=torch.Generator().manual_seed(rank)).round()
    x[:4] = torch.tensor([-0.0, math.nan, math.inf, 1e-45])
    for t in (x, x.bfloat16(), x.double()):
        want = t.new_empty(n * t.numel())
        dist.all_gather_single(want, t)
        for async_op in (False, True):
            got = t.new_empty(n * t.numel())
            work = PackedAllGather()(got, t, group, async_op=async_op)
            assert isinstance(work, dist.Work) == async_op
            if work is not None:
                work.wait()
            assert _agree(torch.equal(_bits(got), _bits(want))), (t.dtype, async_op)
    # dim-0 padding: zero bits are rebuilt as zeros; anything else (-0.0 here) is coded
    t = torch.randn(10, generator=torch.Generator().manual_seed(rank)).round()
    t[4:6] = torch.tensor([0.0, -0.0 if rank == 0 else 0.0])
    want = t.new_empty(n * 10)
    dist.all_gather_single(want, t)
    got = t.new_empty(n * 10)
    padded = PackedAllGather([Shard("w", 6, 4, 2), Shard("b", 4, 4)])
    padded(got, t, group)
    assert _agree(torch.equal(_bits(got), _bits(want)))
    with pytest.raises(ValueError, match=r"complex128 \(16 bytes\); allowed: element sizes 1, 2"):
        z = torch.zeros(2, dtype=torch.complex128)
        PackedAllGather()(z.new_empty(2 * n), z, group)


def _ratio(rank, n, per_channel):
    """A ternary Linear(256, 512) (one α, or one per row), one forward and backward: bytes per
    call = the format's; FSDP's all-gather of the same input counted on a weights='fp32' twin."""
    models = []
    for weights in ("packed", "fp32"):
        torch.manual_seed(0)
        layer = nn.Linear(256, 512)
        with torch.no_grad():
            layer.weight.copy_(project(layer.weight, scheme="ternary", per_channel=per_channel).q)
        models.append(shard_model(layer, weights=weights, **SETTINGS))
    (model, exchange), (twin, _) = models
    counting = CountingAllGather()
    twin.set_custom_all_gather(counting)
    x = torch.randn(8, 256)
    for net in (model, twin):
        net(x).sum().backward()
    w, b = model.weight.to_local(), model.bias.to_local()
    groups = w.shape[0] if per_channel else 1
    ks = [len(torch.unique(g)) for g in _bits(w).view(groups, -1)]  # bit patterns per group
    weight = groups + 4 * sum(ks) + -(-w.numel() // 5)  # 5 ternary indices a byte
    stats = exchange.gather_stats
    calls = stats.calls
    assert _agree(all(k == 3 for k in ks)), ks
    assert _agree(calls >= 1 and exchange.all_gathers[""].last_groups == [groups, 0]), calls
    assert _agree(stats.bytes_sent == calls * (n - 1) * (weight + 4 * b.numel())), stats
    assert _agree(stats.raw_bytes_sent == calls * (n - 1) * 4 * b.numel()), stats
    assert _agree(stats.header_bytes_sent == calls * (n - 1) * 2 * HEADER * 8), stats
    assert _agree(stats.default_all_gather_bytes == counting.bytes_sent), (stats, counting)
    assert _agree(counting.bytes_sent == calls * (n - 1) * 4 * (w.numel() + b.numel())), stats
    assert _agree(stats.compression_ratio >= 12), stats.compression_ratio
    return stats.compression_ratio


def _exact_and_ratios(rank, n, ratios):
    _exact(rank, n)
    got = (_ratio(rank, n, False), _ratio(rank, n, True))
    assert _agree(got == pytest.approx(ratios, abs=5e-4)), got


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, ratios", [(2, (18.542, 15.031)), (4, (18.463, 14.990))], ids=["2-ranks", "4-ranks"]
)
def test_gathered_weights_exact_and_bytes(n, ratios):
    """Forward and backward with async all-gathers: gathered parameters = DTensor's full tensors,
    bit for bit, on every rank; outputs and gradients = FSDP's own all-gather's; segment forms
    (palette, row palettes, raw, empty shard); standalone sync/async vs torch's all-gather;
    ternary Linear(256, 512) bytes = the format's, ratios to FSDP's all-gather measured."""
    run_workers(_exact_and_ratios, n, ratios)


def _train(rank, n):
    model, exchange = shard_model(_model(), **SETTINGS)
    twin, _ = shard_model(_model(), weights="fp32", **SETTINGS)
    seen = _capture(model)
    quantized = {"0.weight": dict(scheme="ternary"), "3.weight": dict(scheme="linear", bits=3)}
    latent = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    losses = []
    for step in range(4):
        losses.append(_check_step(model, twin, seen, rank, n, step))
        with torch.no_grad():  # both twins' gradients are equal (checked): one update each
            for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
                latent[name] -= 0.05 * p.grad.to_local()
                new = latent[name]
                if name in quantized and new.numel():  # this rank's rows re-projected
                    new = project(new, per_channel=True, **quantized[name]).q
                for shard in (p.to_local(), q.to_local()):
                    shard.copy_(new)
                p.grad = q.grad = None
    assert _agree(all(math.isfinite(v) for v in losses)), losses
    rows = model[0].weight.to_local().shape[0]
    assert _agree(exchange.all_gathers["0"].last_groups[0] == rows)  # α per row: row palettes


@pytest.mark.slow
def test_training_replicas_stay_bit_identical():
    """4 steps at 2 ranks of a quantized reduce-scatter + packed all-gather, every rank
    re-projecting its own rows (per-channel ternary and 3-bit) each step: the gathered weights
    equal DTensor's full tensors and are bit-identical on every rank, and outputs and gradients
    equal a twin on FSDP's own all-gather, at every step."""
    run_workers(_train, 2)
