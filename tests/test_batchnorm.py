"""distq.batchnorm.recalibrate: the running statistics are the batch averages computed by hand,
nothing but the norms runs in training mode, and ranks end with rank 0's statistics."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional

from distq.batchnorm import batch_norms, recalibrate
from distq.lstm import BatchSharedNorm, QuantLSTM
from tests.distributed import run_workers


def _net() -> nn.Sequential:
    """conv → bn2d → relu → flatten → linear → dropout → bn1d → linear: the dropout before the
    second norm changes its statistics unless it is off."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.Dropout(0.5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 3),
    )


def _batches(seed: int, count: int = 4, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=g) * 2 + 1 for _ in range(count)]


def _by_hand(net: nn.Sequential, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Each norm's (mean of batch means, mean of unbiased batch variances), the first norm
    normalizing with its batch statistics as in training, no dropout."""
    conv, bn2, _, _, linear, _, _, _ = net
    first, second = [], []
    for x in batches:
        a = conv(x)
        first.append((a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=True)))
        h = functional.batch_norm(a, None, None, bn2.weight, bn2.bias, training=True)
        b = linear(torch.relu(h).flatten(1))
        second.append((b.mean(0), b.var(0, unbiased=True)))
    return [
        tuple(torch.stack(stats).mean(0) for stats in zip(*per_norm, strict=True))
        for per_norm in (first, second)
    ]


def test_statistics_are_the_batch_averages_with_only_the_norms_in_training_mode():
    net = _net()
    net.train()
    net[1].momentum = 0.3
    batches = _batches(1)
    assert recalibrate(net, batches) == 2
    with torch.no_grad():
        expected = _by_hand(net, batches)
    for norm, (mean, var) in zip(batch_norms(net), expected, strict=True):
        torch.testing.assert_close(norm.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(norm.num_batches_tracked) == len(batches)
    assert all(m.training for m in net.modules()), "modes are restored"
    assert (net[1].momentum, net[6].momentum) == (0.3, 0.1), "momenta are restored"


def test_the_lstm_batch_shared_norm_gets_the_average_of_its_time_steps():
    """Each forward's statistics averaged over its calls (one for the input term, one per time
    step for the recurrent term), then over the batches; recorded from the terms it normalized."""
    torch.manual_seed(0)
    lstm = QuantLSTM(3, 4, norm="batch-shared")
    norms = [m for m in lstm.modules() if isinstance(m, BatchSharedNorm)]
    assert batch_norms(lstm) == norms and len(norms) == 2
    seen: dict[BatchSharedNorm, list[list[torch.Tensor]]] = {n: [] for n in norms}
    for norm in norms:  # record every term a forward hands to the norm
        bind = norm.bind

        def recording(weight, calls=1, norm=norm, bind=bind):
            normalize, terms = bind(weight, calls), []
            seen[norm].append(terms)

            def run(a):
                terms.append(a.detach().clone())
                return normalize(a)

            return run

        norm.bind = recording
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, 5, 3, generator=g) for _ in range(3)]
    assert recalibrate(lstm, batches) == 2
    for norm in norms:
        forwards = [f for f in seen[norm] if f]
        assert len(forwards) == len(batches)
        means, variances = [], []
        for terms in forwards:
            flat = [t.reshape(t.shape[0], -1, norm.features) for t in terms]
            means.append(torch.stack([f.mean(0).mean(0) for f in flat]).mean(0))
            variances.append(torch.stack([f.var(0, unbiased=True).mean(0) for f in flat]).mean(0))
        torch.testing.assert_close(
            norm.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            norm.running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6
        )
        assert norm.momentum == 0.1


def test_eval_mode_model_stays_in_eval_mode():
    net = _net().eval()
    recalibrate(net, _batches(2))
    assert not any(m.training for m in net.modules())


def test_a_model_without_batch_norms_runs_no_forward():
    net = nn.Sequential(nn.Flatten(), nn.Linear(108, 2))
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    assert recalibrate(net, _batches(3)) == 0
    assert not calls


def test_no_batches_is_refused_and_the_statistics_are_kept():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.train()(_batches(4)[0])  # running statistics away from their initial values
    moved = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate(net, [])
    assert all(torch.equal(moved[k], v) for k, v in net.state_dict().items())


def _ranks_take_rank_zeros_statistics(rank: int, world_size: int) -> None:
    net = _net()
    batches = _batches(10 + rank)  # each rank its own data: their statistics would differ
    recalibrate(net, batches)
    mine = torch.cat([torch.cat([n.running_mean, n.running_var]) for n in batch_norms(net)])
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    with torch.no_grad():
        rank0 = torch.cat([torch.cat(stats) for stats in _by_hand(net, _batches(10))])
    torch.testing.assert_close(mine, rank0, rtol=1e-5, atol=1e-6)


def test_ranks_end_with_rank_zeros_statistics():
    run_workers(_ranks_take_rank_zeros_statistics, 2)
