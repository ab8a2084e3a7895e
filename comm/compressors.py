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

import torch
from torch import Tensor

from distq.comm import kernels
from distq.comm.noise import Key
from distq.comm.wire import WireFormat, join, split
from distq.packing import pack, unpack


class Compressor(ABC):
    """Turns a flat float tensor into a payload of `wire.payload_nbytes(numel)` bytes and back."""

    wire: WireFormat

    @abstractmethod
    def scales(self, x: Tensor, key: Key) -> Tensor:
        """float32 scale per bucket of x; NaN for a bucket holding NaN/Inf."""

    @abstractmethod
    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None) -> Tensor:
        """Payload for x (float32, 1-D); `scales` overrides the local ones (shared scales)."""

    @abstractmethod
    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        """float32 values encoded in `payload`."""


ROW_WIDTH = 4096  # kernel row width when one scale covers the whole input


class BucketCodec(Compressor):
    """Codes c ∈ [0, 2^bits) decoded as (c − k)·s/k per bucket (k = 0: (2c − 1)·s).

    Subclasses choose the scale (`_scales`) and the codes (`_codes`), both pure torch kernels
    from `kernels`, compiled; for 1, 2, 4 and 8 bits the packing is fused into the same pass.
    """

    def __init__(self, wire: WireFormat, k: int) -> None:
        self.wire = wire
        self.k = k
        self._fused = wire.bits in (1, 2, 4, 8) and self._width(0) * wire.bits % 8 == 0

    @abstractmethod
    def _scales(self, xb: Tensor, numel: int) -> Tensor:
        """Scale of each row of the padded [n_buckets, width] view (NaN if non-finite)."""

    @abstractmethod
    def _codes(self, xb: Tensor, s: Tensor, key: Tensor, numel: Tensor, packed: bool) -> Tensor:
        """Codes of the view for scales s (row-packed bytes if `packed`)."""

    def scales(self, x: Tensor, key: Key) -> Tensor:
        return self._scales(self._view(x), x.numel())

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None) -> Tensor:
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        numel, xb = x.numel(), self._view(x)
        s = self._scales(xb, numel) if scales is None else scales
        s = round_up_to_wire(s, self.wire.scale_dtype)
        count = torch.tensor(numel, device=x.device)
        codes = self._codes(xb, self._per_row(s, xb), key.tensor(x.device), count, self._fused)
        codes = codes.reshape(-1)
        if self._fused:
            packed = codes[: self.wire.code_nbytes(numel)]
        else:
            packed = pack(codes[:numel], self.wire.bits)
        return join(packed, s, self.wire)

    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        packed, s = split(payload, numel, self.wire)
        if numel == 0:
            return torch.empty(0, device=payload.device)
        width = self._width(numel)
        rows = -(-numel // width)
        if self._fused:
            row_bytes = width * self.wire.bits // 8
            full = torch.cat([packed, packed.new_zeros(rows * row_bytes - packed.numel())])
            packed = full.view(rows, row_bytes)
            values = kernels.compiled(kernels.packed_level_values)(
                packed, self._per_row(s, packed), self.k, self.wire.bits
            )
        else:
            codes = self._view(unpack(packed, self.wire.bits, numel))
            values = kernels.compiled(kernels.level_values)(codes, self._per_row(s, codes), self.k)
        return values.reshape(-1)[:numel]

    def _width(self, numel: int) -> int:
        """Row width of the kernels' 2-D view: bucket_size, or a fixed row for one-scale codecs."""
        return self.wire.bucket_size or ROW_WIDTH

    def _per_row(self, s: Tensor, rows: Tensor) -> Tensor:
        """One scale per row of the view: the bucket scales, or the single scale repeated."""
        return s if self.wire.bucket_size is not None else s.expand(rows.shape[0])

    def _view(self, t: Tensor) -> Tensor:
        """[n_buckets, width] view of a flat tensor, zero-padded at the end."""
        width = self._width(t.numel())
        pad = -t.numel() % width
        if pad or t.numel() == 0:
            t = torch.cat([t, t.new_zeros(pad or width)])
        return t.view(-1, width)


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

    def _scales(self, xb: Tensor, numel: int) -> Tensor:
        s = kernels.compiled(kernels.max_abs_scales)(xb)
        return s if self.wire.bucket_size is not None else s.amax(dim=0, keepdim=True)

    def _codes(self, xb: Tensor, s: Tensor, key: Tensor, numel: Tensor, packed: bool) -> Tensor:
        if packed:
            return kernels.compiled(kernels.stochastic_packed)(
                xb, s, key, numel, self.k, self.wire.bits
            )
        return kernels.compiled(kernels.stochastic_codes)(xb, s, key, numel, self.k)


def terngrad(bucket_size: int | None = None) -> StochasticQuantizer:
    """TernGrad (Wen et al. 2017): 2-bit stochastic levels {−s, 0, s}, s = max over ranks."""
    return StochasticQuantizer(bits=2, bucket_size=bucket_size, shared_scale=True)


class SignCompressor(BucketCodec):
    """sign(g)·‖g‖₁/n per bucket, 1 bit a value (signSGD with a magnitude; biased)."""

    def __init__(self, bucket_size: int | None = 512, scale_dtype: torch.dtype = torch.float32):
        super().__init__(WireFormat(1, bucket_size, scale_dtype), k=0)

    def _scales(self, xb: Tensor, numel: int) -> Tensor:
        sums = kernels.compiled(kernels.abs_sums)(xb)
        if self.wire.bucket_size is None:
            s = sums.sum(dim=0, keepdim=True) / max(numel, 1)
        else:
            width = self.wire.bucket_size
            real = (numel - torch.arange(sums.numel(), device=xb.device) * width).clamp(1, width)
            s = sums / real
        return torch.where(torch.isfinite(s), s, torch.nan)

    def _codes(self, xb: Tensor, s: Tensor, key: Tensor, numel: Tensor, packed: bool) -> Tensor:
        if packed:
            return kernels.compiled(kernels.sign_packed)(xb, numel)
        return kernels.compiled(kernels.sign_codes)(xb, numel)


class ErrorFeedback(Compressor):
    """Error feedback around any compressor (Seide et al. 2014; Karimireddy et al. 2019).

    For a rank's own gradient (key.phase 0) it compresses g + e and keeps e ← (g + e) − Q(g + e)
    per key.slot: one residual the size of the gradient per rank. Re-quantizations of reduced
    data (phase ≥ 1, the `scatter` owner's step) pass through uncompensated. inplace=True adds
    e into the caller's x (a scratch buffer) instead of allocating g + e.
    """

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

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None) -> Tensor:
        if key.phase != 0:
            return self.inner.compress(x, key, scales)
        residual = self._residual(x, key)
        if residual is not None:
            x = x.add_(residual) if self.inplace else x + residual
        payload = self.inner.compress(x, key, scales)
        if residual is None:
            residual = self.residuals[key.slot] = torch.empty_like(x)
        torch.sub(x, self.inner.decompress(payload, x.numel()), out=residual)
        torch.nan_to_num_(residual, nan=0.0, posinf=0.0, neginf=0.0)
        return payload

    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        return self.inner.decompress(payload, numel)

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
