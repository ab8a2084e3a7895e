"""Gradient compressors: what the bytes on the wire are.

Each compressor declares its `WireFormat` and turns a flat float tensor into one uint8 payload
(`compress`) and back (`decompress`). Scales are per bucket of `bucket_size` elements (None: one
for the whole input). Every compressor here is deterministic given its `Key`, so all ranks that
decode a payload get bit-identical values.

- `StochasticQuantizer` (ICLR 2019, "Analysis of Quantized Models"; QSGD/TernGrad family):
  levels r/k, k = 2^(m−1) − 1, scale s = max|g| of the bucket, stochastic rounding between the two
  nearest levels: unbiased, E‖Q(g) − g‖² ≤ Δ_g·‖g‖_∞·‖g‖₁ per bucket with Δ_g = 1/k.
  m = 1 is the unbiased stochastic sign: ±s with P(+s) = (1 + g/s)/2.
- `terngrad`: the 2-bit case with one scale per tensor, max-reduced across ranks.
- `SignCompressor`: sign(g)·mean|g| per bucket (1 bit; biased, use with error feedback).
- `ErrorFeedback`: wraps any compressor; adds last step's compression error before compressing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from distq.comm import kernels
from distq.comm.noise import Key
from distq.comm.wire import WireFormat, split
from distq.packing import pack, unpack


class Compressor(ABC):
    """Turns a flat float tensor into a payload of `wire.payload_nbytes(numel)` bytes and back."""

    wire: WireFormat
    stateful = False  # keeps state per whole tensor (error feedback): never split it up

    @abstractmethod
    def scales(self, x: Tensor, key: Key) -> Tensor:
        """float32 scale per bucket of x; NaN for a bucket holding NaN/Inf."""

    @abstractmethod
    def compress(
        self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0
    ) -> Tensor:
        """Payload for x (float32, 1-D); `scales` overrides the local ones (shared scales).

        x[i] draws the noise of element start + i of `key`'s stream, so the pieces of a tensor
        compressed one after another (start = their offsets) get the whole tensor's codes."""

    @abstractmethod
    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        """float32 values encoded in `payload`."""

    def decompress_into(self, payload: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
        """Decode into `out` (out += decoded if `accumulate`); returns out."""
        values = self.decompress(payload, out.numel())
        return out.add_(values) if accumulate else out.copy_(values)


ROW_WIDTH = 4096  # kernel row width when one scale covers the whole input
BLOCK_ELEMENTS = 1 << 20  # elements per kernel call: bounds the codec's scratch memory


class BucketCodec(Compressor):
    """Codes c ∈ [0, 2^bits) decoded as (c − k)·s/k per bucket (k = 0: (2c − 1)·s).

    Subclasses choose the scale (`_row_stats`, `_finish_scales`) and the codes (`_codes`), pure
    torch kernels from `kernels`, compiled; for 1, 2, 4 and 8 bits the packing is fused into the
    same pass. Inputs are processed in blocks of about BLOCK_ELEMENTS, so encoding and decoding
    allocate nothing of the input's size besides the payload and the decoded output.
    """

    def __init__(self, wire: WireFormat, k: int) -> None:
        self.wire = wire
        self.k = k
        self._width = wire.bucket_size or ROW_WIDTH
        self._row_bytes = self._width * wire.bits // 8
        self._aligned = self._width * wire.bits % 8 == 0  # every row starts on a byte
        self._fused = self._aligned and wire.bits in (1, 2, 4, 8)
        self._block_rows = max(1, BLOCK_ELEMENTS // self._width)

    @abstractmethod
    def _row_stats(self, xb: Tensor) -> Tensor:
        """Per-row statistic of a block view that the scales are made of."""

    @abstractmethod
    def _finish_scales(self, stats: Tensor, numel: int) -> Tensor:
        """Scale per bucket from all rows' statistics (NaN where the input is not finite)."""

    @abstractmethod
    def _codes(
        self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor, packed: bool
    ) -> Tensor:
        """Codes of a block view starting at element `offset` (row-packed bytes if `packed`)."""

    def scales(self, x: Tensor, key: Key) -> Tensor:
        stats = [self._row_stats(self._block(x, r0, r1)) for r0, r1 in self._blocks(x.numel())]
        return self._finish_scales(torch.cat(stats), x.numel())

    def compress(
        self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0
    ) -> Tensor:
        numel = x.numel()
        payload = torch.empty(self.wire.payload_nbytes(numel), dtype=torch.uint8, device=x.device)
        if numel == 0:
            return payload
        s = round_up_to_wire(
            self.scales(x, key) if scales is None else scales, self.wire.scale_dtype
        )
        row_scales = self._row_scales(s, numel)
        code_bytes = self.wire.code_nbytes(numel)
        # element indices are offset by `start`; the padding test compares them to start + numel
        seed, count = key.tensor(x.device), torch.tensor(start + numel, device=x.device)
        codes = []
        for r0, r1 in self._blocks(numel):
            offset = torch.tensor(start + r0 * self._width, device=x.device)
            block = self._codes(
                self._block(x, r0, r1), row_scales[r0:r1], seed, offset, count, self._fused
            ).reshape(-1)
            if not self._aligned:
                codes.append(block)
                continue
            if not self._fused:
                block = pack(block, self.wire.bits)
            b0, b1 = r0 * self._row_bytes, min(code_bytes, r1 * self._row_bytes)
            payload[b0:b1] = block[: b1 - b0]
        if not self._aligned:  # rows not byte-aligned: pack the whole code stream at once
            payload[:code_bytes] = pack(torch.cat(codes)[:numel], self.wire.bits)
        payload[code_bytes:] = s.to(self.wire.scale_dtype).view(torch.uint8)
        return payload

    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        return self.decompress_into(payload, torch.empty(numel, device=payload.device))

    def decompress_into(self, payload: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
        numel = out.numel()
        packed, s = split(payload, numel, self.wire)
        if numel == 0:
            return out
        row_scales = self._row_scales(s, numel)
        codes = None if self._aligned else unpack(packed, self.wire.bits, numel)
        for r0, r1 in self._blocks(numel):
            rows = r1 - r0
            if self._aligned:
                block = packed[r0 * self._row_bytes : r1 * self._row_bytes]
                if block.numel() < rows * self._row_bytes:  # the last row's unused tail
                    block = torch.cat(
                        [block, block.new_zeros(rows * self._row_bytes - block.numel())]
                    )
            e0, e1 = r0 * self._width, min(numel, r1 * self._width)
            if self._fused and e1 - e0 == rows * self._width:  # whole rows: decode in place
                kernel = kernels.decode_add_into if accumulate else kernels.decode_into
                kernels.compiled(kernel)(
                    block.view(rows, -1),
                    row_scales[r0:r1],
                    out[e0:e1].view(rows, -1),
                    self.k,
                    self.wire.bits,
                )
                continue
            if self._fused:
                values = kernels.compiled(kernels.packed_level_values)(
                    block.view(rows, -1), row_scales[r0:r1], self.k, self.wire.bits
                )
            else:
                if self._aligned:
                    block_codes = unpack(block, self.wire.bits, rows * self._width)
                else:
                    block_codes = self._block(codes, r0, r1)
                values = kernels.compiled(kernels.level_values)(
                    block_codes.view(rows, -1), row_scales[r0:r1], self.k
                )
            if accumulate:
                out[e0:e1] += values.reshape(-1)[: e1 - e0]
            else:
                out[e0:e1] = values.reshape(-1)[: e1 - e0]
        return out

    def _blocks(self, numel: int) -> Iterator[tuple[int, int]]:
        """(first row, end row) of each block of rows covering `numel` elements."""
        rows = -(-numel // self._width)
        for r0 in range(0, rows, self._block_rows):
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
        if self.wire.bucket_size is not None:
            return s
        return s.expand(-(-numel // self._width))


def round_up_to_wire(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Scales as they will be decoded: in `dtype`, rounded up so |g| ≤ s still holds (fp16
    saturates at 65504: a gradient beyond that is clipped there, never turned into inf)."""
    if dtype == torch.float32:
        return s
    s = s.clamp(max=torch.finfo(dtype).max)  # saturate: larger values clip, never become inf
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
        super().__init__(
            WireFormat(bits, bucket_size, scale_dtype, shared_scale), 2 ** (bits - 1) - 1
        )

    @property
    def delta(self) -> float:
        """Δ_g = 1/k, the level spacing relative to the scale (1 for the 1-bit sign code, for
        which Lemma 3's bound E‖Q(g) − g‖² ≤ Δ_g‖g‖_∞‖g‖₁ does not hold)."""
        return 1.0 / self.k if self.k else 1.0

    def _row_stats(self, xb: Tensor) -> Tensor:
        return kernels.compiled(kernels.max_abs_scales)(xb)

    def _finish_scales(self, stats: Tensor, numel: int) -> Tensor:
        return stats if self.wire.bucket_size is not None else stats.amax(dim=0, keepdim=True)

    def _codes(
        self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor, packed: bool
    ) -> Tensor:
        if packed:
            return kernels.compiled(kernels.stochastic_packed)(
                xb, s, key, offset, numel, self.k, self.wire.bits
            )
        return kernels.compiled(kernels.stochastic_codes)(xb, s, key, offset, numel, self.k)


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

    def _codes(
        self, xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor, packed: bool
    ) -> Tensor:
        if packed:
            return kernels.compiled(kernels.sign_packed)(xb, offset, numel)
        return kernels.compiled(kernels.sign_codes)(xb, offset, numel)


class ErrorFeedback(Compressor):
    """Error feedback around any compressor (Seide et al. 2014; Karimireddy et al. 2019).

    For a rank's own gradient (key.phase 0) it compresses g + e and keeps e ← (g + e) − Q(g + e)
    per key.slot: one residual the size of the gradient per rank. Re-quantizations of reduced
    data (phase ≥ 1, the `scatter` owner's step) pass through uncompensated. inplace=True adds
    e into the caller's x (a scratch buffer) instead of allocating g + e.
    """

    stateful = True

    def __init__(self, inner: Compressor, inplace: bool = False) -> None:
        self.inner = inner
        self.wire = inner.wire
        self.inplace = inplace
        self.residuals: dict[int, Tensor] = {}

    def _residual(self, x: Tensor, key: Key) -> Tensor | None:
        residual = self.residuals.get(key.slot)
        if key.phase != 0 or residual is None:
            return None
        if residual.numel() != x.numel():
            raise ValueError(
                f"error-feedback slot {key.slot} holds {residual.numel()} elements, got "
                f"{x.numel()}: the bucket layout changed; call discard_mismatched() or reset()"
            )
        return residual

    def discard_mismatched(self, slot: int, numel: int) -> bool:
        """Drop slot's residual if it has another size than `numel`; True if one was dropped."""
        residual = self.residuals.get(slot)
        if residual is not None and residual.numel() != numel:
            del self.residuals[slot]
            return True
        return False

    def scales(self, x: Tensor, key: Key) -> Tensor:
        residual = self._residual(x, key)
        return self.inner.scales(x if residual is None else x + residual, key)

    def compress(
        self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0
    ) -> Tensor:
        if key.phase != 0:
            return self.inner.compress(x, key, scales, start)
        residual = self._residual(x, key)
        if residual is not None:
            x = x.add_(residual) if self.inplace else x + residual
        payload = self.inner.compress(x, key, scales, start)
        if residual is None:
            residual = self.residuals[key.slot] = torch.empty_like(x)
        self.inner.decompress_into(payload, residual).neg_().add_(x)  # e = target − Q(target)
        torch.nan_to_num_(residual, nan=0.0, posinf=0.0, neginf=0.0)
        return payload

    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        return self.inner.decompress(payload, numel)

    def decompress_into(self, payload: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
        return self.inner.decompress_into(payload, out, accumulate)

    def reset(self) -> None:
        """Forget all residuals (a new bucket layout or world size)."""
        self.residuals.clear()


def make_compressor(
    kind: str = "quantize",
    bits: int = 2,
    bucket_size: int | None = 512,
    error_feedback: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    inplace_feedback: bool = False,
) -> Compressor:
    """A compressor by name: 'quantize' (m-bit stochastic), 'terngrad', 'sign' (1-bit);
    error_feedback wraps it in `ErrorFeedback(…, inplace=inplace_feedback)`."""
    if kind == "quantize":
        compressor: Compressor = StochasticQuantizer(bits, bucket_size, scale_dtype)
    elif kind == "terngrad":
        compressor = terngrad(bucket_size)
    elif kind == "sign":
        compressor = SignCompressor(bucket_size, scale_dtype)
    else:
        raise ValueError(f"compressor {kind!r}; allowed: {', '.join(COMPRESSORS)}")
    return ErrorFeedback(compressor, inplace_feedback) if error_feedback else compressor


COMPRESSORS = ("quantize", "terngrad", "sign")
