"""The training configuration: five sections, each feeding one part of the run, built from
defaults, a YAML file, then command-line flags.

`weights` and `sparsity` are QuantizedOptimizer's keyword arguments, `gradients` the gradient
hook's (QuantizedCommState), `monitor` the convergence monitor's and its exporter's, `run` the
run's own (recipe, base optimizer, epochs, out_dir, ...). A YAML file gives a section as a
mapping (`gradients: {bits: 4}`) or its fields by their flat names (`grad_bits: 4`), the names
the flags have; a bad key or value raises ConfigError naming it and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distq.bit_allocation import METHODS as BIT_ALLOCATIONS
from distq.channels import ALLOCATIONS as CHANNEL_ALLOCATIONS
from distq.comm import COLLECTIVES, COMPRESSORS
from distq.comm.auto import DEFAULT_BUDGET
from distq.comm.gradient_bits import METRICS as GRADIENT_METRICS
from distq.launch.options import ConfigError, Options, add_flags, flat_name, option
from distq.launch.recipes import DATA_DIR_RECIPES, RECIPES, TEXT_RECIPES
from distq.launch.yaml_config import load_yaml
from distq.lstm import NORMS
from distq.meta import ESTIMATORS
from distq.quant import SCHEMES, get_scheme
from distq.quant.sparse import SCHEDULES, SCOPES, SparsitySchedule

FULL_PRECISION = "none"
PARALLEL = ("ddp", "fsdp")
FSDP_REFUSED = (  # settings that read a replicated model or the DDP hook: defaults only
    "channel_sparsity", "distill", "weight_bits_budget", "sparsity_scope", "collective",
    "error_feedback", "estimator", "sparse_gradients", "grad_bits_budget",
)  # fmt: skip
SHARE = {"minimum": 0, "maximum": 0.99}  # a share of a tensor's weights that may be zero
FRACTION = {"minimum": 0, "maximum": 1}  # a point in the run, as a fraction of its steps


@dataclass
class Weights(Options):
    """Weight quantization: QuantizedOptimizer's keyword arguments (distq/optim.py), and the
    per-tensor widths a bit allocation chooses once (distq/bit_allocation.py)."""

    scheme: str = option(
        "ternary",
        f"weight quantization scheme ('{FULL_PRECISION}' = full precision)",
        choices=(FULL_PRECISION, *SCHEMES),
    )
    bits: int | None = option(
        None,
        "bits per weight for the schemes of several widths "
        f"({', '.join(s for s in SCHEMES if len(get_scheme(s).bits) > 1)})",
        minimum=1,
        maximum=8,
    )
    per_channel: bool = option(False, "one scale per output channel instead of per tensor")
    keep_full_precision: list[str] = option(
        ["first", "last"], "layers left unquantized: names, regexes, 'first', 'last'"
    )
    clip_latent: float | None = option(1.0, "clip latent weights to [-c, c] (null: off)", above=0)
    loss_aware: bool = option(
        True, "weight the projection by the optimizer's curvature (off: d = 1, an ablation)"
    )
    nonfinite: str = option(
        "skip", "on a NaN/Inf gradient: skip the step or raise", choices=("skip", "raise")
    )
    estimator: str = option(
        "ste", "gradient through the quantizer: straight-through, or MetaQuant's meta network "
        "trained jointly (distq/meta.py)", choices=ESTIMATORS,
    )  # fmt: skip
    weight_bits_budget: float | None = option(
        None, "average bits per quantized weight: after allocate_after steps at `bits`, each "
        "tensor takes a width from bit_candidates within this budget (null: `bits` for all)",
        minimum=1, maximum=8,
    )  # fmt: skip
    bit_allocation: str = option(
        "sensitivity", "how weight_bits_budget chooses widths: least Fisher-weighted "
        "quantization error (distq/bit_allocation.py), or DQMQ's learned search (distq/dqmq.py)",
        choices=BIT_ALLOCATIONS,
    )  # fmt: skip
    bit_candidates: list[int] = option([2, 3, 4], "the widths a tensor may take")
    allocate_after: int = option(
        100, "steps at the uniform `bits` before widths are allocated (the curvature d is "
        "Adam's running estimate by then)", minimum=1,
    )  # fmt: skip
    dqmq_steps: int = option(200, "bit_allocation dqmq: steps of its search", minimum=1)

    def as_kwargs(self) -> dict[str, Any]:
        """QuantizedOptimizer's keyword arguments (the allocation's fields are read by the run)."""
        kwargs = super().as_kwargs()
        for name in ALLOCATION_FIELDS:
            del kwargs[name]
        return kwargs

    @property
    def quantized(self) -> bool:
        """Whether any weight is quantized (scheme is not 'none')."""
        return self.scheme != FULL_PRECISION

    def check(self) -> None:
        if self.estimator != "ste" and not self.quantized:
            raise ConfigError(
                f"estimator={self.estimator!r} needs a quantization scheme; scheme is "
                f"{FULL_PRECISION!r}"
            )
        if not self.quantized:
            if self.weight_bits_budget is not None:
                raise ConfigError(
                    f"weight_bits_budget={self.weight_bits_budget} needs a quantization scheme; "
                    f"scheme is {FULL_PRECISION!r}"
                )
            return
        self._check_allocation()
        allowed = get_scheme(self.scheme).bits
        if self.bits is None and len(allowed) > 1:
            raise ConfigError(f"scheme {self.scheme!r} needs bits: {allowed[0]}..{allowed[-1]}")
        if self.bits is not None and self.bits not in allowed:
            raise ConfigError(
                f"bits={self.bits} is not allowed for scheme {self.scheme!r}; allowed: "
                f"{', '.join(map(str, allowed))}"
            )

    def _check_allocation(self) -> None:
        """A budget needs a scheme of several widths, candidates it takes, and lies within them."""
        if self.weight_bits_budget is None:
            return
        allowed = get_scheme(self.scheme).bits
        several = [s for s in SCHEMES if len(get_scheme(s).bits) > 1]
        if len(allowed) == 1:
            raise ConfigError(
                f"weight_bits_budget needs a scheme of several widths ({', '.join(several)}); "
                f"scheme is {self.scheme!r}"
            )
        check_budget(
            ("weight_bits_budget", self.weight_bits_budget),
            ("bit_candidates", self.bit_candidates),
            allowed,
            f" of scheme {self.scheme!r},",
        )


def check_budget(
    budget: tuple[str, float],
    candidates: tuple[str, list[int]],
    allowed: Sequence[int],
    of: str = "",
) -> None:
    """A width budget (name, value) and its candidate widths (name, list): distinct widths
    from `allowed` (the widths `of` something), the budget within them; ConfigError naming
    them otherwise."""
    (budget_name, value), (name, widths) = budget, candidates
    refused = [m for m in widths if m not in allowed]
    if refused or not widths or len(set(widths)) < len(widths):
        raise ConfigError(
            f"{name}={widths}: allowed: distinct widths{of} {allowed[0]}..{allowed[-1]}"
        )
    low, high = min(widths), max(widths)
    if not low <= value <= high:
        raise ConfigError(
            f"{budget_name}={value} is outside {name} {sorted(widths)}; allowed: {low}..{high}"
        )


ALLOCATION_FIELDS = ("weight_bits_budget", "bit_allocation", "bit_candidates", "allocate_after",
                     "dqmq_steps")  # fmt: skip


@dataclass
class Sparsity(Options):
    """Joint quantization + sparsification: QuantizedOptimizer's `sparsity` (a schedule) and
    `sparsity_scope`, and whether pruned weights' gradients stay off the wire."""

    final: float = option(
        0.0, "share of zeros per quantized tensor at the end of the schedule", **SHARE,
        flat="sparsity",
    )  # fmt: skip
    schedule: str = option(
        "constant", "constant, or a cubic ramp (Zhu & Gupta 2017)", choices=SCHEDULES,
        flat="sparsity_schedule",
    )  # fmt: skip
    initial: float = option(
        0.0, "sparsity where a cubic ramp starts", **SHARE, flat="sparsity_initial"
    )
    begin: float = option(
        0.0, "where the cubic ramp starts, as a fraction of the run's steps", **FRACTION,
        flat="sparsity_begin",
    )  # fmt: skip
    end: float = option(
        0.75, "where the cubic ramp reaches `sparsity`, as a fraction of the steps", **FRACTION,
        flat="sparsity_end",
    )  # fmt: skip
    scope: str = option(
        "tensor", "each tensor loses `sparsity`, or all quantized tensors together",
        choices=SCOPES, flat="sparsity_scope",
    )  # fmt: skip
    gradients: bool = option(
        False, "leave pruned weights' gradient entries off the wire (they freeze while pruned)",
        flat="sparse_gradients",
    )  # fmt: skip
    channels: float = option(
        0.0, "share of output channels removed from each conv/linear layer but the output layer "
        "(global channel pruning, distq/channels.py); distq export writes the smaller model",
        **SHARE, flat="channel_sparsity",
    )  # fmt: skip
    channel_schedule: str = option(
        "cubic", "channel_sparsity constant from the start, or a cubic ramp from 0",
        choices=SCHEDULES,
    )  # fmt: skip
    channel_begin: float = option(
        0.0, "where the channel ramp starts, as a fraction of the run's steps", **FRACTION
    )
    channel_end: float = option(
        0.5, "where the channel ramp reaches channel_sparsity, as a fraction of the steps",
        **FRACTION,
    )  # fmt: skip
    channel_every: int = option(20, "steps between votes of the channel ranking", minimum=1)
    channel_calibration: int = option(
        256, "training examples the channel vote runs on (the same on every rank)", minimum=1
    )
    channel_rank_weight: float = option(
        0.1, "weight λ of the learn-to-rank term pulling each example's channel attention "
        "toward the global ranking (0: off)", minimum=0,
    )  # fmt: skip
    channel_allocation: str = option(
        "uniform", "uniform: channel_sparsity of each layer's channels; global: of the model's "
        "multiply-accumulates, channels leaving by importance per MAC across layers",
        choices=CHANNEL_ALLOCATIONS,
    )  # fmt: skip
    channel_floor: float = option(
        0.25, "under channel_allocation global, the share of each layer's channels always kept",
        **FRACTION,
    )  # fmt: skip

    def check(self) -> None:
        if self.schedule == "cubic" and not self.begin < self.end:
            raise ConfigError(
                f"sparsity_begin={self.begin} must be below sparsity_end={self.end} for the "
                "cubic schedule"
            )
        if self.channel_floor == 0:
            raise ConfigError("channel_floor=0; allowed: a share in (0, 1] (at least 1 channel)")
        if self.channel_schedule == "cubic" and not self.channel_begin < self.channel_end:
            raise ConfigError(
                f"channel_begin={self.channel_begin} must be below channel_end="
                f"{self.channel_end} for the cubic schedule"
            )

    def channel_schedule_over(self, total_steps: int) -> SparsitySchedule:
        """ρ over a run of `total_steps`: constant, or the cubic ramp from 0 placed in it."""
        begin = round(self.channel_begin * total_steps)
        end = max(round(self.channel_end * total_steps), begin + 1)
        return SparsitySchedule(self.channels, self.channel_schedule, 0.0, begin, end)

    def optimizer_kwargs(self, total_steps: int) -> dict[str, Any]:
        """QuantizedOptimizer's `sparsity` (the schedule, its ramp placed in a run of
        `total_steps`) and `sparsity_scope`."""
        begin = round(self.begin * total_steps)
        end = max(round(self.end * total_steps), begin + 1)
        schedule = SparsitySchedule(self.final, self.schedule, self.initial, begin, end)
        return {"sparsity": schedule, "sparsity_scope": self.scope}


