"""Global channel pruning on the CIFAR-style CNN: accuracy, multiply-accumulates and CPU latency of
the rewritten (smaller, dense) model against the unpruned one and against unstructured sparsity
at the same parameter count.

Training: `distq train` in this process (one worker), recipe cifar (the synthetic set made from
the seed), ternary weights (first convolution and classifier full precision), unpruned and with
--channel-sparsity ρ, where ρ is the smallest multiple of 0.01 that removes >= 50% of the
multiply-accumulates (ρ of each prunable layer's output channels; cubic ramp over the first half
of the steps, a vote every 20 steps on 256 training examples, learn-to-rank weight λ = 0.1).
`--unstructured` also trains `--sparsity κ --sparsity-scope global` (κ: the share of the
quantized tensors' weights that channel pruning removed) for its accuracy. The pruned
checkpoint is packed with distq export's rewrite, loaded back into a model resized to the file
and scored: that is the accuracy reported.

Latency: seed 0's trained models in eval mode, fp32, one thread, in one process: unpruned, the
rewritten pruned model, and the unpruned model with its smallest-|w| weights zeroed per tensor
down to the pruned model's parameter count (unstructured sparsity; dense kernels, as a packed
file unpacks to). Batches of 1 and 64 images, the models' forwards interleaved round-robin,
median of `--repeats` (batch 1) and `--repeats // 10` (batch 64) timed forwards after warm-up.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/channel_pruning.py --seeds 0 1 \\
        --epochs 6 --hidden 128 --unstructured
"""

from __future__ import annotations

import argparse
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
from distq.channels import (
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
    if kind == "channels":
        base["channel_sparsity"] = rho
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


def latencies(models: dict[str, nn.Module], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of a forward at batch 1 and 64, models interleaved round-robin."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch, runs in ((1, repeats), (64, max(5, repeats // 10))):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():
            for _ in range(3):  # warm-up
                for model in models.values():
                    model(x)
            for _ in range(runs):
                for name, model in models.items():
                    started = time.perf_counter()
                    model(x)
                    times[name].append((time.perf_counter() - started) * 1e3)
        for name in models:
            out[name][f"batch{batch}_ms"] = statistics.median(times[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256, help="the CNN's widths: hidden / 8 ...")
    parser.add_argument("--repeats", type=int, default=200, help="timed forwards at batch 1")
    parser.add_argument("--unstructured", action="store_true", help="also train unstructured")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    example = torch.zeros(1, 3, 32, 32)
    torch.manual_seed(0)
    reference = recipes.build_model("cifar", args.hidden, 3)
    rho = rho_for_half(reference, example)
    kinds = ["unpruned", "channels", *(["unstructured"] if args.unstructured else [])]
    record: dict = {
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "hidden": args.hidden,
        "epochs": args.epochs, "seeds": args.seeds, "rho": rho, "runs": {k: {} for k in kinds},
    }  # fmt: skip
    path = HERE / "channel_pruning.json"
    # unpruned and pruned for every seed first, the timing after seed 0's, unstructured last
    order = [(seed, kind) for seed in args.seeds for kind in kinds if kind != "unstructured"]
    order += [(seed, "unstructured") for seed in args.seeds if "unstructured" in kinds]
    with tempfile.TemporaryDirectory() as tmp:
        states: dict[tuple[str, int], dict] = {}
        kappa: dict[int, float] = {}
        for seed, kind in order:
            out = Path(tmp) / f"{kind}-{seed}"
            started = time.perf_counter()
            cfg = config.TrainConfig(**settings(kind, rho, kappa.get(seed, 0.0), seed, args, out))
            result = train.run(cfg)
            state = checkpoint.load(out / "checkpoint.pt")
            run = {"accuracy": result.test_accuracy, "seconds": time.perf_counter() - started}
            if kind == "channels":
                data = recipes.load("cifar", 0.2, seed)
                run["exported_accuracy"], run["file_bytes"] = exported_accuracy(
                    state, data, Path(tmp)
                )
                kappa[seed] = removed_share(state)
                run["kappa"] = round(kappa[seed], 4)
                run["kept"] = {n: int(k.sum()) for n, k in state["channels"]["keep"].items()}
            record["runs"][kind][seed] = run
            states[(kind, seed)] = state
            print(f"seed {seed} {kind}: {run}", flush=True)
            if kind == "channels" and seed == args.seeds[0]:
                record.update(timings(states, seed, args.repeats, example))
            path.write_text(json.dumps(record, indent=2) + "\n")  # what a cut run keeps
    print_table(record)


def removed_share(state: dict) -> float:
    """The share of the quantized tensors' weights that channel pruning removed."""
    pruned = rewrite(model_of(state), state["channels"]["keep"]).state_dict()
    names = state["quantized"]
    removed = sum(state["model"][n].numel() - pruned[n].numel() for n in names)
    return removed / sum(state["model"][n].numel() for n in names)


def timings(states: dict, seed: int, repeats: int, example: torch.Tensor) -> dict:
    """Latency, parameters and multiply-accumulates of seed's unpruned, pruned and unstructured
    models."""
    unpruned = model_of(states[("unpruned", seed)])
    chosen = states[("channels", seed)]
    pruned = rewrite(model_of(chosen), chosen["channels"]["keep"])
    params = sum(p.numel() for p in pruned.parameters())
    sparse, zeroed = unstructured_like(model_of(states[("unpruned", seed)]), params)
    full = count_macs(unpruned, example)
    return {
        "latency": latencies(
            {"unpruned": unpruned, "channels": pruned, "unstructured": sparse}, repeats
        ),
        "params": {
            "unpruned": sum(p.numel() for p in unpruned.parameters()),
            "channels": params,
            "unstructured": sum(p.numel() for p in sparse.parameters()) - zeroed,
        },
        "macs": {
            "unpruned": full,
            "channels": count_macs(pruned, example),
            "unstructured": full,  # dense kernels: every multiply still runs
        },
    }


def print_table(record: dict) -> None:
    """The README table of a record."""
    runs, lat, macs, params = record["runs"], record["latency"], record["macs"], record["params"]

    def acc(kind: str) -> str:
        values = [100 * r.get("exported_accuracy", r["accuracy"]) for r in runs[kind].values()]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        each = ", ".join(f"{v:.2f}" for v in values)
        return f"{statistics.mean(values):.2f}{spread} ({each})"

    print("| model | params | MACs / image | MACs | latency b=1 (ms) | b=64 (ms) | vs unpruned "
          "b=1 / b=64 | test accuracy % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = lat["unpruned"]
    for kind in ("unpruned", "channels", "unstructured"):
        name = {"unpruned": "unpruned", "channels": f"channel-pruned ρ = {record['rho']}",
                "unstructured": "unstructured, same params"}[kind]  # fmt: skip
        cell = acc(kind) if runs.get(kind) else "not trained"
        print(
            f"| {name} | {params[kind]:,} | {macs[kind] / 1e6:.2f} M | "
            f"{macs[kind] / macs['unpruned']:.1%} | {lat[kind]['batch1_ms']:.2f} | "
            f"{lat[kind]['batch64_ms']:.1f} | {lat[kind]['batch1_ms'] / base['batch1_ms']:.2f}x / "
            f"{lat[kind]['batch64_ms'] / base['batch64_ms']:.2f}x | {cell} |"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print_table(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
