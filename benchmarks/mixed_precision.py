"""Per-layer mixed precision (issue 24, item 3): uniform 3-bit weights vs widths from {2, 3, 4}
allocated by sensitivity (distq/bit_allocation.py) at an average of 3 bits, same runs otherwise
(`--uniform` and `--budgets` add other uniform widths and average budgets; `--dqmq-budgets`
adds runs whose widths DQMQ's search picks, distq/dqmq.py, for `--dqmq-steps` steps;
`--candidates` the widths an allocation may take; `--fixed` runs at given per-tensor widths from
step 0; `--keep-full-precision` with no layer quantizes every weight matrix, the char LM's
embedding and softmax layer included).

Each (seed, configuration) is one `distq train` run in this process (one thread, fp32
gradients, linear m-bit weights, by default first and last layer full precision).
"allocated, avg B" trains `--allocate-after` steps at 3 bits, then each quantized tensor takes
the width minimizing Σ_i S_i(m_i), S_i(m) = Σ v̂(ŵ_m − w)², within Σ n_i·m_i ≤ B·Σ n_i.
Configurations alternate within each seed. Sizes: the quantized tensors' code bits Σ n_i·m_i
and the bytes `export_packed` stores for them (codes and codebooks, smallest layout).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/mixed_precision.py --recipe cifar \\
        --hidden 128 --epochs 4 --seeds 0 1
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/mixed_precision.py --recipe charlm \\
        --hidden 64 --epochs 6 --seeds 0 1

The char LM runs the budget of benchmarks/ptq.py (the first 300,000 characters of the default
corpus, depth 1, bptt 50, batch 64, lr 0.02 cosine, 10% held out) and scores held-out bits per
character (BPC, lower is better) beside per-character accuracy.

Results: benchmarks/mixed_precision-<recipe>.json (every number, the widths chosen per seed),
and the table printed at the end (`--table-only` prints it from the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.weight_sharing import quantized_bytes
from distq.launch import build, config, train
from distq.launch.allocation import BIT_WIDTHS_NAME

HERE = Path(__file__).resolve().parent
CHARLM = {"depth": 1, "bptt": 50, "batch_size": 64, "lr": 0.02, "test_fraction": 0.1}
CHARLM_CHARS = 300_000
QUIET = {"progress": False, "monitor": False, "metrics_port": None}
CANDIDATES = [2, 3, 4]
FIXED = "fixed widths"  # a configuration's per-tensor widths from step 0 (not a config key)


def configurations(
    uniform: list[int],
    budgets: list[float],
    dqmq_budgets: list[float],
    dqmq_steps: int,
    candidates: list[int],
    fixed: list[str] = (),
) -> dict[str, dict]:
    """Name -> config changes: uniform widths, fixed per-tensor widths ("name=bits,..."), then
    allocations from `candidates` by sensitivity and by DQMQ's search at each average budget."""
    runs = {f"uniform {m}-bit": {"bits": m} for m in uniform}
    for widths in fixed:
        bits = {name: int(b) for name, b in (item.split("=") for item in widths.split(","))}
        runs["fixed " + ", ".join(f"{n.split('.')[-2]} {b}" for n, b in bits.items())] = {
            FIXED: bits
        }
    for budget in budgets:
        allocated = {"weight_bits_budget": budget, "bit_candidates": candidates}
        runs[f"allocated, avg {budget:g}"] = allocated
    for budget in dqmq_budgets:
        searched = {"weight_bits_budget": budget, "bit_candidates": candidates}
        searched.update(bit_allocation="dqmq", dqmq_steps=dqmq_steps)
        runs[f"DQMQ, avg {budget:g}"] = searched
    return runs


@contextlib.contextmanager
def fixed_widths(bits: dict[str, int] | None):
    """`distq train` has no option for per-tensor widths from the start: bind them to the
    QuantizedOptimizer that `distq.launch.build` makes (`bits_by_name`) while a run lasts."""
    original = build.QuantizedOptimizer
    if bits:
        build.QuantizedOptimizer = functools.partial(original, bits_by_name=bits)
    try:
        yield
    finally:
        build.QuantizedOptimizer = original


def one_run(out: Path, seed: int, args: argparse.Namespace, changes: dict) -> dict:
    """Scores, widths and sizes of one `distq train` run."""
    extra = {**CHARLM, "data_dir": str(args.corpus)} if args.recipe == "charlm" else {}
    changes = dict(changes)
    bits = changes.pop(FIXED, None)
    cfg = config.TrainConfig(
        recipe=args.recipe, hidden=args.hidden, scheme="linear", grad_bits=None, seed=seed,
        epochs=args.epochs, out_dir=str(out), allocate_after=args.allocate_after,
        keep_full_precision=args.keep_full_precision, **QUIET, **extra, **{"bits": 3, **changes},
    )  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), fixed_widths(bits):  # its per-epoch lines
        result = train.run(cfg)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    widths = {n: s["bits"] for n, s in state["quantized"].items()}
    numel = {n: state["model"][n].numel() for n in widths}
    fp32, packed = quantized_bytes(out / "checkpoint.pt", out / "q.safetensors")
    record = (out / BIT_WIDTHS_NAME).is_file() and json.loads((out / BIT_WIDTHS_NAME).read_text())
    return {
        "accuracy": result.test_accuracy,
        **({"bpc": result.metrics["test_bpc"]} if "test_bpc" in result.metrics else {}),
        "bits": widths,
        "numel": numel,
        "code_bits": sum(numel[n] * b for n, b in widths.items()),
        "quantized_fp32_bytes": fp32,
        "quantized_packed_bytes": packed,
        "seconds": time.perf_counter() - started,
        **({"allocation": record} if record else {}),
    }


