"""Rotated quantization (DRIVE, NeurIPS'21; EDEN, ICML'22): each bucket of w = 2^p elements is
rotated by y = H·D·x/√w (D random ±1 signs, H the Walsh–Hadamard matrix), which makes its
coordinates near-Gaussian, then coded against the Lloyd–Max levels c of a standard normal
(`distq.theory.rotation.lloyd_max`); decoding un-rotates: x̂ = D·H·ŷ/√w.

- deterministic (EDEN): c_i the level nearest y_i/σ, σ = ‖y‖/√w, and ŷ = S·c with the unbiasing
  scale S = ‖y‖²/⟨y, c⟩, so E_D[x̂] = x over the rotation; vNMSE ≈ D_b/(1 − D_b).
- stochastic: S = max|y|/c_top and y/S rounded at random to the two adjacent levels: unbiased
  for every rotation.

D comes from the key's seed, step and slot (not its rank or phase) and the position in the
bucket, so every rank rotates a bucket alike (THC, NSDI'24: rotated vectors can be summed as
they are); decoding needs the encode call's key. H_w = H_a ⊗ H_b runs as two small matrix
products; decoding one payload applies it to integer levels, where every summation order gives
the same bits, and a sum of payloads (`allgather`) is added in the rotated domain and
un-rotated once by the staged butterfly, whose every output is one addition, so every rank
decodes bit-identical values. The last partial bucket is padded with zeros
and sent whole (`WireFormat.whole_buckets`): the rotation spreads the padding.

On CPU, at 1, 2 and 4 bits, the C kernels of comm/rotation_kernel.c (comm/native.py) encode the
deterministic variant and decode both in one pass per bucket; decoding there gives the torch
path's bits, encoding may differ from it in a scale's last bit (its sums run in another order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from distq.comm import kernels, native
from distq.comm.compressors import Compressor
from distq.comm.noise import Key
from distq.comm.wire import WireFormat, split
from distq.packing import pack, unpack
from distq.theory.rotation import lloyd_max

BITS = range(1, 5)
BLOCK_ELEMENTS = 1 << 20  # elements per transform call: bounds the codec's scratch memory
EXACT = 1 << 24  # float32 holds every integer below this exactly


def hadamard_factors(width: int) -> tuple[Tensor, Tensor]:
    """(H_a, H_b) with a·b = width, a ≤ b, as balanced as powers of two allow: H_w = H_a ⊗ H_b,
    two small matrix products instead of log2(w) passes (5 ns an element at w = 512 on one core
    against 13 for the compiled butterfly)."""
    a = 1 << (width.bit_length() - 1) // 2
    return sylvester(a), sylvester(width // a)


def sylvester(width: int) -> Tensor:
    """The width × width Walsh–Hadamard matrix (Kronecker powers of [[1, 1], [1, −1]])."""
    h = torch.ones(1, 1)
    while h.shape[0] < width:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(x: Tensor, outer: Tensor, inner: Tensor) -> Tensor:
    """H·x for each row of x [rows, w], H = outer ⊗ inner, unnormalized (H·H = w·I). Exact, in
    any summation order, for integer x with w·max|x| < 2^24: every partial sum is an integer."""
    rows, a, b = x.shape[0], outer.shape[0], inner.shape[0]
    y = (x.reshape(rows * a, b) @ inner).view(rows, a, b)
    return torch.matmul(outer, y).reshape(rows, a * b)


def butterfly(v: Tensor) -> Tensor:
    """H·v per row of v [rows, w] by the log2(w) stages of the fast Walsh–Hadamard transform,
    stage h pairing elements h apart (h = 1, 2, 4, ...): every output of every stage is one
    addition or subtraction, so any device or kernel computes the same bits for float v (the
    C kernel, comm/rotation_kernel.c, runs the same stages)."""
    rows, width = v.shape
    half = 1
    while half < width:
        pairs = v.reshape(rows, width // (2 * half), 2, half)
        v = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), 2)
        half *= 2
    return v.reshape(rows, width)


def rotate(xb: Tensor, signs: Tensor, outer: Tensor, inner: Tensor) -> Tensor:
    """y = H·D·x/√w per row."""
    return hadamard(xb * signs, outer, inner) * (1.0 / math.sqrt(xb.shape[1]))


def _nearest(t: Tensor, levels: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(code, level) of the level nearest each t (ties to the lower), by comparisons with the
    midpoints: elementwise, so it fuses with the rest of the encode."""
    code, value = torch.zeros_like(t, dtype=torch.int32), torch.full_like(t, levels[0])
    for j in range(1, len(levels)):
        above = t > (levels[j - 1] + levels[j]) / 2
        code = code + above.to(torch.int32)
        value = torch.where(above, levels[j], value)
    return code, value


