"""`distq plan`: predict bytes, step time and gradient variance of a quantized exchange."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from distq.theory.plan_compressors import PLANNED
from distq.theory.planner import COLLECTIVES, parse_bandwidth, plan


def _number(text: str, ok: Callable[[float], bool], allowed: str) -> float:
    """float(text) if it is finite and ok(value), else an argparse error naming text."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: {allowed}")
    return value


def _count(text: str) -> int:
    """A positive whole number, written 6300000 or 6.3e6."""
    return int(_number(text, lambda v: v >= 1 and v == int(v), "a positive whole number"))


def _positive(text: str) -> float:
    return _number(text, lambda v: v > 0, "a number > 0")


def _nonnegative(text: str) -> float:
    return _number(text, lambda v: v >= 0, "a number ≥ 0")


def _or_none(parse: Callable[[str], object]) -> Callable[[str], object]:
    """parse, or None for the word 'none'."""

    def parse_or_none(text: str) -> object:
        return None if text.lower() == "none" else parse(text)

    parse_or_none.__name__ = parse.__name__  # argparse names the type in its errors
    return parse_or_none


def _bandwidth(text: str) -> float:
    try:
        return parse_bandwidth(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The `distq plan` argument parser; value errors name the bad value (exit 2)."""
    parser = argparse.ArgumentParser(
        prog="distq plan",
        description="Predict per-step bytes, time and gradient variance of a quantized "
        "gradient exchange against the fp32 ring all-reduce.",
    )
    _add_exchange_arguments(parser.add_argument)
    _add_time_arguments(parser.add_argument)
    parser.add_argument("--all", action="store_true", help="show all three collectives")
    return parser


def _add_exchange_arguments(add: Callable[..., object]) -> None:
    """What is exchanged, and between how many: elements, compressor, bits, scales, clip,
    collective."""
    add("--params", type=_count, required=True, help="gradient elements (6300000 or 6.3e6)")
    add(
        "--compressor",
        default="quantize",
        metavar="{" + ",".join(PLANNED) + "}",
        help="the compressor: 'quantize' (stochastic, proven blow-up bound) or a rotated one "
        "(1..4 bits, buckets a power of two in 8..65536, blow-up an estimate; default quantize)",
    )
    add(
        "--bits",
        type=int,
        default=2,
        choices=range(1, 9),
        metavar="{1..8}",
        help="gradient bits (default 2)",
    )
    add(
        "--bucket-size",
        type=_or_none(_count),
        default=512,
        help="elements per scale, or 'none' for one scale a tensor (default 512)",
    )
    add(
        "--clip",
        type=_or_none(_positive),
        default=2.5,
        help="clip at this many σ before quantizing, or 'none' (default 2.5)",
    )
    add("--world-size", type=_count, default=4, help="number of ranks (default 4)")
    add(
        "--collective",
        choices=COLLECTIVES,
        default="scatter",
        help="quantized exchange (default scatter)",
    )
    add(
        "--nodes",
        type=_count,
        default=None,
        help="nodes, for hierarchical (default: one rank per node)",
    )
    add(
        "--scale-bytes",
        type=int,
        choices=(2, 4),
        default=4,
        help="bytes per scale: 4 fp32, 2 fp16 (default 4)",
    )


def _add_time_arguments(add: Callable[..., object]) -> None:
    """What a step's time is made of: the link's bandwidth, compute, the codec."""
    add(
        "--bandwidth",
        type=_bandwidth,
        required=True,
        help="slow-link bandwidth per rank: 200mbit, 1gbit, 25MB/s, or a number of bit/s",
    )
    add(
        "--compute-ms",
        type=_nonnegative,
        default=0.0,
        help="forward + backward time per step in ms (default 0)",
    )
    add(
        "--codec-ns",
        type=_nonnegative,
        default=0.0,
        help="codec CPU time per gradient element per step in ns (clip, encode, decode; "
        "benchmarks/README.md has measured values): adds codec time and prints the bandwidth "
        "above which fp32 all-reduce is faster (default 0: not counted)",
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, print the plan's table; bad arguments exit 2 naming the value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = plan(
            args.params,
            args.bits,
            args.bucket_size,
            args.clip,
            args.world_size,
            args.collective,
            args.bandwidth,
            args.compute_ms / 1e3,
            args.scale_bytes,
            args.nodes,
            args.codec_ns,
            args.compressor,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(result.to_str(all_collectives=args.all))
    return 0
