"""Sharded checkpoints of an FSDP run: every rank writes its own rows of the model and optimizer
state through torch.distributed.checkpoint (DCP) into one directory, `step-<step>.dcp/`, so no
rank ever holds the whole model.

The directory holds DCP's files (`.metadata` and a `__<rank>_0.distcp` per rank), `distq.pt`
(everything else a checkpoint holds, with a spec {shape, dtype, sharded} in place of each model
and optimizer tensor) and `MANIFEST.sha256` (every other file's SHA-256). It is written under a
temporary name and renamed once complete and fsynced, so a kill leaves the earlier checkpoints and
either all of the new one or none of it; `read` checks every file against the manifest. The
directory must be on a filesystem every rank sees (a cluster's shared one); `save` checks that.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from distq.launch.durable import fsync_directory, sha256_of, write_small_atomic
from distq.quant.sharded import shard_rows

SUFFIX = ".dcp"
PAYLOAD_NAME = "distq.pt"
MANIFEST_NAME = "MANIFEST.sha256"
TENSOR_PARTS = ("model", "optimizer")  # the payload entries whose tensors DCP writes
_SPEC = "dcp_tensor"  # marks a spec dict in distq.pt


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint with a missing, extra or altered file, or one no rank can share."""


def save(payload: dict[str, Any] | None, parts: dict[str, Any], path: Path) -> None:
    """Write the checkpoint directory `path` (a collective over the default group; on rank 0 it
    returns once `path` has its name). `parts`: this rank's `TENSOR_PARTS` (state dicts whose
    DTensors are its rows); `payload`: the rest of the checkpoint, on rank 0 (None elsewhere)."""
    rank = dist.get_rank()
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _check_shared(tmp)
    skeleton, tensors = _split(parts)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))
    if rank == 0:
        _finish(tmp, {**(payload or {}), **skeleton}, path)


def read(path: Path) -> dict[str, Any]:
    """The checkpoint's payload with specs in place of its model and optimizer tensors, after
    checking every file against the manifest (ShardedCheckpointError if one differs)."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        raise ShardedCheckpointError(f"sharded checkpoint {str(path)!r} has no {MANIFEST_NAME}")
    recorded = dict(line.split("  ", 1)[::-1] for line in manifest.read_text().splitlines())
    present = {p.name for p in path.iterdir()} - {MANIFEST_NAME}
    if present != recorded.keys():
        raise ShardedCheckpointError(
            f"sharded checkpoint {str(path)!r} holds {sorted(present)}; its manifest lists "
            f"{sorted(recorded)}"
        )
    for name, digest in recorded.items():
        if sha256_of(path / name) != digest:
            raise ShardedCheckpointError(
                f"sharded checkpoint {str(path)!r} is corrupt: {name}'s SHA-256 differs from the "
                "one recorded when it was written"
            )
    return torch.load(path / PAYLOAD_NAME, map_location="cpu", weights_only=True)


def fill(state: dict[str, Any], path: Path, mesh: DeviceMesh | None) -> dict[str, Any]:
    """`state` (what `read` returned) with its specs replaced by tensors read from `path`: each
    sharded one as this rank's rows on `mesh` (a collective over the mesh), or whole when `mesh`
    is None (no process group needed: `distq export`)."""
    templates: dict[str, torch.Tensor] = {}

    def template(spec: dict) -> torch.Tensor:
        shape, dtype = torch.Size(spec["shape"]), getattr(torch, spec["dtype"])
        if spec["sharded"] and mesh is not None:
            rank, world = mesh.get_local_rank(), mesh.size()
            start, stop = shard_rows(shape[0], rank, world)
            rows = torch.empty((stop - start, *shape[1:]), dtype=dtype)
            stride = torch.empty(shape, device="meta").stride()
            tensor = DTensor.from_local(rows, mesh, [Shard(0)], shape=shape, stride=stride)
        else:
            tensor = torch.empty(shape, dtype=dtype)
        templates[spec["key"]] = tensor
        return tensor

    filled = {k: _map_specs(v, template) if k in TENSOR_PARTS else v for k, v in state.items()}
    with warnings.catch_warnings():  # no_dist is what it asks: one process, whole tensors
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(templates, storage_reader=dcp.FileSystemReader(path), no_dist=mesh is None)
    return filled


def is_sharded(path: Path) -> bool:
    """Whether `path` names a sharded checkpoint (a directory), not a one-file one."""
    return path.is_dir()


def _finish(tmp: Path, payload: dict[str, Any], path: Path) -> None:
    """Rank 0, after every rank wrote its shards: the payload, the manifest, then the name."""
    with (tmp / PAYLOAD_NAME).open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    digests = sorted((p.name, sha256_of(p)) for p in tmp.iterdir())
    write_small_atomic(tmp / MANIFEST_NAME, "".join(f"{d}  {n}\n" for n, d in digests))
    fsync_directory(tmp)
    replaced = path.with_name(f".{path.name}.replaced")
    if path.exists():  # the same step saved again: swap, then drop the earlier copy
        os.replace(path, replaced)
    os.replace(tmp, path)
    fsync_directory(path.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _check_shared(tmp: Path) -> None:
    """Every rank must see the directory rank 0 made; all ranks raise together otherwise."""
    dist.barrier()
    missing = torch.tensor([0 if tmp.is_dir() else 1])
    dist.all_reduce(missing)
    if int(missing):
        raise ShardedCheckpointError(
            f"{int(missing)} rank(s) do not see {str(tmp.parent)!r}, which rank 0 writes into: "
            "sharded checkpoints need a filesystem every rank shares; use "
            "checkpoint_format='file' (rank 0 writes one file) without one"
        )


def _split(parts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`parts` with each tensor replaced by its spec, and the tensors by key (DCP's names)."""
    tensors: dict[str, torch.Tensor] = {}

    def to_spec(tensor: torch.Tensor, key: str) -> dict:
        sharded = isinstance(tensor, DTensor)
        if sharded and tuple(tensor.placements) != (Shard(0),):
            raise ValueError(f"{key}: placements {tensor.placements}; allowed: (Shard(0),)")
        tensors[key] = tensor
        dtype = str(tensor.dtype).removeprefix("torch.")
        return {_SPEC: True, "key": key, "shape": list(tensor.shape), "dtype": dtype,
                "sharded": sharded}  # fmt: skip

    return {k: _map_tensors(v, to_spec, k) for k, v in parts.items()}, tensors


def _map_tensors(value: Any, fn, key: str) -> Any:
    """`value` with fn(tensor, its key) in place of each tensor in nested dicts/lists."""
    if isinstance(value, torch.Tensor):
        return fn(value, key)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn, f"{key}/{i}") for i, v in enumerate(value))
    return value


def _map_specs(value: Any, fn) -> Any:
    """`value` with fn(spec) in place of each spec `_split` made."""
    if isinstance(value, dict):
        if value.get(_SPEC) is True:
            return fn(value)
        return {k: _map_specs(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_specs(v, fn) for v in value)
    return value
