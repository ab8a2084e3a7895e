"""Sharded checkpoints (torch.distributed.checkpoint, 2 real gloo ranks on one filesystem): each
rank reads back exactly its rows, `checkpoint.load` gives the whole tensors a one-file checkpoint
holds, the newest `keep` survive, and an altered, missing or extra file is found, set aside and
the checkpoint before it used; a torn save's directory is never loaded and is cleaned up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from distq.dtensors import whole
from distq.launch import checkpoint, sharded_checkpoint
from distq.optim import QuantizedOptimizer
from tests.distributed import run_workers


def _trained() -> tuple[nn.Module, QuantizedOptimizer]:
    """A ternary MLP sharded by FSDP2, two Adam steps taken (so every state tensor exists)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model,
                             keep_full_precision=())  # fmt: skip
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(2):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _equal(a, b) -> bool:
    """Nested state equal, DTensors compared by this rank's rows."""
    if isinstance(a, DTensor) or isinstance(b, DTensor):
        same_kind = isinstance(a, DTensor) and isinstance(b, DTensor)
        return same_kind and a.shape == b.shape and torch.equal(a.to_local(), b.to_local())
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _round_trip(rank: int, world: int, out: str) -> None:
    model, opt = _trained()
    store = checkpoint.CheckpointStore(out, keep=2)
    torn = store.directory / ".step-00000009.dcp.tmp"  # what a kill during a save leaves
    if rank == 0:
        torn.mkdir(parents=True)
        (torn / "__0_0.distcp").write_bytes(b"cut short")
    parts = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    for step in (1, 2, 3):
        payload = {"format": 2, "step": step} if rank == 0 else None
        written = store.save_sharded(payload, parts, step)
        assert (written is not None) == (rank == 0)
    assert [p.name for p in store.paths()] == ["step-00000002.dcp", "step-00000003.dcp"]
    assert not torn.exists()
    newest = store.directory / "step-00000003.dcp"
    assert store.latest.resolve() == newest.resolve()
    assert {p.name for p in newest.iterdir()} == {
        ".metadata",
        *(f"__{r}_0.distcp" for r in range(world)),
        "distq.pt",
        "MANIFEST.sha256",
    }

    state = checkpoint.load_verified(newest)  # specs only: what rank 0 sends the others
    spec = {"key": "model/0.weight", "shape": [9, 6], "dtype": "float32", "sharded": True}
    assert state["model"]["0.weight"] == {"dcp_tensor": True, **spec}
    mesh = model[0].weight.device_mesh
    read = sharded_checkpoint.fill(state, newest, mesh)
    assert read["step"] == 3
    assert _equal(read["model"], parts["model"]) and _equal(read["optimizer"], parts["optimizer"])
    expected = whole(parts)  # a collective: every rank gathers
    dist.barrier()
    if rank == 0:
        loaded = checkpoint.load(store.latest)  # whole tensors, no process group used
        assert _equal(loaded["model"], expected["model"])
        assert _equal(loaded["optimizer"], expected["optimizer"])
    dist.barrier()


@pytest.mark.slow
def test_each_rank_reads_back_its_rows_and_export_reads_whole(tmp_path):
    run_workers(_round_trip, 2, str(tmp_path))


def _saved(rank: int, world: int, out: str) -> None:
    model, opt = _trained()
    store = checkpoint.CheckpointStore(out, keep=3)
    for step in (1, 2):
        parts = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        store.save_sharded({"step": step} if rank == 0 else None, parts, step)


@pytest.fixture
def two_saved(tmp_path) -> checkpoint.CheckpointStore:
    """A store with sharded checkpoints of steps 1 and 2, written by 2 ranks."""
    run_workers(_saved, 2, str(tmp_path))
    return checkpoint.CheckpointStore(tmp_path, keep=3)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda d: _flip_a_byte(d / "__1_0.distcp"), "__1_0.distcp's SHA-256 differs"),
        (lambda d: (d / "__0_0.distcp").unlink(), "holds"),
        (lambda d: (d / "stray.bin").write_bytes(b"x"), "holds"),
        (lambda d: (d / "MANIFEST.sha256").unlink(), "has no MANIFEST.sha256"),
    ],
    ids=["flipped bit in rank 1's shard", "missing shard", "extra file", "no manifest"],
)
def test_damaged_checkpoint_is_set_aside_and_the_one_before_used(two_saved, damage, error):
    newest = two_saved.paths()[-1]
    damage(newest)
    with pytest.raises(checkpoint.CheckpointError, match=error):
        checkpoint.load_verified(newest)
    state, path = two_saved.load_newest()
    assert path.name == "step-00000001.dcp" and state["step"] == 1
    assert [p.name for p in two_saved.corrupt()] == ["step-00000002.dcp"]
