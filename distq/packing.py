"""Sub-byte bit packing of integer codes, for packed checkpoints and the gradient wire format.

Layout (every width 1..8 is a true `bits`-bit layout: 3-bit codes take 3 bits, not a 4-bit
container): the output bytes are read as one little-endian bit stream, bit k of the stream being
bit k % 8 of byte k // 8, and code i occupies stream bits [bits*i, bits*(i+1)) with its least
significant bit first. Bits after the last code in the final byte are zero; the output has
exactly ceil(numel*bits/8) bytes. Example: 2-bit codes [1, 2, 3, 0] pack to the single byte
0b00_11_10_01 = 57 (code 0 in bits 0-1, code 1 in bits 2-3, ...).

Base-k digits (`pack_digits`, for a code alphabet that is not a power of two): j = the most
digits a byte holds (k^j ≤ 256) go to one byte as Σ c_i·k^i, the first code in the lowest
digit; the last byte's missing digits are 0, and the output has ceil(numel/j) bytes. Ternary
codes take 5 to a byte (1.6 bits each, against 2 in the bit layout): [1, 2, 0, 0, 1] is
1 + 2·3 + 1·81 = 88.

Wider unsigned integers (`pack_uint`): widths 1..8 are the layout above; widths 16 and 32 store
each value as 2 or 4 little-endian bytes.

Gap code for sorted positions (`gap_encode`, the index form of sparse exports): positions
p_0 < p_1 < ... are coded by their gaps g_j = p_j - p_{j-1} - 1 (p_{-1} = -1), the number of
skipped slots, as symbols of a fixed width w (1..8, 16 or 32) with one escape value
E = 2**w - 1: a gap g is written as g // E escape symbols followed by the symbol g % E. A reader
adds E for an escape and s + 1 for any other symbol s, and that symbol's position is the running
sum minus 1. Nothing is written after the last position (trailing skipped slots are implicit), so
the stream has len(positions) + sum(g_j // E) symbols, packed with `pack_uint`. Width 0 writes
no symbols and codes only the positions 0, 1, ..., n-1 (every gap 0). Example, w=2 (E=3):
positions [1, 9] have gaps [1, 7] and are the symbols [1, 3, 3, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GAP_WIDTHS",
    "UINT_WIDTHS",
    "digits_nbytes",
    "digits_per_byte",
    "gap_decode",
    "gap_encode",
    "gap_symbols",
    "pack",
    "pack_digits",
    "pack_uint",
    "packed_nbytes",
    "uint_nbytes",
    "unpack",
    "unpack_digits",
    "unpack_uint",
]

_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)
UINT_WIDTHS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)  # widths pack_uint stores
GAP_WIDTHS = (0, *UINT_WIDTHS)  # symbol widths of the gap code


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes `numel` codes of `bits` bits take: ceil(numel*bits/8)."""
    _check_bits(bits)
    _check_numel(numel)
    return (numel * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, flattened) into a 1-D uint8 tensor."""
    _check_bits(bits)
    _check_integers(codes, "codes")
    flat = codes.detach().reshape(-1)
    numel = flat.numel()
    if numel == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    if flat.dtype in _WIDE_UNSIGNED:  # no min/max kernels for these: widen (uint64 > 2**63 wraps)
        flat = flat.to(torch.int64)
    _check_range(flat, bits, "codes")
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
    _check_packed(packed, packed_nbytes(numel, bits), f"{numel} codes of {bits} bits")
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


def digits_per_byte(base: int) -> int:
    """How many base-`base` digits one byte holds: the largest j with base^j ≤ 256."""
    _check_base(base)
    digits = 1
    while base ** (digits + 1) <= 256:
        digits += 1
    return digits


def digits_nbytes(numel: int, base: int) -> int:
    """Bytes `numel` codes in [0, base) take as base-`base` digits: ceil(numel/j)."""
    _check_numel(numel)
    return -(-numel // digits_per_byte(base))


def pack_digits(codes: Tensor, base: int) -> Tensor:
    """Pack integer codes in [0, base) (any shape, flattened) as base-`base` digits, the most a
    byte holds to each byte (module doc); a 1-D uint8 tensor."""
    per_byte = digits_per_byte(base)
    _check_integers(codes, "codes")
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel():
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= base:
            raise ValueError(f"codes must lie in [0, {base}); found min {lo}, max {hi}")
    weights = base ** torch.arange(per_byte, dtype=torch.int64, device=flat.device)
    return (_pad_to(flat, per_byte).view(-1, per_byte) * weights).sum(1).to(torch.uint8)


def unpack_digits(packed: Tensor, base: int, numel: int) -> Tensor:
    """The `numel` codes `pack_digits(codes, base)` packed; 1-D uint8."""
    per_byte = digits_per_byte(base)
    _check_packed(packed, digits_nbytes(numel, base), f"{numel} base-{base} digits")
    weights = base ** torch.arange(per_byte, dtype=torch.int64, device=packed.device)
    table = (torch.arange(256, device=packed.device)[:, None] // weights % base).to(torch.uint8)
    return table[packed.to(torch.int64)].reshape(-1)[:numel]  # each byte's digits, looked up


def uint_nbytes(numel: int, bits: int) -> int:
    """Bytes `pack_uint` writes for `numel` values of `bits` bits (1..8, 16 or 32)."""
    _check_uint_bits(bits)
    _check_numel(numel)
    return packed_nbytes(numel, bits) if bits <= 8 else numel * (bits // 8)


def pack_uint(values: Tensor, bits: int) -> Tensor:
    """Pack integers in [0, 2**bits) into a 1-D uint8 tensor: `pack` for bits 1..8, else
    bits//8 little-endian bytes per value (bits 16 or 32)."""
    _check_uint_bits(bits)
    if bits <= 8:
        return pack(values, bits)
    _check_integers(values, "values")
    flat = values.detach().reshape(-1).to(torch.int64)  # uint64 > 2**63 wraps: rejected below
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    _check_range(flat, bits, "values")
    shifts = torch.arange(0, bits, 8, dtype=torch.int64, device=flat.device)
    return ((flat.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_uint(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Unpack `numel` values of `bits` bits written by `pack_uint`; a 1-D int64 tensor."""
    _check_uint_bits(bits)
    if bits <= 8:
        return unpack(packed, bits, numel).to(torch.int64)
    _check_numel(numel)
    _check_packed(packed, uint_nbytes(numel, bits), f"{numel} values of {bits} bits")
    shifts = torch.arange(0, bits, 8, dtype=torch.int64, device=packed.device)
    return (packed.to(torch.int64).view(numel, bits // 8) << shifts).sum(dim=1)


def gap_symbols(positions: Tensor, width: int) -> int | None:
    """How many symbols `gap_encode` writes for these positions at `width`; None where the
    width cannot code them (width 0 and positions other than 0..n-1)."""
    gaps = _gaps(positions, width)
    if width == 0:
        return 0 if not gaps.any() else None
    return gaps.numel() + int((gaps // ((1 << width) - 1)).sum())


def gap_encode(positions: Tensor, width: int) -> Tensor:
    """The gap code of strictly increasing non-negative positions (module docstring), packed
    into a 1-D uint8 tensor of uint_nbytes(gap_symbols(positions, width), width) bytes."""
    gaps = _gaps(positions, width)
    if width == 0:
        if gaps.any():
            raise ValueError("width 0 codes only the positions 0, 1, ..., n-1")
        return torch.empty(0, dtype=torch.uint8, device=positions.device)
    escape = (1 << width) - 1
    escapes = gaps // escape
    symbols = torch.full(
        (gaps.numel() + int(escapes.sum()),), escape, dtype=torch.int64, device=gaps.device
    )
    symbols[torch.cumsum(escapes + 1, dim=0) - 1] = gaps % escape
    return pack_uint(symbols, width)


def gap_decode(packed: Tensor, width: int, count: int, numel: int) -> Tensor:
    """The positions (1-D int64) coded by `count` symbols of `width` bits in `packed`, each
    below `numel`; for width 0, `count` is the number of positions (0..count-1).

    Raises ValueError for a stream `gap_encode` cannot have written: a trailing escape, a
    position >= numel, or a wrong byte count.
    """
    _check_gap_width(width)
    _check_numel(count)
    _check_numel(numel)
    if width == 0:
        if packed.numel() != 0:
            raise ValueError(f"a width-0 gap code has no bytes, got {packed.numel()}")
        if count > numel:
            raise ValueError(f"{count} positions do not fit in {numel} slots")
        return torch.arange(count, dtype=torch.int64, device=packed.device)
    symbols = unpack_uint(packed, width, count)
    escape = (1 << width) - 1
    is_escape = symbols == escape
    if count and bool(is_escape[-1]):
        raise ValueError("gap code ends with an escape symbol")
    positions = torch.cumsum(torch.where(is_escape, escape, symbols + 1), dim=0)[~is_escape] - 1
    if positions.numel() and int(positions[-1]) >= numel:
        raise ValueError(f"gap code reaches position {int(positions[-1])}, past {numel} slots")
    return positions


def _gaps(positions: Tensor, width: int) -> Tensor:
    """Gaps p_j - p_{j-1} - 1 (p_{-1} = -1) of strictly increasing non-negative positions."""
    _check_gap_width(width)
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dim() != 1:
        raise ValueError(
            f"positions must be a 1-D integer tensor, got {positions.dtype} "
            f"of shape {tuple(positions.shape)}"
        )
    flat = positions.to(torch.int64)
    gaps = torch.diff(flat, prepend=flat.new_full((1,), -1)) - 1
    if gaps.numel() and int(gaps.min()) < 0:
        raise ValueError("positions must be non-negative and strictly increasing")
    return gaps


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


def _check_integers(t: Tensor, what: str) -> None:
    """Reject a floating, complex or bool tensor where integers are packed."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must have an integer dtype, got {t.dtype}")


def _check_range(flat: Tensor, bits: int, what: str) -> None:
    """Reject a non-empty tensor with a value outside [0, 2**bits), naming its min and max."""
    lo, hi = (int(v) for v in torch.aminmax(flat))
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(
            f"{what} must lie in [0, {1 << bits}) for bits={bits}; found min {lo}, max {hi}"
        )


def _check_packed(packed: Tensor, expected: int, holds: str) -> None:
    """Reject a packed stream that is not 1-D uint8 of `expected` bytes (what `holds` needs)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if packed.numel() != expected:
        raise ValueError(f"packed has {packed.numel()} bytes but {holds} need {expected}")


def _check_base(base: int) -> None:
    """Reject a digit base outside 2..256 (and non-integers)."""
    if isinstance(base, bool) or not isinstance(base, int) or not 2 <= base <= 256:
        raise ValueError(f"base must be an integer in 2..256, got {base!r}")


def _check_uint_bits(bits: int) -> None:
    """Reject widths `pack_uint` does not store."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in UINT_WIDTHS:
        raise ValueError(f"bits must be one of {UINT_WIDTHS}, got {bits!r}")


def _check_gap_width(width: int) -> None:
    """Reject symbol widths the gap code does not have."""
    if isinstance(width, bool) or not isinstance(width, int) or width not in GAP_WIDTHS:
        raise ValueError(f"gap width must be one of {GAP_WIDTHS}, got {width!r}")
