"""Post-training quantization (`distq quantize`, distq.ptq) on digits: test accuracy after
layer-wise PTQ with 1%, 10% and 100% of the training set as calibration data, after naive
rounding (d = 1, no data), and after full quantized training from scratch, for binary, ternary
and 2-/4-bit linear weights, with the hidden layers quantized (the default: first and last
layer full precision) and with every layer quantized; then the fine-tuning steps from each PTQ
start to come within 1 point of full quantized training.

Per seed and setting: one full-precision run (`distq train --scheme none`, fp32 gradients, one
process, one thread) and one quantized run per scheme with the same settings and epochs; each
PTQ is `quantize_checkpoint` on the full-precision checkpoint (the `distq quantize` path).
Fine-tuning resumes a PTQ checkpoint into the same QuantizedOptimizer `distq train --resume`
builds (Adam, constant lr --ft-lr, batch 32) and scores the test set (359 digits) every
--ft-every steps, up to --ft-steps steps; "steps" is the first scored step at or above (full
quantized training − 1 point), "—" if none.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ptq.py --seeds 0 1 2 3 4 --epochs 15
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/ptq.py --recipe cifar --hidden 32 \
        --epochs 8 --seeds 0 1 --schemes ternary linear4 --settings hidden --ft-steps 150
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ptq.py --recipe charlm --hidden 64 \
        --epochs 6 --seeds 0 1 --schemes binary ternary linear4 --settings hidden \
        --ft-steps 150 --ft-every 15 --ft-lr 0.01

The char LM (`--recipe charlm`) runs the LSTM budget of lstm_normalization.py (the first
300,000 characters of the default corpus, depth 1, bptt 50, batch 64, lr 0.02 cosine, 10% held
out, no LSTM norm), scores held-out bits per character (BPC) beside per-character accuracy,
and fine-tunes its PTQ starts to within --ft-bpc of quantized training's held-out BPC (lower is
better), scoring BPC every --ft-every steps.

Results: benchmarks/ptq.json (digits; ptq-<recipe>.json for the others: every number) and
the table printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from distq.launch import checkpoint, config, recipes, train
from distq.launch.build import build_optimizer
from distq.launch.data import ShardedBatches
from distq.launch.quantize import quantize_checkpoint

SCHEMES = {"binary": ("binary", None), "ternary": ("ternary", None), "linear2": ("linear", 2),
           "linear4": ("linear", 4)}  # fmt: skip
SETTINGS = {
    "hidden": ["first", "last"],
    "all": [],
}  # which layers are quantized: keep_full_precision
FRACTIONS = (0.01, 0.1, 1.0)
STARTS = ("naive", 0.01, 1.0)  # the PTQ starts that are fine-tuned
QUIET = {"progress": False, "monitor": False, "metrics_port": None, "checkpoint_every": None}
HERE = Path(__file__).resolve().parent
CHARLM_CHARS = 300_000
CHARLM = {"depth": 1, "bptt": 50, "batch_size": 64, "lr": 0.02, "test_fraction": 0.1}


def results_path(recipe: str) -> Path:
    return HERE / ("ptq.json" if recipe == "digits" else f"ptq-{recipe}.json")


def name(scheme: str, bits: int | None) -> str:
    return scheme if bits is None else f"{scheme} {bits}-bit"


def trained(
    out: Path, seed: int, args: argparse.Namespace, scheme: str, bits: int | None, keep: list[str]
) -> dict:
    """Test accuracy (and the char LM's BPC) of a `distq train` run (one process, fp32
    gradients)."""
    extra = {**CHARLM, "data_dir": str(args.corpus)} if args.recipe == "charlm" else {}
    cfg = config.TrainConfig(
        recipe=args.recipe, hidden=args.hidden, scheme=scheme, bits=bits, grad_bits=None,
        seed=seed, epochs=args.epochs, out_dir=str(out), keep_full_precision=keep, **QUIET,
        **extra,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch lines
        result = train.run(cfg)
    return {"accuracy": result.test_accuracy, **_bpc(result.metrics)}


def _bpc(metrics: dict) -> dict:
    return {"bpc": metrics["test_bpc"]} if "test_bpc" in metrics else {}


def scores_of(ckpt: Path) -> dict:
    """The char LM's held-out BPC of the model in a checkpoint ({} for the other recipes)."""
    state = checkpoint.load(ckpt)
    run = config.from_mapping(state["config"]).run
    data = recipes.load(run.recipe, run.test_fraction, run.seed, run.data_dir, run.bptt)
    model = recipes.build_model(
        run.recipe, run.hidden, run.depth, classes=data.classes, lstm_norm=run.lstm_norm,
        bptt=run.bptt,
    )  # fmt: skip
    model.load_state_dict(state["model"])
    return _bpc(recipes.extra_metrics(run.recipe, model, data.test_x, data.test_y))


