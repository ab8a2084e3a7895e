"""Compressors in one process: the level grid, unbiasedness and variance against the exact
per-element theory, the rounding noise, NaN/Inf and zero handling, payload sizes, determinism
(compiled == eager bit for bit), sign and error feedback, TernGrad, and argument checks.

Statistical assertions use Bernstein's inequality with a stated failure probability: for T iid
samples with |Y − EY| ≤ M and Var Y ≤ V, P(|Ȳ − EY| ≥ √(2VL/T) + 2ML/(3T)) ≤ 2e^{−L}. With
L = ln(2/δ), δ = 1e-9 per element, the union over every element checked here stays below 1e-4.
The noise is a deterministic hash of the key, so each test is deterministic: these bounds say
how unlikely a correct implementation is to fail for a fresh choice of keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from scipy import stats

from distq.comm import (
    COMPRESSORS,
    ErrorFeedback,
    Key,
    SignCompressor,
    StochasticQuantizer,
    compressors,
    kernels,
    make_compressor,
    terngrad,
)
from distq.comm.wire import split
from distq.packing import pack

DELTA = 1e-9  # failure probability per checked element
L = math.log(2 / DELTA)
EPS32 = 2.0**-24  # float32 unit roundoff (also the resolution of the rounding noise)
# float32 slack for one decode or a mean of decodes, relative to the bucket scale: the level is
# |x|/s·k in float32 (error ≤ k·2^-23 levels), the noise has 24-bit resolution (2^-24 levels),
# and (code − k)·(s/k) is rounded once more: all together well below 2^-19·s.
TINY = 2.0**-19


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    """Eager kernels: the statistics need thousands of small calls, where compiling only costs.
    `kernels.compiled` caches its decision per kernel, so the cache is cleared on both sides."""
    monkeypatch.setenv("DISTQ_COMPILE", "0")
    kernels.compiled.cache_clear()
    yield
    kernels.compiled.cache_clear()


# ----------------------------------------------------------------------------------- helpers


def bucket_scales(x: torch.Tensor, bucket: int | None) -> torch.Tensor:
    """max|x| per bucket of the flat tensor (the last bucket may be partial)."""
    size = bucket or x.numel()
    return torch.stack([c.abs().max() for c in x.split(size)])


def per_element(scales: torch.Tensor, numel: int, bucket: int | None) -> torch.Tensor:
    return scales.repeat_interleave(bucket or numel)[:numel]


def rounding_variance(x: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """Exact Var Q(x) per element (float64): (s/k)²·p(1−p), p = frac(|x|/s·k); 1 bit: s² − x²."""
    x, s = x.double(), s.double()
    if k == 0:
        return (s**2 - x**2).clamp_min(0)
    level = torch.where(s > 0, x.abs() / s * k, 0.0)
    p = level - level.floor()
    return (s / k) ** 2 * p * (1 - p)


def bernstein(var: torch.Tensor, bound: torch.Tensor, T: int) -> torch.Tensor:
    """Half-width of the 1 − δ interval of a mean of T iid samples (Var ≤ var, |Y−EY| ≤ bound)."""
    return torch.sqrt(2 * var * L / T) + 2 * bound * L / (3 * T)


def decode_many(q, x: torch.Tensor, T: int, scales=None, **key) -> torch.Tensor:
    """[T, numel] float64 decodes of x under keys with steps 0..T−1."""
    return torch.stack(
        [
            q.decompress(q.compress(x, Key(step=t, **key), scales), x.numel()).double()
            for t in range(T)
        ]
    )


def payload_scales(q, payload: torch.Tensor, numel: int) -> torch.Tensor:
    return split(payload, numel, q.wire)[1]


def sample(numel: int, seed: int) -> torch.Tensor:
    """Gaussian values with heavier outliers, exact zeros and a repeated bucket max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    x[::37] *= 4.0
    x[5::50] = 0.0
    if numel > 7:
        x[7] = -x.abs().max()  # a tie with the max (negative)
    return x


# ------------------------------------------------------------------------ 1. the level grid


