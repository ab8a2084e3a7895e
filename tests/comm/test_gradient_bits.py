"""Gradient widths by sensitivity (comm/gradient_bits.py): the cost law against Monte Carlo of the
real compressor, the budget, the widths through a real 2-rank gloo DDP exchange, bad input."""

import gc
import itertools
import math
import os

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.comm import QuantizedCommState, quantized_hook
from distq.comm.compressors import StochasticQuantizer
from distq.comm.exchange import ExchangeSettings
from distq.comm.gradient_bits import (
    allocate_gradient_bits,
    bytes_sent,
    gradient_costs,
    gradient_costs_across,
    quantization_error,
)
from distq.comm.noise import Key
from distq.theory import lemma3_variance_bound, level_spacing
from tests.distributed import run_workers

os.environ.setdefault("DISTQ_COMPILE", "0")  # spawned workers inherit it: fast start-up


def heavy_tailed(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3) * 5


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_error_law_matches_monte_carlo_of_the_compressor(bits):
    """E Σ w(Q(x) − x)² of StochasticQuantizer, 3 buckets (the last partial), against 800 draws:
    within 4 standard errors; replacing f(1 − f) by its mean 1/6 or max 1/4 is far outside."""
    x = heavy_tailed(1300, bits)
    w = torch.rand(1300, generator=torch.Generator().manual_seed(7)) + 0.1
    quantizer = StochasticQuantizer(bits, 512)
    draws = []
    for step in range(800):
        payload = quantizer.compress(x, Key(3, step, 0, 0))
        draws.append(float((w * (quantizer.decompress(payload, x.numel()) - x).square()).sum()))
    draws = torch.tensor(draws, dtype=torch.float64)
    mean, stderr = float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))
    predicted = quantization_error(x, bits, 512, w)
    assert abs(predicted - mean) < 4 * stderr, (predicted, mean, stderr)
    if bits > 1:
        assert quantization_error(x, bits, 512) <= lemma3_variance_bound(
            x.numpy(), level_spacing(bits), 512
        ) * (1 + 1e-9)
        k, s = 2 ** (bits - 1) - 1, x.abs().view(-1)[:1024].view(2, 512).amax(1)
        flat = float((s / k).square().sum() * 512 / 4)  # f(1 − f) ≤ 1/4 everywhere: too high
        assert flat > mean + 10 * stderr


def named_grads(seed):
    return {
        "big": heavy_tailed(3072, seed),
        "small": heavy_tailed(1024, seed + 1) * 0.1,
        "mid": heavy_tailed(2048, seed + 2),
    }


def test_costs_fall_with_width_and_follow_the_curvature():
    """C_i(m) falls with m; weighting by 1/d puts the cost where d is small, 1/d² more so."""
    steps = [[named_grads(0), named_grads(10)], [named_grads(20), named_grads(30)]]
    d = {"big": torch.full((3072,), 4.0), "small": torch.full((1024,), 0.01), "mid": None}
    settings = ExchangeSettings(bits=3)
    loss = gradient_costs(steps, d, [2, 3, 4], settings)
    update = gradient_costs(steps, d, [2, 3, 4], settings, metric="update")
    plain = gradient_costs(steps, dict.fromkeys(d), [2, 3, 4], settings)
    for costs in (loss, update, plain):
        for by in costs.values():
            assert by[2] > by[3] > by[4] > 0
    assert loss["big"][3] == pytest.approx(plain["big"][3] / 4)
    assert update["big"][3] == pytest.approx(plain["big"][3] / 16)
    assert loss["small"][3] == pytest.approx(plain["small"][3] / 0.01)
    assert loss["mid"] == plain["mid"] == update["mid"]


