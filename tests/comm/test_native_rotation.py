"""The rotated codec's C kernels (comm/rotation_kernel.c through comm/native.py) against the
torch path they replace on CPU: decoding bit for bit, encoding code for code with scales to
float32 rounding, the same answers on non-finite and zero buckets, and the fallback when no
compiler works."""

from __future__ import annotations

import logging

import pytest
import torch

from distq.comm import Key, native
from distq.comm.rotation import RotatedQuantizer, butterfly, sylvester

CASES = [(bits, width) for bits in (1, 2, 4) for width in (8, 64, 512, 4096)]


@pytest.fixture
def torch_path(monkeypatch):
    """A function running its argument with the C kernels off, then on again."""

    def run(fn):
        monkeypatch.setenv("DISTQ_NATIVE", "0")
        native.library.cache_clear()
        try:
            return fn()
        finally:
            monkeypatch.delenv("DISTQ_NATIVE")
            native.library.cache_clear()

    return run


def test_the_kernels_build_here():
    assert native.library() is not None, "cc builds comm/rotation_kernel.c on this machine"


@pytest.mark.parametrize("width", [8, 64, 512])
def test_the_staged_butterfly_is_the_hadamard_matrix(width):
    """Exact on integers, within float32 rounding of H·v in float64 on floats."""
    g = torch.Generator().manual_seed(width)
    h = sylvester(width).double()
    integers = torch.randint(-50, 50, (5, width), generator=g).float()
    assert torch.equal(butterfly(integers), (integers.double() @ h).float())
    floats = torch.randn(5, width, generator=g)
    torch.testing.assert_close(butterfly(floats).double(), floats.double() @ h, rtol=0, atol=1e-4)


def _input(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    x[: n // 7] *= 1e-3  # buckets of very different norms
    return x


@pytest.mark.parametrize(("bits", "width"), CASES)
def test_decoding_is_the_torch_paths_bit_for_bit(bits, width, torch_path):
    """Every decode the collectives make (fresh, accumulated, rows, the owner's sum with a row
    skipped), a partial last bucket included."""
    q, key, rows = RotatedQuantizer(bits, width), Key(seed=2, step=5, slot=1), 3
    n = width * 5 - 3
    x = _input(rows * n, bits + width)
    payloads = torch.stack([q.compress(part, key) for part in x.view(rows, n)])
    base = _input(n, 99)

    def decodes():
        return [
            q.decompress_into(payloads[0], torch.empty(n), key=key),
            q.decompress_into(payloads[1], base.clone(), accumulate=True, key=key),
            q.decode_rows_into(payloads, torch.empty(rows * n), key=key),
            q.decode_sum_into(payloads, base.clone(), skip=1, accumulate=True, key=key),
        ]

    for mine, theirs in zip(decodes(), torch_path(decodes), strict=True):
        assert torch.equal(mine.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize(("bits", "width"), CASES)
def test_encoding_gives_the_torch_paths_codes_and_scales(bits, width, torch_path):
    """Codes identical (a near-tie could round either way; none occurs in these inputs), scales
    within float32 rounding of sums taken in another order."""
    q, key = RotatedQuantizer(bits, width), Key(seed=4, step=1)
    x = _input(width * 9 - 5, bits * width)
    buckets = q.wire.buckets(x.numel())
    mine, theirs = q.compress(x, key), torch_path(lambda: q.compress(x, key))
    code_bytes = mine.numel() - 4 * buckets
    assert torch.equal(mine[:code_bytes], theirs[:code_bytes])
    scales = [p[code_bytes:].clone().view(torch.float32) for p in (mine, theirs)]
    torch.testing.assert_close(scales[0], scales[1], rtol=2e-6, atol=0)


def test_zero_and_non_finite_buckets(torch_path):
    """A zero bucket gets scale 0 and decodes to zeros; a bucket holding Inf or NaN gets a NaN
    scale (the NaN travels) and leaves its neighbours alone, as on the torch path."""
    q, key = RotatedQuantizer(2, 64), Key()
    x = torch.randn(64 * 4, generator=torch.Generator().manual_seed(0))
    x[:64] = 0.0
    x[64 + 5] = float("inf")
    x[128 + 9] = float("nan")
    payload = q.compress(x, key)
    scales = payload[-16:].clone().view(torch.float32)
    assert scales[0] == 0 and scales[1].isnan() and scales[2].isnan() and scales[3] > 0
    decoded = q.decompress(payload, x.numel(), key)
    assert torch.equal(decoded[:64], torch.zeros(64))
    assert decoded[64:192].isnan().all() and decoded[192:].isfinite().all()
    theirs = torch_path(lambda: q.decompress(payload, x.numel(), key))
    torch.testing.assert_close(decoded, theirs, equal_nan=True, rtol=0, atol=0)


def test_owner_stage_codes_alike(torch_path):
    """`scatter`'s owner re-quantizes in the rotated domain through the same kernel, its error
    sums (the monitor's re-quantization error) included."""
    q, key, owner = RotatedQuantizer(2, 512), Key(step=3), Key(step=3, rank=1, phase=1)
    x = _input(4 * 1024, 5)
    received = torch.stack([q.compress(part, key) for part in x.view(4, -1)])
    errors, their_errors = [0.0, 0.0], [0.0, 0.0]
    mine = q.requantize_sum(received, x.view(4, -1)[2], 2, key, owner, 0, errors)
    theirs = torch_path(
        lambda: q.requantize_sum(received, x.view(4, -1)[2], 2, key, owner, 0, their_errors)
    )
    assert errors[0] > 0 and errors[1] > 0
    torch.testing.assert_close(torch.tensor(errors), torch.tensor(their_errors), rtol=1e-5, atol=0)
    codes = mine.numel() - 4 * 2
    assert torch.equal(mine[:codes], theirs[:codes])
    torch.testing.assert_close(
        mine[codes:].clone().view(torch.float32), theirs[codes:].clone().view(torch.float32),
        rtol=2e-6, atol=0,
    )  # fmt: skip


def test_no_compiler_falls_back_to_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="distq.comm.native"):
            assert native.library() is None
        assert "torch path" in caplog.text
        q, key = RotatedQuantizer(2, 64), Key()
        x = torch.randn(640, generator=torch.Generator().manual_seed(1))
        decoded = q.decompress(q.compress(x, key), x.numel(), key)
        assert float((decoded - x).square().sum() / x.square().sum()) < 0.3
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_the_build_is_cached_by_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "distq").glob("rotation_kernel-*.so"))
        assert len(built) == 1 and not list((tmp_path / "distq").glob(".build-*"))
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp, "a second load reuses the build"
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
