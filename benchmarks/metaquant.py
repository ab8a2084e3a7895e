"""A learned gradient through the quantizer (`--estimator meta`, MetaQuant) against the
straight-through estimator: binary weights, SGD and Adam, and what the meta network costs.

Each (optimizer, estimator, seed) is a real `torchrun --nproc_per_node=2` run of the main job
(binary weights, first and last layer full precision, fp32 gradient all-reduce so only the weight
estimator differs, lr 0.01 with the cosine schedule; SGD is distq's, momentum 0.9, d ≡ 1, so
binary means BWN's α = mean |w| as in the paper's BWN rows), STE and meta alternating within each
seed; ms/step is the run's training time over its steps.

Each meta run's learned gain is read from its final checkpoint: ‖G‖/‖g‖ over all quantized
weights and the spread of the per-weight gains G_i/g_i, on the last step's inputs. A control
run follows each SGD meta run: the STE at that seed's learning rate times the gain, which asks
whether the meta network does more than learn a larger step.

The meta network's cost is also measured side by side in one process (1 thread, no DDP): the
recipe's model, blocks of steps with each estimator alternating on the same batch; medians.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/metaquant.py --recipe cifar \
        --seeds 0 1 --epochs 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import accuracy_cells, run_digits
from distq.launch import config, recipes
from distq.launch.build import build_optimizer
from distq.launch.checkpoint import CheckpointStore
from distq.meta import MetaGradient

HERE = Path(__file__).resolve().parent
ESTIMATORS = ("ste", "meta")


def flags(recipe: str, optimizer: str, estimator: str, lr: float) -> list[str]:
    out = ["--recipe", recipe, "--scheme", "binary", "--grad-bits", "null", "--lr", str(lr)]
    return [*out, "--optimizer", optimizer, "--estimator", estimator]


@torch.no_grad()
def learned_gain(out: Path) -> dict:
    """‖G‖/‖g‖ over all quantized weights and the per-weight gains G_i/g_i (mean, 5th and 95th
    percentile, share below 0) of a meta run's final checkpoint, on its last step's inputs."""
    meta = MetaGradient()
    meta.load_state_dict(CheckpointStore(out, keep=3).load_newest()[0]["optimizer"]["meta"])
    grads = {n: g for n, (g, _, _) in meta.previous.items()}
    proposed = meta.gradients(grads, {n: w for n, (_, w, _) in meta.previous.items()})
    flat_g = torch.cat([grads[n].reshape(-1) for n in grads])
    flat_meta = torch.cat([proposed[n].reshape(-1) for n in grads])
    gains = (flat_meta / flat_g)[flat_g != 0]
    low, high = torch.quantile(gains[:: max(1, len(gains) // 100_000)], torch.tensor([0.05, 0.95]))
    return {
        "norm_ratio": (flat_meta.norm() / flat_g.norm()).item(),
        "mean": gains.mean().item(),
        "p05": low.item(),
        "p95": high.item(),
        "negative": (gains < 0).double().mean().item(),
    }


def step_times(recipe: str, blocks: int, steps: int) -> dict:
    """Median ms per step with each estimator (Adam), over `blocks` alternating blocks of
    `steps` steps in this process."""
    torch.set_num_threads(1)
    data = recipes.load(recipe, config.Run().test_fraction, 0)
    runs = {}
    for estimator in ESTIMATORS:
        cfg = config.TrainConfig(recipe=recipe, scheme="binary", estimator=estimator)
        torch.manual_seed(0)
        model = recipes.build_model(recipe, cfg.run.hidden, cfg.run.depth, classes=data.classes)
        runs[estimator] = (model, build_optimizer(cfg, model, blocks * steps * 3))
    batch = torch.arange(cfg.run.batch_size)
    x, y = data.train_x[batch], data.train_y[batch]

    def train_step(estimator: str) -> None:
        model, optimizer = runs[estimator]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times: dict[str, list[float]] = {k: [] for k in ESTIMATORS}
    for kind in ESTIMATORS:  # warm-up
        train_step(kind)
    for _ in range(blocks):
        for kind in ESTIMATORS:
            started = time.perf_counter()
            for _ in range(steps):
                train_step(kind)
            times[kind].append(1e3 * (time.perf_counter() - started) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cifar", choices=("digits", "cifar"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    parser.add_argument("--timing-blocks", type=int, default=5)
    parser.add_argument("--timing-steps", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    git = ["git", "rev-parse", "--short", "HEAD"]
    record = {
        "recipe": args.recipe,
        "epochs": args.epochs,
        "lr": args.lr,
        "commit": subprocess.run(git, capture_output=True, text=True).stdout.strip(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "runs": [],
        "step_ms_one_process": None,
    }
    path = HERE / f"metaquant_{args.recipe}.json"
    settings = [(s, o, e) for s in args.seeds for o in args.optimizers for e in ESTIMATORS]
    with tempfile.TemporaryDirectory() as tmp:

        def train(seed: int, optimizer: str, estimator: str, lr: float) -> Path:
            out = Path(tmp) / f"{optimizer}-{estimator}-{lr}-{seed}"
            result = run_digits(
                flags(args.recipe, optimizer, estimator, lr), seed, args.epochs, out
            )
            record["runs"].append({
                "optimizer": optimizer, "estimator": estimator, "lr": lr, "seed": seed,
                "test_accuracy": 100 * result["test_accuracy"],
                **{k: result[k] for k in ("final_loss", "steps", "seconds")},
            })  # fmt: skip
            return out

        for seed, optimizer, estimator in settings:
            out = train(seed, optimizer, estimator, args.lr)
            if estimator == "meta":
                record["runs"][-1]["gain"] = gain = learned_gain(out)
            if estimator == "meta" and optimizer == "sgd":  # the STE with the learned step
                train(seed, optimizer, "ste", round(args.lr * gain["norm_ratio"], 5))
            print(record["runs"][-1], file=sys.stderr)
            path.write_text(json.dumps(record, indent=2) + "\n")  # what a cut run keeps
    record["step_ms_one_process"] = step_times(args.recipe, args.timing_blocks, args.timing_steps)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print_tables(record)


def print_tables(record: dict) -> None:
    """The Markdown table of `record` (accuracy per optimizer, estimator and learning rate; the
    meta runs' learned gain), then the timing."""
    runs = record["runs"]
    lines = [
        f"\n{record['recipe']}, binary weights, 2 workers (gloo), fp32 gradients, "
        f"{record['epochs']} epochs, seeds {sorted({r['seed'] for r in runs})}, commit "
        f"{record['commit']}, {record['date']}\n",
        "| optimizer | estimator | lr | test accuracy % (mean ± sd) | vs STE at lr "
        f"{record['lr']} | per seed | learned gain ‖G‖/‖g‖ (G_i/g_i 5-95%) | ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_setting: dict[tuple[str, str, bool], list[dict]] = {}
    for r in runs:
        key = (r["optimizer"], r["estimator"], r["lr"] != record["lr"])
        by_setting.setdefault(key, []).append(r)
    for (optimizer, estimator, scaled), mine in sorted(
        by_setting.items(), key=lambda kv: (kv[0][0] != "sgd", kv[0][2], kv[0][1] != "ste")
    ):
        ste = by_setting.get((optimizer, "ste", False), mine)
        accuracies = [r["test_accuracy"] for r in mine]
        delta = statistics.mean(accuracies) - statistics.mean(r["test_accuracy"] for r in ste)
        cells = accuracy_cells(accuracies)
        lrs = ", ".join(f"{r['lr']:g}" for r in mine) if scaled else f"{record['lr']:g}"
        gains = ", ".join(
            f"{r['gain']['norm_ratio']:.2f} ({r['gain']['p05']:.2f}-{r['gain']['p95']:.2f})"
            for r in mine
            if "gain" in r
        )
        ms = 1e3 * sum(r["seconds"] for r in mine) / sum(r["steps"] for r in mine)
        lines.append(
            f"| {optimizer} | {estimator} | {lrs} | {cells[0]} | {delta:+.2f} | {cells[1]} "
            f"| {gains or '-'} | {ms:.1f} |"
        )
    t = record["step_ms_one_process"]
    if t is not None:
        lines.append(
            f"\none process, 1 thread, batch 32, Adam: a step {t['ste']:.2f} ms with the STE, "
            f"{t['meta']:.2f} ms with the meta network ({t['meta'] / t['ste']:.2f}x)"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # reprint a committed result: --table FILE
        print_tables(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
