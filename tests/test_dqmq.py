"""DQMQ bit-width search (distq/dqmq.py): the budget holds exactly, a sensitive layer gets more
bits, the model is left as it was, a seed fixes the result, and bad input is named."""

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.nn import functional

from distq.bit_allocation import allocate_bits
from distq.dqmq import fit_budget, search, search_bits
from distq.optim import QuantizedOptimizer


def allowed(sizes, budget):
    """⌊budget·Σ n⌋ with the budget read as the decimal it is written as (2.3 is 23/10)."""
    return math.floor(Fraction(repr(float(budget))) * sum(sizes))


def within(bits, sizes, budget):
    """Σ n·m ≤ ⌊budget·Σ n⌋ for {name: bits} and {name: n}."""
    return sum(sizes[n] * b for n, b in bits.items()) <= allowed(sizes.values(), budget)


def regression(sensitive_first: bool, d: int = 16, seed: int = 0):
    """y = W₂W₁x, both W d×d (equal sizes). One is Gaussian (its 2-bit projection is far off),
    the other ±1 (exact on every m-bit linear grid): only the Gaussian one needs bits."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False))
    gaussian = torch.randn(d, d, generator=g)
    signs = torch.randint(0, 2, (d, d), generator=g).float() * 2 - 1
    with torch.no_grad():
        model[0].weight.copy_(gaussian if sensitive_first else signs)
        model[1].weight.copy_(signs if sensitive_first else gaussian)
    x = torch.randn(256, d, generator=g)
    with torch.no_grad():
        y = model(x)
    return model, [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]


def named(rows):
    return {f"t{i}": row for i, row in enumerate(rows)}


def test_fit_budget_holds_exactly_and_leaves_no_upgrade_that_fits():
    rng = random.Random(0)
    for _ in range(300):
        widths = sorted(rng.sample(range(2, 9), rng.randint(1, 4)))
        sizes = [rng.choice([1, 3, 7, 64, 577, 4096, 30_000]) for _ in range(rng.randint(1, 8))]
        budget = rng.choice([float(rng.choice(widths)), rng.uniform(widths[0], widths[-1])])
        logp = [[rng.gauss(0, 2) for _ in widths] for _ in sizes]
        chosen = list(fit_budget(named(logp), named(sizes), widths, budget).values())
        assert all(m in widths for m in chosen)
        used = sum(n * m for n, m in zip(sizes, chosen, strict=True))
        assert used <= allowed(sizes, budget)
        for n, m in zip(sizes, chosen, strict=True):
            bigger = [w for w in widths if w > m]
            assert not bigger or n * (bigger[0] - m) > allowed(sizes, budget) - used


def test_fit_budget_is_the_most_probable_assignment_within_the_budget():
    rng = random.Random(1)
    for _ in range(200):
        widths = sorted(rng.sample(range(2, 9), rng.randint(2, 3)))
        sizes = [rng.randint(1, 50) for _ in range(rng.randint(1, 5))]
        budget = rng.uniform(widths[0], widths[-1])
        logp = [[rng.gauss(0, 2) for _ in widths] for _ in sizes]
        best = max(
            sum(row[widths.index(m)] for row, m in zip(logp, pick, strict=True))
            for pick in itertools.product(widths, repeat=len(sizes))
            if sum(n * m for n, m in zip(sizes, pick, strict=True)) <= allowed(sizes, budget)
        )
        chosen = fit_budget(named(logp), named(sizes), widths, budget, fill=False).values()
        score = sum(row[widths.index(m)] for row, m in zip(logp, chosen, strict=True))
        assert sum(n * m for n, m in zip(sizes, chosen, strict=True)) <= allowed(sizes, budget)
        assert score == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_budget_holds_exactly_on_random_size_mixes(seed):
    rng = random.Random(seed)
    widths = [rng.randint(1, 40) for _ in range(5)]
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    model = nn.Sequential(*layers)
    x = torch.randn(8, widths[0])
    batches = [(x, torch.randn(8, widths[-1]))]
    budget = rng.uniform(2, 4)
    names = [f"{i}.weight" for i in range(len(layers))]
    result = search(model, batches, functional.mse_loss, budget=budget, names=names, steps=3,
                    seed=seed)
    assert set(result.bits) == set(names)
    assert result.sizes == {n: layers[i].weight.numel() for i, n in enumerate(names)}
    assert within(result.bits, result.sizes, budget)
    assert result.average_bits <= budget
    assert all(abs(sum(p) - 1) < 1e-9 for p in result.probs.values())


@pytest.mark.parametrize("budget", [2, 4])
def test_budget_at_the_smallest_or_largest_candidate_gives_every_tensor_that_width(budget):
    # (a middle width is not forced: 2 and 4 on equal sizes also average 3)
    model, batches = regression(sensitive_first=True)
    bits = search_bits(model, batches, functional.mse_loss, budget=budget,
                       names=["0.weight", "1.weight"], steps=5)
    assert bits == {"0.weight": budget, "1.weight": budget}


@pytest.mark.parametrize("sensitive_first", [True, False])
@pytest.mark.parametrize("weight_lr", [0.0, 1e-3])
def test_the_sensitive_layer_gets_more_bits(sensitive_first, weight_lr):
    model, batches = regression(sensitive_first)
    result = search(model, batches, functional.mse_loss, budget=3.0,
                    names=["0.weight", "1.weight"], steps=60, weight_lr=weight_lr)
    sensitive, robust = ("0.weight", "1.weight") if sensitive_first else ("1.weight", "0.weight")
    assert result.bits == {sensitive: 4, robust: 2}
    assert result.probs[sensitive][2] > 0.5 and result.probs[robust][0] > 0.5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.mid = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = self.mid(torch.relu(self.norm(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_the_model_is_left_unchanged():
    torch.manual_seed(0)
    model = Net().train()
    model.mid.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(2)]
    result = search(model, batches, functional.cross_entropy, budget=2.5, steps=4,
                    names=["conv.weight", "mid.weight", "head.weight"])
    assert result.sizes["mid.weight"] == 216
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert dict(model.named_parameters()) == params
    assert all(p.grad is None for p in model.parameters())
    assert not model.mid.weight.requires_grad and model.conv.weight.requires_grad
    assert model.training


def test_a_seed_fixes_the_result():
    def run(seed):
        model, batches = regression(sensitive_first=True)
        return search(model, batches, functional.mse_loss, budget=2.6,
                      names=["0.weight", "1.weight"], steps=8, seed=seed)

    first, again, other = run(0), run(0), run(1)
    assert first.bits == again.bits and first.probs == again.probs
    assert first.expected_bits == again.expected_bits
    assert first.probs != other.probs


def test_default_names_are_the_optimizers_default_selection():
    torch.manual_seed(0)
    model = Net()
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,)))]
    result = search(model, batches, functional.cross_entropy, budget=3, steps=1)
    assert list(result.bits) == ["mid.weight"]  # first and last layer stay full precision


def test_bad_input_names_the_value_and_what_is_allowed():
    model, batches = regression(sensitive_first=True)
    names = ["0.weight", "1.weight"]
    loss = functional.mse_loss

    def fails(match, **kwargs):
        options = {"budget": 3.0, "names": names, "steps": 1, **kwargs}
        with pytest.raises(ValueError, match=match):
            search(model, options.pop("batches", batches), loss, **options)

    fails(r"budget=1\.5; allowed: average bits in \[2, 4\]", budget=1.5)
    fails(r"budget=4\.5; allowed: average bits in \[2, 4\]", budget=4.5)
    fails(r"budget=nan", budget=float("nan"))
    fails(r"candidates is empty; allowed: widths of scheme 'linear'", candidates=())
    fails(r"bits=1 is not supported by scheme 'linear'; allowed: 2\.\.8", candidates=(1, 2))
    fails(r"candidates \(2, 2\) repeat a width", candidates=(2, 2), budget=2)
    fails(r"unknown quantization scheme 'cubic'", scheme="cubic")
    fails(r"unknown parameter name\(s\) \['2.weight'\].*\['0.weight', '1.weight'\]",
          names=["0.weight", "2.weight"])
    fails(r"names=\['0.weight', '0.weight'\]; allowed: a non-empty list of distinct",
          names=["0.weight", "0.weight"])
    fails(r"steps=0; allowed: a positive integer", steps=0)
    fails(r"lr=0; allowed: a finite number > 0", lr=0)
    fails(r"weight_lr=-1; allowed: a finite number >= 0", weight_lr=-1)
    fails(r"tau=\(0.1, 1.0\); allowed: \(start, end\) with start >= end > 0", tau=(0.1, 1.0))
    fails(r"batches yielded no \(input, target\) pair", batches=[])
    with pytest.raises(ValueError, match=r"default picks no weight.*\['0.weight', '1.weight'\]"):
        search(model, batches, loss, budget=3.0, steps=1)


def test_fit_budget_takes_the_most_probable_widths_that_fit():
    # widths and final probabilities of the CIFAR CNN's five convolutions (seed 0, 300 steps):
    # the argmax (4, 3, 3, 3, 3) is 2304 bits over; dropping the first tensor to 3 bits fits at
    # the least loss of probability (a per-bit greedy dropped the largest to 2 bits, then
    # upgraded three others: 4 of 5 off their argmax)
    probs = [
        [0.03, 0.4259, 0.5441], [0.0439, 0.8716, 0.0845], [0.011, 0.9584, 0.0306],
        [0.1504, 0.774, 0.0756], [0.0822, 0.8513, 0.0664],
    ]
    logp = [[math.log(p) for p in row] for row in probs]
    sizes = named([2304, 4608, 9216, 18432, 36864])
    assert list(fit_budget(named(logp), sizes, [2, 3, 4], 3.0).values()) == [3] * 5


def test_search_bits_serves_as_the_allocators_dqmq_search():
    # distq.bit_allocation calls search(names, budget, candidates) with the latent weights in the
    # model and refuses widths over its ⌊budget·Σ n⌋ (2.3·230 = 529 bits)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 3))
    optimizer = QuantizedOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, "linear", 3, keep_full_precision=()
    )
    batches = [(torch.randn(8, 10), torch.randn(8, 3))]

    def dqmq_search(names, budget, candidates):
        return search_bits(
            model, batches, functional.mse_loss, budget=budget, candidates=candidates,
            names=names, steps=3,
        )

    chosen = allocate_bits(optimizer, 2.3, [2, 3, 4], "dqmq", dqmq_search, switch=False)
    assert set(chosen.bits) == {"0.weight", "1.weight", "2.weight"}
    assert chosen.capacity == 529 and chosen.total_bits <= 529
    assert chosen.bits == search_bits(
        model, batches, functional.mse_loss, budget=2.3, names=list(chosen.bits), steps=3
    )  # the latent weights were in the model during the search, and are again
