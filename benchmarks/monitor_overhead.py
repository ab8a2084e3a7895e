"""Cost of the convergence monitor on the digits job: step time with it on vs off.

Runs the main job (2 workers, ternary weights, 2-bit gradients) with `--monitor` and
`--no-monitor` alternately, `--repeats` times each, and compares the median time per step
(training seconds ÷ steps from each run's summary). Target: monitoring costs ≤ 5%.

    .venv/bin/python benchmarks/monitor_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import run_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    per_step: dict[str, list[float]] = {"monitor off": [], "monitor on": []}
    flags = {"monitor off": ["--no-monitor"],
             "monitor on": ["--monitor-every", "10", "--metrics-port", "0"]}  # on by default
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in per_step:  # alternate
                summary = run_digits(flags[name], 0, args.epochs, Path(tmp) / f"{name}{repeat}")
                per_step[name].append(1e3 * summary["seconds"] / summary["steps"])
                print(f"{name}: {per_step[name][-1]:.2f} ms/step", file=sys.stderr)
    off, on = (statistics.median(per_step[n]) for n in ("monitor off", "monitor on"))
    print(f"\nDigits main job, 2 workers, {args.epochs} epochs, {args.repeats} runs each, "
          "alternating; median ms per step (whole training loop)\n")
    print("| monitor | ms/step (median) | runs |")
    print("|---|---|---|")
    for name in per_step:
        runs = ", ".join(f"{v:.2f}" for v in per_step[name])
        print(f"| {name[8:]} | {statistics.median(per_step[name]):.2f} | {runs} |")
    print(f"\noverhead: {100 * (on / off - 1):+.1f}%")


if __name__ == "__main__":
    main()
