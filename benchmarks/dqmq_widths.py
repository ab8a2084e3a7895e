"""The widths DQMQ's bit-width search (distq/dqmq.py) picks on the CIFAR-style CNN, and its time.

A search only, no training after it: recipe cifar (the synthetic set made from the seed), the CNN
built from the seed (`--hidden`; widths c, 2c, 4c with c = hidden / 8), the default selection
(the first convolution and the classifier stay full precision, so the five inner convolutions
are searched), candidates {2, 3, 4}, `--budget` average bits per weight. The search trains
copies of the weights from initialization with Adam (`--weight-lr`) while it learns the width
logits (`--lr`), `--steps` batches of `--batch-size` training images in a seeded shuffle
(one search per value given), cross-entropy. Time: wall clock of `distq.dqmq.search` in this
process, one thread.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/dqmq_widths.py --seeds 0 1 \\
        --hidden 128 --budget 3.0 --steps 300 1000

Results: benchmarks/dqmq_widths.json (per seed: widths, sizes, final probabilities, average and
expected bits, seconds; the settings and the commit).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distq.dqmq import search
from distq.launch import recipes

HERE = Path(__file__).resolve().parent


def one_seed(seed: int, steps: int, args: argparse.Namespace) -> dict:
    data = recipes.load("cifar", 1 / 6, seed)
    torch.manual_seed(seed)
    model = recipes.build_model("cifar", args.hidden, 3)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
    starts = range(0, len(order) - args.batch_size + 1, args.batch_size)
    batches = [
        (data.train_x[order[i : i + args.batch_size]], data.train_y[order[i : i + args.batch_size]])
        for i in starts
    ]
    result = search(
        model, batches, functional.cross_entropy, budget=args.budget, steps=steps,
        lr=args.lr, weight_lr=args.weight_lr, seed=seed,
    )
    return {
        "seed": seed,
        "steps": steps,
        "bits": result.bits,
        "sizes": result.sizes,
        "probs": {n: [round(p, 4) for p in ps] for n, ps in result.probs.items()},
        "average_bits": result.average_bits,
        "expected_bits": result.expected_bits,
        "moved_by_repair": result.changed,
        "seconds": round(result.seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-lr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=HERE / "dqmq_widths.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    runs = [one_seed(seed, steps, args) for steps in args.steps for seed in args.seeds]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results = {
        "what": "DQMQ bit-width search on the CIFAR-style CNN: widths chosen, no training after",
        "commit": commit, "settings": {**settings, "candidates": [2, 3, 4]}, "runs": runs,
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for run in runs:
        widths = ", ".join(f"{n} {b}" for n, b in run["bits"].items())
        print(
            f"{run['steps']} steps, seed {run['seed']}: {widths}; {run['average_bits']:.4f} bits, "
            f"{run['moved_by_repair']} off the argmax, {run['seconds']} s"
        )


if __name__ == "__main__":
    main()
