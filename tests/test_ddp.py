"""QuantizedOptimizer inside real 2-rank gloo DDP: replicas stay bit-identical."""

import gc

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.optim import QuantizedOptimizer
from distq.quant.sparse import SparsitySchedule
from tests.distributed import run_workers

pytestmark = pytest.mark.slow
STEPS = 50


def train_replica(rank, world_size, out_dir, scheme, bits, sparse=None):
    torch.manual_seed(rank)  # different init per rank: DDP's broadcast must fix it before wrapping
    model = nn.Sequential(
        nn.Linear(12, 48),
        nn.ReLU(),
        nn.Linear(48, 48),
        nn.ReLU(),
        nn.Linear(48, 48),
        nn.ReLU(),
        nn.Linear(48, 4),
    )
    ddp = DistributedDataParallel(model)
    opt = QuantizedOptimizer(
        torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, scheme, bits, **(sparse or {})
    )
    initial = {n: t.clone() for n, t in opt.latent.items()}
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for _ in range(STEPS):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save(
        {"params": model.state_dict(), "latent": opt.latent, "initial": initial},
        out_dir / f"rank{rank}.pt",
    )
    del ddp
    gc.collect()


@pytest.mark.parametrize(("scheme", "bits"), [("ternary", None), ("linear", 3), ("shared", 3)])
def test_replicas_are_bit_identical_after_50_steps(tmp_path, scheme, bits):
    run_workers(train_replica, 2, tmp_path, scheme, bits)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for kind in ("params", "latent", "initial"):
        assert r0[kind].keys() == r1[kind].keys()
        for name in r0[kind]:
            assert torch.equal(r0[kind][name], r1[kind][name]), (kind, name)
    levels = {"ternary": 3, "linear": 7, "shared": 8}[scheme]
    assert len(r0["params"]["2.weight"].unique()) <= levels
    # the run really trained: latent weights moved away from the broadcast initial values
    assert (r0["latent"]["2.weight"] - r0["initial"]["2.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("scheme", "bits", "sparse", "density"),
    [
        ("ternary", None, {"sparsity": SparsitySchedule(0.75, "cubic", 0.0, 5, 40)}, 0.25),
        ("linear", 3, {"sparsity": 0.5, "sparsity_scope": "global"}, 0.5),
    ],
)
def test_sparse_masks_agree_across_ranks_without_communication(tmp_path, scheme, bits, sparse,
                                                               density):
    """Masks come from replicated state (latent weights, curvature, step count): both ranks
    derive the same ones, and the budget holds at the end of the schedule."""
    run_workers(train_replica, 2, tmp_path, scheme, bits, sparse)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    quantized = [r0["params"][n] for n in ("2.weight", "4.weight")]
    kept = sum(int((w != 0).sum()) for w in quantized)
    total = sum(w.numel() for w in quantized)
    assert kept <= total * density + 2
    assert kept >= total * density * 0.5  # the budget is a cap, but training did not collapse