@dataclass
class Gradients(Options):
    """Gradient exchange: QuantizedCommState's keyword arguments (comm/hook.py)."""

    bits: int | str | None = option(
        2, "bits per gradient element on the wire (null: fp32 all-reduce; auto: per bucket, the "
        "fastest of fp32, fp16 and the compressor's widths within grad_auto_budget, measured)",
        minimum=1, maximum=8, flat="grad_bits", words=("auto",),
    )  # fmt: skip
    collective: str = option(
        "scatter", "how quantized gradients are exchanged", choices=COLLECTIVES
    )
    clip: float | None = option(2.5, "clip gradients at clip·σ per tensor (null: off)", above=0)
    bucket_size: int | None = option(
        512, "gradient elements per scale (null: one per bucket)", minimum=1
    )
    compressor: str = option(
        "quantize", "gradient code: stochastic m-bit, TernGrad, 1-bit sign, or rotated (EDEN)",
        choices=COMPRESSORS, flat="grad_compressor",
    )  # fmt: skip
    error_feedback: bool = option(False, "add each step's compression error to the next")
    auto_budget: float = option(
        DEFAULT_BUDGET, "with grad_bits auto: the relative variance ‖Q(g) − g‖²/‖g‖² an option "
        "may add per step", above=0, flat="grad_auto_budget",
    )  # fmt: skip
    bits_budget: float | None = option(
        None, "average bits per gradient element: after grad_allocate_after steps at grad_bits, "
        "each tensor takes a width from grad_bit_candidates within this budget, by the loss its "
        "gradient noise adds (comm/gradient_bits.py; null: grad_bits for all)",
        minimum=1, maximum=8, flat="grad_bits_budget",
    )  # fmt: skip
    bit_candidates: list[int] = option(
        [2, 3, 4], "the widths a gradient tensor may take", flat="grad_bit_candidates"
    )
    allocate_after: int = option(
        100, "steps at grad_bits before gradient widths are allocated", minimum=1,
        flat="grad_allocate_after",
    )  # fmt: skip
    calibration: int = option(
        4, "batches of each rank's own gradient the widths' costs are measured on", minimum=1,
        flat="grad_calibration",
    )  # fmt: skip
    metric: str = option(
        "loss", "gradient widths minimize the loss the noise adds (weights 1/d) or the update's "
        "own error (1/d²)", choices=GRADIENT_METRICS, flat="grad_bits_metric",
    )  # fmt: skip

    def as_kwargs(self) -> dict[str, Any]:
        """QuantizedCommState's keyword arguments (the allocation's fields are read by the run)."""
        kwargs = super().as_kwargs()
        for name in GRADIENT_ALLOCATION_FIELDS:
            del kwargs[name]
        return kwargs

    def check(self) -> None:
        self._check_budget()
        record = COMPRESSORS[self.compressor]
        if self.bits == "auto" and self.collective == "hierarchical":
            raise ConfigError("grad_bits auto works on a flat group; allowed with it: collective "
                              "scatter or allgather")  # fmt: skip
        if self.bits not in (None, "auto") and self.bits not in record.widths:
            raise ConfigError(
                f"grad_compressor {self.compressor!r} sends {record.sends()} bit(s); "
                f"got grad_bits={self.bits}"
            )

    def _check_budget(self) -> None:
        """A gradient budget needs fixed-width stochastic codes (the cost law's), candidates the
        compressor sends, and lies within them."""
        if self.bits_budget is None:
            return
        fixed = isinstance(self.bits, int) and self.compressor == "quantize"
        if not fixed or self.error_feedback or self.collective == "hierarchical":
            raise ConfigError(
                f"grad_bits_budget needs grad_bits a number, grad_compressor 'quantize', no "
                f"error_feedback and collective scatter or allgather; got grad_bits={self.bits!r}, "
                f"grad_compressor={self.compressor!r}, error_feedback={self.error_feedback}, "
                f"collective={self.collective!r}"
            )
        check_budget(
            ("grad_bits_budget", self.bits_budget),
            ("grad_bit_candidates", self.bit_candidates),
            COMPRESSORS[self.compressor].widths,
        )


