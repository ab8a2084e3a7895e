"""The sensitivity bit allocator: the knapsack solvers against brute force over every
assignment, the budget held to the bit, the costs against the projection, and bad input."""

import itertools
import math
import random
import re

import pytest
import torch

from distq.bit_allocation import allocate, allocate_bits, capacity_of, sensitivity_costs
from distq.quant import project
from tests.test_optim import build, make_model, train

ALL = {"keep_full_precision": ()}


def instance(rng, convex):
    """Random sizes and costs for 2-6 tensors over a random candidate set: convex costs fall
    as c·4^−m times noise (quantization errors do); otherwise any costs, rises included."""
    candidates = sorted(rng.sample(range(1, 9), rng.randint(2, 4)))
    names = [f"t{i}" for i in range(rng.randint(2, 6))]
    numel = {n: rng.randint(1, 60) for n in names}
    if convex:
        costs = {
            n: {m: rng.uniform(0.1, 10) * 4.0**-m * rng.uniform(0.8, 1.0) for m in candidates}
            for n in names
        }
    else:
        costs = {n: {m: rng.uniform(0, 1) for m in candidates} for n in names}
    budget = round(rng.uniform(candidates[0], candidates[-1]), rng.choice([0, 1, 2]))
    return costs, numel, budget


def brute_force(costs, numel, budget):
    """The optimal cost over every assignment within ⌊budget·Σn⌋ bits (exact arithmetic)."""
    names, candidates = list(costs), sorted(next(iter(costs.values())))
    capacity = math.floor(round(budget * 100) * sum(numel.values()) / 100)
    best = math.inf
    for widths in itertools.product(candidates, repeat=len(names)):
        if sum(numel[n] * m for n, m in zip(names, widths, strict=True)) <= capacity:
            best = min(best, sum(costs[n][m] for n, m in zip(names, widths, strict=True)))
    return best, capacity


@pytest.mark.parametrize("convex", [True, False])
def test_the_exact_solver_matches_brute_force(convex):
    rng = random.Random(1 + convex)
    for _ in range(300):
        costs, numel, budget = instance(rng, convex)
        best, capacity = brute_force(costs, numel, budget)
        a = allocate(costs, numel, budget)
        assert a.exact and a.capacity == capacity and a.total_bits <= capacity
        assert a.total_bits == sum(numel[n] * m for n, m in a.bits.items())
        assert a.cost == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert a.lower_bound == a.cost


@pytest.mark.parametrize("convex", [True, False])
def test_the_lagrangian_method_is_within_its_stated_gap_and_exact_when_integral(convex):
    rng = random.Random(10 + convex)
    integral = within_a_percent = 0
    for _ in range(300):
        costs, numel, budget = instance(rng, convex)
        best, capacity = brute_force(costs, numel, budget)
        a = allocate(costs, numel, budget, max_states=0)  # no state fits: Lagrangian
        assert not a.exact and a.total_bits <= capacity == a.capacity
        assert a.lower_bound <= best * (1 + 1e-12) + 1e-15  # a true lower bound
        assert a.cost >= best * (1 - 1e-12) - 1e-15  # feasible, so no better than optimal
        if a.lower_bound == a.cost:  # the LP optimum is integral: the method is exact
            integral += 1
            assert a.cost == pytest.approx(best, rel=1e-12, abs=1e-15)
        within_a_percent += a.cost <= best * 1.01 + 1e-15
    assert integral >= 10  # the exact case happens (budgets at min/max candidates, at least)
    if convex:  # measured on these 300 instances: a few percent over the optimum at most
        assert within_a_percent >= 200


def test_the_budget_is_held_to_the_bit_as_written():
    numel = {"a": 9, "b": 21}  # 2.3 · 30 is 68.99999999999999 in floats: 69 bits allowed
    assert capacity_of(numel, 2.3, [2, 3]) == 69
    costs = {"a": {2: 5.0, 3: 1.0}, "b": {2: 5.0, 3: 4.999}}
    a = allocate(costs, numel, 2.3)
    assert a.bits == {"a": 3, "b": 2} and a.total_bits == 27 + 42 == 69
    assert a.average_bits == pytest.approx(2.3)
    assert allocate(costs, numel, 2.29).bits == {"a": 2, "b": 2}  # 68 bits: a no longer fits
    assert allocate(costs, numel, 3).bits == {"a": 3, "b": 3}
    assert allocate(costs, numel, 2).bits == {"a": 2, "b": 2}