def _packed(codes: Callable[[Tensor, Tensor | None], Tensor], t: Tensor, bits: int, offset):
    """Row-packed bytes (`kernels.pack_rows`) for 1, 2, 4 bits, else uint8 codes [rows, w]."""
    if bits in (1, 2, 4):
        return kernels.pack_rows(t, bits, codes, offset)
    index = None
    if offset is not None:
        index = torch.arange(t.numel(), device=t.device).view_as(t).to(torch.int32) + offset
    return codes(t, index).to(torch.uint8)


def deterministic_codes(
    y: Tensor, levels: tuple[float, ...], bits: int
) -> tuple[Tensor, Tensor]:
    """(codes, scales [rows]) of rotated rows y by EDEN's deterministic variant (module doc), the
    codes packed as `_packed` says; a row holding NaN/Inf gets a NaN scale."""
    energy = (y * y).sum(dim=1)
    sigma = (energy / y.shape[1]).sqrt()[:, None]
    tiny = torch.finfo(torch.float32).tiny
    t = torch.where(sigma > 0, y / sigma.clamp_min(tiny), 0.0)
    inner_product = (y * _nearest(t, levels)[1]).sum(dim=1)
    scale = torch.where(inner_product > 0, energy / inner_product.clamp_min(tiny), 0.0)
    scale = torch.where(torch.isfinite(energy), scale, torch.nan)
    return _packed(lambda ts, _: _nearest(ts, levels)[0], t, bits, None), scale


def stochastic_codes(
    y: Tensor, key: Tensor, offset: Tensor, levels: tuple[float, ...], bits: int
) -> tuple[Tensor, Tensor]:
    """(codes, scales) of rotated rows y by the stochastic variant: y/S, S = max|y|/c_top, rounded
    to an adjacent level with the probabilities that make it unbiased (noise from `offset`)."""
    scale = kernels.max_abs_scales(y) / levels[-1]
    u = torch.where(scale[:, None] > 0, y / scale[:, None].clamp_min(1e-38), 0.0)

    def codes(us: Tensor, index: Tensor) -> Tensor:
        low = torch.zeros_like(us, dtype=torch.int32)
        below, above = torch.full_like(us, levels[0]), torch.full_like(us, levels[1])
        for j in range(1, len(levels) - 1):  # the cell [levels[low], levels[low + 1]] of u
            inside = us >= levels[j]
            low = low + inside.to(torch.int32)
            below = torch.where(inside, levels[j], below)
            above = torch.where(inside, levels[j + 1], above)
        up = (us - below) / (above - below)
        return low + (kernels.hash_uniform(index, key) < up).to(torch.int32)

    return _packed(codes, u, bits, offset), scale


def integer_values(codes: Tensor, levels: tuple[float, ...], bits: int) -> Tensor:
    """The integer levels (float32) of row-packed codes [rows, bytes] (1, 2, 4 bits) or of
    codes [rows, w]."""
    codes = kernels.unpack_rows(codes, bits) if bits in (1, 2, 4) else codes.to(torch.int32)
    value = torch.full(codes.shape, levels[0], device=codes.device)
    for j in range(1, len(levels)):
        value = torch.where(codes == j, levels[j], value)
    return value


def rotated_values(
    codes: Tensor, scale: Tensor, levels: tuple[float, ...], bits: int, unit: float
) -> Tensor:
    """ŷ = c·S per row in the rotated domain, c = integer level·unit (unit = 2^−F)."""
    return integer_values(codes, levels, bits) * (scale * unit)[:, None]


def decoded_values(
    codes: Tensor,
    scale: Tensor,
    outer: Tensor,
    inner: Tensor,
    levels: tuple[float, ...],
    bits: int,
    unit: float,
) -> Tensor:
    """H·c·(S·unit) per row (unit = 2^−F/√w): H applied to the integer levels c, exact in any
    summation order."""
    return hadamard(integer_values(codes, levels, bits), outer, inner) * (scale * unit)[:, None]


