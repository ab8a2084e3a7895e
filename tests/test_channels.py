"""Global channel pruning (distq.channels): the vote, the learn-to-rank term, the schedule, the
rewrite to a smaller model, and masks that agree across real gloo ranks."""

import copy
import gc
import itertools

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.channels import (
    ChannelPruner,
    ChannelTopologyError,
    MacModel,
    attention,
    borda_ranking,
    channel_groups,
    count_macs,
    prune_state_dict,
    rank_loss,
    resize_to,
    rewrite,
)
from distq.optim import QuantizedOptimizer
from distq.quant.sparse import SparsitySchedule
from tests.distributed import run_workers


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(12, 6, 3, padding=1), nn.ReLU()),  # nested, no norm
        nn.Flatten(),  # 6 channels × 4×4 positions -> 96 features
        nn.Linear(96, 10),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(10, 5),
    )


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 9), nn.Tanh(),
        nn.Linear(9, 3),
    )  # fmt: skip


def randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial norm statistics and affine parameters (defaults would hide a slicing bug)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def random_keep(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in channel_groups(model):
        mask = torch.rand(group.channels, generator=g) < 0.6
        mask[torch.randint(group.channels, (1,), generator=g)] = True
        keep[group.producer] = mask
    return keep


def masked_copy(model: nn.Module, keep) -> nn.Module:
    """The model with its pruned channels zeroed the way ChannelPruner.apply zeroes them."""
    model = __import__("copy").deepcopy(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for group in channel_groups(model):
            drop = ~keep[group.producer]
            names = [f"{group.producer}.weight", f"{group.producer}.bias"]
            names += [f"{n}.{p}" for n in group.norms for p in ("weight", "bias")]
            for name in names:
                if name in params:
                    params[name][drop] = 0
    return model


def test_groups_follow_the_chain_through_norms_pools_and_flatten():
    groups = {g.producer: g for g in channel_groups(cnn())}
    assert list(groups) == ["0", "3", "7.0", "9"]  # not the output layer "12"
    assert groups["0"].norms == ("1",) and groups["0"].consumer == "3"
    assert groups["7.0"].consumer == "9" and groups["7.0"].block == 16
    assert groups["9"].consumer == "12" and groups["9"].block == 1


@pytest.mark.parametrize("build", [cnn, mlp])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewritten_model_computes_what_the_masked_model_computes(build, seed):
    torch.manual_seed(seed)
    model = build()
    randomize(model, seed)
    keep = random_keep(model, seed)
    masked = masked_copy(model, keep).eval()
    smaller = rewrite(masked, keep).eval()
    x = torch.randn(5, 3, 8, 8) if build is cnn else torch.randn(5, 7)
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), masked(x), rtol=1e-5, atol=1e-5)
        # the pruned channels mattered: without the masks the outputs differ
        assert not torch.allclose(model.eval()(x), masked(x), atol=1e-3)
    kept = sum(int(k.sum()) for k in keep.values())
    total = sum(k.numel() for k in keep.values())
    assert kept < total
    n_small = sum(p.numel() for p in smaller.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    # the rewritten shapes: producers lose rows, consumers the matching columns
    for group in channel_groups(model):
        k = int(keep[group.producer].sum())
        assert smaller.get_submodule(group.producer).weight.shape[0] == k
        assert smaller.get_submodule(group.consumer).weight.shape[1] == k * group.block


def test_resize_to_rebuilds_a_model_from_a_pruned_state_dict():
    torch.manual_seed(3)
    model = cnn()
    randomize(model, 3)
    keep = random_keep(model, 3)
    masked = masked_copy(model, keep).eval()
    state = prune_state_dict(masked.state_dict(), channel_groups(masked), keep)
    fresh = resize_to(cnn(), state)
    fresh.load_state_dict(state)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model", "names"),
    [
        (nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)), "'1' (Sigmoid)"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 1, 1)),
            "'1'",
        ),
        (
            nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 2)),
            "'1' (BatchNorm1d)",
        ),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(4, 2)), "'1' (Linear)"),
        (nn.LSTM(3, 4), "LSTM"),
    ],
)
def test_a_topology_that_cannot_be_rewritten_is_named(model, names):
    with pytest.raises(ChannelTopologyError, match=__import__("re").escape(names)):
        channel_groups(model)


def test_borda_count_matches_a_brute_force_tally():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(9, 5, generator=g)
    points = torch.zeros(5)
    for row in scores:
        for position, c in enumerate(sorted(range(5), key=lambda c: -row[c].item())):
            points[c] += 4 - position
    expected = sorted(range(5), key=lambda c: (-points[c].item(), c))
    assert borda_ranking(scores).tolist() == expected
    # a channel most samples rank first wins, even where one sample ranks it last
    votes = torch.tensor([[3.0, 2, 1], [3, 2, 1], [0, 2, 1]])
    assert borda_ranking(votes)[0] == 0
    # pruned channels rank last whatever their scores
    assert borda_ranking(votes, torch.tensor([True, False, False])).tolist() == [1, 2, 0]


