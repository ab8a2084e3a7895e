"""Held-out bits per byte of the gpt recipe with loss-aware ternary weights (LAT exact and
approximate) against TWN, BitNet b1.58's absmean and fp32 weights, at equal steps.

Each (scheme, seed) is one `distq train --recipe gpt` run in this process (one worker, so no
gradient exchange) on the same prefix of the default corpus (the Python standard library's
sources), with the same model, batches and learning-rate schedule; schemes alternate within
each seed so machine noise spreads evenly. The first and last layers (byte embedding, output
head) stay full precision as the recipe's defaults have it; every Linear inside the blocks
carries the scheme.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/gpt_schemes.py --seeds 0 1

`--table A.json B.json` prints the table of runs written earlier with `--json` (seeds pooled
over the files; a seed found twice must have the same result, as it is deterministic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from distq.launch import config, train
from distq.launch.recipes import charlm

SCHEMES = [  # (label, scheme)
    ("fp32 weights", "none"),
    ("ternary (LAT exact)", "ternary"),
    ("ternary-approx (LATa)", "ternary-approx"),
    ("TWN", "twn"),
    ("absmean (BitNet b1.58)", "absmean"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--chars", type=int, default=600_000, help="corpus prefix length")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--bptt", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--json", type=Path, help="also write the runs here")
    parser.add_argument("--table", type=Path, nargs="+", help="only tabulate these --json files")
    args = parser.parse_args()
    if args.table:
        print_table(pooled(args.table))
        return
    results = train_all(args)
    steps = {r["steps"] for runs in results.values() for r in runs}
    print(
        f"\ngpt recipe, {args.chars} characters of the stdlib corpus, width {args.hidden}, "
        f"{args.depth} blocks, context {args.bptt}, batch {args.batch_size}, Adam lr {args.lr} "
        f"cosine, {args.epochs} epochs = {'/'.join(map(str, sorted(steps)))} steps, 1 worker, "
        f"seeds {args.seeds}\n"
    )
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs": results}, indent=1))  # fmt: skip


def train_all(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every (seed, scheme) run, schemes alternating within each seed: label → runs."""
    results: dict[str, list[dict]] = {label: [] for label, _ in SCHEMES}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.py"
        corpus.write_text(charlm.default_corpus(args.chars))
        for seed in args.seeds:
            for label, scheme in SCHEMES:
                started = time.perf_counter()
                cfg = config.TrainConfig(
                    recipe="gpt", data_dir=str(corpus), scheme=scheme, hidden=args.hidden,
                    depth=args.depth, bptt=args.bptt, batch_size=args.batch_size,
                    epochs=args.epochs, lr=args.lr, seed=seed, grad_bits=None,
                    out_dir=str(Path(tmp) / f"{scheme}-{seed}"), progress=False, monitor=False,
                    metrics_port=None,
                )  # fmt: skip
                result = train.run(cfg)
                run = {
                    "seed": seed, "scheme": scheme, "steps": result.steps,
                    "seconds": time.perf_counter() - started, **result.metrics,
                    "final_train_loss": result.final_loss,
                }  # fmt: skip
                results[label].append(run)
                print(
                    f"seed {seed} {label:<24} test bpb {run['test_bpb']:.4f}  "
                    f"({result.steps} steps, {run['seconds']:.0f} s)",
                    file=sys.stderr,
                )
    return results


def pooled(paths: list[Path]) -> dict[str, list[dict]]:
    """The runs of several --json files by label, each seed once, in seed order; a seed present
    in two files with different results is refused (the runs are deterministic)."""
    by_seed: dict[str, dict[int, dict]] = {label: {} for label, _ in SCHEMES}
    for path in paths:
        for label, runs in json.loads(path.read_text())["runs"].items():
            for run in runs:
                seen = by_seed[label].setdefault(run["seed"], run)
                if seen["test_bpb"] != run["test_bpb"]:
                    raise SystemExit(
                        f"{label}, seed {run['seed']}: test bpb {seen['test_bpb']} in one file, "
                        f"{run['test_bpb']} in {path}"
                    )
    return {label: [runs[s] for s in sorted(runs)] for label, runs in by_seed.items()}


def print_table(results: dict[str, list[dict]]) -> None:
    """Mean ± sd per scheme, the gap to fp32, and the paired difference to absmean per seed
    (mean ± sd, its standard error, and on how many seeds the scheme was lower)."""
    reference = statistics.mean(r["test_bpb"] for r in results["fp32 weights"])
    absmean = {r["seed"]: r["test_bpb"] for r in results["absmean (BitNet b1.58)"]}
    print(
        "| weights | test bpb (mean ± sd) | vs fp32 | test loss, nats/byte | − absmean, paired "
        "(mean ± sd; s.e.) | seeds below absmean | per seed (bpb) |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, _ in SCHEMES:
        bpb = [r["test_bpb"] for r in results[label]]
        nats = statistics.mean(r["test_loss"] for r in results[label])
        sd = statistics.stdev(bpb) if len(bpb) > 1 else 0.0
        gaps = [r["test_bpb"] - absmean[r["seed"]] for r in results[label] if r["seed"] in absmean]
        paired = "— | —"
        if label != "absmean (BitNet b1.58)" and len(gaps) > 1:
            gap_sd = statistics.stdev(gaps)
            paired = (
                f"{statistics.mean(gaps):+.4f} ± {gap_sd:.4f}; {gap_sd / len(gaps) ** 0.5:.4f} | "
                f"{sum(g < 0 for g in gaps)} of {len(gaps)}"
            )
        print(
            f"| {label} | {statistics.mean(bpb):.4f} ± {sd:.4f} | "
            f"{statistics.mean(bpb) - reference:+.4f} | {nats:.4f} | {paired} | "
            f"{', '.join(f'{v:.4f}' for v in bpb)} |"
        )


if __name__ == "__main__":
    main()
