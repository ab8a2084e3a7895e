"""The wire format a compressor declares: collectives read it, never a compressor's class.

A payload for n elements is one uint8 tensor: the packed codes, `bits` per element, then one
scale per bucket in `scale_dtype`, little-endian bytes. Code layout (version 2): rows of w
elements (the bucket; 4096 when one scale covers the input). For bits 1, 2, 4 and 8 a whole row
is w·bits/8 bytes in p = 8/bits planes: byte j holds codes j + t·w/p at bits [t·bits, (t+1)·bits),
t = 0 … p − 1. A partial last row, and every row of other widths, are packed LSB-first in element
order (`distq.packing`: code i in bits [b·i, b·(i+1))). Either way n elements take ⌈n·bits/8⌉
code bytes, or, with `whole_buckets` (a transform over the bucket fills its padding with codes
that matter), ⌈B·w·bits/8⌉ for B buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distq.packing import packed_nbytes

LAYOUT_VERSION = 2
SCALE_DTYPES = (torch.float32, torch.float16)


@dataclass(frozen=True)
class WireFormat:
    """bits per element, elements per scale (None: one scale per tensor or chunk), scale dtype,
    whether the scales must be agreed on (max-reduced) across ranks before encoding, and whether
    a partial last bucket is sent whole (`whole_buckets`)."""

    bits: int
    bucket_size: int | None
    scale_dtype: torch.dtype = torch.float32
    shared_scale: bool = False
    layout_version: int = LAYOUT_VERSION
    whole_buckets: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits}; allowed: 1..8")
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"bucket_size={self.bucket_size}; allowed: a positive int or None")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype}; allowed: float32, float16")
        if self.whole_buckets and self.bucket_size is None:
            raise ValueError("whole_buckets=True needs a bucket_size; allowed: a positive int")

    def buckets(self, numel: int) -> int:
        """Number of scales for `numel` elements (none for an empty tensor)."""
        return min(numel, 1) if self.bucket_size is None else -(-numel // self.bucket_size)

    def code_nbytes(self, numel: int) -> int:
        """Bytes of the packed codes of `numel` elements."""
        if self.whole_buckets:
            numel = self.buckets(numel) * self.bucket_size
        return packed_nbytes(numel, self.bits)

    def payload_nbytes(self, numel: int) -> int:
        """Bytes on the wire for `numel` elements: packed codes plus the scales."""
        return self.code_nbytes(numel) + self.buckets(numel) * self.scale_dtype.itemsize

    def chunk_unit(self) -> int:
        """Smallest element count whose codes fill whole bytes and whole buckets."""
        per_byte = 8 // math.gcd(self.bits, 8)
        return per_byte if self.bucket_size is None else math.lcm(self.bucket_size, per_byte)


def split(payload: Tensor, numel: int, wire: WireFormat) -> tuple[Tensor, Tensor]:
    """(packed codes, float32 scales) of a payload of `numel` elements."""
    n_codes = wire.code_nbytes(numel)
    if payload.numel() != wire.payload_nbytes(numel):
        raise ValueError(
            f"payload has {payload.numel()} bytes, {numel} elements need "
            f"{wire.payload_nbytes(numel)} in {wire}"
        )
    scales = payload[n_codes:].clone().view(wire.scale_dtype).to(torch.float32)
    return payload[:n_codes], scales
