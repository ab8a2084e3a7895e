"""Quantized LSTMs need normalization: bits per character of a 1-layer character LSTM at the
same budget for full precision, BinaryConnect and TernaryConnect (the unscaled binary and ternary
weights of the paper's BC and TC rows), each without and with weight / layer / batch-shared
normalization, over several seeds; the packed model size of each, and ‖∂ℓ/∂h_t‖ across time
steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lstm_normalization.py [--seeds 0 1]

The corpus is the first `--corpus-chars` characters of the recipe's default corpus (the
standard library's sources), written to the run root and read as `data_dir`: a slice small
enough that a 64-unit LSTM gets 48 passes over it in about five minutes per run on one core. The
question the table answers is whether quantized weights with a normalization reach
full precision *with the same normalization*, so full precision is trained with every
normalization too; the budget is only meaningful if full precision is near convergence, which
the script checks by printing the gap between full precision without and with layer norm. The
plot's ‖W_h‖₂ is the monitor's power iteration; benchmarks/README.md says where it reads 0.

Each configuration and seed trains in its own process (`distq.launch.train.run`, one worker, 1
thread), `--jobs` at a time, and writes one JSON per run as it finishes, under
benchmarks/lstm_normalization_runs/e<epochs>/ (`--epochs`; -constant with `--lr-schedule
constant`, -c<k>k with another `--corpus-chars`); a rerun skips the runs that have a result
(delete a JSON to redo it). Then the script prints the markdown table and writes
lstm_normalization.png (gradient norms across time steps at the end of training, and the first
step's over training, seed 0) from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "lstm_normalization_runs"  # one folder per budget: e12/, e48/
PLOT = HERE / "lstm_normalization.png"

SCHEMES = {  # weight scheme -> short name
    "none": "fp32",
    "binaryconnect": "bc",
    "ternaryconnect": "tc",
}
NORMS = ("none", "weight", "layer", "batch-shared")
CORPUS_CHARS = 300_000
# The same budget for every configuration (see benchmarks/README.md for why these sizes).
BUDGET = {
    "recipe": "charlm",
    "hidden": 64,
    "depth": 1,
    "bptt": 50,
    "batch_size": 64,
    "epochs": 96,  # fp32 and fp32 + layer norm within 0.05 BPC on both seeds (12: 0.15-0.18)
    "lr": 0.02,
    "lr_schedule": "cosine",  # down to 0 at the last step
    "test_fraction": 0.1,
    "keep_full_precision": ["first", "last"],  # embedding and softmax layer
    "grad_bits": None,  # one worker: no gradient exchange
    "monitor_every": 10,
    "checkpoint_every": None,
    "metrics_port": None,
    "progress": False,
}


def results_dir(corpus_chars: int) -> Path:
    """Where a budget's JSONs live: e<epochs>/, with -constant for a constant LR and -c<k>k for
    another corpus length than CORPUS_CHARS."""
    name = f"e{BUDGET['epochs']}"
    if BUDGET["lr_schedule"] != "cosine":
        name += f"-{BUDGET['lr_schedule']}"
    if corpus_chars != CORPUS_CHARS:
        name += f"-c{corpus_chars // 1000}k"
    return RUNS / name


def run_name(scheme: str, norm: str, seed: int) -> str:
    """The result file's stem, e.g. bc-layer-s1."""
    return f"{SCHEMES[scheme]}-{norm}-s{seed}"


def parse_name(name: str) -> tuple[str, str, int]:
    """(scheme, norm, seed) of a run name."""
    short, rest = name.split("-", 1)
    norm, seed = rest.rsplit("-s", 1)
    scheme = next(s for s, n in SCHEMES.items() if n == short)
    return scheme, norm, int(seed)


def corpus_file(run_root: Path, chars: int) -> Path:
    """The corpus slice every run reads: the default corpus' first `chars` characters."""
    from distq.launch.recipes.charlm import default_corpus

    path = run_root / f"corpus-{chars}.txt"
    if not path.exists():
        run_root.mkdir(parents=True, exist_ok=True)
        path.write_text(default_corpus(chars), encoding="utf-8")
    return path


