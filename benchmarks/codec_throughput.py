"""Gradient codec throughput on this machine, beside a measured memcpy of the same tensor.

Times `compress` (scales, stochastic rounding, bit packing, payload assembly) and
`decompress_into` a preallocated tensor (unpack, dequantize; the hook's path) on a 25.2 M-element
fp32 tensor (100 MB; the size of the reference numbers
in DESIGN.md §7), in three modes (`MODES`: the default, with the rotated quantizer's C kernels;
torch.compile'd alone; eager), and reports GB/s of fp32 input, the ratio to memcpy, and each
codec's time against the 2-bit stochastic codec's. Every configuration is timed interleaved
with the others, median of `--repeats`.

    .venv/bin/python benchmarks/codec_throughput.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from distq.comm import Key, SignCompressor, StochasticQuantizer
from distq.comm.rotation import RotatedQuantizer

CONFIGS = {
    "2-bit, 512-elt buckets": lambda: StochasticQuantizer(2, 512),
    "4-bit, 512-elt buckets": lambda: StochasticQuantizer(4, 512),
    "2-bit, one scale": lambda: StochasticQuantizer(2, None),
    "1-bit sign, 512": lambda: SignCompressor(512),
    "rotated 2-bit, 512": lambda: RotatedQuantizer(2, 512),
    "rotated 4-bit, 512": lambda: RotatedQuantizer(4, 512),
    "rotated-stochastic 2-bit, 512": lambda: RotatedQuantizer(2, 512, stochastic=True),
}


# mode -> (DISTQ_COMPILE, DISTQ_NATIVE): the default (torch.compile'd kernels, and the rotated
# quantizer's C kernels, comm/native.py), the torch path alone compiled, and eager torch.
MODES = {"compiled + C": ("1", "1"), "compiled": ("1", "0"), "eager": ("0", "0")}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(numel: int, repeats: int, threads: int) -> dict[str, tuple[float, float]]:
    """{config: (compress s, decompress s)} plus 'memcpy' in this process's compile mode."""
    torch.set_num_threads(threads)
    x = torch.randn(numel)
    out = torch.empty_like(x)
    codecs = {name: make() for name, make in CONFIGS.items()}
    payloads = {name: c.compress(x, Key()) for name, c in codecs.items()}  # warm-up / compile
    for name, c in codecs.items():
        c.decompress_into(payloads[name], out, key=Key())
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in codecs}
    memcpy = []
    for step in range(repeats):  # interleave configurations
        memcpy.append(median_seconds(lambda: out.copy_(x), 1))
        for name, c in codecs.items():
            enc = median_seconds(lambda c=c, s=step: c.compress(x, Key(step=s)), 1)
            dec = median_seconds(
                lambda c=c, n=name: c.decompress_into(payloads[n], out, key=Key()), 1
            )
            results[name].append((enc, dec))
    summary = {name: (statistics.median(e for e, _ in r), statistics.median(d for _, d in r))
               for name, r in results.items()}
    summary["memcpy"] = (statistics.median(memcpy), statistics.median(memcpy))
    return summary


def child(args: argparse.Namespace) -> None:
    summary = measure(args.numel, args.repeats, args.threads)
    for name, (enc, dec) in summary.items():
        print(f"{name}\t{enc}\t{dec}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25_200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    gb = args.numel * 4 / 1e9
    rows = {}
    for mode, (compile_flag, native_flag) in MODES.items():
        cmd = [sys.executable, __file__, "--child", "--numel", str(args.numel),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        env = {**os.environ, "DISTQ_COMPILE": compile_flag, "DISTQ_NATIVE": native_flag}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        for line in done.stdout.strip().splitlines():
            name, enc, dec = line.split("\t")
            rows[(mode, name)] = (float(enc), float(dec))
    memcpy = rows[("compiled", "memcpy")][0]
    print(f"{args.numel / 1e6:.1f} M fp32 elements ({gb * 1e3:.0f} MB), {args.threads} threads, "
          f"median of {args.repeats}; memcpy {memcpy * 1e3:.1f} ms = {gb / memcpy:.2f} GB/s\n")
    print("| codec | mode | compress ms | GB/s | % of memcpy | decompress ms | GB/s "
          "| % of memcpy |")
    print("|---|---|---|---|---|---|---|---|")
    for (mode, name), (enc, dec) in rows.items():
        if name == "memcpy":
            continue
        print(f"| {name} | {mode} | {enc * 1e3:.1f} | {gb / enc:.2f} | {100 * memcpy / enc:.0f}% "
              f"| {dec * 1e3:.1f} | {gb / dec:.2f} | {100 * memcpy / dec:.0f}% |")
    base = sum(rows[("compiled + C", "2-bit, 512-elt buckets")])
    print("\ncompress + decompress against 2-bit stochastic (512), default mode:")
    for name in CONFIGS:
        print(f"- {name}: {sum(rows[('compiled + C', name)]) / base:.2f}x")


if __name__ == "__main__":
    main()