class RotatedQuantizer(Compressor):
    """1–4-bit rotated quantizer (module doc) on buckets of `bucket_size` = 2^p in 8..65536
    elements, one float32 scale each. The levels are multiples of 2^−F (F as large as keeps
    w·|level|·2^F below 2^24), so decoding transforms integers: exact in any summation order,
    hence the same on every rank whatever its matrix-multiply kernel."""

    def __init__(
        self,
        bits: int = 2,
        bucket_size: int | None = 512,
        scale_dtype: torch.dtype = torch.float32,
        stochastic: bool = False,
    ) -> None:
        if scale_dtype != torch.float32:
            raise ValueError(f"scale_dtype={scale_dtype} (rotated quantizer); allowed: float32")
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"bits={bits!r} for the rotated quantizer; allowed: 1..4")
        if (
            not isinstance(bucket_size, int)
            or not 8 <= bucket_size <= 1 << 16
            or bucket_size & (bucket_size - 1)
        ):
            raise ValueError(
                f"bucket_size={bucket_size!r} for the rotated quantizer; allowed: a power of "
                "two in 8..65536 (the Hadamard transform's width)"
            )
        self.wire = WireFormat(bits, bucket_size, whole_buckets=True)
        self.stochastic = stochastic
        levels = lloyd_max(bits)[0]
        fraction_bits = int(math.log2(EXACT / (bucket_size * levels[-1]))) - 1
        self.integer_levels = tuple(float(round(c * 2**fraction_bits)) for c in levels)
        self.levels = tuple(c * 2.0**-fraction_bits for c in self.integer_levels)  # dyadic
        self._grid = 2.0**-fraction_bits  # integer level → level
        self._unit = self._grid / math.sqrt(bucket_size)  # integer level → decoded value
        self._outer, self._inner = hadamard_factors(bucket_size)
        self._c_levels = torch.tensor(self.levels, dtype=torch.float32)
        pairs = zip(self.levels[:-1], self.levels[1:], strict=True)
        self._c_midpoints = torch.tensor([(a + b) / 2 for a, b in pairs], dtype=torch.float32)
        self._c_integer_levels = torch.tensor(self.integer_levels, dtype=torch.float32)

    def _native(self, *tensors: Tensor) -> bool:
        """Whether the C kernels take this call: CPU float32 tensors, 1, 2 or 4 bits."""
        return (
            self.wire.bits in (1, 2, 4)
            and all(t.dtype == torch.float32 for t in tensors)
            and native.usable(*tensors)
        )

    def with_bits(self, bits: int) -> Compressor:
        if bits == self.wire.bits:
            return self
        return RotatedQuantizer(bits, self.wire.bucket_size, stochastic=self.stochastic)

    def signs(self, key: Key, device: torch.device | str = "cpu") -> Tensor:
        """D: ±1 per position in a bucket, the same on every rank and phase of a step's slot."""
        shared = Key(key.seed, key.step, 0, key.slot, 0)
        position = torch.arange(self.wire.bucket_size, device=device)
        return torch.where(kernels.hash_uniform(position, shared.tensor(device)) < 0.5, -1.0, 1.0)

    def _blocks(self, buckets: int) -> range:
        """First bucket of each block of at most BLOCK_ELEMENTS elements."""
        return range(0, buckets, max(1, BLOCK_ELEMENTS // self.wire.bucket_size))

    def _encode(self, x: Tensor, key: Key, start: int) -> tuple[Tensor, Tensor]:
        """(packed codes [buckets, w·bits/8], scales [buckets]) of flat x, the last bucket
        zero-padded; a bucket's codes are whole bytes (w ≥ 8)."""
        width, device = self.wire.bucket_size, x.device
        rows = -(-x.numel() // width)
        if not self.stochastic and self._native(x):
            return self._native_code(x.contiguous(), rows, self.signs(key))
        padded = torch.nn.functional.pad(x, (0, rows * width - x.numel())).view(rows, width)
        rotation = (self.signs(key, device), self._outer.to(device), self._inner.to(device))
        blocks = self._blocks(rows)
        coded = [
            self._code(kernels.compiled(rotate)(padded[r0 : r0 + blocks.step], *rotation), key,
                       start + r0 * width)
            for r0 in blocks
        ]  # fmt: skip
        return torch.cat([c for c, _ in coded]), torch.cat([s for _, s in coded])

    def _code(self, y: Tensor, key: Key, start: int) -> tuple[Tensor, Tensor]:
        """(packed codes, scales) of rotated rows y whose first element is element `start`."""
        bits = self.wire.bits
        if not self.stochastic and self._native(y):
            return self._native_code(y.contiguous(), len(y), None)
        if self.stochastic:
            offset = torch.tensor(start, device=y.device)
            run = kernels.compiled(stochastic_codes)
            codes, s = run(y, key.tensor(y.device), offset, self.levels, bits)
        else:
            codes, s = kernels.compiled(deterministic_codes)(y, self.levels, bits)
        return (codes if bits in (1, 2, 4) else pack(codes, bits).view(len(y), -1)), s

    def _native_code(
        self,
        x: Tensor | None,
        rows: int,
        signs: Tensor | None,
        parts: Sequence[tuple[Tensor, Tensor]] = (),
        errors: list[float] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(codes [rows, w·bits/8], scales) by the C kernel, deterministic variant, of y = x
        (None: 0) rotated first if `signs` are given, plus the received `parts`' rotated
        values: `_encode`, `_code` and the owner stage of `requantize_sum`. `errors` (or None)
        gets += Σ‖ŷ − y‖² and Σ‖y‖²."""
        width, bits = self.wire.bucket_size, self.wire.bits
        codes = torch.empty(rows, width * bits // 8, dtype=torch.uint8)
        scales = torch.empty(rows, dtype=torch.float32)
        # every tensor whose address the kernel reads is held by a name until it returns
        received = [packed.contiguous() for packed, _ in parts]
        received_scales = [s.contiguous() for _, s in parts]
        sums = torch.zeros(2, dtype=torch.float64)
        status = native.library().distq_eden_code(
            None if x is None else native.pointer(x), 0 if x is None else x.numel(), rows,
            width, signs is not None, None if signs is None else native.pointer(signs),
            1.0 / math.sqrt(width), native.pointers(received), native.pointers(received_scales),
            len(parts), native.pointer(self._c_integer_levels), self._grid,
            native.pointer(self._c_levels), native.pointer(self._c_midpoints), len(self.levels),
            bits, native.pointer(codes), native.pointer(scales),
            None if errors is None else native.pointer(sums),
        )  # fmt: skip
        native.check(status, "distq_eden_code")
        if errors is not None:
            errors[0] += float(sums[0])
            errors[1] += float(sums[1])
        return codes, scales

    def scales(self, x: Tensor, key: Key) -> Tensor:
        return self._encode(x, key, 0)[1]

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0) -> Tensor:
        if scales is not None:
            raise ValueError("the rotated quantizer makes its own scales; allowed: scales=None")
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        codes, s = self._encode(x, key, start)
        return torch.cat([codes.view(-1), s.view(torch.uint8)])

    def compress_rows(
        self, x: Tensor, rows: int, key: Key, start: int = 0, out: Tensor | None = None
    ) -> Tensor:
        length, width = x.numel() // rows, self.wire.bucket_size
        if length == 0 or length % width:
            return super().compress_rows(x, rows, key, start, out)
        codes, s = self._encode(x, key, start)
        payload = torch.cat([codes.view(rows, -1), s.view(rows, -1).view(torch.uint8)], dim=1)
        return payload if out is None else out.copy_(payload)

    def _decode(
        self, payloads: list[Tensor], out: Tensor, accumulate: bool, key: Key | None
    ) -> Tensor:
        """out ← [out +] Σ over `payloads` (each of out.numel() elements) of the decoded values,
        per block of buckets, then times the signs D, the padding dropped. One payload: H·(its
        integer levels), exact, times its S·2^−F/√w. Several (`allgather`'s sum, THC): their
        ŷ = levels·S·2^−F/√w added in payload order in the rotated domain, then un-rotated once
        by `butterfly`, whose outputs are each one IEEE addition: the same bits on every path."""
        if key is None:
            raise ValueError("decoding rotated codes needs the encode call's key; got key=None")
        numel, width, bits = out.numel(), self.wire.bucket_size, self.wire.bits
        parts = [split(payload, numel, self.wire) for payload in payloads]
        device = out.device
        signs = self.signs(key, device)
        if self._native(out) and out.is_contiguous():
            return self._native_decode(parts, out, accumulate, signs)
        outer, inner = self._outer.to(device), self._inner.to(device)
        buckets = self.wire.buckets(numel)
        blocks = self._blocks(buckets)
        one, each = kernels.compiled(decoded_values), kernels.compiled(rotated_values)
        for b0 in blocks:
            b1 = min(buckets, b0 + blocks.step)
            if len(parts) == 1:
                codes, s = self._codes(parts[0][0], b0, b1), parts[0][1][b0:b1]
                total = one(codes, s, outer, inner, self.integer_levels, bits, self._unit)
            else:  # summed as they are, then one transform in the butterfly's order
                total = None
                for packed, s in parts:
                    codes = self._codes(packed, b0, b1)
                    values = each(codes, s[b0:b1], self.integer_levels, bits, self._unit)
                    total = values if total is None else total.add_(values)
                total = butterfly(total)
            piece = out[b0 * width : min(numel, b1 * width)]
            decoded = total.mul_(signs).view(-1)[: piece.numel()]
            (piece.add_ if accumulate else piece.copy_)(decoded)
        return out

    def _native_decode(
        self, parts: list[tuple[Tensor, Tensor]], out: Tensor, accumulate: bool, signs: Tensor
    ) -> Tensor:
        """`_decode` by the C kernel: every bucket of every payload in one call (the lists hold
        the tensors whose addresses it reads)."""
        codes = [packed.contiguous() for packed, _ in parts]
        scales = [s.contiguous() for _, s in parts]
        status = native.library().distq_eden_decode(
            native.pointers(codes), native.pointers(scales), len(parts),
            self.wire.buckets(out.numel()), self.wire.bucket_size, self.wire.bits,
            native.pointer(self._c_integer_levels), self._unit, native.pointer(signs),
            native.pointer(out), out.numel(), accumulate,
        )  # fmt: skip
        native.check(status, "distq_eden_decode")
        return out

    def decompress_into(
        self, payload: Tensor, out: Tensor, accumulate: bool = False, *, key: Key | None = None
    ) -> Tensor:
        return self._decode([payload], out, accumulate, key)

    def decode_sum_into(
        self,
        rows: Tensor,
        out: Tensor,
        skip: int | None = None,
        accumulate: bool = False,
        *,
        key: Key | None = None,
    ) -> Tensor:
        """out ← [out +] Σ_{i ≠ skip} decode(rows[i]), in one pass over out."""
        kept = [row for i, row in enumerate(rows) if i != skip]
        if not kept:
            return out if accumulate else out.zero_()
        return self._decode(kept, out, accumulate, key)

    def _codes(self, packed: Tensor, b0: int, b1: int) -> Tensor:
        """Buckets b0..b1 of a payload's codes: row-packed bytes, or codes [rows, w] at 3 bits."""
        width, bits = self.wire.bucket_size, self.wire.bits
        row_bytes = width * bits // 8
        codes = packed[b0 * row_bytes : b1 * row_bytes].view(b1 - b0, row_bytes)
        if bits in (1, 2, 4):
            return codes
        return unpack(codes.reshape(-1), bits, (b1 - b0) * width).view(-1, width)

    def requantize_sum(
        self,
        received: Tensor,
        mine: Tensor,
        skip: int | None,
        key: Key,
        owner_key: Key,
        start: int,
        errors: list[float] | None = None,
    ) -> Tensor:
        """`scatter`'s owner stage in the rotated domain (THC): the received chunks' ŷ summed as
        they are, plus this rank's own chunk rotated (`skip`, exact), coded again under
        `owner_key` without un-rotating; the error sums go to `errors` (the rotation keeps
        norms). `mine` (whole buckets) is only read."""
        numel, width, device = mine.numel(), self.wire.bucket_size, mine.device
        parts = [split(row, numel, self.wire) for i, row in enumerate(received) if i != skip]
        if not self.stochastic and self._native(mine):
            return self._native_requantize(parts, mine.contiguous(), skip is not None, key, errors)
        rotation = (self.signs(key, device), self._outer.to(device), self._inner.to(device))
        values, turn = kernels.compiled(rotated_values), kernels.compiled(rotate)
        buckets = numel // width
        blocks = self._blocks(buckets)
        coded = []
        for b0 in blocks:
            b1 = min(buckets, b0 + blocks.step)
            own = mine[b0 * width : b1 * width].view(-1, width)
            y = turn(own, *rotation) if skip is not None else torch.zeros_like(own)
            for packed, s in parts:
                y.add_(values(self._codes(packed, b0, b1), s[b0:b1], self.integer_levels,
                              self.wire.bits, self._grid))  # fmt: skip
            codes, s = self._code(y, owner_key, start + b0 * width)
            if errors is not None:
                again = self._codes(codes.view(-1), 0, b1 - b0)
                diff = values(again, s, self.integer_levels, self.wire.bits, self._grid) - y
                errors[0] += float(diff.square().sum())
                errors[1] += float(y.square().sum())
            coded.append((codes, s))
        return torch.cat([torch.cat([c for c, _ in coded]).view(-1),
                          torch.cat([s for _, s in coded]).view(torch.uint8)])  # fmt: skip

    def _native_requantize(
        self,
        parts: list[tuple[Tensor, Tensor]],
        mine: Tensor,
        own: bool,
        key: Key,
        errors: list[float] | None,
    ) -> Tensor:
        """`requantize_sum` by the C kernel (deterministic variant), laid out as `compress` lays
        out a payload."""
        rows = mine.numel() // self.wire.bucket_size
        signs = self.signs(key)
        codes, scales = self._native_code(mine if own else None, rows, signs, parts, errors)
        return torch.cat([codes.view(-1), scales.view(torch.uint8)])
