"""`distq.comm.allreduce`: the quantized average of a tensor over ranks, for custom loops."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from distq.comm.clipping import clip_by_rms_
from distq.comm.collectives import quantized_sum
from distq.comm.compressors import Compressor, StochasticQuantizer
from distq.comm.exchange import NONFINITE_POLICIES
from distq.comm.noise import Key

_calls: dict[str, int] = {}  # calls so far per process group name (the default noise key)


def allreduce(
    tensor: Tensor,
    bits: int | None = None,
    bucket_size: int | None = 512,
    clip: float | None = None,
    collective: str = "scatter",
    group: dist.ProcessGroup | None = None,
    *,
    compressor: Compressor | None = None,
    key: Key | None = None,
    nonfinite: str = "raise",
) -> Tensor:
    """Average floating-point `tensor` over the ranks of `group` through `bits`-bit stochastic
    codes (default 2, or `compressor`'s width): a new tensor, bit-identical on every rank and
    unbiased, E[result] = mean of the (clipped at clip·√mean(x²)) inputs; the input itself on
    one rank. Every rank calls it in the same order. `key` fixes the rounding noise (default:
    this process's call count on `group`, seeded by the group's name). `nonfinite`: 'raise'
    FloatingPointError on every rank alike if any input holds NaN/Inf, or 'propagate' the NaN.
    """
    if not tensor.is_floating_point():
        raise TypeError(
            f"allreduce averages floating-point tensors; got dtype {tensor.dtype} (cast it, "
            "e.g. tensor.float(): an integer average would be truncated)"
        )
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}; allowed: {', '.join(NONFINITE_POLICIES)}")
    if compressor is None:
        compressor = StochasticQuantizer(2 if bits is None else bits, bucket_size)
    elif bits is not None and bits != compressor.wire.bits:
        raise ValueError(
            f"bits={bits} contradicts compressor {type(compressor).__name__}, which sends "
            f"{compressor.wire.bits} bit(s); allowed: bits={compressor.wire.bits} or bits=None"
        )
    if dist.get_world_size(group) == 1:
        return _checked(tensor.detach().clone(), nonfinite)
    if key is None:
        key = _next_key(group)
    x = tensor.detach().to(torch.float32, copy=True).reshape(-1)
    if clip is not None:
        clip_by_rms_(x, clip)
    total, _ = quantized_sum(x, compressor, key, collective, group, inplace=True)
    average = (total / dist.get_world_size(group)).reshape(tensor.shape).to(tensor.dtype)
    return _checked(average, nonfinite)


def _next_key(group: dist.ProcessGroup | None) -> Key:
    """Key of this process's next call on `group`: (group's name, its call count, rank)."""
    name = (group or dist.group.WORLD).group_name
    step = _calls.get(name, 0)
    _calls[name] = step + 1
    return Key(seed=zlib.crc32(name.encode()), step=step, rank=dist.get_rank())


def _checked(average: Tensor, nonfinite: str) -> Tensor:
    """The average, or FloatingPointError under 'raise' if it holds NaN/Inf (alike everywhere)."""
    if nonfinite == "raise" and not torch.isfinite(average).all():
        raise FloatingPointError(
            "non-finite value in allreduce's average: some rank's input holds NaN/Inf "
            "(every rank raises alike; nonfinite='propagate' returns the NaN instead)"
        )
    return average
