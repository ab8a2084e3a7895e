"""The `distq` command: train, quantize a trained model after training, export a packed
checkpoint, list the weight schemes, plot a run's monitor log, plan the communication of a
configuration."""

from __future__ import annotations

import argparse
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

from distq.launch import checkpoint, train


def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="distq export", description="Pack a training checkpoint's low-bit weights."
    )
    parser.add_argument("checkpoint", help="checkpoint.pt written by distq train")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing output (never a checkpoint)"
    )
    args = parser.parse_args(argv)
    from distq.export import QuantSpec, export_packed

    try:
        check_export_target(Path(args.checkpoint), Path(args.out), args.force)
        state = read_training_checkpoint(args.checkpoint)
    except ValueError as exc:
        print(f"distq export: error: {exc}", file=sys.stderr)
        return 2
    specs = {name: QuantSpec(**spec) for name, spec in state["quantized"].items()}
    if state.get("channels"):  # --channel-sparsity: the pruned channels leave the model
        from distq.channels import groups_from_state, prune_state_dict

        channels = state["channels"]
        state["model"] = prune_state_dict(
            state["model"], groups_from_state(channels), channels["keep"]
        )
    report = export_packed(state["model"], specs, args.out)
    print(report.to_str())
    if state.get("channels"):
        kept = sum(int(k.sum()) for k in channels["keep"].values())
        total = sum(k.numel() for k in channels["keep"].values())
        print(
            f"channel pruning: {total - kept} of {total} channels removed; the file holds the "
            "smaller model (distq.channels.resize_to(model, load_packed(file)) builds it)"
        )
    return 0


def read_training_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, checked; ValueError "not a distq checkpoint: ..." otherwise."""
    try:
        state = checkpoint.load(path)
    except (FileNotFoundError, checkpoint.CheckpointError) as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # whatever torch.load makes of a file that is not its own
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a distq checkpoint: {path} ({reason})") from None
    if not (isinstance(state, dict) and {"model", "quantized"} <= state.keys()):
        raise ValueError(f"not a distq checkpoint: {path} (no 'model' and 'quantized' entries)")
    return state


def check_export_target(source: Path, out: Path, force: bool) -> None:
    """ValueError unless `out` may be written: absent, or replaced under `force` when it is
    neither the source nor any torch checkpoint (a zip archive) or a checkpoint's digest."""
    if not out.exists():
        return
    if out.is_dir():
        raise ValueError(f"{out} is a directory; name the output file")
    digest_of = out.with_name(out.name.removesuffix(checkpoint.DIGEST_SUFFIX))
    if (
        out.resolve() == source.resolve()
        or zipfile.is_zipfile(out)
        or (out.name.endswith(checkpoint.DIGEST_SUFFIX) and digest_of.exists())
    ):
        raise ValueError(f"{out} is a checkpoint; distq export never writes over one")
    if not force:
        raise ValueError(f"{out} exists; add --force to replace it")


METHODS = (  # (name, command, what it is for): the ways of compressing built on a scheme
    (
        "post-training quantization",
        "distq quantize CHECKPOINT --scheme S --calibration-fraction 0.01",
        "a trained full-precision model and a little of its data in, quantized weights out, "
        "layer by layer (distq.ptq); fine-tune with distq train --resume",
    ),
    (
        "self-distillation",
        "distq train --scheme S --distill 0.5",
        "the latent full-precision weights teach the quantized/sparsified network during "
        "training: (1-λ)·CE + λ·T²·KL (distq.distill)",
    ),
    (
        "learned estimator",
        "distq train --scheme S --estimator meta",
        "a small meta network learns the latent weights' gradient from the quantized weights' "
        "in place of the straight-through estimator (distq.meta; MetaQuant)",
    ),
    (
        "sparsification",
        "distq train --scheme S --sparsity 0.75 --sparsity-schedule cubic",
        "a share of zeros in every quantized tensor, chosen with the same curvature "
        "(distq.quant.sparse; not with shared)",
    ),
)


