"""Batch-norm recalibration (`--bn-recalibration N`, distq/batchnorm.py): test accuracy after each
epoch of the ternary CIFAR-style CNN with the running averages training leaves (N = 0) and with
statistics recomputed over N training examples with the epoch's final weights.

Each seed trains once per N (`distq train`, one worker, `--recipe cifar --hidden 128 --scheme
ternary`, the synthetic set); recalibration changes no training step, so the runs of a seed
share every loss and weight and differ only in their batch-norm statistics. Prints the mean test
accuracy per epoch over the seeds and each seed's final accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bn_recalibration.py --seeds 0 1 2 3 \\
        --epochs 12 --examples 0 1024 4800 --jobs 2
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EPOCH = re.compile(r"epoch +\d+/\d+ +loss ([\d.]+) +test accuracy ([\d.]+)%")


def train(seed: int, examples: int, epochs: int, root: Path) -> list[tuple[float, float]]:
    """(loss, test accuracy %) per epoch of one run."""
    command = [
        sys.executable, "-m", "distq.launch.train", "--recipe", "cifar", "--hidden", "128",
        "--scheme", "ternary", "--epochs", str(epochs), "--seed", str(seed),
        "--bn-recalibration", str(examples), "--out-dir", str(root / f"s{seed}-n{examples}"),
        "--no-progress", "--no-monitor", "--metrics-port", "none",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return [(float(loss), float(acc)) for loss, acc in EPOCH.findall(done.stdout)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--examples", type=int, nargs="+", default=[0, 1024])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        runs = {
            (seed, n): pool.submit(train, seed, n, args.epochs, Path(tmp))
            for seed in args.seeds
            for n in args.examples
        }
        curves = {key: future.result() for key, future in runs.items()}
    for seed in args.seeds:
        losses = {tuple(loss for loss, _ in curves[(seed, n)]) for n in args.examples}
        if len(losses) != 1:
            raise SystemExit(f"seed {seed}: the runs' losses differ (training changed)")
    print("| examples | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |")
    print("|---" * (args.epochs + 1) + "|")
    for n in args.examples:
        means = [
            statistics.mean(curves[(seed, n)][e][1] for seed in args.seeds)
            for e in range(args.epochs)
        ]
        print(f"| {n} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    print("\nfinal accuracy per seed " + ", ".join(map(str, args.seeds)) + ":")
    for n in args.examples:
        print(f"- {n}: " + ", ".join(f"{curves[(seed, n)][-1][1]:.2f}" for seed in args.seeds))


if __name__ == "__main__":
    main()
