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


class BucketCodec(Compressor):
    """A compressor made of per-bucket `encode`/`decode` on an [n_buckets, bucket] view."""

    def __init__(self, wire: WireFormat) -> None:
        self.wire = wire

    @abstractmethod
    def bucket_scales(self, xb: Tensor) -> Tensor:
        """Scale of each row of the padded [n_buckets, bucket] view."""

    @abstractmethod
    def encode(self, xb: Tensor, s: Tensor, key: Key) -> Tensor:
        """uint8 codes in [0, 2^bits) for the bucket view, given the (wire-rounded) scales."""

    @abstractmethod
    def decode(self, codes: Tensor, s: Tensor) -> Tensor:
        """Values of the [n_buckets, bucket] codes."""

    def scales(self, x: Tensor, key: Key) -> Tensor:
        xb = self._view(x)
        s = self.bucket_scales(xb)
        return torch.where(torch.isfinite(xb).all(dim=1) & torch.isfinite(s), s, torch.nan)

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None) -> Tensor:
        s = self.scales(x, key) if scales is None else scales
        s = round_up_to_wire(s, self.wire.scale_dtype)
        codes = self.encode(self._view(x), s, key).reshape(-1)[: x.numel()]
        return join(pack(codes, self.wire.bits), s, self.wire)

    def decompress(self, payload: Tensor, numel: int) -> Tensor:
        packed, s = split(payload, numel, self.wire)
        codes = unpack(packed, self.wire.bits, numel)
        return self.decode(self._view(codes), s).reshape(-1)[:numel]

    def _view(self, t: Tensor) -> Tensor:
        """[n_buckets, bucket_size] view of a flat tensor, zero-padded at the end."""
        size = self.wire.bucket_size or max(t.numel(), 1)
        pad = -t.numel() % size
        if pad:
            t = torch.cat([t, t.new_zeros(pad)])
        return t.view(-1, size)


def round_up_to_wire(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Scales as they will be decoded: in `dtype`, rounded up so |g| ≤ s still holds."""
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
        super().__init__(WireFormat(bits, bucket_size, scale_dtype, shared_scale))
        self.k = 2 ** (bits - 1) - 1

    @property
    def delta(self) -> float:
        """Δ_g, the level spacing relative to the scale (1 for the 1-bit sign case)."""
        return 1.0 / self.k if self.k else 1.0

    def bucket_scales(self, xb: Tensor) -> Tensor:
        return xb.abs().amax(dim=1)

    def encode(self, xb: Tensor, s: Tensor, key: Key) -> Tensor:
        seed = key.tensor(xb.device)
        if self.k == 0:
            return kernels.compiled(kernels.stochastic_sign_codes)(xb, s, seed)
        return kernels.compiled(kernels.stochastic_codes)(xb, s, seed, self.k)

    def decode(self, codes: Tensor, s: Tensor) -> Tensor:
        if self.k == 0:
            return kernels.compiled(kernels.sign_values)(codes, s)
        return kernels.compiled(kernels.level_values)(codes, s, self.k)


def terngrad(bucket_size: int | None = None) -> StochasticQuantizer:
    """TernGrad (Wen et al. 2017): 2-bit stochastic levels {−s, 0, s}, s = max over ranks."""
    return StochasticQuantizer(bits=2, bucket_size=bucket_size, shared_scale=True)


class SignCompressor(BucketCodec):
    """sign(g)·‖g‖₁/n per bucket, 1 bit a value (signSGD with a magnitude; biased)."""

    def __init__(self, bucket_size: int | None = 512, scale_dtype: torch.dtype = torch.float32):
        super().__init__(WireFormat(1, bucket_size, scale_dtype))

    def bucket_scales(self, xb: Tensor) -> Tensor:
        return xb.abs().mean(dim=1)

    def encode(self, xb: Tensor, s: Tensor, key: Key) -> Tensor:
        return (xb >= 0).to(torch.uint8)

    def decode(self, codes: Tensor, s: Tensor) -> Tensor:
        return kernels.compiled(kernels.sign_values)(codes, s)


class ErrorFeedback(Compressor):
    """Error feedback around any compressor (Seide et al. 2014; Karimireddy et al. 2019).

    For a rank's own gradient (key.phase 0) it compresses g + e and keeps e ← (g + e) − Q(g + e)
    per key.slot: one residual the size of the gradient per rank. Re-quantizations of reduced
    data (phase ≥ 1, the `scatter` owner's step) pass through uncompensated.
    """

    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.wire = inner.wire
        self.residuals: dict[int, Tensor] = {}

    def _compensated(self, x: Tensor, key: Key) -> Tensor:
        residual = self.residuals.get(key.slot)
        if key.phase != 0 or residual is None:
            return x
        if residual.numel() != x.numel():
            raise ValueError(
                f"error-feedback slot {key.slot} holds {residual.numel()} elements, got "
                f"{x.numel()}: the bucket layout changed; call discard_mismatched() or reset()"
            )
        return x + residual

    def discard_mismatched(self, slot: int, numel: int) -> bool:
        """Drop slot's residual if it has another size than `numel`; True if one was dropped."""
        residual = self.residuals.get(slot)
        if residual is not None and residual.numel() != numel:
            del self.residuals[slot]
            return True
        return False

    def scales(self, x: Tensor, key: Key) -> Tensor:
        return self.inner.scales(self._compensated(x, key), key)

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None) -> Tensor:
        target = self._compensated(x, key)
        payload = self.inner.compress(target, key, scales)
        if key.phase == 0:
            residual = target - self.inner.decompress(payload, x.numel())
            self.residuals[key.slot] = torch.where(torch.isfinite(residual), residual, 0.0)
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
) -> Compressor:
    """A compressor by name: 'quantize' (m-bit stochastic), 'terngrad', 'sign' (1-bit)."""
    if kind == "quantize":
        compressor: Compressor = StochasticQuantizer(bits, bucket_size, scale_dtype)
    elif kind == "terngrad":
        compressor = terngrad(bucket_size)
    elif kind == "sign":
        compressor = SignCompressor(bucket_size, scale_dtype)
    else:
        raise ValueError(f"compressor {kind!r}; allowed: {', '.join(COMPRESSORS)}")
    return ErrorFeedback(compressor) if error_feedback else compressor


COMPRESSORS = ("quantize", "terngrad", "sign")
