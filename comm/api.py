"""`distq.comm.allreduce`: the quantized average of a tensor over ranks, for custom loops."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import Tensor

from distq.comm.clipping import clip_by_std_
from distq.comm.collectives import quantized_sum
from distq.comm.compressors import Compressor, StochasticQuantizer
from distq.comm.noise import Key

_calls = itertools.count()


def allreduce(
    tensor: Tensor,
    bits: int = 2,
    bucket_size: int | None = 512,
    clip: float | None = None,
    collective: str = "scatter",
    group: dist.ProcessGroup | None = None,
    *,
    compressor: Compressor | None = None,
    key: Key | None = None,
) -> Tensor:
    """Average `tensor` over the ranks of `group`, sending `bits`-bit stochastic codes.

    Returns a new tensor (same shape and dtype), bit-identical on every rank and unbiased:
    E[result] = mean of the (clipped) inputs. Every rank must call it in the same order. `key`
    fixes the rounding noise (default: a per-process call counter, the same on every rank).
    """
    compressor = compressor or StochasticQuantizer(bits, bucket_size)
    if key is None:
        key = Key(step=next(_calls), rank=dist.get_rank())
    x = tensor.detach().to(torch.float32, copy=True).reshape(-1)
    if clip is not None:
        clip_by_std_(x, clip)
    total, _ = quantized_sum(x, compressor, key, collective, group, inplace=True)
    return (total / dist.get_world_size(group)).reshape(tensor.shape).to(tensor.dtype)
