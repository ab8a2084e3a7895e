"""Which tensors of a model get quantized, and the one-table summary printed at start.

Policy: the matmul weight of every layer a user would call one (Linear, Conv and ConvTranspose,
Hugging Face's Conv1D, the stacked gate matrices of LSTM/GRU/RNN, MultiheadAttention's
projections, and any module type named in `quantize_modules`), minus `keep_full_precision`
(module or parameter names, regular expressions, or "first"/"last" for the first/last
quantizable layer: by default the layer after the embeddings and the output head). Embeddings,
biases and normalization parameters always stay full precision. A weight tied into several
layers (a language model's output head and its embedding) is one tensor, quantized once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

QUANTIZABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
# Layers of other libraries, matched by qualified class name so distq never imports them.
# Hugging Face's Conv1D (GPT-2's attention and MLP) is a Linear whose weight is stored (in, out):
# per_channel scales then act on the stored rows, i.e. on input features.
FOREIGN_MODULES = ("transformers.pytorch_utils.Conv1D",)
# Gate matrices stacked in one recurrent weight: one scale per gate block (torch's gate order).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3}
POSITIONAL = ("first", "last")

ModuleType = type[nn.Module] | str


@dataclass(frozen=True)
class Candidate:
    """A quantizable weight: its name in `named_parameters()`, every layer path that reaches it
    (several for a tied weight), and its number of gate blocks (1 outside recurrent layers)."""

    name: str
    aliases: tuple[str, ...]
    blocks: int = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel (or similar `.module`) wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _class_names(module: nn.Module) -> set[str]:
    """Bare and qualified names of the module's class and its bases."""
    names = set()
    for cls in type(module).__mro__:
        names |= {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
    return names


def _is_named_type(module: nn.Module, types: Iterable[ModuleType]) -> bool:
    names = _class_names(module)
    return any(t in names if isinstance(t, str) else isinstance(module, t) for t in types)


def _layer_weights(module: nn.Module, extra: tuple[ModuleType, ...]) -> list[tuple[str, int]]:
    """(attribute, gate blocks) of each matmul weight `module` holds itself; [] if not a layer."""
    if isinstance(module, nn.RNNBase):
        gates = RECURRENT_GATES.get(module.mode, 1)
        return [
            (n, 1 if n.startswith("weight_hr") else gates)
            for n, _ in module.named_parameters(recurse=False)
            if n.startswith("weight_")
        ]
    if isinstance(module, nn.MultiheadAttention):
        attrs = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        return [
            (a, 3 if a == "in_proj_weight" else 1) for a in attrs if getattr(module, a) is not None
        ]
    if isinstance(module, QUANTIZABLE_MODULES) or _is_named_type(module, FOREIGN_MODULES + extra):
        return [("weight", 1)] if getattr(module, "weight", None) is not None else []
    return []


def _check_module_types(model: nn.Module, types: tuple[ModuleType, ...]) -> None:
    """Every entry is a Module subclass or class name that matches a module with a `weight`."""
    present = sorted({type(m).__name__ for m in model.modules()})
    for t in types:
        if not (isinstance(t, str) and t) and not (
            isinstance(t, type) and issubclass(t, nn.Module)
        ):
            raise ValueError(
                f"quantize_modules entry {t!r}; allowed: an nn.Module subclass or a class name"
            )
        hits = [m for m in model.modules() if _is_named_type(m, (t,))]
        if not hits:
            raise ValueError(
                f"quantize_modules entry {t!r} matches no module of the model; "
                f"module types in it: {present}"
            )
        if all(not isinstance(getattr(m, "weight", None), nn.Parameter) for m in hits):
            raise ValueError(
                f"quantize_modules entry {t!r}: its modules have no `weight` parameter"
            )


def quantizable(model: nn.Module, quantize_modules: Iterable[ModuleType] = ()) -> list[Candidate]:
    """Every quantizable weight of `model`, each once, in the order its first layer registers."""
    model = unwrap(model)
    extra = tuple(quantize_modules)
    _check_module_types(model, extra)
    canonical = {id(p): name for name, p in model.named_parameters()}
    found: dict[int, tuple[list[str], int]] = {}
    for path, module in model.named_modules():
        for attr, blocks in _layer_weights(module, extra):
            weight = getattr(module, attr)
            if id(weight) in canonical:
                aliases, _ = found.setdefault(id(weight), ([], blocks))
                aliases.append(f"{path}.{attr}" if path else attr)
    return [Candidate(canonical[key], tuple(a), b) for key, (a, b) in found.items()]


def candidate_weights(model: nn.Module, quantize_modules: Iterable[ModuleType] = ()) -> list[str]:
    """Names (as `named_parameters()` gives them) of the quantizable weights, in layer order."""
    return [c.name for c in quantizable(model, quantize_modules)]


def _matches(pattern: str, param_name: str) -> bool:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    if pattern in (param_name, module_name):
        return True
    try:
        return re.fullmatch(pattern, param_name) is not None
    except re.error:
        return False


def widths_by_name(
    names: Iterable[str],
    bits_by_name: Mapping[str, int],
    what: str = "parameter",
    listed: str = "names",
) -> dict[str, int]:
    """{name: bits} for the `names` that `bits_by_name` matches: an entry naming it exactly,
    else the first regex that matches all of it; an entry that matches no name is a ValueError
    saying it matches no `what` and listing the names (as `listed`)."""
    names = list(names)
    widths, used = {}, set()
    for name in names:
        exact = [name] if name in bits_by_name else []
        found = exact or [p for p in bits_by_name if re.fullmatch(p, name)][:1]
        if found:
            widths[name] = bits_by_name[found[0]]
            used.add(found[0])
    unused = sorted(set(bits_by_name) - used)
    if unused:
        raise ValueError(f"bits_by_name entries {unused} match no {what}; {listed}: {names}")
    return widths


def select(
    model: nn.Module,
    keep_full_precision: Iterable[str] = POSITIONAL,
    quantize_modules: Iterable[ModuleType] = (),
) -> list[Candidate]:
    """The weights to quantize; a keep pattern that matches nothing is a ValueError. A pattern
    may name any path of a tied weight (GPT-2's "lm_head.weight" is "transformer.wte.weight")."""
    if isinstance(keep_full_precision, str):
        keep_full_precision = (keep_full_precision,)
    candidates = quantizable(model, quantize_modules)
    keep: set[str] = set()
    for pattern in keep_full_precision:
        if pattern in POSITIONAL:
            if candidates:
                keep.add(candidates[0 if pattern == "first" else -1].name)
            continue
        hits = {
            c.name for c in candidates if any(_matches(pattern, n) for n in (c.name, *c.aliases))
        }
        if not hits:
            raise ValueError(
                f"keep_full_precision entry {pattern!r} matches no quantizable weight; "
                f"allowed: 'first', 'last', or a name/regex among {[c.name for c in candidates]}"
            )
        keep |= hits
    return [c for c in candidates if c.name not in keep]


def select_quantized(
    model: nn.Module,
    keep_full_precision: Iterable[str] = POSITIONAL,
    quantize_modules: Iterable[ModuleType] = (),
) -> list[str]:
    """Parameter names to quantize (see `select`)."""
    return [c.name for c in select(model, keep_full_precision, quantize_modules)]


@dataclass(frozen=True)
class TensorPlan:
    """One parameter's row in the quantization summary."""

    name: str
    shape: tuple[int, ...]
    quantized: bool
    bits: int


@dataclass(frozen=True)
class QuantizationSummary:
    """What is quantized, at how many bits, and the resulting weight storage."""

    scheme: str
    rows: tuple[TensorPlan, ...]

    @property
    def fp32_bytes(self) -> int:
        return sum(4 * math.prod(r.shape) for r in self.rows)

    @property
    def packed_bytes(self) -> int:
        return sum((math.prod(r.shape) * r.bits + 7) // 8 for r in self.rows)

    def to_str(self) -> str:
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [f"{'parameter':<{width}}  {'shape':<16} {'numel':>9}  {'stored as':<20}"]
        for r in self.rows:
            kind = f"{self.scheme}, {r.bits} bit" if r.quantized else "full precision"
            shape = "x".join(map(str, r.shape)) or "scalar"
            lines.append(f"{r.name:<{width}}  {shape:<16} {math.prod(r.shape):>9}  {kind:<20}")
        quantized = sum(math.prod(r.shape) for r in self.rows if r.quantized)
        total = sum(math.prod(r.shape) for r in self.rows)
        lines.append(
            f"quantized {quantized}/{total} parameters ({100 * quantized / max(total, 1):.1f}%); "
            f"weights {self.fp32_bytes / 1024:.1f} KiB fp32 -> "
            f"{self.packed_bytes / 1024:.1f} KiB packed"
        )
        return "\n".join(lines)


def summarize(
    model: nn.Module, quantized: Iterable[str], scheme: str, bits: int | Mapping[str, int]
) -> QuantizationSummary:
    """The summary table for `model` when the parameters named in `quantized` get `bits` bits
    (one width for all; or {name: bits} per tensor, whose names are then the quantized ones)."""
    widths = bits if isinstance(bits, Mapping) else dict.fromkeys(quantized, bits)
    rows = tuple(
        TensorPlan(name, tuple(p.shape), name in widths, widths.get(name, 32))
        for name, p in unwrap(model).named_parameters()
    )
    return QuantizationSummary(scheme, rows)