@pytest.mark.parametrize("bucket", [64, None])
@pytest.mark.parametrize("bits", range(1, 9))
def test_decoded_values_lie_on_the_level_grid(bits, bucket):
    x = sample(1000, seed=bits)
    q = StochasticQuantizer(bits, bucket)
    assert q.k == 2 ** (bits - 1) - 1
    assert q.delta == (1.0 if bits == 1 else 1.0 / q.k)
    s_true = bucket_scales(x, bucket)
    for step in range(3):
        payload = q.compress(x, Key(step=step))
        assert payload.dtype == torch.uint8
        s_wire = payload_scales(q, payload, x.numel())
        assert torch.equal(s_wire, s_true)  # fp32 scales: max|x| exactly
        s = per_element(s_wire, x.numel(), bucket)
        dec = q.decompress(payload, x.numel())
        assert dec.dtype == torch.float32 and dec.shape == x.shape
        if bits == 1:
            assert torch.equal(dec.abs(), s)
            continue
        spacing = s / q.k
        r = torch.round(dec / spacing)
        assert (r.abs() <= q.k).all()
        torch.testing.assert_close(dec, r * spacing, rtol=4 * EPS32, atol=0)
        # stochastic rounding moves to one of the two nearest levels only, keeping the sign
        level = x.abs().double() / s.double() * q.k
        lo, hi = level.floor() - 1e-6, level.ceil() + 1e-6  # float32 vs float64 level
        assert ((r.abs() >= lo) & (r.abs() <= hi)).all()
        assert (r * x.sign() >= 0).all()
        # the bucket max sits on the top level: it decodes to ±s (k·(s/k) in float32)
        top = x.abs() == s
        torch.testing.assert_close(dec[top], s[top] * x[top].sign(), rtol=2 * EPS32, atol=0)


# ----------------------------------------------------------------------- 2. unbiasedness


@pytest.mark.parametrize("bucket", [64, None])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_unbiased_per_element_against_exact_variance(bits, bucket):
    T = 1000
    x = sample(1000, seed=10 + bits)
    q = StochasticQuantizer(bits, bucket)
    s = per_element(bucket_scales(x, bucket), x.numel(), bucket).double()
    var = rounding_variance(x, s, q.k)
    spread = 2 * s if bits == 1 else s / q.k  # |Q(x) − x| ≤ one level spacing (2s for ±s)
    mean = decode_many(q, x, T).mean(dim=0)
    err = (mean - x.double()).abs()
    limit = bernstein(var, spread, T) + TINY * s
    assert (err <= limit).all(), f"worst excess {(err - limit).max():.3g}"
    # the spread of the errors is the one the theory predicts (no extra correlation, no
    # deterministic rounding): mean z² ≈ 1 over the elements whose noise dominates float error
    sd = torch.sqrt(var / T)
    noisy = sd > 10 * TINY * s
    assert noisy.sum() > 800
    z2 = ((mean - x.double())[noisy] / sd[noisy]) ** 2
    assert 0.7 <= z2.mean() <= 1.3, z2.mean()


# -------------------------------------------------------------------------- 3. the variance


@pytest.mark.parametrize("bucket", [64, None])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mean_squared_error_matches_theory_and_lemma_3_bound(bits, bucket):
    T = 400
    x = sample(1000, seed=20 + bits)
    q = StochasticQuantizer(bits, bucket)
    s_b = bucket_scales(x, bucket).double()
    s = per_element(s_b, x.numel(), bucket)
    xd = x.double()
    sq_err = ((decode_many(q, x, T) - xd) ** 2).sum(dim=1)  # ‖Q(g) − g‖² per key
    # exact E‖Q(g) − g‖² and the exact variance of one ‖Q(g) − g‖² (independent elements:
    # e² takes (s/k)²(1−p)² w.p. p and (s/k)²p² w.p. 1−p, so Var e² = (s/k)⁴p(1−p)(1−2p)²)
    level = xd.abs() / s * q.k
    p = level - level.floor()
    expected = ((s / q.k) ** 2 * p * (1 - p)).sum()
    sd = torch.sqrt(((s / q.k) ** 4 * p * (1 - p) * (1 - 2 * p) ** 2).sum() / T)
    # the mean over T keys of a sum of 1000 independent bounded terms: Gaussian, 6.5σ
    tol = math.sqrt(2 * L) * sd + 2 * TINY * (s**2).sum() / q.k
    assert abs(sq_err.mean() - expected) <= tol, (sq_err.mean(), expected, tol)
    # Lemma 3: E‖Q(g) − g‖² ≤ Δ_g‖g‖_∞‖g‖₁ per bucket, Δ_g = 1/k, summed over buckets
    size = bucket or x.numel()
    l1 = torch.stack([c.abs().sum() for c in xd.split(size)])
    lemma = (q.delta * s_b * l1).sum()
    assert expected <= lemma
    assert sq_err.mean() <= lemma