def run_one(name: str, run_root: Path, corpus_chars: int) -> dict:
    """Train run `name` (scheme, norm, seed) in this process and return its result record."""
    import torch

    torch.set_num_threads(1)
    from distq.launch import checkpoint, config, train
    from distq.monitor.report import read_log

    scheme, norm, seed = parse_name(name)
    out = run_root / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh run directory: never resume an old one
    corpus = corpus_file(run_root, corpus_chars)
    cfg = config.TrainConfig(
        **BUDGET, data_dir=str(corpus), seed=seed, scheme=scheme, lstm_norm=norm, out_dir=str(out)
    )
    started = time.perf_counter()
    result = train.run(cfg)
    state = checkpoint.load(out / "checkpoint.pt")
    records = read_log(out)
    recurrent = [
        {"step": r["step"], **r["recurrent"]["lstm.layers.0"]} for r in records if "recurrent" in r
    ]
    return {
        "name": name,
        "scheme": scheme,
        "norm": norm,
        "seed": seed,
        "test_bpc": result.metrics["test_bpc"],
        "test_accuracy": result.test_accuracy,
        "final_train_loss_nats": result.final_loss,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - started,
        **export_sizes(out),
        "skipped_steps": state["optimizer"].get("skipped_steps", 0) if scheme != "none" else 0,
        "recurrent": recurrent,
        "budget": {**BUDGET, "corpus_chars": corpus_chars},
        "commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
    }


def export_sizes(out: Path) -> dict[str, int]:
    """Pack the run's final checkpoint (`distq export`'s code path); the file's size on disk and
    the LSTM matrices' packed bytes (codes + codebooks) against their fp32 bytes."""
    from distq.export import QuantSpec, export_packed
    from distq.launch import checkpoint

    state = checkpoint.load(out / "checkpoint.pt")
    specs = {n: QuantSpec(**s) for n, s in state["quantized"].items()}
    report = export_packed(state["model"], specs, out / "model.safetensors")
    lstm = [t for t in report.tensors if t.name.endswith(("ih.weight", "hh.weight"))]
    return {
        "packed_file_bytes": report.file_bytes,
        "fp32_tensor_bytes": report.total_fp32_bytes,
        "lstm_packed_bytes": sum(t.packed_bytes for t in lstm),
        "lstm_fp32_bytes": sum(t.fp32_bytes for t in lstm),
    }


def run_missing(names: list[str], run_root: Path, corpus_chars: int, jobs: int) -> None:
    """Train every run without a result JSON, `jobs` processes (1 thread each) at a time."""
    results_dir(corpus_chars).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[str, subprocess.Popen]] = []
    for name in names:
        if (results_dir(corpus_chars) / f"{name}.json").exists():
            continue
        while len(running) >= jobs:
            running = _reap(running)
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--run-root",
            str(run_root),
            "--corpus-chars",
            str(corpus_chars),
            "--epochs",
            str(BUDGET["epochs"]),
            "--lr-schedule",
            BUDGET["lr_schedule"],
        ]
        run_root.mkdir(parents=True, exist_ok=True)
        with (run_root / f"{name}.log").open("w") as log:
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=log, env=env)))
        print(f"started {name}", flush=True)
    while running:
        running = _reap(running)


def _reap(running: list[tuple[str, subprocess.Popen]]) -> list[tuple[str, subprocess.Popen]]:
    """Wait a moment; report the runs that finished and return those still running."""
    time.sleep(1)
    still = []
    for name, process in running:
        code = process.poll()
        if code is None:
            still.append((name, process))
        else:
            print(f"finished {name} (exit {code})", flush=True)
    return still


def fmt_delta(values: list[float]) -> str:
    """Mean of per-seed differences, with their range when there is more than one seed."""
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:+.3f}"
    return f"{mean:+.3f} ({min(values):+.3f}..{max(values):+.3f})"


