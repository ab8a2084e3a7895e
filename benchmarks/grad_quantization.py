"""Digits accuracy with ternary weights under gradient quantization, 2 workers, 3 seeds.

Options: fp32 all-reduce, 2-bit unclipped, 2-bit clipped at 2.5σ, 4-bit clipped (all `scatter`,
512-element buckets). The paper's finding to check (ICLR 2019): 2-bit clipped ≈ full precision.
Runs alternate options within each seed; each is a real torchrun job of `distq train`.

    .venv/bin/python benchmarks/grad_quantization.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import run_digits

OPTIONS = [
    ("fp32 gradients", ["--grad-bits", "none"]),
    ("2-bit, unclipped", ["--grad-bits", "2", "--clip", "none"]),
    ("2-bit, clipped 2.5σ", ["--grad-bits", "2", "--clip", "2.5"]),
    ("4-bit, clipped 2.5σ", ["--grad-bits", "4", "--clip", "2.5"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    accuracy: dict[str, list[float]] = {name: [] for name, _ in OPTIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for index, (name, flags) in enumerate(OPTIONS):  # a directory per run
                result = run_digits(["--scheme", "ternary", *flags], seed, args.epochs,
                                    Path(tmp) / f"seed{seed}-option{index}")
                accuracy[name].append(100 * result["test_accuracy"])
                print(f"seed {seed} {name:<22} {accuracy[name][-1]:.2f}%", file=sys.stderr)
    reference = statistics.mean(accuracy["fp32 gradients"])
    print(f"\nDigits, ternary weights, 2 workers, {args.epochs} epochs, seeds {args.seeds}\n")
    print("| gradients | test accuracy % (mean ± sd) | vs fp32 gradients | per seed |")
    print("|---|---|---|---|")
    for name, _ in OPTIONS:
        values = accuracy[name]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.2f} ± {sd:.2f} | "
              f"{statistics.mean(values) - reference:+.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