# ---------------------------------------------------------------------- 4. the rounding noise


def test_noise_is_uniform_and_uncorrelated():
    n = 1_000_000
    u = Key(seed=3, step=7, rank=1, slot=2, phase=0).uniform(n).double()
    assert u.shape == (n,) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) <= 6 * math.sqrt(1 / 12 / n)
    # Var of (u − ½)² for U(0,1) is 1/80 − 1/144 = 1/180
    assert abs(u.var() - 1 / 12) <= 6 * math.sqrt(1 / 180 / n)
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum().item()
    p_value = stats.chi2.sf(chi2, df=63)
    assert DELTA < p_value < 1 - DELTA, chi2  # neither non-uniform nor suspiciously regular
    # consecutive indices (and a few more lags) are uncorrelated: corr ~ N(0, 1/n)
    c = u - u.mean()
    for lag in (1, 2, 3, 64, 512):
        corr = (c[:-lag] * c[lag:]).mean() / c.var()
        assert abs(corr) <= 6 / math.sqrt(n), (lag, corr)


def test_different_keys_give_different_independent_streams():
    n = 200_000
    base = dict(seed=1, step=5, rank=2, slot=3, phase=0)
    keys = [Key(**base)] + [Key(**{**base, f: base[f] + 1}) for f in base]
    assert len({k.value() for k in keys}) == len(keys)
    streams = [k.uniform(n).double() for k in keys]
    for i in range(len(keys)):
        for j in range(i):
            a, b = streams[i], streams[j]
            assert (a == b).double().mean() < 1e-3  # 24-bit values: ~n·2^-24 ties by chance
            corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
            assert abs(corr) <= 6 / math.sqrt(n), (keys[i], keys[j], corr)
    # the same key is the same stream, and a prefix of a longer one
    assert torch.equal(keys[0].uniform(n), Key(**base).uniform(n))
    assert torch.equal(keys[0].uniform(1000), streams[0][:1000].float())
    # many small keys (steps × ranks) fold to distinct 32-bit values
    values = {Key(step=t, rank=r).value() for t in range(250) for r in range(4)}
    assert len(values) == 1000


def fmix32_uniform(i: int, key: int) -> float:
    """MurmurHash3's fmix32 of (i·φ + key) mod 2³² in plain Python integers, top 24 bits."""
    h = (i * 0x9E3779B1 + key) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return (h >> 8) * 2.0**-24


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_noise_is_fmix32_of_the_element_index_even_past_2_to_the_32(compiled):
    """The int32 arithmetic of the kernel equals unsigned 32-bit arithmetic, including indices
    that overflow int32 and uint32 (element offsets of a huge tensor)."""
    key = Key(seed=5, step=11, rank=3)
    starts = [0, 2**31 - 70, 2**32 - 70, 3 * 2**32 + 12_345]
    index = torch.cat([torch.arange(s, s + 140, dtype=torch.int64) for s in starts])
    hash_uniform = kernels.compiled(kernels.hash_uniform) if compiled else kernels.hash_uniform
    u = hash_uniform(index, key.tensor())
    expected = torch.tensor([fmix32_uniform(int(i), key.value()) for i in index])
    assert torch.equal(u, expected)


# ----------------------------------------------------------------------- 5. zeros, NaN, Inf

CODECS = [
    pytest.param(lambda: StochasticQuantizer(1, 64), id="q1"),
    pytest.param(lambda: StochasticQuantizer(2, 64), id="q2"),
    pytest.param(lambda: StochasticQuantizer(8, 64), id="q8"),
    pytest.param(lambda: StochasticQuantizer(3, 64, torch.float16), id="q3-fp16"),
    pytest.param(lambda: SignCompressor(64), id="sign"),
    pytest.param(lambda: terngrad(64), id="terngrad"),
]


