"""QuantizedOptimizer on FSDP2-sharded models (torch's fully_shard, real gloo groups): latent
weights and Adam state live as dim-0 shards, and the ŵ every rank's shard computes is the
unsharded projection of the gathered latent weights, for every kind of scheme and an LSTM's
gate blocks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from distq.comm.fsdp import shard_model
from distq.lstm import QuantLSTM
from distq.optim import QuantizedOptimizer
from distq.quant import get_scheme, project
from distq.quant.sharded import shard_rows
from tests.distributed import run_workers

SETUPS = {  # name: (scheme, bits, options)
    "ternary": ("ternary", None, {}),
    "linear-3 (warm start)": ("linear", 3, {}),
    "binary": ("binary", None, {}),
    "ternary-approx": ("ternary-approx", None, {}),
    "absmean": ("absmean", None, {}),
    "ternary per channel": ("ternary", None, {"per_channel": True}),
    "ternary, half zeros": ("ternary", None, {"sparsity": 0.5}),
    "shared-2 (codebook)": ("shared", 2, {}),
}


def _sharded_mlp() -> nn.Module:
    torch.manual_seed(0)  # every rank builds the same model; fully_shard keeps its own rows
    model = nn.Sequential(
        nn.Linear(12, 37), nn.ReLU(), nn.Linear(37, 29), nn.ReLU(), nn.Linear(29, 5)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _train(model: nn.Module, opt: QuantizedOptimizer, rank: int, steps: int) -> dict:
    """`steps` Adam steps on this rank's own batches; returns each tensor's α before the last."""
    g = torch.Generator().manual_seed(1 + rank)
    before = {}
    for step in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        if step == steps - 1:
            before = {n: a.clone() for n, a in opt.alpha.items()}
        opt.step()
        opt.zero_grad()
    return before


def _projections_match(rank: int, world: int, setups: list[str]) -> None:
    torch.set_num_threads(1)
    for setup in setups:
        scheme, bits, options = SETUPS[setup]
        model = _sharded_mlp()
        adam = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt = QuantizedOptimizer(adam, model, scheme, bits, keep_full_precision=(), **options)
        before = _train(model, opt, rank, steps=4)
        for name, p in opt.quantized_parameters().items():
            latent = opt.latent[name].full_tensor()
            d = opt.curvature(p).full_tensor()
            warm = get_scheme(scheme).warm_start
            if warm and options.get("per_channel"):
                before[name] = torch.cat(_gathered_rows(before[name], world))
            extra = {"alpha_init": before[name]} if warm else {}
            whole = project(latent, d, scheme, bits, **options, **extra)
            q = p.full_tensor()
            assert torch.equal(torch.sign(q), torch.sign(whole.q)), (setup, name)
            assert torch.allclose(q, whole.q, rtol=1e-5, atol=0), (setup, name)
            rows = shard_rows(latent.shape[0], rank, world)
            assert opt.latent[name].to_local().shape[0] == rows[1] - rows[0]
            for state in adam.state[p].values():  # Adam's moments: the same rows
                if state.dim():
                    assert state.to_local().shape == opt.latent[name].to_local().shape
            if not options.get("per_channel"):  # one α per tensor: the same on every rank
                alphas = [torch.empty_like(opt.alpha[name]) for _ in range(world)]
                dist.all_gather(alphas, opt.alpha[name].contiguous())
                assert all(torch.equal(a, alphas[0]) for a in alphas), (setup, name)


def _gathered_rows(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's per-channel α rows (uneven lengths: padded to the longest, then cut)."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(t)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *t.shape[1:], dtype=t.dtype)
    padded[: len(t)] = t
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return [p[: int(s.item())] for p, s in zip(pieces, sizes, strict=True)]


def test_sharded_projection_is_the_unsharded_one_for_every_kind_of_scheme():
    run_workers(_projections_match, 2, list(SETUPS))


def test_sharded_projection_on_four_ranks():
    run_workers(_projections_match, 4, ["ternary", "linear-3 (warm start)"])


def _nan_on_one_rank(rank: int, world: int) -> None:
    model = _sharded_mlp()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters()), model, keep_full_precision=())
    nn.functional.cross_entropy(model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    first = next(iter(opt.quantized_parameters().values()))
    if rank == 1:
        first.grad.to_local()[0, 0] = math.nan
    latent = {n: t.to_local().clone() for n, t in opt.latent.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert opt.skipped_steps == 1  # on both ranks, whichever shard held the NaN
    assert any("step skipped" in str(w.message) for w in caught)
    assert all(torch.equal(t.to_local(), latent[n]) for n, t in opt.latent.items())


def test_a_nan_in_one_shard_skips_the_step_on_every_rank():
    run_workers(_nan_on_one_rank, 2)


def _global_scope_refused(rank: int, world: int) -> None:
    model = _sharded_mlp()
    with pytest.raises(ValueError, match=r"sparsity_scope='global'.*allowed with FSDP: 'tensor'"):
        QuantizedOptimizer(
            torch.optim.Adam(model.parameters()), model, sparsity=0.5, sparsity_scope="global"
        )


def test_global_sparsity_is_refused_on_shards():
    run_workers(_global_scope_refused, 2)


def _lstm_gate_blocks(rank: int, world: int) -> None:
    """An unrolled LSTM layer reads its gate matrices in its own forward: shard_model keeps it
    one FSDP unit, and each gate block's α is the whole block's across the shard rows."""
    torch.manual_seed(0)
    model, _ = shard_model(QuantLSTM(6, 10), weights="packed", bits=2)
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model,
                             keep_full_precision=())  # fmt: skip
    g = torch.Generator().manual_seed(1 + rank)
    for _ in range(3):
        out, _ = model(torch.randn(4, 5, 6, generator=g))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    for name, p in opt.quantized_parameters().items():
        assert opt.blocks[name] == 4 and opt.alpha[name].shape == (4,)
        whole = project(opt.latent[name].full_tensor(), opt.curvature(p).full_tensor(), blocks=4)
        q = p.full_tensor()
        assert torch.equal(torch.sign(q), torch.sign(whole.q)), name
        assert torch.allclose(q, whole.q, rtol=1e-5, atol=0), name


def test_lstm_gate_blocks_are_projected_whole_across_shards():
    run_workers(_lstm_gate_blocks, 2)
