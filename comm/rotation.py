"""Rotated quantization (DRIVE, NeurIPS'21; EDEN, ICML'22): each bucket of w = 2^p elements is
rotated by y = H·D·x/√w (D random ±1 signs, H the Walsh–Hadamard matrix), which makes its
coordinates near-Gaussian, then coded against the Lloyd–Max levels c of a standard normal
(`distq.theory.rotation.lloyd_max`); decoding un-rotates: x̂ = D·H·ŷ/√w.

- deterministic (EDEN): c_i the level nearest y_i/σ, σ = ‖y‖/√w, and ŷ = S·c with the unbiasing
  scale S = ‖y‖²/⟨y, c⟩, so E_D[x̂] = x over the rotation; vNMSE ≈ D_b/(1 − D_b).
- stochastic: S = max|y|/c_top and y/S rounded at random to the two adjacent levels: unbiased
  for every rotation.

D comes from the key's seed, step and slot (not its rank or phase) and the position in the
bucket, so every rank rotates a bucket alike: decoded payloads are summed in the rotated domain
and un-rotated once (`decode_sum_into`); decoding needs the encode call's key. The transform is
the butterfly, additions in a fixed order (a matmul's summation order may differ between
machines), so every rank decodes bit-identical values. The last partial bucket is padded with
zeros and sent whole (`WireFormat.whole_buckets`): the rotation spreads the padding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distq.comm import kernels
from distq.comm.compressors import Compressor
from distq.comm.noise import Key
from distq.comm.wire import WireFormat, split
from distq.packing import pack, unpack
from distq.theory.rotation import lloyd_max

BITS = range(1, 5)
BLOCK_ELEMENTS = 1 << 20  # elements per transform call: bounds the codec's scratch memory


def hadamard(x: Tensor) -> Tensor:
    """H·x for each row of x [rows, w], w a power of two: log2(w) butterfly stages, unnormalized
    (H·H = w·I)."""
    rows, width = x.shape
    half = 1
    while half < width:
        pairs = x.view(rows, width // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        half *= 2
    return x.reshape(rows, width)


def rotated_deterministic_codes(
    xb: Tensor, signs: Tensor, levels: Tensor, thresholds: Tensor
) -> tuple[Tensor, Tensor]:
    """(codes [rows, w], scales [rows]) of EDEN's deterministic variant (module doc); a row
    holding NaN/Inf gets a NaN scale."""
    y = hadamard(xb * signs) * (1.0 / math.sqrt(xb.shape[1]))
    energy = (y * y).sum(dim=1)
    sigma = (energy / xb.shape[1]).sqrt()[:, None]
    t = torch.where(sigma > 0, y / sigma.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = torch.bucketize(t, thresholds)
    inner = (y * levels[codes]).sum(dim=1)
    scale = torch.where(inner > 0, energy / inner.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    scale = torch.where(torch.isfinite(energy), scale, torch.nan)
    return codes.to(torch.uint8), scale


def rotated_stochastic_codes(
    xb: Tensor, signs: Tensor, levels: Tensor, key: Tensor, offset: Tensor
) -> tuple[Tensor, Tensor]:
    """(codes, scales) of the stochastic variant: y/S, S = max|y|/c_top, rounded to an adjacent
    level with the probabilities that make it unbiased (noise: element `offset` onwards)."""
    y = hadamard(xb * signs) * (1.0 / math.sqrt(xb.shape[1]))
    scale = kernels.max_abs_scales(y) / levels[-1]
    u = torch.where(scale[:, None] > 0, y / scale[:, None].clamp_min(1e-38), 0.0)
    low = (torch.bucketize(u, levels, right=True) - 1).clamp(0, levels.numel() - 2)
    below, above = levels[low], levels[low + 1]
    up = (u - below) / (above - below)
    index = torch.arange(xb.numel(), dtype=torch.int64, device=xb.device).view_as(xb) + offset
    codes = low + (kernels.hash_uniform(index, key) < up).to(low.dtype)
    return codes.to(torch.uint8), scale


def rotated_values(codes: Tensor, scales: Tensor, levels: Tensor) -> Tensor:
    """ŷ = S·c per row, in the rotated domain (float32)."""
    return levels[codes.long()] * scales[:, None]


def unrotate(y: Tensor, signs: Tensor) -> Tensor:
    """x = D·H·y/√w per row: the inverse of the rotation."""
    return hadamard(y) * (1.0 / math.sqrt(y.shape[1])) * signs


class RotatedQuantizer(Compressor):
    """1–4-bit rotated quantizer (module doc) on buckets of `bucket_size` = 2^p ≥ 8 elements,
    one float32 scale each."""

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
        if not isinstance(bucket_size, int) or bucket_size < 8 or bucket_size & (bucket_size - 1):
            raise ValueError(
                f"bucket_size={bucket_size!r} for the rotated quantizer; allowed: a power of "
                "two >= 8 (the Hadamard transform's width)"
            )
        self.wire = WireFormat(bits, bucket_size, whole_buckets=True)
        self.stochastic = stochastic
        levels, thresholds = lloyd_max(bits)
        self._levels = torch.tensor(levels, dtype=torch.float32)
        self._thresholds = torch.tensor(thresholds, dtype=torch.float32)

    def with_bits(self, bits: int) -> Compressor:
        if bits == self.wire.bits:
            return self
        return RotatedQuantizer(bits, self.wire.bucket_size, stochastic=self.stochastic)

    def signs(self, key: Key, device: torch.device | str = "cpu") -> Tensor:
        """D: ±1 per position in a bucket, the same on every rank and phase of a step's slot."""
        shared = Key(key.seed, key.step, 0, key.slot, 0)
        position = torch.arange(self.wire.bucket_size, device=device)
        return torch.where(kernels.hash_uniform(position, shared.tensor(device)) < 0.5, -1.0, 1.0)

    def _encode(self, x: Tensor, key: Key, start: int) -> tuple[Tensor, Tensor]:
        """(codes [buckets, w] uint8, scales [buckets]) of flat x, the last bucket zero-padded."""
        width, device = self.wire.bucket_size, x.device
        rows = -(-x.numel() // width)
        padded = torch.nn.functional.pad(x, (0, rows * width - x.numel())).view(rows, width)
        signs = self.signs(key, device)
        levels, thresholds = self._levels.to(device), self._thresholds.to(device)
        codes, scales = [], []
        per_block = max(1, BLOCK_ELEMENTS // width)
        for r0 in range(0, rows, per_block):
            xb = padded[r0 : r0 + per_block]
            if self.stochastic:
                offset = torch.tensor(start + r0 * width, device=device)
                run = kernels.compiled(rotated_stochastic_codes)
                c, s = run(xb, signs, levels, key.tensor(device), offset)
            else:
                c, s = kernels.compiled(rotated_deterministic_codes)(xb, signs, levels, thresholds)
            codes.append(c)
            scales.append(s)
        return torch.cat(codes), torch.cat(scales)

    def scales(self, x: Tensor, key: Key) -> Tensor:
        return self._encode(x, key, 0)[1]

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0) -> Tensor:
        if scales is not None:
            raise ValueError("the rotated quantizer makes its own scales; allowed: scales=None")
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        codes, s = self._encode(x, key, start)
        return torch.cat([pack(codes, self.wire.bits), s.view(torch.uint8)])

    def compress_rows(
        self, x: Tensor, rows: int, key: Key, start: int = 0, out: Tensor | None = None
    ) -> Tensor:
        length, width = x.numel() // rows, self.wire.bucket_size
        if length == 0 or length % width:
            return super().compress_rows(x, rows, key, start, out)
        codes, s = self._encode(x, key, start)  # whole buckets: a row's codes are whole bytes
        packed = pack(codes, self.wire.bits).view(rows, -1)
        payload = torch.cat([packed, s.view(rows, -1).view(torch.uint8)], dim=1)
        if out is None:
            return payload
        return out.copy_(payload)

    def _rotated(self, payloads: Tensor, length: int) -> Tensor:
        """Σ over the rows of `payloads` (each `length` elements) of ŷ, in row order, in the
        rotated domain: [buckets, w]."""
        width, bits = self.wire.bucket_size, self.wire.bits
        buckets = self.wire.buckets(length)
        levels = self._levels.to(payloads.device)
        total = None
        for payload in payloads:
            packed, s = split(payload, length, self.wire)
            codes = unpack(packed, bits, buckets * width).view(buckets, width)
            values = rotated_values(codes, s, levels)
            total = values if total is None else total.add_(values)
        return total

    def _write(self, y: Tensor, out: Tensor, key: Key | None, accumulate: bool) -> Tensor:
        """out ← [out +] the un-rotated y, its padding dropped."""
        if key is None:
            raise ValueError("decoding rotated codes needs the encode call's key; got key=None")
        x = unrotate(y, self.signs(key, y.device)).view(-1)[: out.numel()]
        return out.add_(x) if accumulate else out.copy_(x)

    def decompress_into(
        self, payload: Tensor, out: Tensor, accumulate: bool = False, *, key: Key | None = None
    ) -> Tensor:
        if out.numel() == 0:
            split(payload, 0, self.wire)  # checks the length
            return out
        return self._write(self._rotated(payload.view(1, -1), out.numel()), out, key, accumulate)

    def decode_rows_into(self, rows: Tensor, out: Tensor, *, key: Key | None = None) -> Tensor:
        length, width = out.numel() // max(1, rows.shape[0]), self.wire.bucket_size
        if length == 0 or length % width:
            return super().decode_rows_into(rows, out, key=key)
        wire = self.wire
        code_bytes = wire.code_nbytes(length)
        if rows.shape[1] != wire.payload_nbytes(length):
            raise ValueError(
                f"payload rows of {rows.shape[1]} bytes; {length} elements need "
                f"{wire.payload_nbytes(length)} in {wire}"
            )
        codes = unpack(rows[:, :code_bytes].reshape(-1), wire.bits, rows.shape[0] * length)
        scales = rows[:, code_bytes:].contiguous().view(torch.float32).reshape(-1)
        y = rotated_values(codes.view(-1, width), scales, self._levels.to(rows.device))
        return self._write(y, out, key, accumulate=False)

    def decode_sum_into(
        self,
        rows: Tensor,
        out: Tensor,
        skip: int | None = None,
        accumulate: bool = False,
        *,
        key: Key | None = None,
    ) -> Tensor:
        """out ← [out +] Σ_{i ≠ skip} decode(rows[i]): summed in the rotated domain, un-rotated
        once (the rotation is linear and every rank's is the same)."""
        kept = [i for i in range(rows.shape[0]) if i != skip]
        if not kept:
            return out if accumulate else out.zero_()
        return self._write(self._rotated(rows[kept], out.numel()), out, key, accumulate)