@pytest.mark.parametrize("make", CODECS)
def test_zero_tensor_decodes_to_exact_zeros(make):
    q = make()
    for numel in (1, 100, 192):
        payload = q.compress(torch.zeros(numel), Key(step=numel))
        dec = q.decompress(payload, numel)
        assert torch.isfinite(dec).all()
        assert (dec == 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("make", CODECS)
def test_non_finite_value_poisons_only_its_bucket(make, bad):
    q = make()
    x = sample(200, seed=5)  # buckets [0,64) [64,128) [128,192) [192,200)
    x[70] = bad
    dec = q.decompress(q.compress(x, Key()), x.numel())
    assert torch.isnan(dec[64:128]).all()
    rest = torch.cat([dec[:64], dec[128:]])
    assert torch.isfinite(rest).all()
    clean = x.clone()
    clean[64:128] = 0.0
    # the other buckets decode exactly as they would without the bad bucket
    expected = q.decompress(q.compress(clean, Key()), x.numel())
    assert torch.equal(rest, torch.cat([expected[:64], expected[128:]]))


def test_non_finite_without_buckets_poisons_everything():
    q = StochasticQuantizer(2, None)
    x = sample(300, seed=6)
    x[123] = math.nan
    assert torch.isnan(q.decompress(q.compress(x, Key()), x.numel())).all()


# ------------------------------------------------------------------------ 6. payload sizes


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bucket", [1, 64, 100, None])
def test_payload_size(bucket, scale_dtype):
    scale_bytes = 4 if scale_dtype == torch.float32 else 2
    for bits in range(1, 9):
        q = StochasticQuantizer(bits, bucket, scale_dtype)
        for numel in (1, 7, 63, 64, 65, 100, 333, 1000, 1023):
            n_buckets = 1 if bucket is None else math.ceil(numel / bucket)
            expected = math.ceil(numel * bits / 8) + n_buckets * scale_bytes
            assert q.wire.payload_nbytes(numel) == expected
            x = sample(numel, seed=numel)
            payload = q.compress(x, Key(step=bits))
            assert payload.shape == (expected,) and payload.dtype == torch.uint8
            assert q.decompress(payload, numel).shape == (numel,)
            with pytest.raises(ValueError, match="bytes"):
                q.decompress(payload[:-1], numel)


def reference_layout(codes: list[int], bits: int, width: int) -> list[int]:
    """Wire layout 2 in plain Python (comm/wire.py): each whole row of `width` codes as 8/bits
    planes, byte j holding codes j + t·width·bits/8 at bit t·bits; a partial last row LSB-first
    in element order."""
    per_byte, out = 8 // bits, []
    whole = len(codes) // width * width
    for r0 in range(0, whole, width):
        plane = width // per_byte
        for j in range(plane):
            out.append(sum(codes[r0 + j + t * plane] << (t * bits) for t in range(per_byte)))
    tail = codes[whole:]
    for b0 in range(0, len(tail), per_byte):
        out.append(sum(c << (t * bits) for t, c in enumerate(tail[b0 : b0 + per_byte])))
    return out


@pytest.mark.parametrize(
    "make, width",
    [
        pytest.param(lambda: StochasticQuantizer(1, 64), 64, id="q1"),
        pytest.param(lambda: StochasticQuantizer(2, 64), 64, id="q2"),
        pytest.param(lambda: StochasticQuantizer(4, 32), 32, id="q4"),
        pytest.param(lambda: StochasticQuantizer(8, 16), 16, id="q8"),
        pytest.param(lambda: StochasticQuantizer(2, None), 4096, id="q2-one-scale"),
        pytest.param(lambda: SignCompressor(64), 64, id="sign"),
    ],
)
@pytest.mark.parametrize("numel", [192, 192 + 37, 3, 2 * 4096 + 5])
def test_codes_are_in_the_documented_planar_layout(make, width, numel):
    """The code bytes match a plain-Python packing of the element codes: the codes themselves
    are read back one at a time from decoded values, so this pins the byte layout alone."""
    q = make()
    x = sample(numel, seed=numel) * 2
    payload = q.compress(x, Key(seed=5, step=numel))
    values = q.decompress(payload, numel)
    _, scales = split(payload, numel, q.wire)
    s = per_element(scales, numel, q.wire.bucket_size)
    # ±s -> 1/0 for the 1-bit codes, (code − k)·s/k -> code otherwise
    levels = torch.round(values / s * q.k).long() + q.k
    codes = (values > 0).long() if q.k == 0 else levels
    code_bytes = payload[: q.wire.code_nbytes(numel)].tolist()
    assert code_bytes == reference_layout(codes.tolist(), q.wire.bits, width)


@pytest.mark.parametrize("bits, bucket", [(3, 100), (1, 7), (2, 33), (5, 16)])
def test_widths_off_the_planar_layout_are_one_stream_across_blocks(monkeypatch, bits, bucket):
    """Widths with no planar layout (rows off whole bytes included) are one LSB-first stream in
    element order, though encoded and decoded in blocks of a few rows (BLOCK_ELEMENTS = 64)."""
    monkeypatch.setattr(compressors, "BLOCK_ELEMENTS", 64)
    q, numel = StochasticQuantizer(bits, bucket), 1001
    payload = q.compress(sample(numel, seed=bits) * 2, Key(seed=5, step=bits))
    values = q.decompress(payload, numel)
    _, scales = split(payload, numel, q.wire)
    s = per_element(scales, numel, bucket)
    codes = (values > 0).long() if q.k == 0 else torch.round(values / s * q.k).long() + q.k
    assert torch.equal(payload[: q.wire.code_nbytes(numel)], pack(codes, bits))


@pytest.mark.parametrize("start", [0, 2**31 - 64, 2**32 - 64, 3 * 2**32 + 12345])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_whole_rows_draw_the_noise_of_their_int64_index(bits, start):
    """The planar kernel hashes the index in int32 lanes (mod 2³²): its codes equal the
    element-order kernel's, which indexes in int64, at offsets around 2³¹ and past 2³²."""
    q, key = StochasticQuantizer(bits, 64), Key(seed=3, step=1, rank=2)
    x = sample(4 * 64, seed=bits)
    payload = q.compress(x, key, start=start)
    _, scales = split(payload, x.numel(), q.wire)
    reference = kernels.stochastic_codes(
        x.view(4, 64),
        scales,
        key.tensor(x.device),
        torch.tensor(start),
        torch.tensor(start + x.numel()),
        q.k,
    ).reshape(-1)
    expected = reference_layout(reference.tolist(), bits, 64)
    assert payload[: q.wire.code_nbytes(x.numel())].tolist() == expected


@pytest.mark.parametrize("bucket", [64, None])
def test_empty_tensor_round_trips(bucket):
    q = StochasticQuantizer(2, bucket)
    payload = q.compress(torch.zeros(0), Key())
    assert payload.numel() == q.wire.payload_nbytes(0) == 0
    assert q.decompress(payload, 0).shape == (0,)


def test_fp16_scale_rounds_up_and_stays_unbiased():
    T = 2000
    ulp1 = 2.0**-10  # fp16 spacing in [1, 2)
    # bucket maxima that fp16 cannot hold; round-to-nearest would go down for the first three
    maxima = [1 + 0.4 * ulp1, 0.0123456, 3.14159e-3, 1e-9, 60000.5, 2.0 + 1.7 * 2 * ulp1]
    g = torch.Generator().manual_seed(0)
    x = torch.cat([(torch.rand(64, generator=g) * 2 - 1) * m for m in maxima])
    for b, m in enumerate(maxima):
        x[64 * b + 3] = m
    q = StochasticQuantizer(8, 64, torch.float16)
    payload = q.compress(x, Key())
    s16 = payload_scales(q, payload, x.numel())
    true = bucket_scales(x, 64)
    assert torch.equal(s16.half().float(), s16)  # representable in fp16
    assert (s16 >= true).all()  # never below the max: nothing is clipped
    below = torch.nextafter(s16.half(), torch.tensor(-math.inf, dtype=torch.half)).float()
    assert (below < true).all()  # and the smallest fp16 that is not
    assert (s16[:3] > true[:3].half().float()).all()  # (these did need rounding up)
    dec = decode_many(q, x, T)
    s = per_element(s16, x.numel(), 64).double()
    assert (dec.abs() <= s * (1 + 2 * EPS32)).all()  # within s16 (k·(s/k) in float32)
    tops = torch.arange(len(maxima)) * 64 + 3
    var = rounding_variance(x[tops], s[tops], q.k)
    err = (dec[:, tops].mean(dim=0) - x[tops].double()).abs()
    assert (err <= bernstein(var, s[tops] / q.k, T) + TINY * s[tops]).all()


def test_fp16_scale_overflow_keeps_finite_values_finite():
    q = StochasticQuantizer(2, 64, torch.float16)
    x = torch.tensor([70000.0, 1.0, -2.0])
    dec = q.decompress(q.compress(x, Key()), x.numel())
    assert torch.isfinite(dec).all()
    assert dec[0] == torch.finfo(torch.float16).max  # the scale saturates: 70000 clips to 65504


# -------------------------------------------------------------------------- 7. determinism


def test_same_key_same_bytes_other_key_other_bytes():
    x = sample(5000, seed=7)
    for bits in (1, 2, 5):
        q = StochasticQuantizer(bits, 512)
        key = Key(seed=1, step=2, rank=3, slot=4, phase=0)
        payload = q.compress(x, key)
        assert torch.equal(payload, q.compress(x, key))
        assert torch.equal(payload, StochasticQuantizer(bits, 512).compress(x.clone(), key))
        for field in ("seed", "step", "rank", "slot", "phase"):
            other = dataclasses.replace(key, **{field: getattr(key, field) + 1})
            assert not torch.equal(payload, q.compress(x, other)), field


EAGER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from distq.comm import Key, StochasticQuantizer
    x = torch.load(sys.argv[1])
    out = {}
    for bits in (1, 2, 3):
        q = StochasticQuantizer(bits, 512)
        payload = q.compress(x, Key(seed=9, step=bits))
        out[bits] = (payload, q.decompress(payload, x.numel()))
    torch.save(out, sys.argv[2])
    """
)


@pytest.fixture
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("DISTQ_COMPILE", raising=False)
    kernels.compiled.cache_clear()
    yield
    kernels.compiled.cache_clear()


def test_compiled_and_eager_payloads_are_bit_identical(tmp_path, compiled_kernels, caplog):
    x = sample(100_003, seed=8)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "DISTQ_COMPILE": "0"}
    eager = subprocess.Popen(
        [sys.executable, "-c", EAGER_SCRIPT, str(tmp_path / "x.pt"), str(tmp_path / "e.pt")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        compiled = {}
        for bits in (1, 2, 3):
            q = StochasticQuantizer(bits, 512)
            payload = q.compress(x, Key(seed=9, step=bits))
            compiled[bits] = (payload, q.decompress(payload, x.numel()))
    assert not caplog.records, "torch.compile fell back to eager: nothing compiled to compare"
    _, err = eager.communicate(timeout=300)
    assert eager.returncode == 0, err
    eager_out = torch.load(tmp_path / "e.pt")
    for bits in (1, 2, 3):
        assert torch.equal(compiled[bits][0], eager_out[bits][0]), bits
        assert torch.equal(compiled[bits][1], eager_out[bits][1]), bits


ROW_CODECS = [
    pytest.param(lambda: StochasticQuantizer(2, 512), id="q2"),
    pytest.param(lambda: StochasticQuantizer(4, 128), id="q4"),
    pytest.param(lambda: StochasticQuantizer(3, 512), id="q3-unfused"),
    pytest.param(lambda: StochasticQuantizer(8, 256, torch.float16), id="q8-fp16"),
    pytest.param(lambda: StochasticQuantizer(2, None), id="q2-one-scale"),
    pytest.param(lambda: SignCompressor(384), id="sign"),
]


@pytest.mark.parametrize("make", ROW_CODECS)
@pytest.mark.parametrize("length", [3 * 1536, (1 << 20) + 1536], ids=["short", "over-a-block"])
def test_row_methods_equal_one_payload_at_a_time(make, length):
    """compress_rows / decode_rows_into / decode_sum_into (the collectives' batched calls) give
    the bytes and values of compress / decompress_into called payload by payload, NaN too."""
    q, rows, start, key = make(), 3, 1000, Key(seed=2, step=4, rank=1)
    x = sample(rows * length, seed=length) * 3
    x[length + 7] = math.nan
    payloads = q.compress_rows(x, rows, key, start)
    one_by_one = torch.stack(
        [q.compress(p, key, start=start + i * length) for i, p in enumerate(x.view(rows, -1))]
    )
    assert torch.equal(payloads, one_by_one)
    decoded = [q.decompress(p, length) for p in payloads]
    out = torch.empty(rows * length)
    q.decode_rows_into(payloads, out)
    assert torch.equal(out.nan_to_num(7), torch.cat(decoded).nan_to_num(7))
    assert out.isnan().any()
    base = sample(length, seed=1)
    summed = q.decode_sum_into(payloads, base.clone(), skip=1, accumulate=True)
    expected = base.clone().add_(decoded[0]).add_(decoded[2])
    assert torch.equal(summed, expected)  # row 1 (with the NaN) skipped
    overwritten = q.decode_sum_into(payloads, torch.full((length,), 5.0))
    expected = decoded[0].clone().add_(decoded[1]).add_(decoded[2])
    assert torch.equal(overwritten.nan_to_num(7), expected.nan_to_num(7))
    with pytest.raises(ValueError, match="payload"):
        q.decode_rows_into(payloads[:, :-1], out)


# ------------------------------------------------------------- 8. sign and error feedback


@pytest.mark.parametrize("numel", [256, 200, 1])
def test_sign_compressor_decodes_sign_times_mean_abs(numel):
    x = sample(max(numel, 8), seed=11)[:numel]
    x[::9] = 0.0  # sign(0) → +
    x[4::9] = -0.0
    q = SignCompressor(64)
    dec = q.decompress(q.compress(x, Key()), numel)
    means = torch.stack([c.abs().mean() for c in x.split(64)])
    s = per_element(means, numel, 64)
    sign = torch.where(x >= 0, 1.0, -1.0)
    torch.testing.assert_close(dec, sign * s, rtol=4 * EPS32, atol=0)


def test_sign_compressor_without_buckets():
    x = sample(300, seed=12)
    q = SignCompressor(None)
    dec = q.decompress(q.compress(x, Key()), x.numel())
    torch.testing.assert_close(dec, torch.where(x >= 0, 1.0, -1.0) * x.abs().mean())


@pytest.mark.parametrize(
    "inner",
    [
        pytest.param(lambda: SignCompressor(64), id="sign"),
        pytest.param(lambda: StochasticQuantizer(2, 64), id="q2"),
    ],
)
def test_error_feedback_residual_and_telescoping(inner):
    T, numel = 60, 256
    ef = ErrorFeedback(inner())
    assert ef.wire == ef.inner.wire
    g = torch.Generator().manual_seed(13)
    sum_x = torch.zeros(numel, dtype=torch.float64)
    sum_dec = torch.zeros(numel, dtype=torch.float64)
    rounding = torch.zeros(numel, dtype=torch.float64)
    for t in range(T):
        x = torch.randn(numel, generator=g) * (1 + t % 3)
        old = ef.residuals.get(0, torch.zeros(numel)).clone()
        payload = ef.compress(x, Key(step=t, slot=0, phase=0))
        dec = ef.decompress(payload, numel)
        target = x + old
        # the stored residual is exactly what this step failed to send
        assert torch.equal(ef.residuals[0], target - dec)
        # the payload is the inner compressor's payload of the compensated input
        assert torch.equal(payload, ef.inner.compress(target, Key(step=t, slot=0, phase=0)))
        # the residual stays bounded: below one level spacing (stochastic) or contracted by
        # at least (1 − 1/d) in squared norm per bucket (scaled sign, d = 64)
        e = ef.residuals[0]
        if isinstance(ef.inner, StochasticQuantizer):
            s = per_element(bucket_scales(target, 64), numel, 64)
            assert (e.abs() <= s * (1 + 4 * EPS32)).all()
        else:
            e2 = (e.double() ** 2).view(-1, 64).sum(1)
            t2 = (target.double() ** 2).view(-1, 64).sum(1)
            assert (e2 <= (1 - 1 / 64) * t2 * (1 + 8 * EPS32)).all()
        sum_x += x.double()
        sum_dec += dec.double()
        rounding += (target.double().abs() + e.double().abs()) * EPS32
    e_T = ef.residuals[0].double()
    # telescoping: Σ decoded = Σ x − e_T, up to the float32 rounding of each x + e and e
    assert ((sum_dec - (sum_x - e_T)).abs() <= rounding + 1e-12).all()
    assert e_T.norm() > 0  # (the identity is not trivial: something was left behind)


def test_error_feedback_phase_one_passes_through_and_slots_are_separate():
    q = StochasticQuantizer(2, 64)
    ef = ErrorFeedback(StochasticQuantizer(2, 64))
    x, y = sample(128, seed=14), sample(100, seed=15)
    ef.compress(x, Key(slot=0))
    r0 = ef.residuals[0].clone()
    # phase 1 (re-quantization of reduced data): no compensation, nothing stored or changed
    for slot in (0, 7):
        key = Key(step=3, slot=slot, phase=1)
        z = x if slot == 0 else y
        assert torch.equal(ef.compress(z, key), q.compress(z, key))
        assert torch.equal(ef.scales(z, key), q.scales(z, key))
    assert set(ef.residuals) == {0}
    assert torch.equal(ef.residuals[0], r0)
    # another slot has its own residual of its own size
    ef.compress(y, Key(slot=1))
    assert ef.residuals[1].shape == (100,)
    assert torch.equal(ef.residuals[0], r0)
    # a slot whose size changed is an error until reset()
    with pytest.raises(ValueError, match="slot 0 holds 128 elements"):
        ef.compress(y, Key(step=1, slot=0))
    ef.reset()
    assert ef.residuals == {}
    ef.compress(y, Key(step=1, slot=0))
    assert ef.residuals[0].shape == (100,)


def test_error_feedback_drops_non_finite_residuals():
    ef = ErrorFeedback(StochasticQuantizer(2, 64))
    x = sample(128, seed=16)
    x[3] = math.nan
    ef.compress(x, Key())
    assert torch.isfinite(ef.residuals[0]).all()
    assert (ef.residuals[0][:64] == 0).all()


# ------------------------------------------------------------------------------ 9. TernGrad


def test_terngrad_wire_format():
    for q in (terngrad(), make_compressor("terngrad", bits=2, bucket_size=None)):
        assert isinstance(q, StochasticQuantizer)
        assert (q.wire.bits, q.wire.bucket_size, q.wire.shared_scale) == (2, None, True)
        assert q.k == 1
    assert terngrad(128).wire.bucket_size == 128
    # bits=5 silently sent 2 bits while checkpoints recorded 5
    with pytest.raises(ValueError, match="bits=5 with compressor 'terngrad'"):
        make_compressor("terngrad", bits=5)
    with pytest.raises(ValueError, match="bits=4 with compressor 'sign'"):
        make_compressor("sign", bits=4)
    assert not StochasticQuantizer(2, None).wire.shared_scale


@pytest.mark.parametrize("bucket", [None, 64])
def test_terngrad_with_a_larger_shared_scale_is_unbiased(bucket):
    T = 1000
    x = sample(300, seed=17)
    q = terngrad(bucket)
    local = q.scales(x, Key())
    assert torch.equal(local, bucket_scales(x, bucket))
    shared = local * torch.linspace(1.5, 3.0, local.numel())  # e.g. the max over other ranks
    payload = q.compress(x, Key(), scales=shared)
    assert torch.equal(payload_scales(q, payload, x.numel()), shared)
    s = per_element(shared, x.numel(), bucket).double()
    dec = decode_many(q, x, T, scales=shared)
    assert ((dec == 0) | (dec == s) | (dec == -s)).all()  # {−s, 0, s}
    var = rounding_variance(x, s, 1)
    err = (dec.mean(dim=0) - x.double()).abs()
    assert (err <= bernstein(var, s, T) + TINY * s).all()
    # the local max no longer sits on a level: it is rounded stochastically too
    top = x.abs().argmax()
    assert 0 < (dec[:, top] == 0).double().mean() < 1


# ------------------------------------------------------------------------ 10. bad arguments


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"allowed: 1\.\.8"):
        StochasticQuantizer(bits)
    with pytest.raises(ValueError, match=r"1\.\.8"):
        make_compressor("quantize", bits=bits)


@pytest.mark.parametrize("bucket", [0, -64])
def test_bucket_size_must_be_positive(bucket):
    with pytest.raises(ValueError, match="bucket_size"):
        StochasticQuantizer(2, bucket)
    with pytest.raises(ValueError, match="bucket_size"):
        SignCompressor(bucket)
    with pytest.raises(ValueError, match="bucket_size"):
        terngrad(bucket)


def test_scale_dtype_must_be_fp32_or_fp16():
    with pytest.raises(ValueError, match="float32, float16"):
        StochasticQuantizer(2, 64, torch.bfloat16)


def test_make_compressor_kinds():
    with pytest.raises(ValueError, match="'foo'") as info:
        make_compressor("foo")
    for kind in ("quantize", "terngrad", "sign", "rotated", "rotated-stochastic"):
        assert kind in str(info.value)
    assert set(COMPRESSORS) == {"quantize", "terngrad", "sign", "rotated", "rotated-stochastic"}
    q = make_compressor("quantize", bits=3, bucket_size=128, scale_dtype=torch.float16)
    assert isinstance(q, StochasticQuantizer)
    assert (q.wire.bits, q.wire.bucket_size, q.wire.scale_dtype) == (3, 128, torch.float16)
    sign = make_compressor("sign", bucket_size=32)
    assert isinstance(sign, SignCompressor) and sign.wire.bits == 1
    ef = make_compressor("sign", bucket_size=32, error_feedback=True)
    assert isinstance(ef, ErrorFeedback) and isinstance(ef.inner, SignCompressor)
    assert ef.wire == sign.wire
