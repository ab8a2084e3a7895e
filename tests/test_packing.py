"""Tests for distq.packing: round trips, the documented LSB-first layout, lengths and errors;
the wide (16/32-bit little-endian) integers and the gap code of sorted positions.

The layouts are checked against references written with Python ints.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distq.packing import (
    GAP_WIDTHS,
    digits_nbytes,
    digits_per_byte,
    gap_decode,
    gap_encode,
    gap_symbols,
    pack,
    pack_digits,
    pack_uint,
    packed_nbytes,
    uint_nbytes,
    unpack,
    unpack_digits,
    unpack_uint,
)

ALL_BITS = range(1, 9)


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """Bit-by-bit reference: code i's bit k is stream bit bits*i + k, stream bit j is byte j//8."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for k in range(bits):
            j = bits * i + k
            out[j // 8] |= ((code >> k) & 1) << (j % 8)
    return out


def random_codes(n: int, bits: int, seed: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """n random codes in [0, 2**bits) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=gen).to(dtype)


@pytest.mark.parametrize("bits", ALL_BITS)
@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, n, seed):
    codes = random_codes(n, bits, seed)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_nbytes(n, bits),)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 13, 24, 33, 64, 101])
def test_layout_matches_bitwise_reference(bits, n):
    codes = random_codes(n, bits, seed=1000 * bits + n)
    assert pack(codes, bits).tolist() == reference_pack(codes.tolist(), bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unpack_reads_reference_bytes(bits):
    codes = random_codes(41, bits, seed=bits)
    packed = torch.tensor(reference_pack(codes.tolist(), bits), dtype=torch.uint8)
    assert unpack(packed, bits, 41).tolist() == codes.tolist()


def test_docstring_example():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [57]
    assert unpack(torch.tensor([57], dtype=torch.uint8), 2, 4).tolist() == [1, 2, 3, 0]


def test_three_bits_is_a_true_three_bit_layout():
    # 8 codes of 3 bits fill exactly 3 bytes; [7, 0, ...] sets only the low 3 bits of byte 0
    assert pack(torch.tensor([7, 0, 0, 0, 0, 0, 0, 0]), 3).tolist() == [7, 0, 0]
    assert pack(torch.tensor([0, 0, 1]), 3).tolist() == [64, 0]  # code 2 starts at stream bit 6


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 100, 1001])
def test_output_length(bits, n):
    expected = -(-n * bits // 8)
    assert packed_nbytes(n, bits) == expected
    assert pack(random_codes(n, bits, seed=n), bits).numel() == expected


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_and_shape(dtype):
    codes = random_codes(60, 3, seed=7, dtype=dtype).view(3, 4, 5)
    out = unpack(pack(codes, 3), 3, 60)
    assert torch.equal(out.long(), codes.reshape(-1).long())


def test_empty():
    packed = pack(torch.empty(0, dtype=torch.int64), 3)
    assert packed.dtype == torch.uint8 and packed.numel() == 0
    out = unpack(packed, 3, 0)
    assert out.dtype == torch.uint8 and out.numel() == 0


def test_trailing_bits_are_zero():
    assert pack(torch.tensor([1]), 1).tolist() == [1]
    assert pack(torch.tensor([31, 31]), 5).tolist() == [255, 3]


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        pack(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        unpack(torch.zeros(1, dtype=torch.uint8), bits, 1)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        packed_nbytes(1, bits)


def test_float_codes():
    with pytest.raises(ValueError, match="integer dtype"):
        pack(torch.tensor([0.0, 1.0]), 2)


def test_value_too_large():
    with pytest.raises(ValueError, match="max 4"):
        pack(torch.tensor([0, 4, 1]), 2)


def test_negative_value():
    with pytest.raises(ValueError, match="min -1"):
        pack(torch.tensor([0, -1, 1]), 2)


@pytest.mark.parametrize("nbytes", [0, 2, 3])
def test_wrong_packed_length(nbytes):
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(nbytes, dtype=torch.uint8), 2, 4)


def test_negative_numel():
    with pytest.raises(ValueError, match="numel"):
        unpack(torch.zeros(0, dtype=torch.uint8), 2, -1)


def test_packed_must_be_uint8():
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(1, dtype=torch.int64), 2, 4)


# ---- pack_uint: widths 1..8 as pack, 16 and 32 little-endian ------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 8, 16, 32])
@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.integers(0, 2**32 - 1), max_size=300))
def test_uint_round_trip(bits, values):
    codes = torch.tensor([v % (1 << bits) for v in values], dtype=torch.int64)
    packed = pack_uint(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == uint_nbytes(len(values), bits)
    out = unpack_uint(packed, bits, len(values))
    assert out.dtype == torch.int64 and out.tolist() == codes.tolist()
    if bits <= 8:
        assert torch.equal(packed, pack(codes, bits))
    else:
        expected = [(v >> s) & 0xFF for v in codes.tolist() for s in range(0, bits, 8)]
        assert packed.tolist() == expected


def test_uint_little_endian():
    assert pack_uint(torch.tensor([0x1234, 0xFFFF]), 16).tolist() == [0x34, 0x12, 0xFF, 0xFF]
    assert pack_uint(torch.tensor([0x01020304]), 32).tolist() == [4, 3, 2, 1]
    assert uint_nbytes(3, 16) == 6 and uint_nbytes(3, 32) == 12 and uint_nbytes(3, 3) == 2


@pytest.mark.parametrize("bits", [0, 9, 12, 24, 64, True, 16.0])
def test_uint_bad_width(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_uint(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        uint_nbytes(1, bits)


def test_uint_errors():
    with pytest.raises(ValueError, match="max 65536"):
        pack_uint(torch.tensor([65536]), 16)
    with pytest.raises(ValueError, match="min -1"):
        pack_uint(torch.tensor([-1]), 32)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_uint(torch.tensor([1.0]), 16)
    with pytest.raises(ValueError, match="need 8"):
        unpack_uint(torch.zeros(6, dtype=torch.uint8), 32, 2)


# ---- gap code -----------------------------------------------------------------------------------


def reference_gap_symbols(positions: list[int], width: int) -> list[int]:
    """Each gap g as g // E escapes E = 2**width - 1 followed by g % E, with Python ints."""
    escape, out, prev = (1 << width) - 1, [], -1
    for p in positions:
        gap, prev = p - prev - 1, p
        out += [escape] * (gap // escape) + [gap % escape]
    return out


def test_gap_docstring_example():
    positions = torch.tensor([1, 9])
    assert gap_symbols(positions, 2) == 4
    assert unpack(gap_encode(positions, 2), 2, 4).tolist() == [1, 3, 3, 1]
    assert gap_decode(gap_encode(positions, 2), 2, 4, 10).tolist() == [1, 9]


@pytest.mark.parametrize("width", [w for w in GAP_WIDTHS if w])
@settings(max_examples=25, deadline=None)
@given(
    numel=st.integers(0, 5000),
    density=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gap_round_trip(width, numel, density, seed):
    gen = torch.Generator().manual_seed(seed)
    positions = (torch.rand(numel, generator=gen) < density).nonzero().squeeze(1)
    symbols = reference_gap_symbols(positions.tolist(), width)
    packed = gap_encode(positions, width)
    assert gap_symbols(positions, width) == len(symbols)
    assert packed.tolist() == pack_uint(torch.tensor(symbols, dtype=torch.int64), width).tolist()
    assert torch.equal(gap_decode(packed, width, len(symbols), numel), positions)


def test_gap_width_0_codes_only_a_prefix():
    assert gap_symbols(torch.arange(5), 0) == 0
    assert gap_encode(torch.arange(5), 0).numel() == 0
    assert gap_decode(torch.empty(0, dtype=torch.uint8), 0, 5, 7).tolist() == [0, 1, 2, 3, 4]
    assert gap_symbols(torch.tensor([0, 2]), 0) is None
    with pytest.raises(ValueError, match="width 0"):
        gap_encode(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="do not fit"):
        gap_decode(torch.empty(0, dtype=torch.uint8), 0, 8, 7)


@pytest.mark.parametrize("positions", [[3, 3], [4, 2], [-1, 2]])
def test_gap_positions_must_increase(positions):
    with pytest.raises(ValueError, match="strictly increasing"):
        gap_encode(torch.tensor(positions), 4)


def test_gap_decode_rejects_bad_streams():
    escape_last = pack(torch.tensor([1, 3]), 2)
    with pytest.raises(ValueError, match="ends with an escape"):
        gap_decode(escape_last, 2, 2, 100)
    with pytest.raises(ValueError, match="past 9 slots"):
        gap_decode(pack(torch.tensor([1, 3, 3, 1]), 2), 2, 4, 9)
    with pytest.raises(ValueError, match="gap width"):
        gap_decode(escape_last, 9, 2, 100)


# -- base-k digits -------------------------------------------------------------------------


def _digits_reference(codes: list[int], base: int) -> list[int]:
    """The module doc's layout written out: j digits a byte, the first code lowest."""
    j = max(d for d in range(1, 9) if base**d <= 256)
    padded = codes + [0] * (-len(codes) % j)
    return [
        sum(c * base**i for i, c in enumerate(padded[s : s + j])) for s in range(0, len(padded), j)
    ]


@settings(max_examples=60, deadline=None)
@given(base=st.integers(2, 256), n=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_digits_round_trip_and_layout(base, n, seed):
    codes = torch.randint(0, base, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_digits(codes, base)
    assert packed.tolist() == _digits_reference(codes.tolist(), base)
    assert packed.numel() == digits_nbytes(n, base)
    assert torch.equal(unpack_digits(packed, base, n).long(), codes)


def test_digits_docstring_example_and_ternary_density():
    assert pack_digits(torch.tensor([1, 2, 0, 0, 1]), 3).tolist() == [88]
    bases = (2, 3, 4, 5, 6, 7, 16, 17, 256)
    assert [digits_per_byte(k) for k in bases] == [8, 5, 4, 3, 3, 2, 2, 1, 1]
    assert digits_nbytes(1000, 3) == 200 < packed_nbytes(1000, 2) == 250


def test_bad_digits_are_refused_by_value():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\); found min 0, max 3"):
        pack_digits(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match=r"base must be an integer in 2\.\.256, got 1"):
        pack_digits(torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="must have an integer dtype"):
        pack_digits(torch.tensor([0.5]), 3)
    with pytest.raises(ValueError, match="packed has 2 bytes but 11 base-3 digits need 3"):
        unpack_digits(torch.zeros(2, dtype=torch.uint8), 3, 11)
