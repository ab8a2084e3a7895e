"""Sub-byte bit packing of integer codes, for packed checkpoints and the gradient wire format.

Layout (every width 1..8 is a true `bits`-bit layout: 3-bit codes take 3 bits, not a 4-bit
container): the output bytes are read as one little-endian bit stream, bit k of the stream being
bit k % 8 of byte k // 8, and code i occupies stream bits [bits*i, bits*(i+1)) with its least
significant bit first. Bits after the last code in the final byte are zero; the output has
exactly ceil(numel*bits/8) bytes. Example: 2-bit codes [1, 2, 3, 0] pack to the single byte
0b00_11_10_01 = 57 (code 0 in bits 0-1, code 1 in bits 2-3, ...).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack", "packed_nbytes", "unpack"]

_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes `numel` codes of `bits` bits take: ceil(numel*bits/8)."""
    _check_bits(bits)
    _check_numel(numel)
    return (numel * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, flattened) into a 1-D uint8 tensor."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    numel = flat.numel()
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if flat.dtype in _WIDE_UNSIGNED:  # no min/max kernels for these: widen (uint64 > 2**63 wraps)
        flat = flat.to(torch.int64)
    lo, hi = (int(v) for v in torch.aminmax(flat))
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(
            f"codes must lie in [0, {1 << bits}) for bits={bits}; found min {lo}, max {hi}"
        )
    group, group_bytes, word_dtype = _grouping(bits)
    padded = _pad_to(flat.to(word_dtype), group).view(-1, group)
    shifts = torch.arange(0, bits * group, bits, dtype=word_dtype, device=flat.device)
    words = (padded << shifts).sum(dim=1, dtype=word_dtype)  # fields are disjoint: sum == OR
    if group_bytes > 1:
        byte_shifts = torch.arange(0, 8 * group_bytes, 8, dtype=word_dtype, device=flat.device)
        words = (words.unsqueeze(1) >> byte_shifts) & 0xFF
    return words.to(torch.uint8).reshape(-1)[: packed_nbytes(numel, bits)]


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Unpack `numel` codes of `bits` bits from a 1-D uint8 tensor made by `pack`; 1-D uint8."""
    _check_bits(bits)
    _check_numel(numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed has {packed.numel()} bytes but {numel} codes of {bits} bits need {expected}"
        )
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=packed.device)
    group, group_bytes, word_dtype = _grouping(bits)
    words = _pad_to(packed.to(word_dtype), group_bytes).view(-1, group_bytes)
    if group_bytes > 1:
        byte_shifts = torch.arange(0, 8 * group_bytes, 8, dtype=word_dtype, device=packed.device)
        words = (words << byte_shifts).sum(dim=1, dtype=word_dtype)
    else:
        words = words.view(-1)
    shifts = torch.arange(0, bits * group, bits, dtype=word_dtype, device=packed.device)
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]


def _grouping(bits: int) -> tuple[int, int, torch.dtype]:
    """Codes per group, bytes per group and word dtype: a group is lcm(bits, 8) bits long."""
    group_bits = math.lcm(bits, 8)
    word_dtype = {8: torch.uint8, 24: torch.int32}.get(group_bits, torch.int64)
    return group_bits // bits, group_bits // 8, word_dtype


def _pad_to(flat: Tensor, multiple: int) -> Tensor:
    """Zero-pad a 1-D tensor to a length that is a multiple of `multiple`."""
    extra = -flat.numel() % multiple
    return torch.cat([flat, flat.new_zeros(extra)]) if extra else flat


def _check_bits(bits: int) -> None:
    """Reject widths outside 1..8 (and non-integers), which the layout does not define."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _check_numel(numel: int) -> None:
    """Reject a negative or non-integer code count."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