def table(results: list[dict]) -> str:
    """The markdown BPC / size table: means over seeds, differences paired by seed."""
    by_key = {(r["scheme"], r["norm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    fp_file = by_key.get(("none", "none", seeds[0]), {}).get("packed_file_bytes")
    lines = [
        "| weights | normalization | test BPC, mean | per seed | Δ vs fp32, same norm | "
        "Δ vs fp32, no norm | ‖∂ℓ/∂h_1‖ at end | packed file | LSTM matrices packed | "
        "skipped steps | train time |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scheme in SCHEMES:
        for norm in NORMS:
            runs = [by_key[(scheme, norm, s)] for s in seeds if (scheme, norm, s) in by_key]
            if not runs:
                continue
            same = [
                r["test_bpc"] - by_key[("none", norm, r["seed"])]["test_bpc"]
                for r in runs
                if ("none", norm, r["seed"]) in by_key
            ]
            plain = [
                r["test_bpc"] - by_key[("none", "none", r["seed"])]["test_bpc"]
                for r in runs
                if ("none", "none", r["seed"]) in by_key
            ]
            first = runs[0]
            checks = [c["grad_norms"][0] for c in first["recurrent"] if "grad_norms" in c]
            per_seed = ", ".join(f"{r['test_bpc']:.3f}" for r in runs)
            size = first["packed_file_bytes"]
            file_ratio = f" ({fp_file / size:.1f}x)" if fp_file else ""
            lstm_ratio = first["lstm_fp32_bytes"] / max(first["lstm_packed_bytes"], 1)
            grad_first = f"{checks[-1]:.1e}" if checks else "-"
            lines.append(
                f"| {scheme} | {norm} | {statistics.mean(r['test_bpc'] for r in runs):.3f} | "
                f"{per_seed} | {fmt_delta(same) if same else '-'} | "
                f"{fmt_delta(plain) if plain else '-'} | {grad_first} | "
                f"{size / 1024:.1f} KiB{file_ratio} | "
                f"{first['lstm_packed_bytes'] / 1024:.1f} KiB ({lstm_ratio:.1f}x) | "
                f"{sum(r['skipped_steps'] for r in runs)} | "
                f"{statistics.mean(r['train_seconds'] for r in runs):.0f} s |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """The first seed's runs. Left: ‖∂ℓ/∂h_t‖ across t at the last check; middle: ‖∂ℓ/∂h_1‖
    over steps; right: the spectral norm of the (quantized) recurrent matrix over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5), dpi=110)
    styles = {"none": "-", "weight": "--", "layer": ":", "batch-shared": "-."}
    colors = {
        "none": "black",
        "binaryconnect": "tab:red",
        "ternaryconnect": "tab:green",
    }
    first_seed = min(r["seed"] for r in results)
    for r in (r for r in results if r["seed"] == first_seed):
        checks = [c for c in r["recurrent"] if "grad_norms" in c]
        if not checks:
            continue
        style = {"ls": styles[r["norm"]], "color": colors[r["scheme"]], "lw": 1.2}
        last = checks[-1]["grad_norms"]
        axes[0].plot(range(1, len(last) + 1), last, label=r["name"], **style)
        axes[1].plot([c["step"] for c in checks], [c["grad_norms"][0] for c in checks], **style)
        axes[2].plot(
            [c["step"] for c in r["recurrent"]],
            [c["spectral_norm"] for c in r["recurrent"]],
            label=r["name"],
            **style,
        )
    axes[0].set(
        title=f"‖∂ℓ/∂h_t‖ across time steps (end of training, seed {first_seed})",
        xlabel="t",
        yscale="log",
    )
    axes[1].set(title="‖∂ℓ/∂h_1‖ over training", xlabel="step", yscale="log")
    axes[2].set(title="‖W_h‖₂ (quantized recurrent matrix)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def convergence_gap(results: list[dict]) -> str:
    """Full precision with layer norm minus without, per seed: how far from converged the
    budget leaves full precision (layer norm changes the model, not its converged fit much)."""
    fp = {(r["norm"], r["seed"]): r["test_bpc"] for r in results if r["scheme"] == "none"}
    gaps = [fp[("layer", s)] - fp[("none", s)] for n, s in fp if n == "none" and ("layer", s) in fp]
    return f"fp32 + layer norm − fp32, test BPC per seed: {', '.join(f'{g:+.3f}' for g in gaps)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument(
        "--corpus-chars",
        type=int,
        default=CORPUS_CHARS,
        help="characters of the default corpus to train and test on",
    )
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    parser.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    parser.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], default=BUDGET["lr_schedule"]
    )
    parser.add_argument("--run-root", default="/tmp/distq-lstm-bench", help="run directories")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    BUDGET.update(epochs=args.epochs, lr_schedule=args.lr_schedule)
    run_root = Path(args.run_root)
    if args.one:
        record = run_one(args.one, run_root, args.corpus_chars)
        result = results_dir(args.corpus_chars) / f"{args.one}.json"
        result.write_text(json.dumps(record, indent=1) + "\n")
        return 0
    names = [
        run_name(scheme, norm, seed)
        for seed in args.seeds
        for scheme in args.schemes
        for norm in args.norms
    ]
    run_missing(names, run_root, args.corpus_chars, args.jobs)
    found = sorted(results_dir(args.corpus_chars).glob("*.json"))
    results = [json.loads(p.read_text()) for p in found]
    print(table(results))
    print(convergence_gap(results))
    plot(results, PLOT)
    print(f"plot: {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
