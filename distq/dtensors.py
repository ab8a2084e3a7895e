"""Whole tensors and FSDP2's row shards (DTensors placed Shard(0)), for checkpoints.

A checkpoint of a sharded run holds whole tensors, as a DDP run's does: `whole` gathers them
(a collective: every rank calls it on the same structure), `shard_like` cuts a loaded one back
to this rank's rows. So `distq export`, the resume checks and a later run at another world size
read one format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from distq.quant.sharded import shard_rows

__all__ = ["local", "rows_like", "shard_like", "shard_optimizer_state", "whole"]


def local(t: Tensor | None) -> Tensor | None:
    """This rank's piece of a DTensor; any other tensor (or None) as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(value: Any) -> Any:
    """`value` with every DTensor in it (dicts, lists, tuples) gathered whole, on every rank."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(whole(v) for v in value)
    return value


def shard_like(value: Any, like: Tensor) -> Any:
    """A whole saved tensor with `like`'s first dimension, cut to this rank's rows as `like` (a
    DTensor placed Shard(0)) is; anything else (a step count, a replicated scale, a tensor
    already sharded) as it is."""
    if not isinstance(like, DTensor) or not isinstance(value, Tensor) or isinstance(value, DTensor):
        return value
    if not value.dim() or value.shape[0] != like.shape[0]:
        return value
    group = like.device_mesh.get_group()
    start, stop = shard_rows(like.shape[0], dist.get_rank(group), dist.get_world_size(group))
    piece = value[start:stop].to(like.dtype).clone()
    return DTensor.from_local(
        piece, like.device_mesh, like.placements, shape=value.shape, stride=value.stride()
    )


def shard_optimizer_state(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict:
    """A torch optimizer's saved `state_dict` (whole tensors, as `whole` gathered them) with each
    parameter's per-parameter tensors cut to this rank's rows of that parameter, so
    `optimizer.load_state_dict` gets state shaped like its (possibly sharded) parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        index: {k: shard_like(v, params[index]) for k, v in entry.items()}
        for index, entry in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def rows_like(t: Tensor, like: Tensor) -> Tensor:
    """This rank's rows `t` of a tensor sharded as `like` (per-channel scales of an FSDP
    parameter), as a DTensor so `whole` gathers them; `t` itself when `like` is no DTensor."""
    if not isinstance(like, DTensor):
        return t
    shape = (like.shape[0], *t.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, like.device_mesh, like.placements, shape=shape, stride=stride)
