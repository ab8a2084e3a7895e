"""The typed, validated training configuration: defaults, YAML file, then command-line overrides.

Every field documents itself (help text, allowed values, bounds); the CLI flags are generated
from the fields, so a new option is one field here. A bad key or value raises ConfigError
naming it and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distq.comm import COLLECTIVES, COMPRESSORS
from distq.launch.recipes import DATA_DIR_RECIPES, RECIPES
from distq.lstm import NORMS
from distq.quant import SCHEMES, get_scheme
from distq.quant.sparse import SCHEDULES, SCOPES

FULL_PRECISION = "none"


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """A config field with its help text, allowed values and numeric bounds (`above`: an
    exclusive lower bound)."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "above": above}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything `distq train` needs; see README.md for a tour."""

    recipe: str = option("digits", "task: model + data", choices=RECIPES)
    data_dir: str | None = option(
        None,
        "cifar: a folder of CIFAR-10 python batches (null: a synthetic CIFAR-style set); "
        "charlm: a text file or folder as corpus (null: the Python standard library's sources)",
    )
    lstm_norm: str = option(
        "none", "charlm: normalization of each W·x and W·h term of the LSTM", choices=NORMS
    )
    bptt: int = option(
        100, "charlm: characters per truncated-BPTT window (after bptt/2 burn-in)", minimum=2
    )
    scheme: str = option(
        "ternary",
        f"weight quantization scheme ('{FULL_PRECISION}' = full precision)",
        choices=(FULL_PRECISION, *SCHEMES),
    )
    bits: int | None = option(
        None, "bits per weight for m-bit schemes (linear, log)", minimum=1, maximum=8
    )
    per_channel: bool = option(False, "one scale per output channel instead of per tensor")
    keep_full_precision: list[str] = option(
        ["first", "last"], "layers left unquantized: names, regexes, 'first', 'last'"
    )
    clip_latent: float | None = option(1.0, "clip latent weights to [-c, c] (null: off)", above=0)
    loss_aware: bool = option(
        True, "weight the projection by the optimizer's curvature (off: d = 1, an ablation)"
    )
    sparsity: float = option(
        0.0,
        "share of zeros per quantized tensor at the end of the schedule",
        minimum=0,
        maximum=0.99,
    )
    sparsity_schedule: str = option(
        "constant", "constant, or a cubic ramp (Zhu & Gupta 2017)", choices=SCHEDULES
    )
    sparsity_initial: float = option(
        0.0, "sparsity where a cubic ramp starts", minimum=0, maximum=0.99
    )
    sparsity_begin: float = option(
        0.0, "where the cubic ramp starts, as a fraction of the run's steps", minimum=0, maximum=1
    )
    sparsity_end: float = option(
        0.75,
        "where the cubic ramp reaches `sparsity`, as a fraction of the steps",
        minimum=0,
        maximum=1,
    )
    sparsity_scope: str = option(
        "tensor", "each tensor loses `sparsity`, or all quantized tensors together", choices=SCOPES
    )
    sparse_gradients: bool = option(
        False, "leave pruned weights' gradient entries off the wire (they freeze while pruned)"
    )
    nonfinite: str = option(
        "skip", "on a NaN/Inf gradient: skip the step or raise", choices=("skip", "raise")
    )
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
    epochs: int = option(15, "passes over the training set", minimum=1)
    batch_size: int = option(32, "examples per worker per step", minimum=1)
    hidden: int = option(256, "width of the hidden layers", minimum=1)
    depth: int = option(3, "number of hidden layers", minimum=1)
    test_fraction: float = option(
        0.2, "share of the data held out for testing", minimum=0.01, maximum=0.9
    )
    seed: int = option(0, "random seed (model init, data split and order)", minimum=0)
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
    grad_bits: int | None = option(
        2, "bits per gradient element on the wire (null: fp32 all-reduce)", minimum=1, maximum=8
    )
    collective: str = option(
        "scatter", "how quantized gradients are exchanged", choices=COLLECTIVES
    )
    clip: float | None = option(2.5, "clip gradients at clip·σ per tensor (null: off)", above=0)
    bucket_size: int | None = option(
        512, "gradient elements per scale (null: one per bucket)", minimum=1
    )
    grad_compressor: str = option(
        "quantize",
        "gradient code: stochastic m-bit, TernGrad, or 1-bit sign",
        choices=COMPRESSORS,
    )
    error_feedback: bool = option(False, "add each step's compression error to the next")
    monitor: bool = option(True, "log quantization errors and theory bounds (JSONL in out_dir)")
    monitor_every: int = option(10, "steps between error measurements", minimum=1)
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

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), hints[f.name], f.metadata)
        if self.data_dir is not None and self.recipe not in DATA_DIR_RECIPES:
            raise ConfigError(
                f"data_dir is read by the {' and '.join(DATA_DIR_RECIPES)} recipes only; "
                f"recipe={self.recipe!r}"
            )
        missing = self.data_dir is not None and not Path(self.data_dir).exists()
        if self.recipe == "charlm" and missing:
            raise ConfigError(
                f"data_dir={self.data_dir!r} does not exist (charlm: a text file or a folder of "
                "them; null: the Python standard library's sources)"
            )
        if self.scheme != FULL_PRECISION:
            spec = get_scheme(self.scheme)
            if self.bits is None and len(spec.bits) > 1:
                raise ConfigError(
                    f"scheme {self.scheme!r} needs bits: {spec.bits[0]}..{spec.bits[-1]}"
                )
            if self.bits is not None and self.bits not in spec.bits:
                raise ConfigError(
                    f"bits={self.bits} is not allowed for scheme {self.scheme!r}; allowed: "
                    f"{', '.join(map(str, spec.bits))}"
                )
        if self.sparsity_schedule == "cubic" and not self.sparsity_begin < self.sparsity_end:
            raise ConfigError(
                f"sparsity_begin={self.sparsity_begin} must be below sparsity_end="
                f"{self.sparsity_end} for the cubic schedule"
            )
        if (self.sparsity or self.sparse_gradients) and self.scheme == FULL_PRECISION:
            raise ConfigError("sparsity needs a quantization scheme; scheme is 'none'")
        if self.sparse_gradients and not (self.sparsity and self.grad_bits):
            raise ConfigError(
                "sparse_gradients needs sparsity > 0 and quantized gradients (grad_bits); got "
                f"sparsity={self.sparsity}, grad_bits={self.grad_bits}"
            )
        if self.sparse_gradients and self.error_feedback:
            raise ConfigError("sparse_gradients cannot be combined with error_feedback")
        if self.grad_compressor == "sign" and self.grad_bits not in (None, 1):
            raise ConfigError(f"grad_compressor 'sign' sends 1 bit; got grad_bits={self.grad_bits}")
        if self.grad_compressor == "terngrad" and self.grad_bits not in (None, 2):
            raise ConfigError(
                f"grad_compressor 'terngrad' sends 2 bits; got grad_bits={self.grad_bits}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(name: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> None:
    """Raise ConfigError unless `value` has the field's type, is among its choices and in bounds."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(hint)
    )
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must not be null")
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if typing.get_origin(base) is list:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{name}={value!r}: expected a list of strings")
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[base]
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {base.__name__}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {_bounds(meta)}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(meta['choices'])}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{name}={value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{name}={value!r} is above the maximum {meta['max']}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: above {meta['above']}")


def _bounds(meta: typing.Mapping[str, Any]) -> str:
    """A float field's allowed values in words: "a finite number in [0, 0.99]"."""
    low, high = meta.get("min"), meta.get("max")
    if meta.get("above") is not None:
        return f"a finite number above {meta['above']}"
    if low is not None and high is not None:
        return f"a finite number in [{low}, {high}]"
    if low is not None:
        return f"a finite number >= {low}"
    return "a finite number" if high is None else f"a finite number <= {high}"


def from_mapping(values: typing.Mapping[str, Any], source: str = "config") -> TrainConfig:
    """Build a config from a dict, rejecting unknown keys with a suggestion."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source}{hint} allowed: {', '.join(known)}")
    return TrainConfig(**values)


class _ConfigLoader(yaml.SafeLoader):
    """YAML with 1.2's floats (`1e-3` is a number, as users write it, not the string 1.1 makes
    it) that refuses a key given twice instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} is given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (empty file: no settings)."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_ConfigLoader) or {}  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field (underscores become dashes), plus a positional YAML file."""
    parser.add_argument("config", nargs="?", help="YAML config file (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_default(f)})"
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
            base = (
                next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
            )
            choices = f.metadata["choices"]
            metavar = "{" + ",".join(choices) + "}" if choices else base.__name__.upper()
            parser.add_argument(
                flag,
                type=_parser_for(base, optional),
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=help_text,
            )


def from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML file values, then the flags given on the command line."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_mapping(values, source=args.config or "command line")


def _parser_for(kind: type, optional: bool) -> typing.Callable[[str], Any]:
    """Parse a flag's text as `kind`; 'none'/'null' mean None for optional fields."""

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None

    return parse


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