def fine_tune(ckpt: Path, target: float, steps: int, every: int, lr: float) -> dict:
    """Resume `ckpt` as `distq train --resume` would and train it `steps` steps at a constant
    `lr`, scoring the test set every `every` steps; the first step that reaches `target` (test
    accuracy >= target; the char LM: held-out BPC <= target)."""
    state = checkpoint.load(ckpt)
    cfg = config.from_mapping(state["config"])
    run = cfg.run
    data = recipes.load(run.recipe, run.test_fraction, run.seed, run.data_dir, run.bptt)
    torch.manual_seed(run.seed)
    model = recipes.build_model(
        run.recipe, run.hidden, run.depth, classes=data.classes, lstm_norm=run.lstm_norm,
        bptt=run.bptt,
    )  # fmt: skip
    batches = ShardedBatches(len(data.train_y), run.batch_size, 0, 1, run.seed)
    optimizer = build_optimizer(cfg, model, run.epochs * batches.steps_per_epoch)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    if run.recipe == "charlm":
        sign = -1.0  # lower BPC is better: compare -BPC against -target

        def score() -> float:
            return recipes.extra_metrics(run.recipe, model, data.test_x, data.test_y)["test_bpc"]
    else:
        sign = 1.0

        def score() -> float:
            return recipes.accuracy(model, data.test_x, data.test_y)

    def reached(value: float) -> bool:
        return sign * value >= sign * target

    curve = [(0, score())]
    step, epoch = 0, 0
    while step < steps and not reached(curve[-1][1]):
        for idx in batches.epoch(epoch):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            optimizer.step()
            step += 1
            if step % every == 0:
                curve.append((step, score()))
                if reached(curve[-1][1]) or step >= steps:
                    break
        epoch += 1
    first = next((s for s, value in curve if reached(value)), None)
    return {"steps_to_target": first, "curve": curve}


def one_seed(work: Path, seed: int, args: argparse.Namespace) -> dict:
    """Every configuration at one seed: full precision, then per setting and scheme the
    quantized training, the PTQ starts and their fine-tuning."""
    started = time.perf_counter()
    record: dict = {"seed": seed}
    for setting in args.settings:
        keep = SETTINGS[setting]
        fp_dir = work / f"fp-{setting}-{seed}"
        fp = trained(fp_dir, seed, args, "none", None, keep)
        record[setting] = {"fp32": fp["accuracy"], **_prefixed("fp32", fp)}
        say(f"seed {seed} {setting}: full precision {fp}", started)
        for scheme, bits in (SCHEMES[s] for s in args.schemes):
            key = name(scheme, bits)
            tag = f"{setting}-{key}-{seed}".replace(" ", "")
            scores = trained(work / f"qat-{tag}", seed, args, scheme, bits, keep)
            qat = scores["accuracy"]
            row: dict = {"trained": qat, **_prefixed("trained", scores), "ptq": {}, "fine_tune": {}}
            for start in ("naive", *FRACTIONS):
                method = "naive" if start == "naive" else "layerwise"
                fraction = 1.0 if start == "naive" else start
                result = quantize_checkpoint(
                    fp_dir / "checkpoint.pt", scheme, bits, fraction, work / f"ptq-{tag}-{start}",
                    method=method,
                )  # fmt: skip
                row["ptq"][str(start)] = {
                    "accuracy": result.accuracy,
                    **(scores_of(result.checkpoint) if args.recipe == "charlm" else {}),
                    "calibration_examples": 0 if method == "naive" else result.calibration_examples,
                    "layers": [_finite(vars(layer)) for layer in result.ptq.layers],
                }
                if start in STARTS:
                    target = scores["bpc"] + args.ft_bpc if args.recipe == "charlm" else qat - 0.01
                    row["fine_tune"][str(start)] = fine_tune(
                        result.checkpoint, target, args.ft_steps, args.ft_every, args.ft_lr
                    )
            record[setting][key] = row
            ptq = ", ".join(
                f"{k} {v['accuracy']:.2%} {v.get('bpc', '')}" for k, v in row["ptq"].items()
            )
            say(f"seed {seed} {setting} {key}: trained {scores}; PTQ {ptq}", started)
    return record


def _prefixed(prefix: str, scores: dict) -> dict:
    """The scores besides accuracy (the char LM's "bpc") as "<prefix>_bpc"."""
    return {f"{prefix}_{k}": v for k, v in scores.items() if k != "accuracy"}


def _finite(record: dict) -> dict:
    """NaN (no inputs seen) as null, so the JSON is strict."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def say(text: str, started: float) -> None:
    print(f"{text}  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def cell(values: list[float]) -> str:
    """mean ± sd (per seed), in percent."""
    pct = [100 * v for v in values]
    sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {sd:.2f} ({', '.join(f'{v:.2f}' for v in pct)})"


def steps_cell(values: list[int | None]) -> str:
    return ", ".join("—" if v is None else str(v) for v in values)


def bpc_cell(values: list[float]) -> str:
    """mean ± sd (per seed) of BPC."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f} ({', '.join(f'{v:.4f}' for v in values)})"