def schemes_command(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="distq schemes",
        description="List the weight schemes (distq train/quantize --scheme) with their bit "
        "widths, level spacing Δ_w (the widest gap between levels, in units of α) and whether "
        "the solver warm-starts from the last step, then the methods built on them.",
    ).parse_args(argv)
    from distq.quant import SCHEMES, get_scheme

    print(f"{'scheme':<15} {'bits':>4}      {'kind':<10}  {'Δ_w':<17} {'start':<5}  summary")
    for name in SCHEMES:
        spec = get_scheme(name)
        bits = str(spec.bits[0]) if len(spec.bits) == 1 else f"{spec.bits[0]}-{spec.bits[-1]}"
        kind = "loss-aware" if spec.loss_aware else "baseline"
        start = "warm" if spec.warm_start else "cold"
        summary = spec.summary + (
            "; a codebook + m-bit indices, no sparsity" if spec.codebook else ""
        )
        print(f"{name:<15} {bits:>4} bit  {kind:<10}  {_spacing(spec):<17} {start:<5}  {summary}")
    print("\nmethods (with any scheme above unless said):")
    for name, command, what in METHODS:
        print(f"  {name}: {command}\n      {what}")
    return 0


def _spacing(spec) -> str:
    """Δ_w at each width, as fractions; a codebook's is fitted to the weights."""
    if spec.codebook:
        return "fitted: codebook"
    widths = [str(Fraction(spec.level_spacing(b)).limit_denominator(1 << 10)) for b in spec.bits]
    return ", ".join(widths[:3]) + (", …" if len(widths) > 3 else "")


def report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="distq report",
        description="Plot a run's monitor log (loss, errors, bounds, bytes); for a "
        "sparsified run, the degree distributions of its pruned layers with power-law fits; the "
        "weight bit widths a --weight-bits-budget run chose per tensor; and the channels a "
        "--channel-sparsity run kept per layer.",
    )
    parser.add_argument("run_dir", help="out_dir of a distq train run")
    parser.add_argument("--rank", type=int, default=0, help="whose log to plot (default 0)")
    args = parser.parse_args(argv)
    from distq.monitor.report import write_degree_report, write_layer_report, write_report

    try:
        paths = write_report(args.run_dir, args.rank)
    except FileNotFoundError as exc:
        paths = []
        print(f"no monitor plots: {exc}", file=sys.stderr)
    table, degree_plots = write_degree_report(args.run_dir)
    notes, layer_plots = write_layer_report(args.run_dir)
    if not paths and not table and not layer_plots:
        parser.error(f"{args.run_dir}: neither a monitor log nor a sparsified checkpoint")
    if table:
        print(table)
    for line in notes:
        print(line)
    for path in [*paths, *degree_plots, *layer_plots]:
        print(path)
    return 0


def quantize_command(argv: list[str]) -> int:
    from distq.launch import quantize

    return quantize.main(argv)


def plan_command(argv: list[str]) -> int:
    from distq.launch import plan

    return plan.main(argv)


COMMANDS = {
    "train": train.main,
    "quantize": quantize_command,
    "export": export_command,
    "schemes": schemes_command,
    "report": report_command,
    "plan": plan_command,
}
SUMMARIES = {
    "train": "train with quantized weights (and gradients, sparsity, --distill); torchrun for more",
    "quantize": "post-training quantization of a trained full-precision checkpoint, layer by layer",
    "export": "pack a checkpoint's low-bit weights into a safetensors file",
    "schemes": "list the weight schemes and the methods built on them",
    "report": "plot a run's monitor log (degree distributions, bit widths, channels kept)",
    "plan": "predict bytes, step time and variance of a gradient exchange",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: distq {" + ",".join(COMMANDS) + "} ...\n"
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"distq: unknown command {argv[0]!r}\n{usage}")
            return 2
        lines = [f"  {name:<9} {SUMMARIES[name]}" for name in COMMANDS]
        sys.stdout.write(
            usage + "\n" + "\n".join(lines) + "\n\ndistq COMMAND --help: its options\n"
        )
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
