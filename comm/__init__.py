"""distq.comm: gradients on the wire in 1–8 bits: compressors, collectives, the exchange they
make up, and its adapters (the DDP hook here; DeepSpeed, Horovod, Lightning as extras)."""

from distq._layout import require_package_name
from distq.comm.api import allreduce
from distq.comm.collectives import Traffic, quantized_sum
from distq.comm.compressors import Compressor, SignCompressor, StochasticQuantizer, terngrad
from distq.comm.exchange import CompressionStats, ExchangeSettings, GradientExchange
from distq.comm.feedback import ErrorFeedback, ResidualMemory
from distq.comm.hook import QuantizedCommState, prime_buckets, quantized_hook
from distq.comm.noise import Key
from distq.comm.registry import COMPRESSORS, make_compressor
from distq.comm.rotation import RotatedQuantizer
from distq.comm.wire import WireFormat
from distq.theory.exchange import COLLECTIVES

require_package_name(__name__, "distq.comm")

__all__ = [
    "COLLECTIVES",
    "COMPRESSORS",
    "CompressionStats",
    "Compressor",
    "ErrorFeedback",
    "ExchangeSettings",
    "GradientExchange",
    "Key",
    "QuantizedCommState",
    "ResidualMemory",
    "RotatedQuantizer",
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
