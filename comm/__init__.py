"""distq.comm: gradients on the wire in 1–8 bits: compressors, collectives, the DDP hook."""

from distq._layout import require_package_name
from distq.comm.api import allreduce
from distq.comm.collectives import COLLECTIVES, Traffic, quantized_sum
from distq.comm.compressors import (
    COMPRESSORS,
    Compressor,
    ErrorFeedback,
    SignCompressor,
    StochasticQuantizer,
    make_compressor,
    terngrad,
)
from distq.comm.hook import CompressionStats, QuantizedCommState, prime_buckets, quantized_hook
from distq.comm.noise import Key
from distq.comm.wire import WireFormat

require_package_name(__name__, "distq.comm")

__all__ = [
    "COLLECTIVES",
    "COMPRESSORS",
    "CompressionStats",
    "Compressor",
    "ErrorFeedback",
    "Key",
    "QuantizedCommState",
    "SignCompressor",
    "StochasticQuantizer",
    "Traffic",
    "WireFormat",
    "allreduce",
    "make_compressor",
    "prime_buckets",
    "quantized_hook",
    "quantized_sum",
    "terngrad",
]
