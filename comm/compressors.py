"""Gradient compressors: a flat float tensor to one uint8 payload of its `WireFormat` and back,
one scale per bucket, deterministic given the `Key` (every rank decodes bit-identical values).

- `StochasticQuantizer` (ICLR 2019, "Analysis of Quantized Models"): levels r/k, k = 2^(m−1) − 1,
  s = max|g| per bucket, stochastic rounding to the two nearest levels: unbiased,
  E‖Q(g) − g‖² ≤ Δ_g·‖g‖_∞·‖g‖₁ per bucket, Δ_g = 1/k; m = 1: ±s with P(+s) = (1 + g/s)/2.
- `terngrad`: the 2-bit case with the scale max-reduced across ranks (one per tensor by default).
- `SignCompressor`: sign(g)·mean|g| per bucket (1 bit; biased, use with error feedback).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from distq.comm import kernels
from distq.comm.noise import Key
from distq.comm.wire import WireFormat, split
from distq.packing import pack, unpack
from distq.quant import levels_per_sign


class Compressor(ABC):
    """Turns a flat float tensor into a payload of `wire.payload_nbytes(numel)` bytes and back."""

    wire: WireFormat
    stateful = False  # keeps state per whole tensor (error feedback): never split it up

    @abstractmethod
    def scales(self, x: Tensor, key: Key) -> Tensor:
        """float32 scale per bucket of x; NaN for a bucket holding NaN/Inf."""

    @abstractmethod
    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0) -> Tensor:
        """Payload for x (float32, 1-D), `scales` overriding the local ones; x[i] draws the noise
        of element start + i of `key`'s stream, so pieces of a tensor get the whole one's codes."""

    @abstractmethod
    def decompress_into(
        self, payload: Tensor, out: Tensor, accumulate: bool = False, *, key: Key | None = None
    ) -> Tensor:
        """Decode into `out` (out += decoded if `accumulate`); returns out. `key`: the encode
        call's, for codes whose decoding needs the randomness both sides share (a rotation)."""

    def decompress(self, payload: Tensor, numel: int, key: Key | None = None) -> Tensor:
        """float32 values encoded in `payload`."""
        return self.decompress_into(payload, torch.empty(numel, device=payload.device), key=key)

    def with_bits(self, bits: int) -> Compressor:
        """This compressor sending `bits` per element; one with a single width refuses others."""
        if bits != self.wire.bits:
            raise ValueError(
                f"bits={bits} with {type(self).__name__}, which sends {self.wire.bits} bit(s) "
                f"per element; allowed: {self.wire.bits}"
            )
        return self

    # -- many payloads of equal length at once (the collectives' chunks) ------------------------
    def compress_rows(
        self, x: Tensor, rows: int, key: Key, start: int = 0, out: Tensor | None = None
    ) -> Tensor:
        """[rows, P] payloads of x's `rows` equal consecutive pieces, row i = compress(piece i,
        start = start + i·len): the same bytes, written into `out` if given."""
        pieces = x.view(rows, -1)
        out = _payload_rows(out, rows, pieces.shape[1], self.wire, x.device)
        for i, piece in enumerate(pieces):
            out[i] = self.compress(piece, key, start=start + i * pieces.shape[1])
        return out

    def decode_rows_into(self, rows: Tensor, out: Tensor, *, key: Key | None = None) -> Tensor:
        """out (flat) ← row i of `rows` decoded into the i-th of len(rows) equal pieces."""
        for row, piece in zip(rows, out.view(rows.shape[0], -1), strict=True):
            self.decompress_into(row, piece, key=key)
        return out

    def decode_sum_into(
        self,
        rows: Tensor,
        out: Tensor,
        skip: int | None = None,
        accumulate: bool = False,
        *,
        key: Key | None = None,
    ) -> Tensor:
        """out ← [out +] Σ_{i ≠ skip} decode(rows[i]), added in row (rank) order."""
        for n, row in enumerate(row for i, row in enumerate(rows) if i != skip):
            self.decompress_into(row, out, accumulate=accumulate or n > 0, key=key)
        return out

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
        """`scatter`'s owner stage: mine ← [mine +] Σ_{i ≠ skip} decode(received[i]) (added to
        this rank's exact chunk when `skip` is set), then the payload of its re-quantization
        under `owner_key`; with `errors`, ‖Q(s) − s‖² and ‖s‖² are added to errors[0], [1]."""
        self.decode_sum_into(received, mine, skip, skip is not None, key=key)
        payload = self.compress(mine, owner_key, start=start)
        if errors is not None:  # decoded by the last stage's kernel: nothing new to compile
            decoded = torch.empty_like(mine)
            error = self.decode_rows_into(payload.view(1, -1), decoded, key=owner_key).sub_(mine)
            errors[0] += float(torch.dot(error, error))
            errors[1] += float(torch.dot(mine, mine))
        return payload


