"""The codec's elementwise kernels: pure torch functions that torch.compile fuses into one pass
(6x faster encodes, 1.9x faster decodes than eager on CPU: benchmarks/README.md). DISTQ_COMPILE=0
runs them eagerly: the same codes for max scales; a sum-based (sign) scale may differ in its last
bit, but every rank runs the same mode."""

from __future__ import annotations

import contextlib
import logging
import os
import types
import warnings
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# torch.compile imports torch.utils.mkldnn, whose class bodies warn that torch.jit.script_method
# is deprecated (14 times): imported here once with exactly those warnings off.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.filterwarnings("ignore", ".*torch.jit.script_method", DeprecationWarning)
    import torch.utils.mkldnn

MASK32 = 0xFFFFFFFF
# φ·2³² and fmix32's multipliers as the int32s with the same bits (all three are ≥ 2³¹)
GOLDEN32, FMIX1, FMIX2 = (c - (1 << 32) for c in (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35))


def _shift_right(h: Tensor, n: int) -> Tensor:
    """Logical right shift of int32 bits (>> on int32 copies the sign bit)."""
    return (h >> n) & ((1 << (32 - n)) - 1)


def hash_uniform(index: Tensor, key: Tensor) -> Tensor:
    """u ∈ [0, 1) from MurmurHash3's fmix32 of (index·φ + key) mod 2³², 24-bit resolution; in
    int32, whose products wrap mod 2³² like uint32's (~1.2x faster than masked int64)."""
    h = index.to(torch.int32) * GOLDEN32 + key.to(torch.int32)
    h = h ^ _shift_right(h, 16)
    h = h * FMIX1
    h = h ^ _shift_right(h, 13)
    h = h * FMIX2
    h = h ^ _shift_right(h, 16)
    return _shift_right(h, 8).to(torch.float32) * (2.0**-24)


def max_abs_scales(xb: Tensor) -> Tensor:
    """max|x| per bucket row; NaN for a row holding NaN or Inf (the NaN then travels)."""
    s = xb.abs().amax(dim=1)
    return torch.where(torch.isfinite(s), s, torch.nan)


def abs_sums(xb: Tensor) -> Tensor:
    """Σ|x| per bucket row (the sign compressor's scale is this over the real element count)."""
    return xb.abs().sum(dim=1)


def _index(xb: Tensor, offset: Tensor) -> Tensor:
    """Global element index of each entry of a block view starting at element `offset`."""
    return (torch.arange(xb.numel(), dtype=torch.int64, device=xb.device) + offset).view_as(xb)