def test_rank_loss_gradient_pulls_each_sample_toward_the_global_order():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 5, generator=g).requires_grad_()
    ranking = torch.tensor([3, 0, 4, 1, 2])
    keep = torch.ones(5, dtype=torch.bool)

    def agreement(s):  # share of (sample, pair) ordered as the ranking says
        pairs = list(itertools.combinations(ranking.tolist(), 2))
        return sum(bool(row[i] > row[j]) for row in s for i, j in pairs) / (len(s) * len(pairs))

    before = agreement(scores.detach())
    opt = torch.optim.SGD([scores], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        rank_loss(scores, ranking, keep).backward()
        opt.step()
    assert before < 0.7 and agreement(scores.detach()) == 1.0
    # pruned channels take no part: a loss over the kept ones only
    keep[[0, 1, 2]] = False
    s = torch.tensor([[1.0, 9, 9, 0.5, 0.4]])
    assert rank_loss(s, ranking, keep) == torch.nn.functional.softplus(torch.tensor(-0.1))


def calibration(n=64):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def pruned_steps(model, opt, pruner, steps=15):
    """Train `model` for `steps` steps on random batches of cnn()'s shape, yielding each step
    number after the pruner's step."""
    g = torch.Generator().manual_seed(9)
    for step in range(1, steps + 1):
        opt.zero_grad()
        out = model(torch.randn(8, 3, 8, 8, generator=g))
        nn.functional.cross_entropy(out, torch.randint(0, 5, (8,), generator=g)).backward()
        opt.step()
        pruner.step(step)
        yield step


def test_schedule_keeps_the_budget_and_never_revives_a_channel():
    torch.manual_seed(0)
    model = cnn()
    schedule = SparsitySchedule(0.5, "cubic", 0.0, 2, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = ChannelPruner(model, schedule, calibration(), every=3, optimizer=opt)
    before = {n: k.clone() for n, k in pruner.keep.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    pruner.update(0)
    for n, b in model.named_buffers():  # the vote leaves running statistics alone
        assert torch.equal(b, buffers[n]), n
    for step in pruned_steps(model, opt, pruner):
        for name, keep in pruner.keep.items():
            assert not (keep & ~before[name]).any(), (step, name)  # no pruned channel returns
            w = model.get_submodule(name).weight
            assert (w[~keep] == 0).all()
            if step % 3 == 0 or step == 12:
                channels = keep.numel()
                expected = max(1, -(-round((1 - schedule.at(step)) * channels, 9) // 1))
                assert int(keep.sum()) == expected, (step, name)
        before = {n: k.clone() for n, k in pruner.keep.items()}
    assert pruner.kept() == {"0": 4, "3": 6, "7.0": 3, "9": 5}
    # pruned weights stay exactly zero through Adam's momentum: zeroed state, zero gradient
    assert (opt.state[model[0].weight]["exp_avg"][~pruner.keep["0"]] == 0).all()


def test_pruned_channels_stay_zero_in_the_latent_weights_of_a_quantized_optimizer():
    torch.manual_seed(0)
    model = cnn()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "ternary")
    pruner = ChannelPruner(model, 0.5, calibration(), every=2, rank_weight=0.1, optimizer=opt)
    g = torch.Generator().manual_seed(2)
    for step in range(1, 6):
        opt.zero_grad()
        out = model(torch.randn(8, 3, 8, 8, generator=g))
        loss = nn.functional.cross_entropy(out, torch.randint(0, 5, (8,), generator=g))
        reg = pruner.regularizer()
        assert reg > 0 and reg.requires_grad
        (loss + reg).backward()
        opt.step()
        pruner.step(step)
    drop = ~pruner.keep["3"]
    assert drop.sum() == 6
    assert (opt.latent["3.weight"][drop] == 0).all() and (model[3].weight[drop] == 0).all()
    assert len(model[3].weight.unique()) <= 3  # still ternary


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="every=0"):
        ChannelPruner(cnn(), 0.5, calibration(), every=0)
    with pytest.raises(ValueError, match=r"sparsity=1\.0"):
        ChannelPruner(cnn(), 1.0, calibration())
    with pytest.raises(ValueError, match="rank_weight=-1"):
        ChannelPruner(cnn(), 0.5, calibration(), rank_weight=-1)


def test_count_macs_matches_the_layer_shapes():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )  # fmt: skip
    assert count_macs(model, torch.randn(1, 3, 8, 8)) == 4 * 8 * 8 * 3 * 9 + 64 * 5


@pytest.mark.parametrize("build, example", [(cnn, (1, 3, 8, 8)), (mlp, (1, 7))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mac_model_counts_what_count_macs_counts_on_the_rewritten_model(build, example, seed):
    torch.manual_seed(seed)
    model = build()
    x = torch.randn(*example)
    macs = MacModel(model, channel_groups(model), x)
    keep = random_keep(model, seed)
    counts = {name: int(k.sum()) for name, k in keep.items()}
    assert macs.total(counts) == count_macs(rewrite(model, keep), x)
    full = {g.producer: g.channels for g in channel_groups(model)}
    assert macs.total(full) == count_macs(model, x)


def test_global_allocation_removes_dead_channels_first_and_keeps_the_mac_budget():
    """Half of layer 7.0's channels carry nothing (ī = 0): a budget their removal meets takes
    them and nothing else, where a uniform ρ would thin every layer."""
    torch.manual_seed(0)
    model = cnn()
    with torch.no_grad():
        model[7][0].weight[:3] = 0
        model[7][0].bias[:3] = 0
    x = calibration()
    full = count_macs(model, x[:1])
    dead = {g.producer: torch.ones(g.channels, dtype=torch.bool) for g in channel_groups(model)}
    dead["7.0"] = torch.arange(6) >= 3
    saved = full - count_macs(rewrite(model, dead), x[:1])
    rho = 0.9 * saved / full
    pruner = ChannelPruner(model, rho, x, allocation="global", floor=0.25)
    assert pruner.kept() == {"0": 8, "3": 12, "7.0": 3, "9": 10}
    assert (pruner.keep["7.0"] == (torch.arange(6) >= 3)).all()
    assert count_macs(rewrite(model, pruner.keep), x[:1]) <= (1 - rho) * full


@pytest.mark.parametrize("seed", [0, 1])
def test_global_allocation_matches_a_brute_force_greedy(seed):
    """Each removal minimises ī / ΔM, with ī the mean attention over the calibration batch
    (batch norms on its statistics) and ΔM measured by count_macs on rewritten models."""
    torch.manual_seed(seed)
    model = cnn()
    randomize(model, seed)
    x = calibration()
    groups = channel_groups(model)
    scores = {}
    probe = copy.deepcopy(model).train()
    for g in groups:
        last = isinstance(probe.get_submodule(g.producer), nn.Linear)

        def record(module, args, g=g, last=last):
            scores[g.producer] = attention(args[0], g.channels, last)

        probe.get_submodule(g.consumer).register_forward_pre_hook(record)
    with torch.no_grad():
        probe(x)
    ranking = {g.producer: borda_ranking(scores[g.producer]) for g in groups}

    def macs(counts):
        keep = {}
        for g in groups:
            keep[g.producer] = torch.zeros(g.channels, dtype=torch.bool)
            keep[g.producer][ranking[g.producer][: counts[g.producer]]] = True
        return count_macs(rewrite(model, keep), x[:1]), keep

    counts = {g.producer: g.channels for g in groups}
    full = macs(counts)[0]
    while macs(counts)[0] > 0.5 * full:
        values = {}
        for g in groups:
            k = counts[g.producer]
            if k > -(-0.25 * g.channels // 1):
                saved = macs(counts)[0] - macs({**counts, g.producer: k - 1})[0]
                channel = ranking[g.producer][k - 1]
                values[g.producer] = float(scores[g.producer][:, channel].mean()) / saved
        counts[min(values, key=values.get)] -= 1
    pruner = ChannelPruner(model, 0.5, x, allocation="global", floor=0.25)
    assert pruner.kept() == counts
    for name, keep in macs(counts)[1].items():
        assert torch.equal(pruner.keep[name], keep), name


@pytest.mark.parametrize("floor", [0.25, 0.5])
def test_global_schedule_keeps_the_mac_budget_and_the_floors_and_never_revives(floor):
    torch.manual_seed(0)
    model = cnn()
    x = calibration()
    schedule = SparsitySchedule(0.6, "cubic", 0.0, 2, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = ChannelPruner(model, schedule, x, every=3, optimizer=opt, allocation="global",
                           floor=floor)  # fmt: skip
    full = count_macs(model, x[:1])
    before = {n: k.clone() for n, k in pruner.keep.items()}
    for step in pruned_steps(model, opt, pruner):
        if step % 3 == 0 or step == 12:  # a vote: the budget of ρ(step) holds
            assert count_macs(rewrite(model, pruner.keep), x[:1]) <= (1 - schedule.at(step)) * full
        for group in pruner.groups:
            keep = pruner.keep[group.producer]
            assert not (keep & ~before[group.producer]).any(), (step, group.producer)
            assert int(keep.sum()) >= -(-floor * group.channels // 1)
            assert (model.get_submodule(group.producer).weight[~keep] == 0).all()
        before = {n: k.clone() for n, k in pruner.keep.items()}
    assert count_macs(rewrite(model, pruner.keep), x[:1]) <= 0.4 * full
    kept = pruner.kept()
    assert len({kept[g.producer] / g.channels for g in pruner.groups}) > 1  # not uniform


def test_chosen_widths_are_reached_along_the_ramp_and_others_stay_uniform():
    torch.manual_seed(0)
    model = cnn()
    schedule = SparsitySchedule(0.5, "cubic", 0.0, 2, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    widths = {"0": 2, "3": 9, "7.0": 6}  # "9" (10 channels) follows ρ
    pruner = ChannelPruner(model, schedule, calibration(), every=3, optimizer=opt, widths=widths)
    before = pruner.kept()
    for step in pruned_steps(model, opt, pruner):
        kept = pruner.kept()
        if step % 3 == 0 or step == 12:
            f = schedule.at(step) / 0.5
            for name, channels, width in (("0", 8, 2), ("3", 12, 9), ("7.0", 6, 6)):
                assert kept[name] == min(
                    channels - int(f * (channels - width) + 1e-9), before[name]
                )
            assert kept["9"] == -(-round((1 - schedule.at(step)) * 10, 9) // 1)
        assert all(kept[n] <= before[n] for n in kept)
        before = kept
    assert pruner.kept() == {"0": 2, "3": 9, "7.0": 6, "9": 5}


def test_global_allocation_out_of_reach_and_bad_names_are_named():
    with pytest.raises(ValueError, match=r"sparsity=0\.9 .*out of reach with floor=0\.5"):
        ChannelPruner(cnn(), 0.9, calibration(), allocation="global", floor=0.5)
    with pytest.raises(ValueError, match=r"allocation='size'.*uniform, global"):
        ChannelPruner(cnn(), 0.5, calibration(), allocation="size")
    with pytest.raises(ValueError, match=r"floor=0"):
        ChannelPruner(cnn(), 0.5, calibration(), allocation="global", floor=0)
    with pytest.raises(ValueError, match=r"widths names '12'; prunable layers: 0, 3, 7\.0, 9"):
        ChannelPruner(cnn(), 0.5, calibration(), widths={"12": 3})
    with pytest.raises(ValueError, match=r"widths\['3'\]=13; allowed: an integer in 1\.\.12"):
        ChannelPruner(cnn(), 0.5, calibration(), widths={"3": 13})
    with pytest.raises(ValueError, match="widths apply to allocation='uniform'"):
        ChannelPruner(cnn(), 0.5, calibration(), allocation="global", widths={"3": 6})
    with pytest.raises(ValueError, match="widths need a sparsity above 0"):
        ChannelPruner(cnn(), 0.0, calibration(), widths={"3": 6})


def train_pruned_replica(rank, world_size, out_dir):
    torch.manual_seed(rank)  # different init per rank: DDP's broadcast must fix it
    model = cnn()
    ddp = DistributedDataParallel(model)
    opt = QuantizedOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, "linear", 3)
    pruner = ChannelPruner(
        ddp, SparsitySchedule(0.5, "cubic", 0.0, 2, 20), calibration(), every=4,
        rank_weight=0.1, optimizer=opt,
    )  # fmt: skip
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for step in range(1, 26):
        opt.zero_grad()
        out = ddp(torch.randn(8, 3, 8, 8, generator=g))
        loss = nn.functional.cross_entropy(out, torch.randint(0, 5, (8,), generator=g))
        (loss + pruner.regularizer()).backward()
        opt.step()
        pruner.step(step)
    torch.save(
        {  # buffers left out: DDP broadcasts rank 0's batch-norm statistics at each forward
            "params": dict(model.named_parameters()),
            "latent": opt.latent,
            "pruner": pruner.state_dict(),
        },
        out_dir / f"rank{rank}.pt",
    )
    del ddp
    gc.collect()


@pytest.mark.slow
def test_channel_masks_agree_across_ranks_without_communication(tmp_path):
    """Each rank votes on the same calibration batch through the same weights: the masks, the
    rankings and so the weights stay bit-identical though every rank trains on its own data."""
    run_workers(train_pruned_replica, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for kind in ("params", "latent"):
        for name in r0[kind]:
            assert torch.equal(r0[kind][name], r1[kind][name]), (kind, name)
    for name in r0["pruner"]["keep"]:
        assert torch.equal(r0["pruner"]["keep"][name], r1["pruner"]["keep"][name])
        assert torch.equal(r0["pruner"]["ranking"][name], r1["pruner"]["ranking"][name])
        assert int(r0["pruner"]["keep"][name].sum()) < r0["pruner"]["keep"][name].numel()
