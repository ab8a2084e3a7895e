"""`distq train` across 2 hosts on a 200 Mbit/s link: fp32 all-reduce vs distq 2-bit `scatter`.

Builds 2 network-namespace hosts (benchmarks/cluster.py) whose egress `tc tbf` shapes to
`--rate`, and runs the digits job on them with torchrun's c10d rendezvous, one process per host,
the same seed, model (`--hidden`) and number of steps for both methods, alternating methods
within each repeat in one invocation. Per run: wall time (torchrun start to exit on both
hosts), training-loop time (rank 0's summary), bytes each host sent on its link (kernel
tx_bytes, so headers, start-up and retransmissions included), test accuracy. Needs root.

    .venv/bin/python benchmarks/shaped_link.py --hidden 1024 --epochs 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cluster import VirtualCluster

HOSTS = 2
METHODS = {
    "fp32 all-reduce": ["--grad-bits", "none"],
    "distq 2-bit scatter": ["--grad-bits", "2", "--collective", "scatter"],
}
TRAFFIC = re.compile(r"gradient traffic \(rank 0\): ([0-9.]+) MB sent")


def run(cluster: VirtualCluster, flags: list[str], out: Path, port: int, timeout: float) -> dict:
    """One `distq train` job on both hosts; its times, bytes per host and summary."""
    before = [cluster.tx_bytes(i) for i in range(HOSTS)]
    started = time.monotonic()
    procs = []
    for i in range(HOSTS):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={HOSTS}",
               "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint={cluster.address(0)}:{port}", f"--rdzv_id=shaped-{port}",
               f"--local_addr={cluster.address(i)}",
               *(["--rdzv_conf=is_host=1"] if i == 0 else []),
               "-m", "distq.launch.train", *flags, "--out-dir", str(out)]
        # one thread per process: 2 processes share this machine's cores, and torchrun sets
        # OMP_NUM_THREADS=1 only for more than one process per node
        procs.append(cluster.popen(i, cmd, {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        finally:
            p.kill()
    wall = time.monotonic() - started
    for p, text in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"distq train failed ({p.returncode}):\n{text}")
    summary = json.loads((out / "summary.json").read_text())
    payload = next((m.group(1) for t in outputs if (m := TRAFFIC.search(t))), None)
    return {
        "wall": wall,
        "train": summary["seconds"],
        "steps": summary["steps"],
        "accuracy": summary["test_accuracy"],
        "sent": [cluster.tx_bytes(i) - before[i] for i in range(HOSTS)],
        "payload_mb": float(payload) if payload else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="200mbit", help="tc tbf rate of each host's egress")
    parser.add_argument("--hidden", type=int, default=1024, help="MLP width (model size)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--scheme", default="none",
                        help="weight scheme of both runs (none: full precision; the exact "
                             "'ternary' projection costs ~0.27 s/step at hidden 1024 here, "
                             "which would hide the link)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("shaped_link.py needs root for ip netns")
    common = ["--hidden", str(args.hidden), "--epochs", str(args.epochs), "--scheme",
              args.scheme, "--seed",
              str(args.seed), "--no-monitor", "--no-progress", "--metrics-port", "none"]
    results: dict[str, list[dict]] = {name: [] for name in METHODS}
    total = args.repeats * len(METHODS)
    with tempfile.TemporaryDirectory() as tmp, VirtualCluster(HOSTS, rate=args.rate) as cluster:
        for repeat in range(args.repeats):
            # alternate, and swap the order every repeat, so drift falls on both alike
            order = list(METHODS) if repeat % 2 == 0 else list(reversed(METHODS))
            for name in order:
                done = sum(len(r) for r in results.values())
                print(f"[{done + 1}/{total}] {name}, repeat {repeat + 1} ...", end=" ",
                      file=sys.stderr, flush=True)
                r = run(cluster, [*common, *METHODS[name]], Path(tmp) / f"run{done}",
                        29560 + done, args.timeout)
                results[name].append(r)
                print(f"{r['wall']:.1f} s wall, {r['train']:.1f} s training, "
                      f"{r['sent'][0] / 1e6:.1f} / {r['sent'][1] / 1e6:.1f} MB sent",
                      file=sys.stderr, flush=True)

    steps = {r["steps"] for rs in results.values() for r in rs}
    assert len(steps) == 1, f"runs differ in steps: {steps}"

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[name])

    def mb_per_host(name: str) -> float:
        return statistics.mean(sum(r["sent"]) / HOSTS for r in results[name]) / 1e6

    fp32 = "fp32 all-reduce"
    weights = "fp32" if args.scheme == "none" else args.scheme
    print(f"\nDigits MLP 64-{args.hidden}x3-10 ({weights} weights), {HOSTS} hosts x 1 process, "
          f"each host's egress shaped to {args.rate} (tc tbf), {steps.pop()} steps "
          f"({args.epochs} epochs), seed {args.seed}; mean of {args.repeats} runs each, "
          "alternating\n")
    print("| gradients | wall s | training s | MB sent per host (tx_bytes) | fp32 ÷ this (bytes) "
          "| speed-up (training) | distq payload MB (rank 0) | test accuracy % |")
    print("|---|---|---|---|---|---|---|---|")
    for name in METHODS:
        payload = results[name][0]["payload_mb"]
        print(f"| {name} | {mean(name, 'wall'):.1f} | {mean(name, 'train'):.1f} | "
              f"{mb_per_host(name):.1f} | {mb_per_host(fp32) / mb_per_host(name):.2f}x | "
              f"{mean(fp32, 'train') / mean(name, 'train'):.2f}x | "
              f"{f'{payload:.1f}' if payload is not None else '-'} | "
              f"{100 * mean(name, 'accuracy'):.2f} |")
    print("\nper run (wall s / training s / MB sent host 0, host 1):")
    for name in METHODS:
        runs = "; ".join(f"{r['wall']:.1f} / {r['train']:.1f} / {r['sent'][0] / 1e6:.1f}, "
                         f"{r['sent'][1] / 1e6:.1f}" for r in results[name])
        print(f"- {name}: {runs}")


if __name__ == "__main__":
    main()
