"""Gradient buckets for engines without DDP's reducer (DeepSpeed, Horovod): parameters grouped
in a fixed order, flattened into one float32 buffer per bucket and written back after the
exchange. The order is the same on every rank, so collectives are issued in the same order."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

DEFAULT_CAP_MB = 25  # DDP's default bucket size


def plan_buckets(params: Iterable[nn.Parameter], cap_mb: float = DEFAULT_CAP_MB) -> list[list]:
    """Trainable parameters in reverse registration order (roughly the order backward produces
    their gradients, as DDP does), cut into buckets of at most `cap_mb` MB of float32."""
    if not cap_mb > 0:
        raise ValueError(f"bucket_cap_mb={cap_mb!r}; allowed: a positive number of megabytes")
    cap = max(1, int(cap_mb * 2**20) // 4)
    buckets: list[list] = []
    size = cap
    for p in reversed([p for p in params if p.requires_grad]):
        if size + p.numel() > cap and size > 0:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets


def flatten_grads(params: list[nn.Parameter]) -> Tensor:
    """The parameters' gradients as one float32 vector (a missing gradient counts as zeros, as
    DDP treats an unused parameter)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in params
        ]
    )


def write_grads(flat: Tensor, params: list[nn.Parameter]) -> None:
    """Copy `flat` back into the gradients (creating any that were missing)."""
    offset = 0
    for p in params:
        values = flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = values.to(p.dtype, copy=True)
        else:
            p.grad.copy_(values)
        offset += p.numel()