def _payload_rows(
    t: Tensor | None, rows: int, length: int, wire: WireFormat, device: torch.device
) -> Tensor:
    """`t` checked to be [rows, P] uint8 payloads of `length` elements each, or a new buffer."""
    nbytes = wire.payload_nbytes(length)
    if t is None:
        return torch.empty(rows, nbytes, dtype=torch.uint8, device=device)
    if t.shape != (rows, nbytes) or t.dtype != torch.uint8:
        raise ValueError(
            f"payload rows are {tuple(t.shape)} {t.dtype}; {length} elements each need "
            f"({rows}, {nbytes}) uint8 in {wire}"
        )
    return t


ROW_WIDTH = 4096  # kernel row width when one scale covers the whole input
BLOCK_ELEMENTS = 1 << 20  # elements per kernel call: bounds the codec's scratch memory


class BucketCodec(Compressor):
    """Codes c ∈ [0, 2^bits) decoded as (c − k)·s/k per bucket (k = 0: (2c − 1)·s), by compiled
    `kernels` (packing fused in for 1, 2, 4, 8 bits); subclasses choose the scales and the codes.
    Blocks of BLOCK_ELEMENTS bound the scratch memory: nothing input-sized but payload, output."""

    def __init__(self, wire: WireFormat, k: int) -> None:
        self.wire = wire
        self.k = k
        self._width = wire.bucket_size or ROW_WIDTH
        self._row_bytes = self._width * wire.bits // 8
        self._fused = self._width * wire.bits % 8 == 0 and wire.bits in (1, 2, 4, 8)
        unit = 8 // math.gcd(self._width * wire.bits, 8)  # rows per byte-aligned step
        self._block_rows = max(1, BLOCK_ELEMENTS // self._width // unit) * unit

    @abstractmethod
    def _row_stats(self, xb: Tensor) -> Tensor:
        """Per-row statistic of a block view that the scales are made of."""

    @abstractmethod
    def _finish_scales(self, stats: Tensor, numel: int) -> Tensor:
        """Scale per bucket from all rows' statistics (NaN where the input is not finite)."""

    @abstractmethod
    def _codes(self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor) -> Tensor:
        """uint8 codes of a block view starting at element `offset`; code 0 past `numel`."""

    @abstractmethod
    def _row_codes(self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor) -> Tensor:
        """Row-packed bytes (`distq.comm.wire`) of whole rows starting at element `offset`."""

    def scales(self, x: Tensor, key: Key) -> Tensor:
        stats = [self._row_stats(self._block(x, r0, r1)) for r0, r1 in self._blocks(x.numel())]
        return self._finish_scales(torch.cat(stats), x.numel())

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0) -> Tensor:
        numel = x.numel()
        if scales is None and numel and self._batched(numel):
            return self.compress_rows(x, 1, key, start).view(-1)
        wire, width = self.wire, self._width
        payload = torch.empty(wire.payload_nbytes(numel), dtype=torch.uint8, device=x.device)
        if numel == 0:
            return payload
        s = round_up_to_wire(self.scales(x, key) if scales is None else scales, wire.scale_dtype)
        row_scales, seed = self._row_scales(s, numel), key.tensor(x.device)
        planar_rows = numel // width if self._fused else 0
        for r0, r1 in self._blocks(planar_rows * width):
            offset = torch.tensor(start + r0 * width, device=x.device)
            codes = self._row_codes(self._block(x, r0, r1), row_scales[r0:r1], seed, offset)
            payload[r0 * self._row_bytes : r1 * self._row_bytes] = codes.view(-1)
        # the rest (a partial last row, widths with no planar layout) is packed in element order,
        # block by block (blocks start on a byte); padding is what lies past start + numel
        code_bytes, count = wire.code_nbytes(numel), torch.tensor(start + numel, device=x.device)
        for r0, r1 in self._blocks(numel, planar_rows):
            offset = torch.tensor(start + r0 * width, device=x.device)
            xb = self._block(x, r0, r1)
            block = self._codes(xb, row_scales[r0:r1], seed, offset, count).reshape(-1)
            b0, b1 = wire.code_nbytes(r0 * width), min(code_bytes, wire.code_nbytes(r1 * width))
            payload[b0:b1] = pack(block, wire.bits)[: b1 - b0]
        payload[code_bytes:] = s.to(wire.scale_dtype).view(torch.uint8)
        return payload

    def decompress_into(
        self, payload: Tensor, out: Tensor, accumulate: bool = False, *, key: Key | None = None
    ) -> Tensor:
        numel, bits, width = out.numel(), self.wire.bits, self._width
        if numel and self._batched(numel) and payload.numel() == self.wire.payload_nbytes(numel):
            return self.decode_sum_into(payload.view(1, -1), out, accumulate=accumulate)
        packed, s = split(payload, numel, self.wire)
        if numel == 0:
            return out
        row_scales = self._row_scales(s, numel)
        planar_rows = numel // width if self._fused else 0
        for r0, r1 in self._blocks(planar_rows * width):
            codes = packed[r0 * self._row_bytes : r1 * self._row_bytes].view(r1 - r0, -1)
            rows_out = out[r0 * width : r1 * width].view(r1 - r0, -1)
            self._decode(codes, row_scales[r0:r1], rows_out, 1, accumulate)
        # the rest is in element order (a partial last row, or widths with no planar layout)
        for r0, r1 in self._blocks(numel, planar_rows):
            e0, e1 = r0 * width, min(numel, r1 * width)
            b0, b1 = self.wire.code_nbytes(e0), self.wire.code_nbytes(e1)
            codes = unpack(packed[b0:b1], bits, e1 - e0)
            block = self._block(codes, 0, r1 - r0)  # the last row padded
            values = kernels.compiled(kernels.level_values)(block, row_scales[r0:r1], self.k)
            piece = out[e0:e1]
            (piece.add_ if accumulate else piece.copy_)(values.reshape(-1)[: e1 - e0])
        return out

    def _decode(self, codes: Tensor, s: Tensor, out: Tensor, parts: int, accumulate: bool) -> None:
        """out [rows, width] ← [out +] the sum of `parts` row blocks of row-packed codes."""
        run = kernels.compiled(kernels.decode_sum_into)
        run(codes, s, out, self.k, self.wire.bits, parts, accumulate)

    def _batched(self, length: int) -> bool:
        """Whether payloads of `length` elements stack into one kernel call: fused codes,
        per-bucket scales, whole buckets."""
        return self._fused and self.wire.bucket_size is not None and length % self._width == 0

    def compress_rows(
        self, x: Tensor, rows: int, key: Key, start: int = 0, out: Tensor | None = None
    ) -> Tensor:
        length = x.numel() // rows
        if not self._batched(length) or length == 0:
            return super().compress_rows(x, rows, key, start, out)
        out = _payload_rows(out, rows, length, self.wire, x.device)
        seed, pieces = key.tensor(x.device), x.view(rows, length)
        for r0, r1, e0, e1 in self._spans(rows, length):
            xb = pieces[r0:r1, e0:e1].reshape(-1, self._width)  # a view: whole rows or one's part
            first = torch.tensor(start + r0 * length + e0, device=x.device)
            codes, s = self._encode(xb, seed, first)
            at_codes, at_scales = self._slices(length, e0, e1)
            out[r0:r1, at_codes] = codes.view(r1 - r0, -1)
            out[r0:r1, at_scales] = s.to(self.wire.scale_dtype).view(torch.uint8).view(r1 - r0, -1)
        return out

    def _spans(self, rows: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(rows r0..r1, elements e0..e1) of each batched call: whole payloads up to a block."""
        block = self._block_rows * self._width
        per_call = max(1, block // length)
        for r0 in range(0, rows, per_call):
            for e0 in range(0, length, block):
                yield r0, min(rows, r0 + per_call), e0, min(length, e0 + block)

    def _encode(self, xb: Tensor, seed: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        """(row-packed codes, decoded scales) of whole buckets xb, xb[0, 0] element `first`."""
        stats = self._row_stats(xb)
        s = round_up_to_wire(self._finish_scales(stats, xb.numel()), self.wire.scale_dtype)
        return self._row_codes(xb, s, seed, first), s

    def decode_rows_into(self, rows: Tensor, out: Tensor, *, key: Key | None = None) -> Tensor:
        length = out.numel() // max(1, rows.shape[0])
        if not self._batched(length) or length == 0:
            return super().decode_rows_into(rows, out)
        _payload_rows(rows, rows.shape[0], length, self.wire, rows.device)
        pieces = out.view(rows.shape[0], length)
        for r0, r1, e0, e1 in self._spans(rows.shape[0], length):
            codes, s = self._split_rows(rows[r0:r1], length, e0, e1)
            self._decode(codes, s, pieces[r0:r1, e0:e1].view(-1, self._width), 1, False)
        return out

    def decode_sum_into(
        self,
        rows: Tensor,
        out: Tensor,
        skip: int | None = None,
        accumulate: bool = False,
        *,
        key: Key | None = None,
    ) -> Tensor:
        length, keep = out.numel(), [i for i in range(rows.shape[0]) if i != skip]
        if not self._batched(length) or length == 0 or not keep:
            return super().decode_sum_into(rows, out, skip, accumulate)
        _payload_rows(rows, rows.shape[0], length, self.wire, rows.device)
        chosen = None if skip is None else torch.tensor(keep, device=rows.device)
        for _, _, e0, e1 in self._spans(1, length):
            codes, s = self._split_rows(rows, length, e0, e1, chosen)
            self._decode(codes, s, out[e0:e1].view(-1, self._width), len(keep), accumulate)
        return out

    def _split_rows(
        self, rows: Tensor, length: int, e0: int, e1: int, chosen: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(codes [rows·buckets, bucket bytes], float32 scales) of elements e0..e1 of the `chosen`
        rows (default all), copied contiguous (1/15 of the decoded bytes at 2 bits) for 1 kernel."""
        at_codes, at_scales = self._slices(length, e0, e1)
        codes, scales = rows[:, at_codes], rows[:, at_scales]
        if chosen is not None:  # indexing copies: contiguous and aligned
            codes, scales = codes[chosen], scales[chosen]
        else:  # a fresh copy aligns the scales for the dtype view
            codes, scales = codes.contiguous(), rows.new_empty(scales.shape).copy_(scales)
        s = scales.view(self.wire.scale_dtype).to(torch.float32)
        return codes.view(-1, self._row_bytes), s.view(-1)

    def _slices(self, length: int, e0: int, e1: int) -> tuple[slice, slice]:
        """Where the codes and scales of elements e0..e1 lie in a payload of `length` elements."""
        wire, width = self.wire, self._width
        first, size = wire.code_nbytes(length), wire.scale_dtype.itemsize
        codes = slice(e0 * wire.bits // 8, e1 * wire.bits // 8)
        return codes, slice(first + e0 // width * size, first + e1 // width * size)

    def _blocks(self, numel: int, r_first: int = 0) -> Iterator[tuple[int, int]]:
        """(first row, end row) of each block from row r_first to the end of `numel` elements."""
        rows = -(-numel // self._width)
        for r0 in range(r_first, rows, self._block_rows):
            yield r0, min(rows, r0 + self._block_rows)

    def _block(self, t: Tensor, r0: int, r1: int) -> Tensor:
        """Rows r0..r1 of the [rows, width] view of flat t; only the last block is padded."""
        e0, e1 = r0 * self._width, min(t.numel(), r1 * self._width)
        piece = t[e0:e1]
        pad = (r1 - r0) * self._width - (e1 - e0)
        if pad:
            piece = torch.cat([piece, piece.new_zeros(pad)])
        return piece.view(r1 - r0, self._width)

    def _row_scales(self, s: Tensor, numel: int) -> Tensor:
        """One scale per row: the bucket scales, or the single scale repeated."""
        return s if self.wire.bucket_size is not None else s.expand(-(-numel // self._width))


def round_up_to_wire(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Scales as they will be decoded: in `dtype`, rounded up so |g| ≤ s still holds (fp16
    saturates at 65504: a gradient beyond that is clipped there, never turned into inf)."""
    if dtype == torch.float32:
        return s
    s = s.clamp(max=torch.finfo(dtype).max)
    rounded = s.to(dtype)
    low = rounded.to(torch.float32) < s
    rounded = torch.where(low, torch.nextafter(rounded, rounded.new_full((), torch.inf)), rounded)
    return rounded.to(torch.float32)


class StochasticQuantizer(BucketCodec):
    """Unbiased stochastic m-bit linear quantizer, scale = max|g| per bucket (see module doc)."""

    def __init__(
        self,
        bits: int = 2,
        bucket_size: int | None = 512,
        scale_dtype: torch.dtype = torch.float32,
        shared_scale: bool = False,
    ) -> None:
        wire = WireFormat(bits, bucket_size, scale_dtype, shared_scale)
        super().__init__(wire, levels_per_sign(bits))

    def with_bits(self, bits: int) -> Compressor:
        if bits == self.wire.bits or self.wire.shared_scale:  # TernGrad has one width
            return super().with_bits(bits)
        return StochasticQuantizer(bits, self.wire.bucket_size, self.wire.scale_dtype)

    @property
    def delta(self) -> float:
        """Δ_g = 1/k, the level spacing relative to the scale (1 for the 1-bit sign code, for
        which Lemma 3's bound E‖Q(g) − g‖² ≤ Δ_g‖g‖_∞‖g‖₁ does not hold)."""
        return 1.0 / self.k if self.k else 1.0

    def _row_stats(self, xb: Tensor) -> Tensor:
        return kernels.compiled(kernels.max_abs_scales)(xb)

    def _finish_scales(self, stats: Tensor, numel: int) -> Tensor:
        return stats if self.wire.bucket_size is not None else stats.amax(dim=0, keepdim=True)

    def _encode(self, xb: Tensor, seed: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
        if self.wire.scale_dtype != torch.float32:  # scales rounded up to fp16 in between
            return super()._encode(xb, seed, first)
        run = kernels.compiled(kernels.stochastic_packed_scaled)
        return run(xb, seed, first, self.k, self.wire.bits)

    def _codes(self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor) -> Tensor:
        return kernels.compiled(kernels.stochastic_codes)(xb, s, key, offset, numel, self.k)

    def _row_codes(self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor) -> Tensor:
        run = kernels.compiled(kernels.stochastic_packed)
        return run(xb, s, key, offset, self.k, self.wire.bits)


def terngrad(bucket_size: int | None = None) -> StochasticQuantizer:
    """TernGrad (Wen et al. 2017): 2-bit stochastic levels {−s, 0, s}, s = max over ranks."""
    return StochasticQuantizer(bits=2, bucket_size=bucket_size, shared_scale=True)


class SignCompressor(BucketCodec):
    """sign(g)·‖g‖₁/n per bucket, 1 bit a value (signSGD with a magnitude; biased)."""

    def __init__(self, bucket_size: int | None = 512, scale_dtype: torch.dtype = torch.float32):
        super().__init__(WireFormat(1, bucket_size, scale_dtype), k=0)

    def _row_stats(self, xb: Tensor) -> Tensor:
        return kernels.compiled(kernels.abs_sums)(xb)

    def _finish_scales(self, stats: Tensor, numel: int) -> Tensor:
        if self.wire.bucket_size is None:
            s = stats.sum(dim=0, keepdim=True) / max(numel, 1)
        else:
            width = self.wire.bucket_size
            rows = torch.arange(stats.numel(), device=stats.device)
            s = stats / (numel - rows * width).clamp(1, width)  # the last bucket may be partial
        return torch.where(torch.isfinite(s), s, torch.nan)

    def _codes(self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor) -> Tensor:
        return kernels.compiled(kernels.sign_codes)(xb, offset, numel)

    def _row_codes(self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor) -> Tensor:
        return kernels.compiled(kernels.sign_packed)(xb)
