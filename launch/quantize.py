"""`distq quantize CHECKPOINT --scheme S --calibration-fraction F`: post-training quantization of
a full-precision `distq train` checkpoint, layer by layer on a share of its training set
(distq.ptq), written as a checkpoint that `distq train --resume` fine-tunes and `distq export`
packs.

The new checkpoint is a quantized run's first: step 0, the source's config with the new
scheme (and out_dir), a QuantizedOptimizer whose latent weights are the full-precision ones and
whose model holds the post-training Ŵ, a fresh base-optimizer state and LR schedule, and the
source's per-rank RNG and gradient-hook state; `OUT/config.yaml` holds the config to resume it
with (same world size as the source).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from distq.launch import checkpoint, config, recipes
from distq.launch.build import build_optimizer, lr_schedule
from distq.launch.cli import read_training_checkpoint
from distq.launch.data import ShardedBatches
from distq.launch.resume import FORMAT, quantized_specs
from distq.ptq import METHODS, PTQResult, quantize_model

CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_checkpoint` did: test accuracy before and after, the calibration size,
    the per-layer report and where the checkpoint went."""

    fp_accuracy: float
    accuracy: float
    calibration_examples: int
    ptq: PTQResult
    checkpoint: Path
    config: Path
    world_size: int


def quantize_checkpoint(
    source: str | Path,
    scheme: str,
    bits: int | None = None,
    calibration_fraction: float = 0.01,
    out: str | Path | None = None,
    *,
    method: str = "layerwise",
    per_channel: bool | None = None,
    refit: bool = True,
    say: Callable[[str], None] = lambda line: None,
) -> QuantizeResult:
    """Quantize the full-precision checkpoint `source` (ValueError for what it cannot take:
    a fraction outside (0, 1], an unknown scheme or bits, a file that is not a distq
    checkpoint, one already quantized, an `out` that holds checkpoints); `say` gets progress.
    `out` defaults to `<source's run dir>-<scheme>[bits]-ptq`; per_channel None keeps the
    source config's setting."""
    if not (isinstance(calibration_fraction, (int, float)) and 0 < calibration_fraction <= 1):
        raise ValueError(
            f"calibration fraction {calibration_fraction!r}; allowed: a number in (0, 1]"
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    state = read_training_checkpoint(str(source))
    cfg_source = _source_config(state, source)
    cfg = _target_config(cfg_source, scheme, bits, per_channel, source, out)
    out = Path(cfg.run.out_dir)
    store = checkpoint.CheckpointStore(out, cfg.run.keep_checkpoints)
    if store.paths() or store.latest.exists():
        raise ValueError(f"{out} holds checkpoints already; name another --out")
    run = cfg.run
    data = recipes.load(run.recipe, run.test_fraction, run.seed, run.data_dir, run.bptt)
    torch.manual_seed(run.seed)
    model = recipes.build_model(
        run.recipe, run.hidden, run.depth, classes=data.classes, lstm_norm=run.lstm_norm,
        bptt=run.bptt,
    )  # fmt: skip
    model.load_state_dict(state["model"])
    fp_accuracy = recipes.accuracy(model, data.test_x, data.test_y)
    n = len(data.train_y)
    count = max(1, math.ceil(calibration_fraction * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(run.seed))
    calibration = data.train_x[order[:count]]
    say(
        f"distq quantize: {run.recipe}, {cfg.weights.scheme}"
        f"{'' if cfg.weights.bits is None else f' {cfg.weights.bits}-bit'} weights, {method}, "
        f"{count} of {n} training examples ({count / n:.1%}) to calibrate; "
        f"full-precision test accuracy {fp_accuracy:.2%}"
    )
    world = int(state.get("world_size", 1))
    steps = run.epochs * ShardedBatches(n, run.batch_size, 0, world, run.seed).steps_per_epoch
    optimizer = build_optimizer(cfg, model, steps)  # latent w = the full-precision weights
    model.load_state_dict(state["model"])  # undo the optimizer's own first projection
    result = quantize_model(
        model,
        calibration if method == "layerwise" else None,
        cfg.weights.scheme,
        cfg.weights.bits,
        method=method,
        keep_full_precision=cfg.weights.keep_full_precision,
        per_channel=cfg.weights.per_channel,
        refit=refit,
        progress=say,
    )
    if list(result.projections) != list(optimizer.names):
        raise RuntimeError(f"quantized {list(result.projections)}, optimizer {optimizer.names}")
    optimizer.alpha = {n: p.alpha.clone() for n, p in result.projections.items()}
    accuracy = recipes.accuracy(model, data.test_x, data.test_y)
    schedule = lr_schedule(run, optimizer, steps)
    payload = {
        "format": FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "epoch": 0,
        "step_in_epoch": 0,
        "step": 0,
        "config": cfg.to_dict(),
        "world_size": world,
        "quantized": quantized_specs(optimizer),
        "ranks": [
            {"rng": r["rng"], "comm": r["comm"], "epoch_loss_sum": 0.0} for r in state["ranks"]
        ],
        "ptq": {"source": str(source), "method": method, "calibration_examples": count},
    }
    store.save(payload, 0)
    config_path = out / CONFIG_NAME
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    say(f"test accuracy after quantization: {accuracy:.2%} (full precision {fp_accuracy:.2%})")
    return QuantizeResult(fp_accuracy, accuracy, count, result, store.latest, config_path, world)


def _source_config(state: dict, source: str | Path) -> config.TrainConfig:
    """The source run's config, checked to be a full-precision distq train run."""
    if state.get("format") != FORMAT or "config" not in state or "ranks" not in state:
        raise ValueError(
            f"not a distq checkpoint: {source} (format {state.get('format')!r}, this distq "
            f"reads format {FORMAT} with a config and per-rank state)"
        )
    if state["quantized"]:
        cfg = config.flatten(state["config"])
        raise ValueError(
            f"{source} holds quantized weights (scheme {cfg.get('scheme')!r}); distq quantize "
            "takes a full-precision checkpoint (a run trained with --scheme none)"
        )
    return config.from_mapping(state["config"], str(source))


def _target_config(
    cfg: config.TrainConfig,
    scheme: str,
    bits: int | None,
    per_channel: bool | None,
    source: str | Path,
    out: str | Path | None,
) -> config.TrainConfig:
    """The source config with the new scheme, bits, per_channel and out_dir (ValueError naming
    a bad scheme or width, as `distq train` would)."""
    if scheme == config.FULL_PRECISION:
        raise ValueError(f"scheme {scheme!r} leaves the weights full precision; name a scheme")
    if out is None:
        run_dir = Path(source).resolve().parent
        if run_dir.name == checkpoint.DIRECTORY_NAME:
            run_dir = run_dir.parent
        out = run_dir.with_name(f"{run_dir.name}-{scheme}{bits or ''}-ptq")
    sections = cfg.to_dict()
    sections["weights"].update(scheme=scheme, bits=bits)
    if per_channel is not None:
        sections["weights"]["per_channel"] = per_channel
    sections["run"]["out_dir"] = str(out)
    sections["run"]["resume"] = True
    return config.TrainConfig(**sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distq quantize",
        description="Quantize a trained full-precision checkpoint layer by layer on a share of "
        "its training set (post-training quantization): each layer's weights fit its outputs on "
        "the calibration inputs, weighted by their second moment, with quantized inputs "
        "propagated. Writes a checkpoint that `distq train --resume` fine-tunes and `distq "
        "export` packs.",
    )
    parser.add_argument(
        "source", metavar="CHECKPOINT", help="checkpoint.pt of a full-precision distq train run"
    )
    parser.add_argument("--scheme", required=True, help="weight scheme (distq schemes lists them)")
    parser.add_argument("--bits", type=int, help="bits for the schemes of several widths")
    parser.add_argument(
        "--calibration-fraction", type=float, default=0.01,
        help="share of the training set to calibrate on, in (0, 1] (default 0.01): the first "
        "examples after a shuffle seeded by the run's seed",
    )  # fmt: skip
    parser.add_argument(
        "--out", help="run directory to write (default: <source run dir>-<scheme><bits>-ptq)"
    )
    parser.add_argument(
        "--method", default="layerwise", choices=METHODS,
        help="layerwise (default) or naive: the plain projection (d = 1), no data",
    )  # fmt: skip
    parser.add_argument(
        "--per-channel", action=argparse.BooleanOptionalAction, default=None,
        help="one scale per output channel (default: as the source run)",
    )  # fmt: skip
    parser.add_argument(
        "--no-refit", dest="refit", action="store_false",
        help="keep the solver's scales (skip the least-squares refit on the outputs)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        result = quantize_checkpoint(**vars(args), say=print)
    except (ValueError, checkpoint.CheckpointError) as exc:
        print(f"distq quantize: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"checkpoint: {result.checkpoint}\n"
        f"  fine-tune: distq train {result.config} --epochs N   (resumes it with "
        f"{result.world_size} process(es), as the source ran)\n"
        f"  pack it:   distq export {result.checkpoint} model.safetensors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
