"""Compressors by name: one record each, saying how to build it, which widths it can send and
its variance law (`distq.theory.exchange.VARIANCE_LAWS`); nothing else lists compressor names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distq.comm.compressors import Compressor, SignCompressor, StochasticQuantizer, terngrad
from distq.comm.feedback import ErrorFeedback, ResidualMemory
from distq.comm.rotation import RotatedQuantizer
from distq.theory.exchange import VARIANCE_LAWS


@dataclass(frozen=True)
class CompressorRecord:
    """`name`, a line on what it sends, `build(bits, bucket_size, scale_dtype)`, the widths it
    can send (`default_bits` when none is asked for), and its variance law (bits, bucket
    elements) → proven bound on E‖Q(x)‖²/‖g‖², or None."""

    name: str
    summary: str
    build: Callable[[int, int | None, torch.dtype], Compressor]
    widths: range
    default_bits: int
    variance: Callable[[int, int], float | None]

    def bits(self, bits: int | None, name: str = "bits") -> int:
        """The width sent for a requested `bits` (None: its own); one it cannot send is refused."""
        if bits is None:
            return self.default_bits
        if bits not in self.widths and isinstance(bits, int) and 1 <= bits <= 8:
            raise ValueError(
                f"{name}={bits!r} with compressor {self.name!r}, which sends {self.sends()} "
                f"bit(s) per element; allowed: {name} in {self.sends()} (or None), or "
                f"compressor 'quantize' for {bits} bits"
            )
        return bits

    def sends(self) -> str:
        """The widths it can send, as "1" or "1..4"."""
        return "..".join(str(w) for w in sorted({self.widths[0], self.widths[-1]}))


COMPRESSORS: dict[str, CompressorRecord] = {
    record.name: record
    for record in (
        CompressorRecord(
            "quantize", "unbiased stochastic m-bit levels, scale max|g| per bucket",
            lambda bits, bucket, dtype: StochasticQuantizer(bits, bucket, dtype),
            range(1, 9), 2, VARIANCE_LAWS["quantize"],
        ),
        CompressorRecord(
            "terngrad", "TernGrad: 2-bit stochastic levels, scale max-reduced over ranks",
            lambda bits, bucket, dtype: terngrad(bucket),
            range(2, 3), 2, VARIANCE_LAWS["terngrad"],
        ),
        CompressorRecord(
            "sign", "sign(g)·mean|g| per bucket, 1 bit (biased: use error feedback)",
            lambda bits, bucket, dtype: SignCompressor(bucket, dtype),
            range(1, 2), 1, VARIANCE_LAWS["sign"],
        ),
        CompressorRecord(
            "rotated", "EDEN: Hadamard-rotated buckets, Lloyd–Max codes, unbiasing scale",
            lambda bits, bucket, dtype: RotatedQuantizer(bits, bucket, dtype),
            range(1, 5), 2, VARIANCE_LAWS["rotated"],
        ),
        CompressorRecord(
            "rotated-stochastic", "Hadamard-rotated buckets, Lloyd–Max levels, stochastic rounding",
            lambda bits, bucket, dtype: RotatedQuantizer(bits, bucket, dtype, stochastic=True),
            range(1, 5), 2, VARIANCE_LAWS["rotated-stochastic"],
        ),
    )
}  # fmt: skip


def compressor_record(kind: str) -> CompressorRecord:
    """The record of compressor `kind`; a ValueError naming the allowed ones otherwise."""
    if kind not in COMPRESSORS:
        raise ValueError(f"compressor={kind!r}; allowed: {', '.join(COMPRESSORS)}")
    return COMPRESSORS[kind]


def make_compressor(
    kind: str = "quantize",
    bits: int | None = None,
    bucket_size: int | None = 512,
    error_feedback: bool | ResidualMemory = False,
    scale_dtype: torch.dtype = torch.float32,
) -> Compressor:
    """A compressor by name (`COMPRESSORS`; bits=None: its own width), wrapped in `ErrorFeedback`
    with a fresh residual memory (or the `ResidualMemory` given) if `error_feedback`."""
    record = compressor_record(kind)
    compressor = record.build(record.bits(bits), bucket_size, scale_dtype)
    if error_feedback is False:
        return compressor
    memory = error_feedback if isinstance(error_feedback, ResidualMemory) else None
    return ErrorFeedback(compressor, memory)
