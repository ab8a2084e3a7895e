"""Which tensors of a model get quantized, and the one-table summary printed at start.

Policy: every Linear/Conv weight, minus `keep_full_precision` (module or parameter names,
regular expressions, or "first"/"last" for the first/last quantizable layer). Biases and
normalization parameters always stay full precision.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

QUANTIZABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)
POSITIONAL = ("first", "last")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel (or similar `.module`) wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def candidate_weights(model: nn.Module) -> list[str]:
    """Names of the weights of quantizable layers, in module registration order."""
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, QUANTIZABLE_MODULES) and module.weight is not None
    ]


def _matches(pattern: str, param_name: str) -> bool:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    if pattern in (param_name, module_name):
        return True
    try:
        return re.fullmatch(pattern, param_name) is not None
    except re.error:
        return False


def select_quantized(
    model: nn.Module, keep_full_precision: Iterable[str] = POSITIONAL
) -> list[str]:
    """Parameter names to quantize; a keep pattern that matches nothing is a ValueError."""
    if isinstance(keep_full_precision, str):
        keep_full_precision = (keep_full_precision,)
    candidates = candidate_weights(unwrap(model))
    keep: set[str] = set()
    for pattern in keep_full_precision:
        if pattern in POSITIONAL:
            if candidates:
                keep.add(candidates[0] if pattern == "first" else candidates[-1])
            continue
        hits = {name for name in candidates if _matches(pattern, name)}
        if not hits:
            raise ValueError(
                f"keep_full_precision entry {pattern!r} matches no quantizable weight; "
                f"allowed: 'first', 'last', or a name/regex among {candidates}"
            )
        keep |= hits
    return [name for name in candidates if name not in keep]


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
    model: nn.Module, quantized: Iterable[str], scheme: str, bits: int
) -> QuantizationSummary:
    """The summary table for `model` when the parameters named in `quantized` get `bits` bits."""
    chosen = set(quantized)
    rows = tuple(
        TensorPlan(name, tuple(p.shape), name in chosen, bits if name in chosen else 32)
        for name, p in unwrap(model).named_parameters()
    )
    return QuantizationSummary(scheme, rows)