@pytest.mark.parametrize("budget", [2.0, 2.3, 2.5, 3.0, 3.21, 4.0])
def test_allocation_is_the_cheapest_within_the_budget(budget):
    """Σ n_i·m_i ≤ ⌊budget·Σ n_i⌋ and no assignment within it costs less (brute force)."""
    steps = [[named_grads(1), named_grads(2)]]
    d = {"big": torch.rand(3072) + 0.5, "small": torch.rand(1024) * 1e-3 + 1e-4, "mid": None}
    costs = gradient_costs(steps, d, [2, 3, 4], ExchangeSettings())
    numel = {"big": 3072, "small": 1024, "mid": 2048}
    chosen = allocate_gradient_bits(costs, numel, budget)
    capacity = math.floor(round(budget * 100) * sum(numel.values()) / 100)
    assert chosen.capacity == capacity
    assert chosen.total_bits == sum(numel[n] * m for n, m in chosen.bits.items()) <= capacity
    best = min(
        sum(costs[n][m] for n, m in zip(numel, widths, strict=True))
        for widths in itertools.product([2, 3, 4], repeat=3)
        if sum(numel[n] * m for n, m in zip(numel, widths, strict=True)) <= capacity
    )
    assert chosen.cost == pytest.approx(best, rel=1e-12)
    ExchangeSettings(bits_by_name=chosen.bits)  # accepted as it is


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c, n: allocate_gradient_bits(c, n, 4.5),
            r"bits budget 4.5 .*allowed: an average in \[2, 4\]",
        ),
        (lambda c, n: allocate_gradient_bits(c, n, 1.9), r"bits budget 1.9 .*\[2, 4\]"),
        (lambda c, n: allocate_gradient_bits(c, n, float("nan")), r"bits budget nan"),
        (lambda c, n: allocate_gradient_bits(c, n, "3"), r"budget '3'; allowed: a number"),
        (lambda c, n: allocate_gradient_bits(c, n, True), r"budget True; allowed: a number"),
    ],
)
def test_bad_budgets_are_refused(call, message):
    costs = {"a": {2: 3.0, 3: 2.0, 4: 1.0}}
    with pytest.raises(ValueError, match=message):
        call(costs, {"a": 1024})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidates": [2, 9]}, r"bit candidate=9; allowed: an int in 1..8"),
        ({"candidates": []}, r"bit candidates \[\]"),
        (
            {"settings": ExchangeSettings(compressor="terngrad")},
            r"compressor='terngrad'.*'quantize'",
        ),
        ({"settings": ExchangeSettings(error_feedback=True)}, r"error_feedback=True.*without"),
        (
            {"settings": ExchangeSettings(collective="hierarchical")},
            r"collective='hierarchical'.*allowed: scatter, allgather",
        ),
        ({"metric": "fisher"}, r"metric='fisher'; allowed: loss, update"),
        ({"steps": []}, r"at least one step"),
    ],
)
def test_bad_cost_inputs_are_refused(kwargs, message):
    args = {"steps": [[{"a": torch.ones(8)}]], "curvature": {"a": None}, "candidates": [2, 3],
            "settings": ExchangeSettings(), **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        gradient_costs(**args)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(30, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(),
                         nn.Linear(64, 40))  # fmt: skip


def wire_worker(rank, world, out, bits_by_name, steps):
    model = make_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=100)  # one bucket after the rebuild
    state = QuantizedCommState(bits=3, bits_by_name=bits_by_name, model=model, min_numel=0)
    ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    sent = []
    for i in range(steps):
        g = torch.Generator().manual_seed(100 * rank + i)
        x, y = torch.randn(16, 30, generator=g), torch.randint(0, 40, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        sent.append(state.stats.bytes_sent)
    torch.save(sent, out / f"rank{rank}.pt")
    state.close()
    del ddp
    gc.collect()


@pytest.mark.slow
def test_allocated_widths_change_the_bytes_on_the_wire_as_predicted(tmp_path):
    """A 2-rank gloo DDP run with the hook: bytes per quantized step equal `bytes_sent` of the
    one-bucket layout, for uniform 3 bits and for widths allocated at budget 2.5 (fewer)."""
    model = make_model()
    named = dict(model.named_parameters())
    numel = {n: p.numel() for n, p in named.items()}
    steps = [[{n: heavy_tailed(p.numel(), 10 * r + i) for n, p in named.items()} for r in (0, 1)]
             for i in range(2)]  # fmt: skip
    settings = ExchangeSettings(bits=3, min_numel=0)
    costs = gradient_costs(steps, dict.fromkeys(named), [2, 3, 4], settings)
    chosen = allocate_gradient_bits(costs, numel, 2.5)
    assert len(set(chosen.bits.values())) > 1
    predicted = {}
    for label, widths in (("uniform", {}), ("allocated", chosen.bits)):
        layout = [[(p.numel(), widths.get(n, 3)) for n, p in named.items()]]
        predicted[label] = bytes_sent(layout, settings, 2)
        run_workers(wire_worker, 2, tmp_path, widths, 5)
        for rank in (0, 1):
            sent = torch.load(tmp_path / f"rank{rank}.pt")
            assert sent[:2] == [0, 0]  # start_iter: 2 fp32 steps
            per_step = {b - a for a, b in itertools.pairwise(sent[1:])}
            assert per_step == {predicted[label]}, (label, per_step, predicted)
    assert predicted["allocated"] < predicted["uniform"]


def scatter_worker(rank, world, out, bits, draws):
    from distq.comm.exchange import GradientExchange
    from distq.comm.transport import TorchTransport

    grads = [heavy_tailed(4096, 50 + r) for r in range(world)]
    settings = ExchangeSettings(bits=bits, min_numel=0, error_every=10**9)
    exchange = GradientExchange(settings, TorchTransport())
    mean = torch.stack([_clip(g) for g in grads]).mean(0)
    errors = []
    for step in range(draws):
        average = exchange.average(grads[rank].clone(), [4096], [bits], 0, step)
        errors.append(float((average - mean).square().sum()))
    torch.save(errors, out / f"rank{rank}.pt")


def _clip(g):
    from distq.comm.clipping import clip_by_rms_

    return clip_by_rms_(g.clone(), 2.5)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
def test_cost_matches_a_real_two_rank_scatter(tmp_path, bits):
    """C(m) with d ≡ 1 against E‖average − mean_r Clip(g_r)‖² of 300 real 2-rank scatter
    exchanges (two quantizations): within 5% (the second one is evaluated at Σ_r Clip(g_r))."""
    run_workers(scatter_worker, 2, tmp_path, bits, 300)
    errors = torch.tensor(torch.load(tmp_path / "rank0.pt"), dtype=torch.float64)
    grads = [heavy_tailed(4096, 50 + r) for r in range(2)]
    cost = gradient_costs([[{"g": g} for g in grads]], {"g": None}, [bits], ExchangeSettings())
    measured, stderr = float(errors.mean()), float(errors.std()) / math.sqrt(len(errors))
    assert abs(cost["g"][bits] - measured) < 0.05 * measured + 4 * stderr, (cost, measured, stderr)


def across_worker(rank, world, out):
    named = dict(make_model().named_parameters())
    own = [{n: heavy_tailed(p.numel(), 100 * rank + 10 * i + j)
            for j, (n, p) in enumerate(named.items())} for i in range(2)]  # fmt: skip
    curvature = {n: heavy_tailed(p.numel(), 7 + j).abs() + 0.1
                 for j, (n, p) in enumerate(named.items())}  # fmt: skip
    costs = {
        collective: gradient_costs_across(
            own, curvature, [1, 2, 4], ExchangeSettings(collective=collective), "update"
        )
        for collective in ("scatter", "allgather")
    }
    torch.save({"own": own, "curvature": curvature, "costs": costs}, out / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_costs_across_ranks_equal_the_costs_of_the_gathered_gradients(tmp_path, world):
    """Each rank passing only its own gradients gets what `gradient_costs` gives for all the
    ranks' gradients, the same on every rank."""
    run_workers(across_worker, world, tmp_path)
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    steps = [[s["own"][i] for s in saved] for i in range(2)]
    for collective in ("scatter", "allgather"):
        settings = ExchangeSettings(collective=collective)
        expected = gradient_costs(steps, saved[0]["curvature"], [1, 2, 4], settings, "update")
        for s in saved:
            got = s["costs"][collective]
            assert got == saved[0]["costs"][collective]
            for name, by_width in expected.items():
                assert got[name] == pytest.approx(by_width, rel=1e-5), (collective, name)


def test_allocate_sets_the_widths_by_name_and_refuses_what_it_cannot_send():
    model = make_model()
    state = QuantizedCommState(bits=3, model=model, overlap=False)
    name = next(iter(dict(model.named_parameters())))
    assert state.allocated is None and state.narrowest_bits() == 3
    state.allocate({name: 2})
    assert state.allocated == {name: 2}
    assert state.narrowest_bits() == 2
    with pytest.raises(ValueError, match="allowed"):
        state.allocate({name: 9})
    with pytest.raises(ValueError, match="match no parameter"):
        state.allocate({"no.such.weight": 2})
    with pytest.raises(ValueError, match="allocate needs model="):
        QuantizedCommState(bits=3, overlap=False).allocate({name: 2})
