"""Global channel pruning on the CIFAR-style CNN: accuracy, multiply-accumulates and CPU latency of
the rewritten (smaller, dense) model against the unpruned one and against unstructured sparsity
at the same parameter count.

Training: `distq train` in this process (one worker), recipe cifar (the synthetic set made from
the seed), ternary weights (first convolution and classifier full precision). Kinds (`--kinds`):
- unpruned;
- channels: --channel-sparsity ρ, ρ the smallest multiple of 0.01 that removes >= 50% of the
  multiply-accumulates (ρ of each prunable layer's output channels; cubic ramp over the first
  `--channel-end` of the steps, a vote every 20 steps on 256 training examples, learn-to-rank
  weight λ = 0.1);
- global: the same with ChannelPruner(allocation="global", floor=`--floor`) and ρ =
  `--global-rho` of the multiply-accumulates (distq.channels' global allocation; the training
  CLI has no option for it yet, so the pruner is given to distq.launch.train with those
  arguments bound);
- widths: the same with ChannelPruner(widths=...) from `--widths` (channels each prunable layer
  keeps at the ramp's end, e.g. 8,8,24,24,48,48), ρ the largest share of a layer removed;
- unstructured: `--sparsity κ --sparsity-scope global` (κ: the share of the quantized tensors'
  weights that uniform channel pruning removed), for its accuracy.
A pruned checkpoint is packed with distq export's rewrite, loaded back into a model resized to
the file and scored: that is the accuracy reported. With `--run-root`, runs live in
DIR/<kind>-s<seed>-e<epochs> and a finished one there (summary.json) is read, not retrained, so
runs trained apart (e.g. one process per `--kinds K --seeds S`) are gathered by one more call.

Latency: the first seed's trained models in eval mode, fp32, one thread, in one process:
unpruned, the rewritten pruned models, the unpruned model with its smallest-|w| weights zeroed
per tensor down to the uniformly pruned model's parameter count (unstructured sparsity; dense
kernels, as a packed file unpacks to), and `floor`, the same network keeping 1 channel per layer
(what does not shrink with the channels: per-call overhead). Times are the thread's CPU time
(time.thread_time), not wall time, so that other processes on a shared machine do not enter
them. Batches of 1 and 64 images, the models' forwards interleaved round-robin, median of
`--repeats` (batch 1) and `--repeats // 10` (batch 64) timed forwards after warm-up, and the
ratio to unpruned as the median of the per-round ratios (paired, same round); twice:
eager PyTorch, and TorchScript (traced and frozen, which folds each batch norm into its
convolution and drops Python dispatch), every model alike. Per layer: each module of the eager
models timed alone on its own input, interleaved.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/channel_pruning.py --seeds 0 1 \\
        --epochs 6 --hidden 128 --kinds unpruned channels unstructured

Every run's test accuracy is also reported with its batch norms' running statistics recomputed
on the training set (`recalibrated_accuracy`), to tell a statistics lag from a weaker model.
`--table FILE` prints the README tables of a results file; `--conv-sweep REPEATS [BATCH]` times
one convolution over a range of widths; `--time-widths W,W,W,W,W,W ...` times untrained CNNs
(hidden 128) of those kept widths against the unpruned one.
"""

from __future__ import annotations

import argparse
import functools
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
from distq.batchnorm import recalibrate
from distq.channels import (
    ChannelPruner,
    channel_groups,
    count_macs,
    groups_from_state,
    prune_state_dict,
    resize_to,
    rewrite,
)
from distq.export import QuantSpec, export_packed, load_packed
from distq.launch import checkpoint, config, recipes, train
from distq.quant.sparse import max_nonzeros

HERE = Path(__file__).resolve().parent
# Latency is the timing thread's CPU time: on a shared machine it leaves out the time spent
# waiting for a core, and with one thread it is the time the forward computes.
clock = time.thread_time
KINDS = ("unpruned", "channels", "global", "widths", "unstructured")