def cells(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    per_seed = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} ({per_seed})"


def table(results: dict) -> str:
    """The markdown table of a results JSON."""
    charlm = results["recipe"] == "charlm"
    task = (
        f"Char LM (LSTM hidden {results['hidden']}, depth 1, {CHARLM_CHARS:,} characters)"
        if charlm
        else f"CIFAR-style synthetic set, VGG-style CNN (hidden {results['hidden']})"
    )
    candidates = ", ".join(map(str, results.get("candidates", CANDIDATES)))
    kept = results.get("keep_full_precision", ["first", "last"])
    task += f", full precision: {', '.join(kept)}" if kept else ", every weight matrix quantized"
    lines = [
        f"{task}, one process, {results['epochs']} epochs, linear weights, widths from "
        f"{{{candidates}}} allocated after {results['allocate_after']} steps at 3 bits, seeds "
        f"{results['seeds']}, commit {results['commit']}",
        "",
        "| weights | test accuracy % mean ± sd (per seed) |"
        + (" held-out BPC mean ± sd (per seed) |" if charlm else "")
        + " widths per quantized tensor (per seed) | bits per weight | quantized tensors"
        " packed B |",
        "|---|---|" + ("---|" if charlm else "") + "---|---|---|",
    ]
    for name, runs in results["runs"].items():
        acc = cells([100 * r["accuracy"] for r in runs], 2)
        bpc = f" {cells([r['bpc'] for r in runs], 4)} |" if charlm else ""
        widths = " / ".join(",".join(str(b) for b in r["bits"].values()) for r in runs)
        average = ", ".join(f"{r['code_bits'] / sum(r['numel'].values()):.3f}" for r in runs)
        packed = ", ".join(str(r["quantized_packed_bytes"]) for r in runs)
        lines.append(f"| {name} | {acc} |{bpc} {widths} | {average} | {packed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cifar", choices=("cifar", "charlm"))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--allocate-after", type=int, default=50, help="steps at 3 bits first")
    parser.add_argument("--uniform", type=int, nargs="*", default=[3], help="uniform widths")
    parser.add_argument("--budgets", type=float, nargs="*", default=[3.0], help="average bits")
    parser.add_argument(
        "--dqmq-budgets", type=float, nargs="+", default=[], help="average bits, DQMQ's search"
    )
    parser.add_argument("--dqmq-steps", type=int, default=1000, help="steps of DQMQ's search")
    parser.add_argument(
        "--candidates", type=int, nargs="+", default=CANDIDATES, help="widths a tensor may take"
    )
    parser.add_argument(
        "--fixed", nargs="*", default=[], metavar="NAME=BITS,...",
        help="runs with these per-tensor widths from step 0 (the rest at 3 bits)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-full-precision", nargs="*", default=["first", "last"], metavar="LAYER",
        help="layers left full precision (none given: every weight matrix is quantized)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="results file (mixed_precision-<recipe>.json)")
    parser.add_argument("--table-only", action="store_true", help="print the JSON's table")
    args = parser.parse_args()
    out_json = args.json or HERE / f"mixed_precision-{args.recipe}.json"
    if args.table_only:
        print(table(json.loads(out_json.read_text())))
        return
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    configs = configurations(
        args.uniform, args.budgets, args.dqmq_budgets, args.dqmq_steps, args.candidates,
        args.fixed,
    )  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.recipe == "charlm":
            from distq.launch.recipes.charlm import default_corpus

            args.corpus = work / "corpus.txt"
            args.corpus.write_text(default_corpus(CHARLM_CHARS), encoding="utf-8")
        for seed in args.seeds:
            for i, (name, changes) in enumerate(configs.items()):
                run = one_run(work / f"{i}-{seed}", seed, args, changes)
                runs[name].append(run)
                print(
                    f"seed {seed} {name:<18} {100 * run['accuracy']:6.2f}% "
                    f"{run.get('bpc', '')} widths {list(run['bits'].values())} "
                    f"({run['seconds']:.0f} s)",
                    file=sys.stderr,
                )
    settings = ("recipe", "hidden", "epochs", "seeds", "allocate_after", "uniform", "budgets")
    settings += ("dqmq_budgets", "dqmq_steps", "candidates", "fixed", "keep_full_precision")
    results = {"commit": commit, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    results.update({key: getattr(args, key) for key in settings}, runs=runs)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