@pytest.mark.parametrize(
    ("budget", "candidates", "message"),
    [
        (1.5, [2, 3, 4], "bits budget 1.5 is outside the candidate widths [2, 3, 4]: allowed: an "
         "average in [2, 4] bits per weight"),
        (4.01, [2, 3, 4], "bits budget 4.01 is outside"),
        (math.nan, [2, 3, 4], "bits budget nan is outside"),
        (3, [], "bit candidates []: allowed: distinct positive integers"),
        (3, [3, 3], "bit candidates [3, 3]"),
        (1, [0, 1], "bit candidates [0, 1]"),
    ],
)  # fmt: skip
def test_bad_budgets_and_candidates_are_refused(budget, candidates, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        capacity_of({"a": 4}, budget, candidates)


def test_costs_are_the_fisher_weighted_error_of_each_width_and_allocation_switches_widths():
    model = make_model()
    opt = build(model, "linear", 3, **ALL)
    train(model, opt, 5)
    costs = sensitivity_costs(opt, [2, 3, 4])
    for name, p in opt.quantized_parameters().items():
        d, state = opt.curvature(p), opt.base_optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        assert torch.allclose(d, v_hat.sqrt() + 1e-8)
        for m in (2, 3, 4):
            err = v_hat * (project(opt.latent[name], d, "linear", m).q - opt.latent[name]).square()
            assert costs[name][m] == pytest.approx(float(err.sum()), rel=1e-6)
        assert costs[name][2] > costs[name][3] > costs[name][4]
    a = allocate_bits(opt, 3.0, [2, 3, 4])
    assert a.exact and a.total_bits <= 3 * sum(a.numel.values())
    assert a.cost <= sum(costs[n][3] for n in costs)  # never worse than uniform 3 bits
    a = allocate_bits(opt, 2.5, [2, 3, 4])
    assert opt.tensor_bits == a.bits and opt.allocated
    assert a.total_bits <= 2.5 * sum(a.numel.values()) and len(set(a.bits.values())) > 1
    assert "average" in a.table() and a.record()["bits"] == a.bits


def test_costs_do_not_change_when_a_layer_is_rescaled_and_the_next_one_undoes_it():
    """Linear 5 scaled by s and Linear 7 by 1/s compute the same function through the ReLU
    between them; with lr 0 both models see the same losses, so the loss a width costs is the
    same. The Fisher-weighted cost says so; a d-weighted one would change by s and 1/s."""
    s = 4.0
    models = [make_model(), make_model()]
    with torch.no_grad():
        models[1][5].weight.mul_(s), models[1][5].bias.mul_(s), models[1][7].weight.div_(s)
    costs, allocations = [], []
    for model in models:
        opt = build(model, "linear", 3, clip_latent=None, **ALL)
        for group in opt.param_groups:
            group["lr"] = 0.0
        train(model, opt, 5)
        costs.append(sensitivity_costs(opt, [2, 3, 4]))
        allocations.append(allocate_bits(opt, 2.5, [2, 3, 4], switch=False).bits)
    for name in costs[0]:
        for m in (2, 3, 4):
            assert costs[1][name][m] == pytest.approx(costs[0][name][m], rel=1e-4), (name, m)
    assert allocations[0] == allocations[1]


def test_allocation_refuses_what_it_cannot_do():
    model = make_model()
    opt = build(model, "shared", 3, **ALL)
    with pytest.raises(ValueError, match=r"bit candidates \[5\] are not widths of scheme "
                       r"'shared'; allowed: 2\.\.4"):  # fmt: skip
        allocate_bits(opt, 3.0, [2, 3, 5])
    with pytest.raises(ValueError, match="bit allocation 'dqmq' needs search=: a callable"):
        allocate_bits(opt, 3.0, [2, 3, 4], method="dqmq")
    over = {"0.weight": 2, "2.weight": 2, "5.weight": 2, "7.weight": 3}  # 4928 + 96 bits
    with pytest.raises(ValueError, match="the search's widths take 5024 bits, over the 4928"):
        allocate_bits(opt, 2.0, [2, 3], method="dqmq", search=lambda n, b, c: over)
    with pytest.raises(ValueError, match="bit allocation 'greedy'; allowed: sensitivity, dqmq"):
        allocate_bits(opt, 3.0, [2, 3, 4], method="greedy")
    assert opt.tensor_bits == dict.fromkeys(opt.names, 3) and not opt.allocated


def test_a_search_sees_the_latent_weights_and_is_scored_by_sensitivity():
    model = make_model()
    opt = build(model, "linear", 3, **ALL)
    train(model, opt, 5)
    quantized = {n: p.clone() for n, p in opt.quantized_parameters().items()}
    seen = {}

    def search(names, budget, candidates):
        params = dict(model.named_parameters())
        seen.update((n, params[n].detach().clone()) for n in names)
        assert (budget, candidates) == (3.0, [2, 3, 4])
        return dict.fromkeys(names, 2)

    a = allocate_bits(opt, 3.0, [2, 3, 4], method="dqmq", search=search)
    assert all(torch.equal(seen[n], opt.latent[n]) for n in opt.names)
    assert a.bits == opt.tensor_bits == dict.fromkeys(opt.names, 2)
    assert a.cost == pytest.approx(sum(a.costs[n][2] for n in opt.names))
    assert a.lower_bound < a.cost and not a.exact  # 2 bits everywhere is not S's optimum
    for name, p in opt.quantized_parameters().items():  # the model holds ŵ again, at 2 bits
        assert not torch.equal(p, quantized[name])
        assert torch.equal(p, project(opt.latent[name], opt.curvature(p), "linear", 2).q)