def macs_at(model: nn.Module, rho: float, example: torch.Tensor) -> int:
    """Multiply-accumulates of `model` with each prunable layer keeping ⌈(1 − ρ)·C⌉ channels."""
    keep = {}
    for g in channel_groups(model):
        mask = torch.zeros(g.channels, dtype=torch.bool)
        mask[: max_nonzeros(g.channels, rho)] = True
        keep[g.producer] = mask
    return count_macs(rewrite(model, keep), example)


def rho_for_half(model: nn.Module, example: torch.Tensor) -> float:
    """The smallest ρ in steps of 0.01 that removes at least half the multiply-accumulates."""
    full = count_macs(model, example)
    return next(r / 100 for r in range(1, 100) if macs_at(model, r / 100, example) <= full / 2)


def settings(
    kind: str, rho: float, kappa: float, seed: int, args: argparse.Namespace, out: Path
) -> dict:
    base = {
        "recipe": "cifar", "hidden": args.hidden, "scheme": "ternary", "epochs": args.epochs,
        "seed": seed, "out_dir": str(out), "progress": False, "monitor": False,
        "metrics_port": None, "checkpoint_every": None, "keep_checkpoints": 1,
    }  # fmt: skip
    if kind in ("channels", "global", "widths"):
        base["channel_sparsity"] = {"global": args.global_rho, "widths": widths_rho(args)}.get(
            kind, rho
        )
        base["channel_end"] = args.channel_end
    elif kind == "unstructured":
        base.update(sparsity=kappa, sparsity_schedule="cubic", sparsity_scope="global")
    return base


def model_of(state: dict) -> nn.Module:
    torch.manual_seed(0)
    model = recipes.build_model("cifar", config.flatten(state["config"])["hidden"], 3)
    model.load_state_dict(state["model"])
    return model.eval()


def exported_accuracy(state: dict, data: recipes.Split, folder: Path) -> tuple[float, int]:
    """Pack the checkpoint as `distq export` does (the rewrite first), load the file into a
    model resized to it, and score it; returns (accuracy, file bytes)."""
    channels = state["channels"]
    tensors = prune_state_dict(state["model"], groups_from_state(channels), channels["keep"])
    specs = {name: QuantSpec(**spec) for name, spec in state["quantized"].items()}
    path = folder / "pruned.safetensors"
    export_packed(tensors, specs, path)
    loaded = load_packed(path)
    torch.manual_seed(0)
    hidden = config.flatten(state["config"])["hidden"]
    model = resize_to(recipes.build_model("cifar", hidden, 3), loaded)
    model.load_state_dict(loaded)
    return recipes.accuracy(model, data.test_x, data.test_y), path.stat().st_size


def recalibrated_accuracy(state: dict, data: recipes.Split) -> float:
    """Test accuracy with every batch norm's running statistics recomputed over the whole
    training set (distq.batchnorm.recalibrate, 250-image batches, weights fixed)."""
    model = model_of(state)
    recalibrate(model, list(data.train_x.split(250)))
    return recipes.accuracy(model, data.test_x, data.test_y)