def _ratio(xb: Tensor, s: Tensor) -> Tensor:
    """x·(1/s) per bucket row (one division per row, not per element: ~15% faster encodes);
    0 where the scale is 0 (or NaN), so zero buckets never give 0/0 and Inf/NaN never a code."""
    sc = s[:, None]
    return torch.where(sc > 0, xb * (1.0 / sc.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)


def _stochastic(x: Tensor, s: Tensor, index: Tensor, key: Tensor, k: int) -> Tensor:
    """Offset code sign·r + k of |x|/s·k rounded stochastically to 0..k (k = 0: the 1-bit code,
    1 with probability (1 + x/s)/2), as int32."""
    u = hash_uniform(index, key)
    if k == 0:
        return (u < (1.0 + _ratio(x, s)) * 0.5).to(torch.int32)
    level = _ratio(x, s).abs() * k
    lower = level.floor()
    r = (lower + (u < level - lower).to(level.dtype)).clamp(max=k)
    return (torch.copysign(r, x) + k).to(torch.int32)


def stochastic_codes(
    xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, numel: Tensor, k: int
) -> Tensor:
    """Codes of every element of the block view; padding past `numel` gets code 0."""
    index = _index(xb, offset)
    return torch.where(index < numel, _stochastic(xb, s, index, key, k), 0).to(torch.uint8)


def sign_codes(xb: Tensor, offset: Tensor, numel: Tensor) -> Tensor:
    """1 where x ≥ 0, else 0; padding past `numel` gets 0."""
    return torch.where(_index(xb, offset) < numel, (xb >= 0).to(torch.uint8), 0)


def pack_rows(xb: Tensor, bits: int, code, offset: Tensor | None = None) -> Tensor:
    """Row-packed bytes of code(x_slice, index_slice) of whole rows, bits 1, 2, 4, 8: byte j of a
    row of w codes holds codes j + t·w/p at bits t·bits (p = 8/bits planes, each a contiguous
    slice). `index_slice`: element index mod 2³² in int32 (all the hash needs), None without
    `offset`."""
    per_byte = 8 // bits
    rows, width = xb.shape
    plane = width // per_byte
    first = None
    if offset is not None:
        first = (
            torch.arange(rows, dtype=torch.int32, device=xb.device)[:, None] * width
            + torch.arange(plane, dtype=torch.int32, device=xb.device)[None, :]
            + offset.to(torch.int32)
        )
    byte = None
    for t in range(per_byte):
        index = None if first is None else first + t * plane
        part = code(xb[:, t * plane : (t + 1) * plane], index) << (t * bits)
        byte = part if byte is None else byte | part
    return byte.to(torch.uint8)


def level_values(codes: Tensor, s: Tensor, k: int) -> Tensor:
    """Decoded values per bucket row: (code − k)·s/k, or (2·code − 1)·s for k = 0."""
    c = codes.to(torch.float32)
    if k == 0:
        return (c * 2.0 - 1.0) * s[:, None]
    return (c - k) * (s / k)[:, None]


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Codes of row-packed bytes (`pack_rows`'s layout): [rows, bytes] -> [rows, bytes·8/bits],
    one shifted, masked copy of the bytes per plane (inductor fuses the cat into one pass)."""
    wide = packed.to(torch.int32)
    mask = (1 << bits) - 1
    return torch.cat([(wide >> (t * bits)) & mask for t in range(8 // bits)], dim=1)


def stochastic_packed(
    xb: Tensor, s: Tensor, key: Tensor, offset: Tensor, k: int, bits: int
) -> Tensor:
    """`stochastic_codes` of whole rows, row-packed (`pack_rows`)."""
    return pack_rows(xb, bits, lambda x, index: _stochastic(x, s, index, key, k), offset)


def stochastic_packed_scaled(
    xb: Tensor, key: Tensor, offset: Tensor, k: int, bits: int
) -> tuple[Tensor, Tensor]:
    """(`stochastic_packed`, `max_abs_scales`) of the same rows in one call: each compiled call
    costs ~25 µs of dispatch on CPU, as much as encoding ~20k elements."""
    s = max_abs_scales(xb)
    return stochastic_packed(xb, s, key, offset, k, bits), s


def sign_packed(xb: Tensor) -> Tensor:
    """`sign_codes` of whole rows, packed 8 to a byte (`pack_rows`)."""
    return pack_rows(xb, 1, lambda x, index: (x >= 0).to(torch.int32))


def decode_sum_into(
    packed: Tensor, s: Tensor, out: Tensor, k: int, bits: int, parts: int, accumulate: bool
) -> None:
    """out ← [out +] Σ_j `level_values` of the row-packed codes of the j-th of `parts` equal
    row blocks of (packed, s), added in block order: one pass over out when compiled."""
    rows = out.shape[0]
    total = out if accumulate else None
    for j in range(parts):
        block = slice(j * rows, (j + 1) * rows)
        values = level_values(unpack_rows(packed[block], bits), s[block], k)
        total = values if total is None else total + values
    out.copy_(total)


@cache
def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile, or `fn` itself if compiling is off or fails. Only dim 0 (rows)
    is dynamic: a constant bucket width lets inductor vectorize (~1.8x faster). Each combination of
    the non-tensor arguments compiles its own copy of `fn` (a new code object): dynamo's recompile
    limit counts per function, and the process-wide limit is the user's."""
    if os.environ.get("DISTQ_COMPILE", "1") == "0":
        return fn
    variants: dict[tuple, Callable] = {}
    failed = False

    def run(*args):
        nonlocal failed
        if failed:
            return fn(*args)
        static = tuple(a for a in args if not isinstance(a, Tensor))
        fast = variants.get(static)
        if fast is None:
            copy = types.FunctionType(
                fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
            )
            fast = variants[static] = torch.compile(copy, dynamic=False)
        for arg in args:
            if isinstance(arg, Tensor) and arg.dim() >= 1:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        try:
            return fast(*args)
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            log.warning("torch.compile failed for %s (%s); using eager kernels", fn.__name__, exc)
            failed = True
            return fn(*args)

    return run