GRADIENT_ALLOCATION_FIELDS = ("bits_budget", "bit_candidates", "allocate_after", "calibration",
                              "metric")  # fmt: skip


@dataclass
class Monitor(Options):
    """The convergence monitor (its `every`) and its Prometheus exporter (port, address)."""

    enabled: bool = option(
        True, "log quantization errors and theory bounds (JSONL in out_dir)", flat="monitor"
    )
    every: int = option(10, "steps between error measurements", minimum=1, flat="monitor_every")
    metrics_port: int | None = option(
        9400,
        "Prometheus /metrics on this port + local rank (0: any free port; null: no exporter)",
        minimum=0,
        maximum=65535,
    )
    metrics_address: str = option(
        "127.0.0.1",
        "address the exporter listens on (0.0.0.0: all interfaces, for a Prometheus elsewhere)",
    )


@dataclass
class Run(Options):
    """The run's own settings: task, base optimizer, length, checkpoints, processes."""

    recipe: str = option("digits", "task: model + data", choices=RECIPES)
    data_dir: str | None = option(
        None,
        "cifar: a folder of CIFAR-10 python batches (null: a synthetic CIFAR-style set); "
        "charlm, gpt: a text file or folder as corpus (null: the Python standard library's "
        "sources)",
    )
    lstm_norm: str = option(
        "none", "charlm: normalization of each W·x and W·h term of the LSTM", choices=NORMS
    )
    bptt: int = option(
        100, "charlm: characters per truncated-BPTT window (after bptt/2 burn-in); gpt: the "
        "context length in bytes", minimum=2,
    )  # fmt: skip
    hidden: int = option(256, "width of the hidden layers (gpt: the model width)", minimum=1)
    depth: int = option(3, "number of hidden layers (gpt: transformer blocks)", minimum=1)
    optimizer: str = option(
        "adam",
        "base optimizer (adam/adamw: loss-aware d; sgd: d = 1)",
        choices=("adam", "adamw", "sgd"),
    )
    lr: float = option(0.01, "learning rate", minimum=0)
    lr_schedule: str = option(
        "cosine", "learning-rate schedule over the run", choices=("constant", "cosine")
    )
    weight_decay: float = option(0.0, "weight decay", minimum=0)
    distill: float = option(
        0.0, "self-distillation weight λ: loss (1-λ)·CE + λ·T²·KL(teacher ‖ student), the "
        "teacher being the latent full-precision weights (distq/distill.py; one extra forward "
        "a step; 0: off)", minimum=0, maximum=1,
    )  # fmt: skip
    distill_temperature: float = option(
        2.0, "softmax temperature T of the distillation term", above=0
    )
    epochs: int = option(15, "passes over the training set", minimum=1)
    batch_size: int = option(32, "examples per worker per step", minimum=1)
    test_fraction: float = option(
        0.2, "share of the data held out for testing", minimum=0.01, maximum=0.9
    )
    seed: int = option(0, "random seed (model init, data split and order)", minimum=0)
    bn_recalibration: int = option(
        1024, "training examples (the same on every rank) over which every batch norm's running "
        "statistics are recomputed with the epoch's final weights before each test and "
        "checkpoint (distq/batchnorm.py; 0: keep the running averages)", minimum=0,
    )  # fmt: skip
    out_dir: str = option("runs/digits", "where checkpoints and logs go")
    resume: bool = option(False, "continue from the newest checkpoint in out_dir, if there is one")
    move_aside: bool = option(
        False,
        "a fresh run into an out_dir holding an earlier run's checkpoints moves that run to "
        "out_dir/previous-<n>/ (default: refuse)",
    )
    checkpoint_every: int | None = option(
        100, "steps between checkpoints, besides one per epoch (null: per epoch only)", minimum=1
    )
    keep_checkpoints: int = option(3, "how many of the newest checkpoints to keep", minimum=1)
    parallel: str = option(
        "ddp",
        "how several ranks hold the model: ddp (a replica each, gradients all-reduced through "
        "the gradients section's hook) or fsdp (FSDP2: parameters, latent weights and optimizer "
        "state sharded by rows; quantized weights cross the all-gather as packed codes, "
        "gradients the reduce-scatter through the gradients section's compressor)",
        choices=PARALLEL,
    )
    checkpoint_format: str = option(
        "auto",
        "file (rank 0 gathers whole tensors into one file; no shared filesystem needed) or "
        "sharded (parallel fsdp: torch.distributed.checkpoint, every rank writes its own rows "
        "into one directory on a filesystem all ranks share); auto: sharded under parallel "
        "fsdp, file otherwise",
        choices=("auto", "file", "sharded"),
    )
    fsdp_dtype: str = option(
        "float32",
        "parallel fsdp: the dtype FSDP2 gathers parameters and reduce-scatters gradients in "
        "(bfloat16: its MixedPrecisionPolicy over fp32 weights, the bf16 baseline)",
        choices=("float32", "bfloat16"),
    )
    backend: str = option(
        "auto",
        "torch.distributed backend (auto: nccl on GPU, else gloo)",
        choices=("auto", "gloo", "nccl"),
    )
    dist_timeout: float = option(
        600,
        "seconds the ranks wait for each other (rendezvous and each collective) before an error",
        above=0,
    )
    progress: bool = option(True, "show a progress bar on rank 0")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written sharded (checkpoint_format resolved)."""
        return self.checkpoint_format == "sharded" or (
            self.checkpoint_format == "auto" and self.parallel == "fsdp"
        )

    def check(self) -> None:
        if self.bn_recalibration == 1:
            raise ConfigError(
                "bn_recalibration=1: a batch norm needs at least 2 examples a batch; give 0 "
                "(off) or >= 2"
            )
        if self.data_dir is not None and self.recipe not in DATA_DIR_RECIPES:
            raise ConfigError(
                f"data_dir is read by the {' and '.join(DATA_DIR_RECIPES)} recipes only; "
                f"recipe={self.recipe!r}"
            )
        missing = self.data_dir is not None and not Path(self.data_dir).exists()
        if self.recipe in TEXT_RECIPES and missing:
            raise ConfigError(
                f"data_dir={self.data_dir!r} does not exist ({self.recipe}: a text file or a "
                "folder of them; null: the Python standard library's sources)"
            )


@dataclass(init=False)
class TrainConfig:
    """Everything `distq train` needs, by section; see README.md for a tour.

    Built from sections (`TrainConfig(run=Run(epochs=2))`, or a section as a mapping), from
    settings by their flat names (`TrainConfig(epochs=2, grad_bits=4)`), or both; what is not
    given takes its default."""

    weights: Weights
    sparsity: Sparsity
    gradients: Gradients
    monitor: Monitor
    run: Run

    def __init__(self, **settings: Any) -> None:
        by_section = _by_section(_settings(settings, "TrainConfig()"))
        for name, section in SECTIONS.items():
            setattr(self, name, section(**by_section[name]))
        self.check()

    def check(self) -> None:
        """Raise ConfigError where sections disagree."""
        sparsity, grads = self.sparsity, self.gradients
        if (sparsity.final or sparsity.gradients) and not self.weights.quantized:
            raise ConfigError("sparsity needs a quantization scheme; scheme is 'none'")
        if (sparsity.final or sparsity.initial) and get_scheme(self.weights.scheme).codebook:
            raise ConfigError(
                f"scheme {self.weights.scheme!r} fits a codebook and takes no sparsity; got "
                f"sparsity={sparsity.final}, sparsity_initial={sparsity.initial}"
            )
        if sparsity.gradients and not (sparsity.final and grads.bits):
            raise ConfigError(
                "sparse_gradients needs sparsity > 0 and quantized gradients (grad_bits); got "
                f"sparsity={sparsity.final}, grad_bits={grads.bits}"
            )
        if self.run.distill and not self.weights.quantized:
            raise ConfigError(
                f"distill={self.run.distill} needs a quantization scheme (the teacher is the "
                "latent full-precision weights); scheme is 'none'"
            )
        if sparsity.gradients and grads.error_feedback:
            raise ConfigError("sparse_gradients cannot be combined with error_feedback")
        if self.run.fsdp_dtype != "float32" and self.run.parallel != "fsdp":
            raise ConfigError(
                f"fsdp_dtype={self.run.fsdp_dtype!r} needs parallel='fsdp'; "
                f"parallel={self.run.parallel!r} allows fsdp_dtype='float32' only"
            )
        if self.run.checkpoint_format == "sharded" and self.run.parallel != "fsdp":
            raise ConfigError(
                f"checkpoint_format='sharded' needs parallel='fsdp' (a DDP rank holds the whole "
                f"model); parallel={self.run.parallel!r} allows 'auto' and 'file'"
            )
        if self.run.parallel == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """Refuse, by name, what `--parallel fsdp` does not run with (each reads a replicated
        model or the DDP hook)."""
        flat = self.flat()
        defaults = TrainConfig().flat()
        refused = [f"{n}={flat[n]!r}" for n in FSDP_REFUSED if flat[n] != defaults[n]]
        if flat["grad_bits"] == "auto":
            refused.append("grad_bits='auto'")
        if refused:
            raise ConfigError(
                f"parallel='fsdp' does not run with {', '.join(refused)}; allowed with it: "
                f"their defaults ({', '.join(f'{n}={defaults[n]!r}' for n in FSDP_REFUSED)})"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The sections as mappings: what a checkpoint records, and a YAML file may hold."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (as flags and errors name it)."""
        return flatten(self.to_dict())


