"""Compressors by name: one record each, saying how to build it, which widths it can send and
its variance law (`distq.theory.exchange.VARIANCE_LAWS`); nothing else lists compressor names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distq.comm.compressors import Compressor, SignCompressor, StochasticQuantizer, terngrad
from distq.comm.feedback import ErrorFeedback, ResidualMemory
from distq.theory.exchange import VARIANCE_LAWS


@dataclass(frozen=True)
class CompressorRecord:
    """`name`, a line on what it sends, `build(bits, bucket_size, scale_dtype)`, the one width
    it can send (None: any of 1..8, `default_bits` when none is asked for), and its variance
    law (bits, bucket elements) → proven bound on E‖Q(x)‖²/‖g‖², or None."""

    name: str
    summary: str
    build: Callable[[int, int | None, torch.dtype], Compressor]
    fixed_bits: int | None
    default_bits: int
    variance: Callable[[int, int], float | None]

    def bits(self, bits: int | None, name: str = "bits") -> int:
        """The width sent for a requested `bits` (None: its own); one it cannot send is refused."""
        if bits is None:
            return self.default_bits
        if self.fixed_bits is not None and bits != self.fixed_bits:
            raise ValueError(
                f"{name}={bits!r} with compressor {self.name!r}, which sends {self.fixed_bits} "
                f"bit(s) per element; allowed: {name}={self.fixed_bits} (or None), or "
                f"compressor 'quantize' for {bits} bits"
            )
        return bits


COMPRESSORS: dict[str, CompressorRecord] = {
    record.name: record
    for record in (
        CompressorRecord(
            "quantize", "unbiased stochastic m-bit levels, scale max|g| per bucket",
            lambda bits, bucket, dtype: StochasticQuantizer(bits, bucket, dtype),
            None, 2, VARIANCE_LAWS["quantize"],
        ),
        CompressorRecord(
            "terngrad", "TernGrad: 2-bit stochastic levels, scale max-reduced over ranks",
            lambda bits, bucket, dtype: terngrad(bucket),
            2, 2, VARIANCE_LAWS["terngrad"],
        ),
        CompressorRecord(
            "sign", "sign(g)·mean|g| per bucket, 1 bit (biased: use error feedback)",
            lambda bits, bucket, dtype: SignCompressor(bucket, dtype),
            1, 1, VARIANCE_LAWS["sign"],
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
