"""Plan a quantized gradient exchange before running it: bytes, time and variance per step.

The byte counts are the exact formulas of distq.comm (README "On the wire"), recomputed here
without torch; the variance is the theory's blow-up bound (`distq.theory.bounds`), or for the
rotated quantizers an estimate under the Gaussian approximation (`distq.theory.rotation`). The
model is deliberately simple: one exchange of the whole gradient per step, communication not
overlapped with compute, codec time (if given) added, and only the slow link timed. With a codec
time it also tells the bandwidth above which the quantized exchange loses to fp32: turn it off
there.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from distq.theory.exchange import COLLECTIVES, fp32_allreduce_bytes
from distq.theory.exchange import collective as collective_record
from distq.theory.plan_compressors import blowup_once, check_compressor, is_bound

NOTES = (
    "MB: 10^6 bytes each rank sends over the slow link per step; fp32 all-reduce is one flat",
    "ring over all ranks; hierarchical counts only the node leaders' quantized exchange.",
    "step = compute + comm + codec (no overlap; codec: --codec-ns per element, 0 if not given).",
    "blow-up: the theory's bound on E|Q(g)|²/|g|²; scatter and hierarchical quantize twice",
    "and the two variances add.",
)
ESTIMATE_NOTES = (  # in place of NOTES' last two lines for the rotated quantizers
    "blow-up†: an estimate, not a bound: 1 + q·vNMSE for q quantizations, vNMSE the rotated",
    "quantizer's law under the Gaussian approximation (distq.theory.rotation.rotated_vnmse),",
    "relative to the clipped gradient (clipping does not enter it); none for buckets < 64.",
)

_PREFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BANDWIDTH = re.compile(
    r"(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<prefix>[kKmMgGtT]i?)?"
    r"(?P<unit>bits?|Bytes?|b|B)(?:/s|ps)?"
)


def parse_bandwidth(value: str | float) -> float:
    """Link bandwidth in bits per second, from a number (bit/s) or a string such as "200mbit",
    "1gbit", "10Gb/s", "200Mbps", "25MB/s", "1GiB/s".

    Units: "bit"/"b" are bits, "B"/"Byte" bytes (×8); prefixes k, M, G, T are decimal (any case),
    Ki, Mi, Gi, Ti binary; "/s" or "ps" may follow. A bare number is bits per second.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bps = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            bps = float(text)
        except ValueError:
            match = _BANDWIDTH.fullmatch(text)
            if match is None:
                raise ValueError(
                    f"bandwidth {value!r}; allowed: a number of bit/s or e.g. '200mbit', "
                    "'1gbit', '10Gb/s', '25MB/s', '1GiB/s'"
                ) from None
            prefix = (match["prefix"] or "").lower()
            scale = _BINARY[prefix[0]] if prefix.endswith("i") else _PREFIXES[prefix]
            unit_bits = 8 if match["unit"].startswith("B") else 1
            bps = float(match["num"]) * scale * unit_bits
    else:
        raise ValueError(f"bandwidth {value!r}; allowed: a number of bit/s or a string")
    if not (math.isfinite(bps) and bps > 0):
        raise ValueError(f"bandwidth {value!r}; allowed: a finite rate > 0")
    return bps