def charlm_table(results: dict) -> str:
    """The char LM's table: held-out BPC (lower is better) and the fine-tuning steps from each
    PTQ start to quantized training's BPC + --ft-bpc (where the results hold them)."""
    runs = results["runs"]
    keys = [name(*SCHEMES[s]) for s in results["schemes"]]
    tuned = all(r["hidden"][key]["fine_tune"] for r in runs for key in keys)
    margin = results["fine_tune"].get("bpc")
    lines = [
        f"Char LM (LSTM hidden {results['hidden']}, depth 1, {CHARLM_CHARS:,} characters), one "
        f"process, {results['epochs']} epochs, seeds {results['seeds']}, commit "
        f"{results['commit']}; held-out bits per character, mean ± sd (per seed). Full "
        f"precision: {bpc_cell([r['hidden']['fp32_bpc'] for r in runs])}",
        "",
        "| weights | naive rounding | PTQ 1% | PTQ 10% | PTQ 100% | quantized training |"
        + (f" fine-tune steps to trained + {margin} BPC: naive / 1% / 100% |" if tuned else ""),
        "|---|---|---|---|---|---|" + ("---|" if tuned else ""),
    ]
    for key in keys:
        rows = [r["hidden"][key] for r in runs]
        ptq = [bpc_cell([row["ptq"][str(k)]["bpc"] for row in rows]) for k in ("naive", *FRACTIONS)]
        trained_cell = bpc_cell([row["trained_bpc"] for row in rows])
        steps = " / ".join(
            steps_cell([row["fine_tune"][str(k)]["steps_to_target"] for row in rows])
            for k in STARTS
            if tuned
        )
        lines.append(
            f"| {key} | {' | '.join(ptq)} | {trained_cell} |" + (f" {steps} |" if tuned else "")
        )
    return "\n".join(lines)


def table(results: dict) -> str:
    if results.get("recipe") == "charlm":
        return charlm_table(results)
    runs = results["runs"]
    settings = results.get("settings", list(SETTINGS))
    h = results.get("hidden", 256)
    task = (
        f"Digits, MLP 64-{h}-{h}-{h}-10"
        if results.get("recipe", "digits") == "digits"
        else f"CIFAR-style synthetic set, VGG-style CNN (hidden {h})"
    )
    lines = [
        f"{task}, one process, {results['epochs']} epochs, seeds {results['seeds']}, commit "
        f"{results['commit']}; test accuracy % mean ± sd (per seed). "
        f"Full precision: {cell([r[settings[0]]['fp32'] for r in runs])}",
        "",
        "| quantized | weights | naive rounding | PTQ 1% | PTQ 10% | PTQ 100% "
        "| quantized training | fine-tune steps to trained − 1 pt: naive / 1% / 100% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        for scheme, bits in (SCHEMES[s] for s in results.get("schemes", SCHEMES)):
            rows = [r[setting][name(scheme, bits)] for r in runs]
            starts = ("naive", *FRACTIONS)
            ptq = [cell([row["ptq"][str(k)]["accuracy"] for row in rows]) for k in starts]
            steps = " / ".join(
                steps_cell([row["fine_tune"][str(k)]["steps_to_target"] for row in rows])
                for k in STARTS
            )
            trained_cell = cell([row["trained"] for row in rows])
            lines.append(
                f"| {setting} layers | {name(scheme, bits)} | {' | '.join(ptq)} "
                f"| {trained_cell} | {steps} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--recipe", default="digits", choices=("digits", "cifar", "charlm"))
    parser.add_argument("--hidden", type=int, default=256, help="the recipe's width")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--ft-steps", type=int, default=440, help="fine-tuning steps at most")
    parser.add_argument("--ft-every", type=int, default=11, help="steps between test scores")
    parser.add_argument("--ft-lr", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument(
        "--ft-bpc", type=float, default=0.05, help="char LM: fine-tune to trained BPC + this"
    )
    parser.add_argument("--table-only", action="store_true", help="print the table of ptq.json")
    parser.add_argument("--out", type=Path, help="the results JSON (default: ptq[-<recipe>].json)")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads((args.out or results_path(args.recipe)).read_text())))
        return
    torch.set_num_threads(1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe == "charlm":
            from distq.launch.recipes.charlm import default_corpus

            args.corpus = Path(tmp) / "corpus.txt"
            args.corpus.write_text(default_corpus(CHARLM_CHARS), encoding="utf-8")
        runs = [one_seed(Path(tmp), seed, args) for seed in args.seeds]
    results = {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "recipe": args.recipe,
        "hidden": args.hidden,
        "schemes": args.schemes,
        "settings": args.settings,
        "fine_tune": {"steps": args.ft_steps, "every": args.ft_every, "lr": args.ft_lr}
        | ({"bpc": args.ft_bpc} if args.recipe == "charlm" else {}),
        "runs": runs,
    }
    (args.out or results_path(args.recipe)).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