def conv_sweep(repeats: int, batch: int = 1) -> None:
    """Median µs of one 3×3 convolution with C inputs and C outputs on `batch` images, at each
    stage's resolution of the CNN, the widths interleaved: whether time follows C² (the MACs)
    or C, and whether multiples of 8 run faster."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| resolution | C | µs | ns per MAC |\n|---|---|---|---|")
    for res, widths in ((32, range(6, 18)), (16, range(16, 34, 2)), (8, range(40, 66, 4))):
        convs = {c: nn.Conv2d(c, c, 3, padding=1, bias=False).eval() for c in widths}
        xs = {c: torch.randn(batch, c, res, res) for c in widths}
        times: dict[int, list[float]] = {c: [] for c in widths}
        with torch.no_grad():
            for run in range(repeats + 3):
                for c in widths:
                    started = clock()
                    convs[c](xs[c])
                    if run >= 3:
                        times[c].append((clock() - started) * 1e6)
        for c in widths:
            us = statistics.median(times[c])
            ns = 1e3 * us / (batch * c * c * 9 * res * res)
            print(f"| {res}×{res} | {c} | {us:.1f} | {ns:.3f} |")


def time_widths(widths: list[str], hidden: int, repeats: int) -> None:
    """Latency (eager and TorchScript) and MACs of the CNN with the given kept widths per
    prunable layer ("12,12,16,16,48,48"), untrained (time does not depend on the values)."""
    torch.manual_seed(0)
    full = recipes.build_model("cifar", hidden, 3).eval()
    groups = channel_groups(full)
    models = {"unpruned": full}
    for spec in widths:
        counts = [int(w) for w in spec.split(",")]
        if len(counts) != len(groups) or not all(
            1 <= k <= g.channels for k, g in zip(counts, groups, strict=False)
        ):
            raise SystemExit(
                f"widths {spec!r}: need {len(groups)} counts, each 1..the layer's channels "
                f"({', '.join(str(g.channels) for g in groups)})"
            )
        keep = {
            g.producer: torch.arange(g.channels) < k for g, k in zip(groups, counts, strict=True)
        }
        models[spec] = rewrite(full, keep).eval()
    example = torch.zeros(1, 3, 32, 32)
    eager, script = latencies(models, repeats), latencies(models, repeats, script=True)
    print("| widths | MACs | eager b=1 / b=64 vs unpruned | TorchScript b=1 / b=64 |")
    print("|---|---|---|---|")
    for name, model in models.items():
        share = count_macs(model, example) / count_macs(full, example)
        cells = [
            f"{t[name]['batch1_ratio']:.2f}x / {t[name]['batch64_ratio']:.2f}x"
            for t in (eager, script)
        ]
        print(f"| {name} | {share:.1%} | {cells[0]} | {cells[1]} |")


def unstructured_like(model: nn.Module, params: int) -> tuple[nn.Module, int]:
    """`model` with the smallest-|w| entries of each conv/linear weight zeroed (ŵ's own zeros
    first), one share for all, so that `params` positions remain; returns it and the count
    zeroed."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    total = sum(p.numel() for p in model.parameters())
    share = (total - params) / sum(w.numel() for w in weights)
    zeroed = 0
    with torch.no_grad():
        for w in weights:
            drop = round(share * w.numel())
            w.view(-1)[w.abs().flatten().argsort(stable=True)[:drop]] = 0
            zeroed += drop
    return model, zeroed


