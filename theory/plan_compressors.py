"""What `distq.theory.plan` knows of each compressor it plans: the widths and buckets it can
send, and one quantization's blow-up E‖Q(x)‖²/‖x‖², a proven bound ('quantize') or an
estimate under the Gaussian approximation ('rotated', 'rotated-stochastic'). Torch-free; the
names are those of `distq.theory.exchange.VARIANCE_LAWS` (the registry's)."""

from __future__ import annotations

from distq.theory.bounds import grad_blowup_clipped, grad_blowup_unclipped, level_spacing
from distq.theory.exchange import VARIANCE_LAWS
from distq.theory.rotation import rotated_vnmse

PLANNED = ("quantize", "rotated", "rotated-stochastic")
ROTATED_BITS = range(1, 5)
ROTATED_BUCKETS = range(8, (1 << 16) + 1)  # RotatedQuantizer's Hadamard widths: 2^3..2^16
ESTIMATE_MIN_BUCKET = 64  # below it rotated_vnmse's dropped O(w⁻²) terms matter (43% at w = 8)


def check_compressor(name: str, bits: int, bucket_size: int | None, scale_bytes: int) -> None:
    """A ValueError naming the bad value and what is allowed unless `name` is planned and can
    send `bits` per element in buckets of `bucket_size` with `scale_bytes`-byte scales.
    'terngrad' (its scale is max-reduced over ranks) and 'sign' (biased) have no model here."""
    if name not in PLANNED:
        known = isinstance(name, str) and name in VARIANCE_LAWS
        known = " has no model in the planner" if known else ""
        raise ValueError(f"compressor={name!r}{known}; allowed: {', '.join(PLANNED)}")
    if name == "quantize":
        return
    if bits not in ROTATED_BITS:
        raise ValueError(f"bits={bits!r} with compressor {name!r}; allowed: 1..4")
    if bucket_size not in ROTATED_BUCKETS or bucket_size & (bucket_size - 1):
        raise ValueError(
            f"bucket_size={bucket_size!r} with compressor {name!r}; allowed: a power of two in "
            "8..65536 (the Hadamard transform's width)"
        )
    if scale_bytes != 4:
        raise ValueError(f"scale_bytes={scale_bytes!r} with compressor {name!r}; allowed: 4")


def is_bound(name: str) -> bool:
    """Whether `blowup_once` of compressor `name` is a proven bound (else an estimate)."""
    return name == "quantize"


def blowup_once(name: str, bits: int, clip: float | None, bucket: int) -> float | None:
    """One quantization's blow-up of a checked compressor (None: no figure).

    'quantize': the bound `grad_blowup_clipped`(clip, Δ_g) with clipping, else
    `grad_blowup_unclipped`(bucket, Δ_g), Δ_g = 1/(2^(bits−1) − 1); None at 1 bit (no Lemma 3
    bound). Rotated: 1 + `rotated_vnmse`(bits, bucket, stochastic), an estimate (exact for
    Gaussian x, approximate otherwise), relative to the clipped x the exchange rotates, so the
    clip does not enter it; None for buckets under 64, where the law is not valid.
    """
    if name != "quantize":
        if bucket < ESTIMATE_MIN_BUCKET:
            return None
        return 1 + rotated_vnmse(bits, bucket, stochastic=name == "rotated-stochastic")
    if bits == 1:
        return None
    if clip is not None:
        return grad_blowup_clipped(clip, level_spacing(bits))
    return grad_blowup_unclipped(bucket, level_spacing(bits))
