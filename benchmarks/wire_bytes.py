"""Bytes on the wire, counted by the kernel: fp32 all-reduce vs distq's quantized collectives.

Builds 2 and 4 network-namespace hosts (benchmarks/cluster.py), runs one process per host, and
reads each host's eth0 tx_bytes around `--iters` calls of: torch's fp32 all_reduce, distq 2-bit
`scatter`, distq 2-bit `allgather` (512-element buckets) on a 6.3 M-element gradient. Prints
bytes each host sent per call, the ratio to fp32, and distq's own payload count beside it.
Needs root.

    .venv/bin/python benchmarks/wire_bytes.py --hosts 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cluster import DEVICE, VirtualCluster

METHODS = ("fp32 all-reduce", "distq 2-bit scatter", "distq 2-bit allgather")


def tx_bytes() -> int:
    return int(Path(f"/sys/class/net/{DEVICE}/statistics/tx_bytes").read_text())


def worker(numel: int, iters: int, out: Path) -> None:
    """One host's process: time each method's traffic with the kernel's counter."""
    import torch
    import torch.distributed as dist

    from distq.comm import Key, StochasticQuantizer, quantized_sum

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    quantizer = StochasticQuantizer(2, 512)
    counted = {}

    def run(method: str, step: int) -> None:
        if method == "fp32 all-reduce":
            dist.all_reduce(x.clone())
            return
        collective = method.rsplit(" ", 1)[1]
        _, traffic = quantized_sum(x, quantizer, Key(step=step, rank=rank), collective)
        counted[method] = traffic.sent

    result = {}
    for method in METHODS:
        run(method, 0)  # warm-up: connections, compilation
        dist.barrier()
        before = tx_bytes()
        for step in range(1, iters + 1):
            run(method, step)
        dist.barrier()
        result[method] = {"tx_per_call": (tx_bytes() - before) / iters,
                          "counted_payload": counted.get(method)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def measure(hosts: int, numel: int, iters: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, VirtualCluster(hosts) as cluster:
        procs = [
            cluster.popen(
                i,
                [sys.executable, __file__, "--worker", "--numel", str(numel), "--iters",
                 str(iters), "--out", tmp],
                {"RANK": str(i), "WORLD_SIZE": str(hosts), "MASTER_ADDR": cluster.address(0),
                 "MASTER_PORT": "29511", "OMP_NUM_THREADS": "1"},
            )
            for i in range(hosts)
        ]
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise RuntimeError(f"a worker failed with exit code {p.returncode}")
        return [json.loads((Path(tmp) / f"rank{i}.json").read_text()) for i in range(hosts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--numel", type=int, default=6_300_000)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.numel, args.iters, args.out)
        return
    if os.geteuid() != 0:
        sys.exit("wire_bytes.py needs root for ip netns")
    print(f"{args.numel / 1e6:.1f} M fp32 elements ({args.numel * 4 / 1e6:.1f} MB), "
          f"mean of {args.iters} calls, bytes each host sent on its link (tx_bytes)\n")
    print("| hosts | method | MB sent per host per call | fp32 ÷ this | distq payload MB | "
          "wire overhead |")
    print("|---|---|---|---|---|---|")
    for hosts in args.hosts:
        per_rank = measure(hosts, args.numel, args.iters)
        fp32 = sum(r["fp32 all-reduce"]["tx_per_call"] for r in per_rank) / hosts
        for method in METHODS:
            tx = sum(r[method]["tx_per_call"] for r in per_rank) / hosts
            payload = per_rank[0][method]["counted_payload"]
            counted = f"{payload / 1e6:.3f}" if payload else "-"
            overhead = f"{100 * (tx / payload - 1):+.2f}%" if payload else "-"
            print(f"| {hosts} | {method} | {tx / 1e6:.3f} | {fp32 / tx:.2f}x | {counted} | "
                  f"{overhead} |")


if __name__ == "__main__":
    main()
