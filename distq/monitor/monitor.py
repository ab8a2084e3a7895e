"""ConvergenceMonitor: the combined weight and gradient quantization error, step by step,
beside the theory's bounds (DESIGN §5), to a JSONL log and a Prometheus exporter, with alarms.

Every `every` steps it reads ‖ŵ − w‖²_D (D-weighted) and ‖ŵ − w‖² (Euclidean) per tensor from
the QuantizedOptimizer; whenever the comm hook has measured its gradient errors (both
quantizations of `scatter`, and the clipping bias; every `error_every` hook steps) it records
them beside a bound where one is proven (`GradientSetup.blowup_bound`). Alarms warn (and count)
when a measured gradient blow-up exceeds its bound, or when the combined error (Euclidean
relative weight error + relative gradient error) has risen `rising` checks in a row. The loss,
step time and bytes are recorded every step, and the loss' parts where the loss has several
(self-distillation: `loss_ce` and `loss_kl`, distq.distill). For a model with quantizable
LSTM layers it also records, every `every` steps, ‖∂ℓ/∂h_t‖ across the time steps of the last
backward and the spectral norms of the recurrent matrices.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distq.monitor.exporter import MetricsExporter
from distq.monitor.recurrent import RecurrentProbe
from distq.monitor.weights import weight_errors
from distq.optim import QuantizedOptimizer
from distq.theory import clip_bias_relative, grad_blowup_clipped, level_spacing
from distq.theory.exchange import VARIANCE_LAWS
from distq.theory.plan_compressors import PLANNED, blowup_once, is_bound

log = logging.getLogger(__name__)

LOG_NAME = "monitor-rank{rank}.jsonl"
LOSS_TERMS = ("ce", "kl")  # the parts of a distillation loss (distq.distill.distillation_terms)


@dataclass
class GradientSetup:
    """What the gradient bounds need: the compressor (a `distq.comm.COMPRESSORS` name) and its
    bits, the clip multiple c (None: unclipped), the elements per scale (bucket), and how many
    quantizations a value goes through (allgather: 1; scatter: 2; hierarchical: 2 across nodes,
    0 on one node)."""

    bits: int
    clip: float | None
    bucket_numel: int
    quantizations: int = 1
    compressor: str = "quantize"

    def blowup_bound(self) -> float | None:
        """A bound on E‖Q(x)‖²/‖g‖² of one quantization (x = Clip(g) or g) proven for every
        gradient, or None where none is: the compressor's variance law
        (`distq.theory.exchange.VARIANCE_LAWS`), clipped or not (clipping only shrinks ‖x‖; the
        clipped 1 + c·Δ_g needs buckets inside one tensor, which DDP's flat buckets are not);
        None where nothing is quantized.
        """
        if self.quantizations == 0:
            return None
        return VARIANCE_LAWS[self.compressor](self.bits, self.bucket_numel)

    def gaussian_blowup(self) -> float | None:
        """What Gaussian gradients give, for comparison, not a bound: the paper's clipped form
        √(2/π)·c·Δ_g + 1 (None unclipped or where `blowup_bound` has none); for the rotated
        compressors 1 + their Gaussian law (`distq.theory.rotation.rotated_vnmse`; None for
        buckets under 64)."""
        if self.quantizations and self.compressor in PLANNED and not is_bound(self.compressor):
            return blowup_once(self.compressor, self.bits, self.clip, self.bucket_numel)
        if self.clip is None or self.bits == 1 or self.blowup_bound() is None:
            return None
        return float(grad_blowup_clipped(self.clip, level_spacing(self.bits)))


@dataclass
class ConvergenceMonitor:
    """Collects, logs, exports and checks the quantization errors of one rank's training."""

    run_dir: Path
    rank: int = 0
    optimizer: QuantizedOptimizer | None = None
    comm: Any = None  # a QuantizedCommState (duck-typed: compression_stats())
    gradient: GradientSetup | None = None
    exporter: MetricsExporter | None = None
    every: int = 10
    rising: int = 5
    recurrent: RecurrentProbe | None = None  # LSTM gradient norms over time, spectral norms
    _log: Any = field(default=None, init=False)
    _streak: int = field(default=0, init=False)
    _last_combined: float | None = field(default=None, init=False)
    _bytes_seen: tuple[int, int] = field(default=(0, 0), init=False)
    _choices_seen: dict[int, str] = field(default_factory=dict, init=False)
    _grad_seen: int = field(default=-1, init=False)
    _last_grad_error: float = field(default=0.0, init=False)
    alarms: dict[str, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every={self.every}; allowed: a positive number of steps")
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = (self.run_dir / LOG_NAME.format(rank=self.rank)).open("a")

    def step(
        self,
        step: int,
        loss: float,
        step_seconds: float,
        terms: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Record one optimizer step: loss (and its parts `terms`, e.g. {"ce": …, "kl": …},
        logged as loss_<name>), time and bytes always; gradient errors whenever the hook has
        measured new ones; weight errors and the combined error every `every` steps."""
        terms = terms or {}
        unknown = sorted(set(terms) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"loss terms {unknown}; allowed: {', '.join(LOSS_TERMS)}")
        record: dict[str, Any] = {
            "step": step,
            "time": time.time(),
            "rank": self.rank,
            "loss": loss,
            **{f"loss_{name}": float(value) for name, value in terms.items()},
            "step_seconds": step_seconds,
        }
        record.update(self._traffic())
        record.update(self._gradient_errors(step))
        if step % self.every == 0:
            record.update(self._weight_errors())
            self._check_combined(step, record)
            if self.recurrent is not None:
                record["recurrent"] = self.recurrent.read()
        self._log.write(json.dumps(_finite_or_null(record)) + "\n")
        if step % self.every == 0:  # flushing every step would cost more than the rest
            self._log.flush()
        self._export(record)
        return record

    def _traffic(self) -> dict[str, Any]:
        """Bytes on the wire so far, and (bits="auto") each bucket's choice when it is new."""
        if self.comm is None:
            return {}
        stats = self.comm.compression_stats()
        out = {
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
            "intra_node_bytes_sent": stats.intra_node_bytes_sent,
            "fp32_allreduce_bytes": stats.fp32_allreduce_bytes,
            "compression_ratio": stats.compression_ratio,
        }
        if stats.choices and stats.choices != self._choices_seen:
            out["grad_auto_choices"] = {str(k): v for k, v in sorted(stats.choices.items())}
            self._choices_seen = dict(stats.choices)
        return out

    def _gradient_errors(self, step: int) -> dict[str, Any]:
        """The hook's newest error measurement, if it is one this monitor has not seen yet.

        All first-quantization figures are relative to ‖g‖² of this rank's unclipped gradient
        (Euclidean): the error ‖Q(x) − x‖², the clipping bias ‖x − g‖², the blow-up ‖Q(x)‖²;
        the second quantization's (`scatter`'s owner step) are relative to its own input."""
        if self.comm is None:
            return {}
        stats = self.comm.compression_stats()
        if stats.measured_step <= self._grad_seen:
            return {}
        self._grad_seen = stats.measured_step
        second = _or_none(stats.requant_relative_error)
        out = {
            "grad_measured_at_hook_step": stats.measured_step,
            "grad_first_error_relative": stats.relative_error,
            "grad_second_error_relative": second,
            "grad_error_relative": stats.relative_error + (second or 0.0),
            "grad_clip_bias_relative": _or_none(stats.clip_bias),
            "grad_blowup": stats.measured_blowup,
        }
        if second is not None:
            out["grad_second_blowup"] = stats.second_blowup
        self._last_grad_error = out["grad_error_relative"]
        if self.gradient is not None:
            out.update(self._gradient_theory(step, out))
        return out

    def _gradient_theory(self, step: int, measured: dict[str, Any]) -> dict[str, Any]:
        """The proven bounds beside the measured blow-ups (null where none is proven), the
        Gaussian forms for comparison, and alarms where a measurement exceeds its bound."""
        setup = self.gradient
        assert setup is not None
        bound = setup.blowup_bound()
        out: dict[str, Any] = {"grad_blowup_bound": bound}
        if "grad_second_blowup" in measured:
            out["grad_second_blowup_bound"] = bound
        if setup.gaussian_blowup() is not None:
            out["grad_blowup_gaussian"] = setup.gaussian_blowup()
        if setup.clip is not None:
            # for zero-mean Gaussian g, the largest over Gaussian means (`clip_bias_relative`)
            out["grad_clip_bias_predicted"] = float(clip_bias_relative(setup.clip))
        if bound is None:
            return out
        for key, name in (("grad_blowup", "first"), ("grad_second_blowup", "second")):
            value = measured.get(key)
            if value is not None and value > bound:
                self._alarm(
                    "blowup_above_bound",
                    step,
                    f"measured blow-up of the {name} gradient quantization {value:.3f} "
                    f"exceeds its proven bound {bound:.3f}",
                )
        return out

    def _weight_errors(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        tensors = weight_errors(self.optimizer)
        total = sum(e.error for e in tensors.values())
        norm = sum(e.norm for e in tensors.values())
        euclidean = sum(e.error_euclidean for e in tensors.values())
        euclidean_norm = sum(e.norm_euclidean for e in tensors.values())
        return {
            "weights": {
                name: {
                    "error_D": e.error,
                    "relative_D": e.relative,
                    "relative_euclidean": e.relative_euclidean,
                    "alpha": e.alpha,
                    "delta_w": e.delta_w,
                    "rounding_bound": e.rounding_bound,
                    "bits": e.bits,
                }
                for name, e in tensors.items()
            },
            "weight_error_D": total,
            "weight_error_relative_D": total / norm if norm > 0 else 0.0,
            "weight_error_relative_euclidean": (
                euclidean / euclidean_norm if euclidean_norm > 0 else 0.0
            ),
        }

    def _check_combined(self, step: int, record: dict[str, Any]) -> None:
        """Combined = Euclidean relative weight error + latest relative gradient error (both
        ‖·‖²/‖·‖² in the plain norm); alarm once when it has risen `rising` checks in a row."""
        combined = record.get("weight_error_relative_euclidean", 0.0) + self._last_grad_error
        record["combined_error_relative"] = combined
        rose = self._last_combined is not None and combined > self._last_combined
        self._streak = self._streak + 1 if rose else 0
        self._last_combined = combined
        if self._streak == self.rising:  # once per streak, when it reaches `rising`
            self._alarm("combined_error_rising", step,
                        f"combined quantization error rose {self.rising} checks in a row "
                        f"(now {combined:.4g})")

    def _alarm(self, kind: str, step: int, message: str) -> None:
        self.alarms[kind] = self.alarms.get(kind, 0) + 1
        log.warning("rank %d step %d: %s", self.rank, step, message)
        if self.exporter is not None:
            self.exporter.add("distq_alarms", 1, kind=kind)

    def _export(self, record: dict[str, Any]) -> None:
        e = self.exporter
        if e is None:
            return
        e.set("distq_loss", record["loss"])
        for name in LOSS_TERMS:
            if f"loss_{name}" in record:
                e.set(f"distq_loss_{name}", record[f"loss_{name}"])
        e.set("distq_step_seconds", record["step_seconds"])
        e.set("distq_step", record["step"])
        if "bytes_sent" in record:
            sent, received = self._bytes_seen
            e.add("distq_wire_bytes", record["bytes_sent"] - sent, direction="sent")
            e.add("distq_wire_bytes", record["bytes_received"] - received, direction="received")
            self._bytes_seen = (record["bytes_sent"], record["bytes_received"])
            if math.isfinite(record["compression_ratio"]):
                e.set("distq_compression_ratio", record["compression_ratio"])
        for name, w in record.get("weights", {}).items():
            e.set("distq_weight_quant_error", w["error_D"], tensor=name)
            e.set("distq_weight_quant_error_relative", w["relative_D"], tensor=name)
            e.set("distq_weight_alpha", w["alpha"], tensor=name)
            e.set("distq_weight_rounding_bound", w["rounding_bound"], tensor=name)
            e.set("distq_weight_bits", w["bits"], tensor=name)
        for name, r in record.get("recurrent", {}).items():
            e.set("distq_lstm_spectral_norm", r["spectral_norm"], tensor=name)
            if r.get("grad_norms"):
                e.set("distq_lstm_hidden_grad_norm_first", r["grad_norms"][0], tensor=name)
        for key, metric in (
            ("grad_error_relative", "distq_grad_quant_error_relative"),
            ("grad_clip_bias_relative", "distq_grad_clip_bias_relative"),
            ("grad_clip_bias_predicted", "distq_grad_clip_bias_predicted"),
            ("grad_blowup", "distq_grad_blowup"),
            ("grad_blowup_bound", "distq_grad_blowup_bound"),
            ("grad_second_blowup", "distq_grad_second_blowup"),
        ):
            if record.get(key) is not None:
                e.set(metric, record[key])

    def close(self) -> None:
        self._log.close()
        if self.exporter is not None:
            self.exporter.close()


def _finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    """NaN/Inf become null: JSONL stays strict JSON for any reader."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


def _or_none(value: float) -> float | None:
    return None if value != value else value