SECTIONS: dict[str, type[Options]] = typing.get_type_hints(TrainConfig)
FLAT: dict[str, tuple[str, str]] = {  # flat name -> (section, field)
    flat_name(f): (section, f.name)
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
}
_FLAT_NAME = {place: name for name, place in FLAT.items()}
_TOP_KEYS = [*FLAT, *(name for name in SECTIONS if name not in FLAT)]


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded config by flat names: sections (what checkpoints hold since configs have them)
    or flat keys (before that), which stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key in SECTIONS and isinstance(value, Mapping):
            flat.update({_FLAT_NAME.get((key, k), k): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def from_mapping(values: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from sections and/or flat keys, rejecting unknown keys with a suggestion."""
    return _build(_settings(values, source))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A positional YAML file, then one --flag per field (its flat name), grouped by section."""
    parser.add_argument("config", nargs="?", help="YAML config file (flags override it)")
    for name, section in SECTIONS.items():
        add_flags(parser.add_argument_group(name, section.__doc__.splitlines()[0]), section)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML file values, then the flags given on the command line."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    settings = _settings(values, args.config or "command line")
    flags = {k: v for k, v in vars(args).items() if k in FLAT}
    settings.update(_settings(flags, "command line"))
    return _build(settings)


def _settings(values: Mapping[str, Any], source: str) -> dict[tuple[str, str], Any]:
    """Each value by its (section, field), whether given in a section (a mapping or an Options
    instance) or by its flat name; ConfigError for an unknown key and for a setting given twice."""
    settings: dict[tuple[str, str], Any] = {}
    given_as: dict[tuple[str, str], str] = {}
    for key, value in values.items():
        if isinstance(value, Options):
            value = value.as_kwargs()
        if key in SECTIONS and (isinstance(value, Mapping) or key not in FLAT):
            fields = [f.name for f in dataclasses.fields(SECTIONS[key])]
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} in {source} must be a mapping of {', '.join(fields)}")
            where = f"section {key!r} of {source}"
            entries = [((key, _known(k, fields, where)), f"{key}.{k}", v) for k, v in value.items()]
        else:
            entries = [(FLAT[_known(key, _TOP_KEYS, source)], key, value)]
        for place, name, v in entries:
            if place in given_as:
                raise ConfigError(
                    f"{given_as[place]} and {name} in {source} set one option; give one"
                )
            given_as[place], settings[place] = name, v
    return settings


def _known(key: Any, allowed: list[str], where: str) -> str:
    """`key` if it is allowed, else ConfigError naming it, the closest allowed key and all."""
    if key in allowed:
        return key
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown key {key!r} in {where}{hint} allowed: {', '.join(allowed)}")


def _by_section(settings: Mapping[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
    """(section, field) -> value settings as one mapping per section."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for (section, name), value in settings.items():
        sections[section][name] = value
    return sections


def _build(settings: Mapping[tuple[str, str], Any]) -> TrainConfig:
    """The config of (section, field) -> value settings, defaults elsewhere."""
    return TrainConfig(**_by_section(settings))