def payload_nbytes(
    n: int, bits: int, bucket_size: int | None, scale_bytes: int = 4, whole_buckets: bool = False
) -> int:
    """P(n) = ⌈n·b/8⌉ + scale_bytes·⌈n/bucket⌉ (one scale when bucket_size is None; 0 for n = 0):
    packed codes then one scale per bucket (distq.comm.wire.WireFormat.payload_nbytes). With
    `whole_buckets` (the rotated quantizers) a partial last bucket is sent whole: the codes take
    ⌈B·bucket·b/8⌉ bytes for B = ⌈n/bucket⌉."""
    if n == 0:
        return 0
    if whole_buckets and bucket_size is None:
        raise ValueError("whole_buckets=True needs a bucket_size; allowed: a positive int")
    scales = 1 if bucket_size is None else -(-n // bucket_size)
    coded = scales * bucket_size if whole_buckets else n
    return -(-coded * bits // 8) + scale_bytes * scales


def chunk_length(n: int, ranks: int, bits: int, bucket_size: int | None) -> int:
    """Elements per rank's chunk in `scatter`: c = max(1, ⌈n/(w·u)⌉)·u with the unit
    u = lcm(bucket, 8/gcd(b, 8)) (u = 8/gcd(b, 8) without buckets), the smallest count whose
    codes fill whole bytes and whole buckets (distq.comm.collectives.chunk_length)."""
    per_byte = 8 // math.gcd(bits, 8)
    unit = per_byte if bucket_size is None else math.lcm(bucket_size, per_byte)
    return max(1, -(-n // (ranks * unit))) * unit


@dataclass(frozen=True)
class Estimate:
    """One exchange: bytes a rank sends over the slow link per step, its time, the step time,
    the speed-up and byte ratio against fp32 all-reduce (None where 0/0), how many times the
    gradient is quantized, and the predicted E‖Q(g)‖²/‖g‖² (None: no figure), a proven bound
    unless `blowup_is_bound` is False (the rotated quantizers' Gaussian-approximation estimate)."""

    name: str
    bytes_sent: float
    comm_seconds: float
    step_seconds: float
    speedup: float | None
    ratio: float | None
    quantizations: int
    blowup: float | None
    codec_seconds: float = 0.0
    # above this bandwidth fp32 all-reduce is faster (0: always; inf: never; None: fp32 itself)
    break_even_bps: float | None = None
    blowup_is_bound: bool = True


@dataclass(frozen=True)
class Plan:
    """Inputs and the predictions of `plan`: the fp32 reference and every collective."""

    params: int
    bits: int
    bucket_size: int | None
    clip: float | None
    world_size: int
    collective: str
    bandwidth_bps: float
    compute_seconds: float
    scale_bytes: int
    nodes: int
    codec_ns: float
    fp32: Estimate
    collectives: dict[str, Estimate]
    compressor: str = "quantize"

    @property
    def chosen(self) -> Estimate:
        """The estimate for the requested collective."""
        return self.collectives[self.collective]

    def to_str(self, all_collectives: bool = False) -> str:
        """A table: the fp32 all-reduce, then the chosen collective (or all three, chosen
        marked *), followed by the assumptions the numbers rest on."""
        bucket = (
            "one scale a tensor" if self.bucket_size is None else f"buckets of {self.bucket_size}"
        )
        clip = "no clipping" if self.clip is None else f"clip at {self.clip:g}σ"
        nodes = (
            f", {self.nodes} nodes" if self.collective == "hierarchical" or all_collectives else ""
        )
        head = (
            f"{self.params:,} params, {self.bits}-bit{self._named()}, {bucket}, {clip}, "
            f"{self.world_size} ranks{nodes}, {self.bandwidth_bps / 1e6:g} Mbit/s, "
            f"compute {self.compute_seconds * 1e3:g} ms, codec {self.codec_ns:g} ns/element"
        )
        names = COLLECTIVES if all_collectives else (self.collective,)
        rows = [self.fp32] + [self.collectives[name] for name in names]
        header = (
            "exchange",
            "MB sent/rank",
            "comm ms",
            "step ms",
            "speed-up",
            "bytes ratio",
            "quantized",
            "blow-up" if is_bound(self.compressor) else "blow-up†",
        )
        table = [header] + [self._row(row) for row in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = [head, ""]
        for line in table:
            cells = [line[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        notes = NOTES if is_bound(self.compressor) else NOTES[:3] + ESTIMATE_NOTES
        lines += ["", *notes]
        if self.codec_ns > 0:
            lines.append(self._break_even_line())
        return "\n".join(lines)

    def _break_even_line(self) -> str:
        """Where the chosen exchange stops paying off: the advice to turn it off."""
        chosen = self.chosen
        if not chosen.break_even_bps:
            return f"{chosen.name} never beats fp32 here: it sends no fewer bytes; turn it off."
        return (
            f"{chosen.name} beats fp32 below {chosen.break_even_bps / 1e9:.3g} Gbit/s (codec "
            f"{self.codec_ns:g} ns/element); on a faster link turn it off (plain DDP)."
        )

    def _named(self) -> str:
        """The compressor after the width in the table's head; nothing for the default."""
        return "" if self.compressor == "quantize" else f" {self.compressor}"

    def _row(self, row: Estimate) -> tuple[str, ...]:
        name = row.name + (" *" if row.name == self.collective else "")
        return (
            name,
            f"{row.bytes_sent / 1e6:.3f}",
            f"{row.comm_seconds * 1e3:.1f}",
            f"{row.step_seconds * 1e3:.1f}",
            "—" if row.speedup is None else f"{row.speedup:.2f}×",
            "—" if row.ratio is None else f"{row.ratio:.2f}×",
            str(row.quantizations),
            self._missing_blowup() if row.blowup is None else f"{row.blowup:.3f}",
        )

    def _missing_blowup(self) -> str:
        """Why a blow-up is None: no bound at 1 bit, or no valid estimate on small buckets."""
        return "n/a (1 bit)" if self.compressor == "quantize" else "n/a (bucket < 64)"


def _check_int(name: str, value: object, lowest: int, highest: int | None = None) -> int:
    """value as an int in lowest..highest, else ValueError naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < lowest
        or (highest is not None and value > highest)
    ):
        allowed = f"an int ≥ {lowest}" if highest is None else f"an int in {lowest}..{highest}"
        raise ValueError(f"{name}={value!r}; allowed: {allowed}")
    return int(value)


def _check_number(name: str, value: object, positive: bool) -> float:
    """value as a finite float, > 0 (positive) or ≥ 0, else ValueError naming it."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        raise ValueError(f"{name}={value!r}; allowed: a finite number {'>' if positive else '≥'} 0")
    return float(value)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def plan(
    params: int,
    bits: int,
    bucket_size: int | None,
    clip: float | None,
    world_size: int,
    collective: str,
    bandwidth_bps: float,
    compute_seconds: float = 0.0,
    scale_bytes: int = 4,
    nodes: int | None = None,
    codec_ns: float = 0.0,
    compressor: str = "quantize",
) -> Plan:
    """Predict one step's exchange of a `params`-element gradient among `world_size` ranks.

    Bytes each rank sends (README "On the wire", distq.comm.collectives; N = params, w = ranks):
      fp32 ring all-reduce  2(w−1)/w · 4N
      allgather             (w−1) · P(N)
      scatter               2(w−1) · P(c),  c = `chunk_length`(N, w)
      hierarchical          `scatter` among the `nodes` leaders: 2(nodes−1) · P(c(N, nodes));
                            the fp32 reduce and broadcast inside a node are on the fast link and
                            not counted (nodes None: one rank per node, i.e. nodes = w).
    Time (our model): comm = bytes·8/bandwidth; codec = `codec_ns`·N (clip, encode and decode
    of one rank per step, measured: see benchmarks/README.md); step = compute + comm + codec
    (no overlap); speed-up = fp32 step / step; bytes ratio = fp32 bytes / bytes. Break-even: the
    bandwidth at which both take equally long, (fp32 bytes − bytes)·8 / codec; above it fp32
    all-reduce is faster (inf without codec time; 0 if no bytes are saved).

    Blow-up (our derivation): one quantization inflates E‖·‖² by b = `grad_blowup_clipped`(c, Δ_g)
    with clipping, else `grad_blowup_unclipped`(d, Δ_g), d = bucket size (params if unbucketed;
    a bound that grows with d, so also used for scatter's smaller re-quantized chunks),
    Δ_g = 1/(2^(bits−1) − 1). The scatter owner re-quantizes the sum: the two rounding noises are
    independent and unbiased, so their variances add, each ≈ (b − 1)·‖g‖² to first order: the
    blow-up is ≈ 1 + 2(b − 1) (the product b² adds the second-order (b − 1)²). The owner does
    not re-clip the sum; we assume its max/σ is no worse than its clipped terms' and use the same
    b for both (an approximation). The owner adds its own chunk unquantized, so the first stage
    carries only (w − 1)/w of its variance; the bound keeps the whole term (conservative).
    1 bit has no Lemma 3 bound: blow-up None.

    `compressor` (a name of `distq.theory.exchange.VARIANCE_LAWS`): 'quantize' (the above), or
    'rotated' / 'rotated-stochastic' (distq.comm.rotation): bits 1..4, bucket_size d a power of
    two in 8..65536, 4-byte scales; a partial last bucket is sent whole, so
    P(n) = ⌈B·d·bits/8⌉ + 4·B, B = ⌈n/d⌉, and the chunk length as above. Their blow-up is no
    bound but an ESTIMATE under the Gaussian approximation (the rotated bucket's entries taken
    as i.i.d. Gaussian): 1 + q·rotated_vnmse(bits, d, stochastic) for q quantizations, composed
    as above (the variances taken to add). The clip does not enter it: the exchange clips, then
    rotates, so it is relative to the clipped x. None for buckets under 64, where the law is
    not valid. `Estimate.blowup_is_bound` says which, and the table marks an estimate with †.
    'terngrad' and 'sign' are refused. (Over 60 lines only for this docstring: each figure's
    derivation stays beside the code that computes it.)
    """
    params, bits = _check_int("params", params, 1), _check_int("bits", bits, 1, 8)
    if bucket_size is not None:
        bucket_size = _check_int("bucket_size", bucket_size, 1)
    if clip is not None:
        clip = _check_number("clip", clip, positive=True)
    world_size = _check_int("world_size", world_size, 1)
    collective_record(collective)
    if scale_bytes not in (2, 4):
        raise ValueError(f"scale_bytes={scale_bytes!r}; allowed: 4 (fp32) or 2 (fp16)")
    check_compressor(compressor, bits, bucket_size, scale_bytes)
    link = _Link(
        _check_number("bandwidth_bps", bandwidth_bps, positive=True),
        _check_number("compute_seconds", compute_seconds, positive=False),
        _check_number("codec_ns", codec_ns, positive=False) * 1e-9 * params,
        fp32_allreduce_bytes(params, world_size),
        blowup_once(compressor, bits, clip, bucket_size or params),
        is_bound(compressor),
    )
    nodes = world_size if nodes is None else _check_int("nodes", nodes, 1, world_size)

    def payload(n: int) -> int:
        return payload_nbytes(n, bits, bucket_size, scale_bytes, compressor != "quantize")

    def chunk(n: int, ranks: int) -> int:
        return chunk_length(n, ranks, bits, bucket_size)

    sent = {
        name: record.bytes_sent(params, world_size, nodes, payload, chunk)
        for name, record in COLLECTIVES.items()
    }
    return Plan(
        params,
        bits,
        bucket_size,
        clip,
        world_size,
        collective,
        link.bandwidth_bps,
        link.compute_seconds,
        scale_bytes,
        nodes,
        codec_ns,
        fp32=link.estimate("fp32 all-reduce", link.fp32_bytes, 0),
        collectives={
            name: link.estimate(name, sent[name], record.quantizations_on(nodes))
            for name, record in COLLECTIVES.items()
        },
        compressor=compressor,
    )


@dataclass(frozen=True)
class _Link:
    """What every estimate of one plan shares: the slow link's bandwidth, compute and codec
    seconds per step, the fp32 all-reduce's bytes, one quantization's blow-up (None: no figure)
    and whether it is a proven bound (else an estimate)."""

    bandwidth_bps: float
    compute_seconds: float
    codec_seconds: float
    fp32_bytes: float
    once: float | None
    bound: bool = True

    def estimate(self, name: str, nbytes: float, quantizations: int) -> Estimate:
        """The step, speed-up, byte ratio, blow-up and break-even of sending `nbytes`."""
        codec = self.codec_seconds if quantizations else 0.0
        step = self.compute_seconds + nbytes * 8 / self.bandwidth_bps + codec
        fp32_step = self.compute_seconds + self.fp32_bytes * 8 / self.bandwidth_bps
        blowup = None if self.once is None else 1 + quantizations * (self.once - 1)
        saved_bits = (self.fp32_bytes - nbytes) * 8
        if not quantizations:
            break_even = None
        elif saved_bits <= 0:
            break_even = 0.0  # slower at any bandwidth
        else:
            break_even = saved_bits / codec if codec > 0 else math.inf
        return Estimate(
            name,
            nbytes,
            nbytes * 8 / self.bandwidth_bps,
            step,
            _ratio(fp32_step, step),
            _ratio(self.fp32_bytes, nbytes),
            quantizations,
            blowup,
            codec,
            break_even,
            self.bound or not quantizations,  # no quantization: exactly 1
        )