def latencies(
    models: dict[str, nn.Module], repeats: int, script: bool = False
) -> dict[str, dict[str, float]]:
    """Median ms of a forward at batch 1 and 64, models interleaved round-robin, and the median
    over rounds of each model's time over the unpruned model's in the same round (a paired
    ratio, robust to load that changes between rounds); `script`: each model traced and frozen
    by TorchScript first (batch norms folded into the convolutions)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if script:
        with torch.no_grad():
            example = torch.zeros(1, 3, 32, 32)
            models = {n: torch.jit.freeze(torch.jit.trace(m, example)) for n, m in models.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch, runs in ((1, repeats), (64, max(5, repeats // 10))):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():
            for _ in range(3):  # warm-up (TorchScript optimises during its first calls)
                for model in models.values():
                    model(x)
            for _ in range(runs):
                for name, model in models.items():
                    started = clock()
                    model(x)
                    times[name].append((clock() - started) * 1e3)
        for name in models:
            out[name][f"batch{batch}_ms"] = statistics.median(times[name])
            ratios = [t / base for t, base in zip(times[name], times["unpruned"], strict=True)]
            out[name][f"batch{batch}_ratio"] = statistics.median(ratios)
    return out


def layer_latencies(models: dict[str, nn.Sequential], repeats: int) -> dict[str, dict]:
    """Median ms of each module of each (flat) Sequential model run alone on the input it sees
    in the model's forward, at batch 1 and 64, modules and models interleaved round-robin."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    out: dict[str, dict] = {name: {} for name in models}
    for batch, runs in ((1, repeats), (64, max(5, repeats // 10))):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        inputs: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for name, model in models.items():
                h, inputs[name] = x, []
                for layer in model:
                    inputs[name].append(h)
                    h = layer(h)
            times = {name: [[] for _ in model] for name, model in models.items()}
            for run in range(runs + 3):  # the first 3: warm-up
                for name, model in models.items():
                    for i, layer in enumerate(model):
                        started = clock()
                        layer(inputs[name][i])
                        if run >= 3:
                            times[name][i].append((clock() - started) * 1e3)
        for name, model in models.items():
            out[name][f"batch{batch}_ms"] = [
                [f"{i} {type(layer).__name__}", statistics.median(times[name][i])]
                for i, layer in enumerate(model)
            ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256, help="the CNN's widths: hidden / 8 ...")
    parser.add_argument("--repeats", type=int, default=200, help="timed forwards at batch 1")
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=["unpruned", "channels"],
        help="which models to train (unpruned and channels are needed for the table)",
    )  # fmt: skip
    for flag, help_text in (
        ("--channel-end", "where the channel ramp ends, as a fraction of the steps"),
        ("--global-rho", "global: the share of multiply-accumulates removed"),
        ("--floor", "global: the share of each layer's channels always kept"),
    ):
        parser.add_argument(flag, type=float, default=0.5, help=help_text)
    parser.add_argument("--run-root", type=Path, help="keep runs here; finished ones are reused")
    parser.add_argument(
        "--widths", default="8,8,24,24,48,48", help="widths: channels each prunable layer keeps"
    )
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    example = torch.zeros(1, 3, 32, 32)
    torch.manual_seed(0)
    reference = recipes.build_model("cifar", args.hidden, 3)
    rho = rho_for_half(reference, example)
    kinds = [k for k in KINDS if k in args.kinds]
    record: dict = {
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "hidden": args.hidden,
        "epochs": args.epochs, "seeds": args.seeds, "rho": rho, "channel_end": args.channel_end,
        "global_rho": args.global_rho, "floor": args.floor, "widths": args.widths,
        "runs": {k: {} for k in kinds},
    }  # fmt: skip
    path = HERE / "channel_pruning.json"
    # every pruned kind after unpruned for every seed, the timing once the first seed's are in,
    # unstructured last (its κ comes from the uniform channel pruning of its seed)
    order = [(seed, kind) for seed in args.seeds for kind in kinds if kind != "unstructured"]
    order += [(seed, "unstructured") for seed in args.seeds if "unstructured" in kinds]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_root or Path(tmp)
        states: dict[tuple[str, int], dict] = {}
        kappa: dict[int, float] = {}
        for seed, kind in order:
            out = root / f"{kind}-s{seed}-e{args.epochs}"
            started = time.perf_counter()
            cfg = config.TrainConfig(**settings(kind, rho, kappa.get(seed, 0.0), seed, args, out))
            run = train_or_read(cfg, kind, args)
            run.setdefault("seconds", time.perf_counter() - started)
            state = checkpoint.load(out / "checkpoint.pt")
            data = recipes.load("cifar", 0.2, seed)
            run["recalibrated_accuracy"] = recalibrated_accuracy(state, data)
            if kind in ("channels", "global", "widths"):
                run["exported_accuracy"], run["file_bytes"] = exported_accuracy(
                    state, data, Path(tmp)
                )
                run["kept"] = {n: int(k.sum()) for n, k in state["channels"]["keep"].items()}
            if kind == "channels":
                kappa[seed] = removed_share(state)
                run["kappa"] = round(kappa[seed], 4)
            record["runs"][kind][seed] = run
            states[(kind, seed)] = state
            print(f"seed {seed} {kind}: {run}", flush=True)
            pruned = [k for k in ("channels", "global", "widths") if k in kinds]
            timed = pruned and "unpruned" in kinds  # a call training one kind times nothing
            if timed and seed == args.seeds[0] and kind == pruned[-1]:
                record.update(timings(states, seed, args.repeats, example))
            path.write_text(json.dumps(record, indent=2) + "\n")  # what a cut run keeps
    if "latency" in record:
        print_table(record)
    else:
        print("not timed: a call with unpruned and a pruned kind times and tabulates the runs")


def widths_of(args: argparse.Namespace) -> dict[str, int]:
    """--widths as producer name -> channels kept."""
    torch.manual_seed(0)
    groups = channel_groups(recipes.build_model("cifar", args.hidden, 3))
    counts = [int(w) for w in args.widths.split(",")]
    if len(counts) != len(groups):
        raise SystemExit(f"--widths {args.widths}: need {len(groups)} counts")
    return {g.producer: k for g, k in zip(groups, counts, strict=True)}


def widths_rho(args: argparse.Namespace) -> float:
    """The ramp's final ρ for --widths: the largest share of a layer's channels removed."""
    torch.manual_seed(0)
    groups = channel_groups(recipes.build_model("cifar", args.hidden, 3))
    widths = widths_of(args)
    return max(1 - widths[g.producer] / g.channels for g in groups)


def train_or_read(cfg: config.TrainConfig, kind: str, args: argparse.Namespace) -> dict:
    """Train the run of `cfg`, or read its result where a finished one is in its folder."""
    summary = Path(cfg.run.out_dir) / "summary.json"
    if args.run_root is not None and summary.is_file():
        done = json.loads(summary.read_text())
        return {"accuracy": done["test_accuracy"], "seconds": done["seconds"], "reused": True}
    pruner = train.ChannelPruner
    if kind == "global":  # no CLI option yet: the pruner is built with these arguments bound
        train.ChannelPruner = functools.partial(
            ChannelPruner, allocation="global", floor=args.floor
        )
    elif kind == "widths":
        train.ChannelPruner = functools.partial(ChannelPruner, widths=widths_of(args))
    try:
        result = train.run(cfg)
    finally:
        train.ChannelPruner = pruner
    return {"accuracy": result.test_accuracy, "seconds": result.seconds}


def removed_share(state: dict) -> float:
    """The share of the quantized tensors' weights that channel pruning removed."""
    pruned = rewrite(model_of(state), state["channels"]["keep"]).state_dict()
    names = state["quantized"]
    removed = sum(state["model"][n].numel() - pruned[n].numel() for n in names)
    return removed / sum(state["model"][n].numel() for n in names)


def timings(states: dict, seed: int, repeats: int, example: torch.Tensor) -> dict:
    """Latency (eager, TorchScript, per layer), parameters and multiply-accumulates of seed's
    unpruned, pruned, unstructured and floor (1 channel per layer) models."""
    unpruned = model_of(states[("unpruned", seed)])
    models = {"unpruned": unpruned}
    for kind in ("channels", "global", "widths"):
        if (kind, seed) in states:
            chosen = states[(kind, seed)]
            models[kind] = rewrite(model_of(chosen), chosen["channels"]["keep"])
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    macs = {k: count_macs(m, example) for k, m in models.items()}
    if "channels" in models:
        sparse, zeroed = unstructured_like(model_of(states[("unpruned", seed)]), params["channels"])
        models["unstructured"] = sparse
        params["unstructured"] = sum(p.numel() for p in sparse.parameters()) - zeroed
        macs["unstructured"] = macs["unpruned"]  # dense kernels: every multiply still runs
    one = {g.producer: torch.arange(g.channels) == 0 for g in channel_groups(unpruned)}
    models["floor"] = rewrite(unpruned, one)
    params["floor"] = sum(p.numel() for p in models["floor"].parameters())
    macs["floor"] = count_macs(models["floor"], example)
    return {
        "latency": latencies(models, repeats),
        "latency_torchscript": latencies(models, repeats, script=True),
        "layer_latency": layer_latencies(models, repeats),
        "params": params,
        "macs": macs,
    }


def print_table(record: dict) -> None:
    """The README tables of a record: one row per model, then per layer where timed."""
    runs, lat, macs, params = record["runs"], record["latency"], record["macs"], record["params"]
    script = record.get("latency_torchscript")

    def acc(kind: str, key: str = "exported_accuracy") -> str:
        values = [100 * r.get(key, r["accuracy"]) for r in runs[kind].values()]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        each = ", ".join(f"{v:.2f}" for v in values)
        return f"{statistics.mean(values):.2f}{spread} ({each})"

    def times(table: dict, kind: str) -> str:
        t, base = table[kind], table["unpruned"]
        ratio = [
            t.get(f"batch{b}_ratio", t[f"batch{b}_ms"] / base[f"batch{b}_ms"]) for b in (1, 64)
        ]
        return f"{t['batch1_ms']:.3f} | {t['batch64_ms']:.1f} | {ratio[0]:.2f}x / {ratio[1]:.2f}x"

    names = {
        "unpruned": "unpruned",
        "channels": f"channel-pruned, uniform ρ = {record['rho']}",
        "global": f"channel-pruned, global ρ = {record.get('global_rho')} of MACs, "
        f"floor {record.get('floor')}",
        "widths": f"channel-pruned, widths {record.get('widths')}",
        "unstructured": "unstructured, same params as uniform",
        "floor": "1 channel per layer (overhead floor)",
    }
    head = "| model | params | MACs / image | MACs | eager b=1 (ms) | b=64 (ms) | vs unpruned "
    head += "b=1 / b=64 |"
    head += " TorchScript b=1 (ms) | b=64 (ms) | vs unpruned b=1 / b=64 |" if script else ""
    recal = all("recalibrated_accuracy" in r for k in runs for r in runs[k].values())
    head += " test accuracy % |" + (" batch norms recalibrated % |" if recal else "")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for kind in [k for k in names if k in lat]:
        cell = acc(kind) if runs.get(kind) else ("—" if kind == "floor" else "not trained")
        row = (
            f"| {names[kind]} | {params[kind]:,} | {macs[kind] / 1e6:.2f} M | "
            f"{macs[kind] / macs['unpruned']:.1%} | {times(lat, kind)} |"
        )
        row += (f" {times(script, kind)} |" if script else "") + f" {cell} |"
        if recal:
            row += f" {acc(kind, 'recalibrated_accuracy')} |" if runs.get(kind) else " — |"
        print(row)
    layers = record.get("layer_latency")
    if layers:
        kinds = list(layers)
        print("\n| layer | " + " | ".join(f"{k} b=1 (µs)" for k in kinds) + " | "
              + " | ".join(f"{k} b=64 (ms)" for k in kinds) + " |")  # fmt: skip
        print("|---" * (1 + 2 * len(kinds)) + "|")
        rows = len(layers["unpruned"]["batch1_ms"])
        for i in range(rows):
            b1 = [f"{1e3 * layers[k]['batch1_ms'][i][1]:.1f}" for k in kinds]
            b64 = [f"{layers[k]['batch64_ms'][i][1]:.2f}" for k in kinds]
            print(f"| {layers['unpruned']['batch1_ms'][i][0]} | " + " | ".join(b1 + b64) + " |")
        sums1 = [f"{1e3 * sum(t for _, t in layers[k]['batch1_ms']):.1f}" for k in kinds]
        sums64 = [f"{sum(t for _, t in layers[k]['batch64_ms']):.2f}" for k in kinds]
        print("| sum | " + " | ".join(sums1 + sums64) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print_table(json.loads(Path(sys.argv[2]).read_text()))
    elif sys.argv[1:2] == ["--time-widths"]:
        time_widths(sys.argv[2:], 128, 1000)
    elif sys.argv[1:2] == ["--conv-sweep"]:
        conv_sweep(*(int(a) for a in sys.argv[2:4]))
    else:
        main()
