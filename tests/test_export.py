"""Tests for distq.export: exact round trips of packed checkpoints, file size, errors, report.

Quantized tensors come from distq.quant.project, so each scheme's value set is exercised; sparse
ones (ternary-like, m-bit with extra zeros) are built at given densities.
"""

import base64
import json
import math
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from distq.export import LAYOUTS, QuantSpec, export_packed, layout_sizes, load_packed
from distq.packing import pack, uint_nbytes, unpack
from distq.quant import project


def quantized(shape, scheme, bits=None, per_channel=False, seed=0, dtype=torch.float32):
    """A tensor projected onto `scheme`'s set, in `dtype`."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return project(w, scheme=scheme, bits=bits, per_channel=per_channel).q


CASES = {
    # name: (tensor, spec)
    "ternary.weight": (quantized((32, 48), "ternary"), QuantSpec("ternary", 2)),
    "binary_pc.weight": (
        quantized((16, 40), "binary", per_channel=True, seed=1),
        QuantSpec("binary", 1, per_channel=True),
    ),
    "linear3.weight": (quantized((24, 30), "linear", bits=3, seed=2), QuantSpec("linear", 3)),
    "log4.weight": (quantized((20, 50), "log", bits=4, seed=3), QuantSpec("log", 4)),
    "ternary2.weight": (quantized((33, 17), "ternary2", seed=4), QuantSpec("ternary2", 2)),
    "half.weight": (
        quantized((12, 20), "ternary", seed=5, dtype=torch.float16),
        QuantSpec("ternary", 2),
    ),
    "bf16.weight": (
        quantized((12, 20), "linear", bits=5, seed=6, dtype=torch.bfloat16),
        QuantSpec("linear", 5),
    ),
    "conv.weight": (
        quantized((8, 3, 3, 3), "ternary", per_channel=True, seed=7),
        QuantSpec("ternary", 2, per_channel=True),
    ),
    "twn.weight": (quantized((10, 10), "twn", seed=8), QuantSpec("twn", 2)),
}


@pytest.fixture
def model_state():
    """Quantized tensors of every case plus full-precision biases and an int64 buffer."""
    state = {name: t for name, (t, _) in CASES.items()}
    state["ternary.bias"] = torch.randn(32)
    state["conv.bias"] = torch.randn(8, dtype=torch.float16)
    state["bn.num_batches_tracked"] = torch.tensor(1234, dtype=torch.int64)
    state["bn.running_mean"] = torch.randn(8).expand(2, 8).t()  # a non-contiguous view
    return state


def test_round_trip_exact(tmp_path, model_state):
    specs = {name: spec for name, (_, spec) in CASES.items()}
    path = tmp_path / "model.safetensors"
    report = export_packed(model_state, specs, path, metadata={"run": "test"})
    loaded = load_packed(path)
    assert set(loaded) == set(model_state)
    for name, t in model_state.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    assert report.file_bytes == os.path.getsize(path)
    assert {s.name for s in report.tensors if s.quantized} == set(specs)


def test_file_layout_and_metadata(tmp_path, model_state):
    specs = {"conv.weight": QuantSpec("ternary", 2, per_channel=True)}
    path = tmp_path / "model.safetensors"
    export_packed(model_state, specs, path, metadata={"run": "test"}, layouts=("dense",))
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        codes, codebook = f.get_tensor("conv.weight.codes"), f.get_tensor("conv.weight.codebook")
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("ternary.weight"), model_state["ternary.weight"])
    assert "conv.weight" not in keys and "conv.bias" in keys
    assert meta["run"] == "test"
    doc = json.loads(meta["distq"])
    assert doc["format"] == "distq-packed" and doc["layout_version"] == 2
    assert doc["tensors"]["conv.weight"] == {
        "shape": [8, 3, 3, 3],
        "dtype": "float32",
        "scheme": "ternary",
        "bits": 2,
        "per_channel": True,
        "layout": "dense",
    }
    assert codes.dtype == torch.uint8 and codes.numel() == 8 * 27 * 2 // 8
    assert codebook.dtype == torch.float32 and codebook.shape == (8, 4)


def test_ternary_file_is_14x_smaller_than_fp32(tmp_path):
    w = quantized((512, 512), "ternary", seed=11)
    packed_path, fp32_path = tmp_path / "packed.safetensors", tmp_path / "fp32.safetensors"
    report = export_packed({"w": w}, {"w": QuantSpec("ternary", 2)}, packed_path)
    save_file({"w": w}, fp32_path)
    packed_bytes, fp32_bytes = os.path.getsize(packed_path), os.path.getsize(fp32_path)
    assert fp32_bytes >= 14 * packed_bytes, (fp32_bytes, packed_bytes)
    assert report.file_bytes == packed_bytes
    assert report.ratio >= 14
    assert torch.equal(load_packed(packed_path)["w"], w)


def test_too_many_distinct_values(tmp_path):
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).repeat(4)
    with pytest.raises(ValueError, match=r"'layer\.weight'.*5 distinct.*2 bits"):
        export_packed({"layer.weight": w}, {"layer.weight": QuantSpec("linear", 2)}, tmp_path / "x")


def test_per_channel_counts_distinct_values_per_row(tmp_path):
    w = torch.arange(12.0).view(6, 2)  # 12 distinct values overall, 2 per row
    path = tmp_path / "x.safetensors"
    export_packed({"w": w}, {"w": QuantSpec("binary", 1, per_channel=True)}, path)
    assert torch.equal(load_packed(path)["w"], w)
    with pytest.raises(ValueError, match="12 distinct"):
        export_packed({"w": w}, {"w": QuantSpec("linear", 3)}, path)


def test_unknown_name(tmp_path):
    state = {"a.weight": torch.zeros(3), "a.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"b\.weight.*a\.weight"):
        export_packed(state, {"b.weight": QuantSpec("ternary", 2)}, tmp_path / "x")


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_outside_range(bits):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        QuantSpec("linear", bits)


def test_plain_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a distq"):
        load_packed(path)


def test_newer_layout_version_is_rejected(tmp_path):
    path = tmp_path / "future.safetensors"
    doc = {"format": "distq-packed", "layout_version": 3, "tensors": {}}
    save_file({"w": torch.zeros(3)}, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match=r"layout_version 3.*1\.\.2"):
        load_packed(path)


def test_float64_quantized_is_rejected(tmp_path):
    w = torch.tensor([1.0, -1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        export_packed({"w": w}, {"w": QuantSpec("binary", 1)}, tmp_path / "x")


def test_report_to_str_has_totals(tmp_path, model_state):
    specs = {name: spec for name, (_, spec) in CASES.items()}
    report = export_packed(model_state, specs, tmp_path / "model.safetensors")
    text = report.to_str()
    assert "total quantized" in text
    assert "layout" in text and "density" in text
    assert str(report.quantized_fp32_bytes) in text
    assert str(report.quantized_packed_bytes) in text
    assert str(report.total_fp32_bytes) in text
    assert str(report.file_bytes) in text
    assert f"{report.ratio:.2f}x" in text
    for name in model_state:
        assert name in text
    for t in report.tensors:
        assert t.layout in (LAYOUTS if t.quantized else ("raw",))
        assert f"{t.density:.3f}" in text
    assert report.total_fp32_bytes == sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model_state.values()
    )


# ---- sparse layouts (layout_version 2) ----------------------------------------------------------


def sparse_tensor(rows, cols, bits, density, per_channel, seed, dtype=torch.float32):
    """A [rows, cols] tensor whose rows hold at most 2**bits distinct values, zero included:
    each element is non-zero with probability `density`, zeros are +0.0 or -0.0 at random, and
    the non-zero levels are shared (per-tensor) or drawn for each row (per-channel)."""
    gen = torch.Generator().manual_seed(seed)
    nz_levels = (1 << bits) - (0 < density < 1)  # leave a code for zero when there are zeros
    ways = rows if per_channel else 1
    levels = torch.stack(
        [torch.randperm(2000, generator=gen)[:nz_levels] - 1000 for _ in range(ways)]
    )
    levels = torch.where(levels >= 0, levels + 1, levels).float()  # distinct, none zero
    levels = levels * (0.01 + torch.rand(ways, 1, generator=gen))  # a scale per group
    pick = torch.randint(0, nz_levels, (rows, cols), generator=gen)
    values = levels.expand(rows, nz_levels).gather(1, pick) if per_channel else levels[0][pick]
    zeros = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -0.0, 0.0)
    mask = torch.rand(rows, cols, generator=gen) < density
    return torch.where(mask, values, zeros).to(dtype)


def dense_rebuild(t, per_channel):
    """What the dense layout (and layout_version 1) rebuilds: every zero of a row takes the sign
    of the row's first zero, the rest is exact."""
    rows = t.reshape(t.shape[0] if per_channel else 1, -1).clone()
    for row in rows:
        zero = row == 0
        if zero.any():
            row[zero] = row[zero.nonzero()[0, 0]]
    return rows.reshape(t.shape)


def bit_equal(a, b):
    """Same dtype, shape and bits (tells -0.0 from +0.0)."""
    as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))
    )


def reference_sizes(t, spec):
    """Bytes of each layout from the formulas of distq.export's docstring, in plain Python."""
    G = t.shape[0] if spec.per_channel else 1
    rows = t.reshape(G, -1).float().tolist()
    numel = sum(len(r) for r in rows)
    flat = [v for r in rows for v in r]
    positions = [i for i, v in enumerate(flat) if v != 0]
    nnz = len(positions)
    k = max((len({v for v in r if v != 0}) for r in rows), default=0)
    nz_bits = math.ceil(math.log2(k)) if k > 1 else 0
    first_zeros = [next((v for v in r if v == 0), 0.0) for r in rows]
    neg_zero = any(math.copysign(1.0, v) < 0 for v in first_zeros)
    common = -(-nnz * nz_bits // 8) + 4 * G * k + (-(-G // 8) if neg_zero else 0)
    gaps = [p - q - 1 for p, q in zip(positions, [-1, *positions][:nnz], strict=True)]
    streams = [0] if not any(gaps) else []  # width 0: the non-zeros are a prefix
    for w in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32):
        symbols = nnz + sum(g // (2**w - 1) for g in gaps)
        streams.append(-(-symbols * w // 8))
    return {
        "dense": -(-numel * spec.bits // 8) + 4 * G * 2**spec.bits,
        "bitmap": -(-numel // 8) + common,
        "index": min(streams) + common,
    }


def stored_bytes(path, name):
    with safe_open(path, framework="pt") as f:
        codes, codebook = f.get_tensor(name + ".codes"), f.get_tensor(name + ".codebook")
    return codes.numel() + codebook.numel() * codebook.element_size()


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 400),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_round_trip_and_smallest_layout(
    tmp_path_factory, density, bits, per_channel, rows, cols, dtype, seed
):
    t = sparse_tensor(rows, cols, bits, density, per_channel, seed, dtype)
    spec = QuantSpec("test", bits, per_channel)
    expected = dense_rebuild(t, per_channel)
    sizes = reference_sizes(t, spec)
    assert layout_sizes(t, spec) == sizes
    path = tmp_path_factory.mktemp("sparse") / "w.safetensors"
    for layouts in [LAYOUTS, *((x,) for x in LAYOUTS)]:
        report = export_packed({"w": t, "b": torch.ones(2)}, {"w": spec}, path, layouts=layouts)
        loaded = load_packed(path)
        assert bit_equal(loaded["w"], expected), layouts
        (size,) = [s for s in report.tensors if s.name == "w"]
        smallest = min(sizes[x] for x in layouts)
        assert size.layout == next(x for x in layouts if sizes[x] == smallest)  # ties: LAYOUTS
        assert size.packed_bytes == smallest == stored_bytes(path, "w")
        assert size.nnz == int(torch.count_nonzero(t))
        assert report.file_bytes == os.path.getsize(path)


def ternary(shape, density, seed, alpha=0.0625, per_channel=False):
    """α·{-1, 0, +1} with exactly round(density*n) non-zeros at random places, like
    α·sign(w)·mask (so masked negative entries are -0.0)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    n = w.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[: round(density * n)]] = True
    scale = alpha * (1 + torch.rand(shape[0], 1, generator=gen)) if per_channel else alpha
    return scale * torch.sign(w) * mask.view(shape)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ternary_zero_signs_rebuild_like_dense(tmp_path, layout, per_channel):
    t = ternary((6, 50), 0.3, seed=3, per_channel=per_channel)
    t[2] = 0.0  # a row without non-zeros
    t[3, 0] = -0.0  # a row whose first zero is -0.0
    t[4, 0] = 0.0  # and one whose first zero is +0.0
    t[5] = torch.where(t[5] != 0, t[5], t[5].abs().max())  # a row without zeros
    spec = QuantSpec("ternary", 2, per_channel)
    path = tmp_path / "t.safetensors"
    export_packed({"w": t}, {"w": spec}, path, layouts=(layout,))
    assert bit_equal(load_packed(path)["w"], dense_rebuild(t, per_channel))


def test_each_layout_wins_somewhere():
    # dense: 3-bit codes, one of the 8 levels zero, 90% non-zero (7 non-zero levels need 3 bits
    # too, so a bitmap or index only adds bits); bitmap: half the ternary entries zero (ties
    # with index, which goes by LAYOUTS order); index: 90% of them zero
    levels = torch.arange(-3.0, 5.0)
    gen = torch.Generator().manual_seed(0)
    mbit = levels[torch.randint(0, 8, (64, 64), generator=gen)]
    mbit[torch.rand(64, 64, generator=gen) < 0.1] = 0.0
    cases = {
        "dense": (mbit, QuantSpec("linear", 3)),
        "bitmap": (ternary((64, 64), 0.5, seed=1), QuantSpec("ternary", 2)),
        "index": (ternary((64, 64), 0.1, seed=2), QuantSpec("ternary", 2)),
    }
    for layout, (t, spec) in cases.items():
        sizes = layout_sizes(t, spec)
        assert min(sizes, key=lambda x: (sizes[x], LAYOUTS.index(x))) == layout, sizes


def test_90_percent_sparse_ternary_is_45x_smaller_than_fp32(tmp_path):
    # 256x256 ternary, 10% non-zero, one α. fp32: 262,144 data bytes. Bitmap: 1 bit/element +
    # 1 sign bit per non-zero = 1.1 bits/element (~29x). The index layout wins: gaps between
    # non-zeros are ~geometric with mean 9; with 4-bit symbols (escape 15 = "skip 15 more") a
    # gap takes 1 + P(gap >= 15)/(1 - P(gap >= 15)) = 1.26 symbols = 5.04 bits, + 1 sign bit:
    # ~6.04 bits per non-zero = 0.6 bits/element, ~4.96 KB, i.e. ~53x on data. The real file
    # also holds ~440 bytes of safetensors header and distq JSON: ~48.6x measured; 45x leaves a
    # margin for the mask's randomness only (the entropy bound, ~4.6 KB of data, is ~57x).
    w = ternary((256, 256), 0.1, seed=12)
    packed_path, fp32_path = tmp_path / "packed.safetensors", tmp_path / "fp32.safetensors"
    report = export_packed({"w": w}, {"w": QuantSpec("ternary", 2)}, packed_path)
    save_file({"w": w}, fp32_path)
    packed_bytes, fp32_bytes = os.path.getsize(packed_path), os.path.getsize(fp32_path)
    assert fp32_bytes >= 45 * packed_bytes, (fp32_bytes, packed_bytes)
    (size,) = report.tensors
    assert size.layout == "index" and size.density == pytest.approx(0.1, abs=1e-4)
    assert size.packed_bytes <= 0.61 * 65536 / 8  # <= 0.61 bits per element
    assert report.file_bytes == packed_bytes and report.ratio >= 45
    assert bit_equal(load_packed(packed_path)["w"], dense_rebuild(w, False))


@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1])
def test_ternary_sizes_by_density(tmp_path, density):
    # fp32 data 262,144 bytes; the stored codes must stay within the bits per element the
    # layout formulas give: 1.0 -> 1 bit (no zeros: index width 0 + 1 sign bit), 0.5 -> 1.5
    # (bitmap + a sign bit per non-zero), 0.25 -> 1.115, 0.1 -> 0.605 (gap code + sign)
    bits_per_element = {1.0: 1.0, 0.5: 1.5, 0.25: 1.13, 0.1: 0.61}[density]
    w = ternary((256, 256), density, seed=5)
    report = export_packed({"w": w}, {"w": QuantSpec("ternary", 2)}, tmp_path / "w.safetensors")
    (size,) = report.tensors
    assert size.packed_bytes <= bits_per_element * 65536 / 8 + 8 + 1  # + codebook, zero sign
    assert report.file_bytes < size.packed_bytes + 600  # header: names, offsets, distq JSON


# A layout_version 1 file written by distq before the sparse layouts (git bb66961's
# export_packed): t.weight ternary per-tensor with mixed ±0.0, pc.weight float16 per-channel,
# lin.weight bfloat16 linear 3-bit, a float32 bias, an int64 scalar, metadata run=v1.
V1_FILE = base64.b64decode(
    """
    AAQAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJydW4iOiJ2MSIsImRpc3RxIjoie1wiZm9ybWF0XCI6IFwiZGlzdHEtcGFj
    a2VkXCIsIFwibGF5b3V0X3ZlcnNpb25cIjogMSwgXCJ0ZW5zb3JzXCI6IHtcInQud2VpZ2h0XCI6IHtcInNoYXBlXCI6
    IFszLCA1XSwgXCJkdHlwZVwiOiBcImZsb2F0MzJcIiwgXCJzY2hlbWVcIjogXCJ0ZXJuYXJ5XCIsIFwiYml0c1wiOiAy
    LCBcInBlcl9jaGFubmVsXCI6IGZhbHNlfSwgXCJwYy53ZWlnaHRcIjoge1wic2hhcGVcIjogWzIsIDRdLCBcImR0eXBl
    XCI6IFwiZmxvYXQxNlwiLCBcInNjaGVtZVwiOiBcInRlcm5hcnlcIiwgXCJiaXRzXCI6IDIsIFwicGVyX2NoYW5uZWxc
    IjogdHJ1ZX0sIFwibGluLndlaWdodFwiOiB7XCJzaGFwZVwiOiBbMiwgM10sIFwiZHR5cGVcIjogXCJiZmxvYXQxNlwi
    LCBcInNjaGVtZVwiOiBcImxpbmVhclwiLCBcImJpdHNcIjogMywgXCJwZXJfY2hhbm5lbFwiOiBmYWxzZX19fSJ9LCJu
    Ijp7ImR0eXBlIjoiSTY0Iiwic2hhcGUiOltdLCJkYXRhX29mZnNldHMiOlswLDhdfSwibGluLndlaWdodC5jb2RlYm9v
    ayI6eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbMSw4XSwiZGF0YV9vZmZzZXRzIjpbOCw0MF19LCJwYy53ZWlnaHQuY29k
    ZWJvb2siOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzIsNF0sImRhdGFfb2Zmc2V0cyI6WzQwLDcyXX0sInQuYmlhcyI6
    eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzcyLDg0XX0sInQud2VpZ2h0LmNvZGVib29r
    Ijp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOlsxLDRdLCJkYXRhX29mZnNldHMiOls4NCwxMDBdfSwibGluLndlaWdodC5j
    b2RlcyI6eyJkdHlwZSI6IlU4Iiwic2hhcGUiOlszXSwiZGF0YV9vZmZzZXRzIjpbMTAwLDEwM119LCJwYy53ZWlnaHQu
    Y29kZXMiOnsiZHR5cGUiOiJVOCIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzEwMywxMDVdfSwidC53ZWlnaHQu
    Y29kZXMiOnsiZHR5cGUiOiJVOCIsInNoYXBlIjpbNF0sImRhdGFfb2Zmc2V0cyI6WzEwNSwxMDldfX0gICAgICAgBwAA
    AAAAAAAAAEC/AAAAAAAAoD8AACBAAAAAAAAAAAAAAAAAAAAAAAAAgL4AAAAAAACAPgAAAAAAAMC/AAAAgAAAwD8AAAAA
    AADAPwAAAMAAAIA+AAAAvwAAAIAAAAA/AAAAAIGGAJKJGZahFA==
    """
)


def test_version_1_file_still_loads(tmp_path):
    path = tmp_path / "v1.safetensors"
    path.write_bytes(V1_FILE)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["distq"])["layout_version"] == 1
    loaded = load_packed(path)
    t = torch.tensor(
        [[-0.0, 0.5, 0.0, -0.5, 0.5], [0.0, -0.0, 0.5, 0.0, -0.5], [0.5, 0.5, -0.5, -0.0, 0.0]]
    )
    pc = torch.tensor([[0.25, -0.25, 0.0, 0.25], [-0.0, 1.5, -1.5, 1.5]], dtype=torch.float16)
    lin = torch.tensor([[0.0, -0.75, 1.25], [2.5, -0.75, 0.0]], dtype=torch.bfloat16)
    assert set(loaded) == {"t.weight", "pc.weight", "lin.weight", "t.bias", "n"}
    assert bit_equal(loaded["t.weight"], dense_rebuild(t, False))  # all zeros -0.0
    assert bit_equal(loaded["pc.weight"], dense_rebuild(pc, True))  # row 0 +0.0, row 1 -0.0
    assert bit_equal(loaded["lin.weight"], lin)
    assert torch.equal(loaded["t.bias"], torch.tensor([1.5, -2.0, 0.25]))
    assert torch.equal(loaded["n"], torch.tensor(7))


def test_dense_layout_is_the_version_1_layout(tmp_path):
    # a version-2 dense export relabelled as version 1 (no "layout" field) loads the same
    t = ternary((32, 40), 0.4, seed=9, per_channel=True)
    path = tmp_path / "w.safetensors"
    export_packed({"w": t}, {"w": QuantSpec("ternary", 2, True)}, path, layouts=("dense",))
    tensors, doc = read(path)
    del doc["tensors"]["w"]["layout"]
    doc["layout_version"] = 1
    save_file(tensors, path, metadata={"distq": json.dumps(doc)})
    assert bit_equal(load_packed(path)["w"], dense_rebuild(t, True))


def read(path):
    """The stored tensors and the metadata, less its digests: an edited file saved from these
    reaches the structural checks (as a file written before distq recorded digests would)."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
        doc = json.loads(f.metadata()["distq"])
        doc.pop("digests", None)
        return tensors, doc


def set_field(key, value):
    def edit(tensors, entry):
        entry[key] = value

    return edit


def drop_field(key):
    def edit(tensors, entry):
        del entry[key]

    return edit


def flip_neg_zero(tensors, entry):
    entry["neg_zero"] = not entry["neg_zero"]


def trim_codes(tensors, entry):
    tensors["w.codes"] = tensors["w.codes"][:-1].clone()


def widen_codebook(tensors, entry):
    tensors["w.codebook"] = torch.zeros(1, 3)


CORRUPTIONS = {
    # name: (layout to write, edit of the stored tensors / metadata entry, error pattern)
    "entry not an object": ("index", None, r"'w'.*metadata entry is \[1, 2\]"),
    "missing layout": ("index", drop_field("layout"), r"'w'.*lacks 'layout'"),
    "unknown layout": ("index", set_field("layout", "rle"), r"'w'.*'layout' is 'rle'"),
    "bits as a string": ("index", set_field("bits", "2"), r"'w'.*'bits' is '2'"),
    "bad dtype": ("dense", set_field("dtype", "float64"), r"'w'.*'dtype' is 'float64'"),
    "bad shape": ("dense", set_field("shape", [64, -1]), r"'w'.*'shape'"),
    "wrong shape": ("dense", set_field("shape", [64, 65]), r"'w'.*do not match shape"),
    "missing nnz": ("bitmap", drop_field("nnz"), r"'w'.*lacks 'nnz'"),
    "nnz past numel": ("bitmap", set_field("nnz", 10**6), r"'w'.*'nnz' is 1000000"),
    "wrong nnz": ("bitmap", set_field("nnz", 5), r"'w'.*code bytes"),
    "wrong nz_bits": ("index", set_field("nz_bits", 2), r"'w'.*nz_bits=2"),
    "neg_zero flipped": ("index", flip_neg_zero, r"'w'.*code bytes"),
    "bad index_bits": ("index", set_field("index_bits", 9), r"'w'.*'index_bits' is 9"),
    "wrong index_count": ("index", set_field("index_count", 3), r"'w'.*code bytes"),
    "truncated codes": ("index", trim_codes, r"'w'.*code bytes"),
    "codebook too wide": ("bitmap", widen_codebook, r"'w'.*codebook of 3"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_metadata_gives_a_clear_error(tmp_path, case):
    layout, edit, pattern = CORRUPTIONS[case]
    path = tmp_path / "w.safetensors"
    w = ternary((64, 64), 0.2, seed=4)
    export_packed({"w": w}, {"w": QuantSpec("ternary", 2)}, path, layouts=(layout,))
    tensors, doc = read(path)
    if edit is None:
        doc["tensors"]["w"] = [1, 2]
    else:
        edit(tensors, doc["tensors"]["w"])
    save_file(tensors, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor ") + pattern):
        load_packed(path)


def test_bitmap_count_must_match_nnz(tmp_path):
    path = tmp_path / "w.safetensors"
    w = ternary((8, 8), 0.5, seed=6)
    export_packed({"w": w}, {"w": QuantSpec("ternary", 2)}, path, layouts=("bitmap",))
    tensors, doc = read(path)
    tensors["w.codes"][0] ^= 1  # flip the first element's bit in the bitmap
    save_file(tensors, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match=r"'w': the bitmap holds \d+ non-zeros, nnz is 32"):
        load_packed(path)


def test_index_ending_in_an_escape_is_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    w = ternary((64, 64), 0.1, seed=6)
    export_packed({"w": w}, {"w": QuantSpec("ternary", 2)}, path, layouts=("index",))
    tensors, doc = read(path)
    entry = doc["tensors"]["w"]
    width, count = entry["index_bits"], entry["index_count"]
    assert width in range(1, 9)
    stream = uint_nbytes(count, width)
    symbols = unpack(tensors["w.codes"][:stream], width, count)
    symbols[-1] = 2**width - 1  # the last symbol an escape: a gap with no non-zero after it
    tensors["w.codes"][:stream] = pack(symbols, width)
    save_file(tensors, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match=r"tensor 'w': index: gap code ends with an escape"):
        load_packed(path)


def test_version_1_entry_with_a_layout_is_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    export_packed({"w": ternary((4, 4), 1.0, 0)}, {"w": QuantSpec("t", 2)}, path, layouts="dense")
    tensors, doc = read(path)
    doc["layout_version"] = 1
    save_file(tensors, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match="layout_version 1 has no 'layout'"):
        load_packed(path)


@pytest.mark.parametrize("layouts", [(), ("sparse",)])
def test_unknown_layouts_are_rejected(tmp_path, layouts):
    with pytest.raises(ValueError, match="layouts must name some of"):
        export_packed(
            {"w": torch.zeros(4)}, {"w": QuantSpec("t", 2)}, tmp_path / "x", layouts=layouts
        )


def flip_stored_bytes(path, tensor, count, offset=0):
    """Flip `count` bytes of `tensor`'s data, from `offset`, in the file at `path`."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert at >= 0
    for i in range(at + offset, at + offset + count):
        data[i] ^= 0x80
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("stored", ["w.codebook", "w.codes", "bias"])
def test_flipped_bytes_in_codebooks_codes_or_raw_tensors_are_refused(tmp_path, stored):
    path = tmp_path / "w.safetensors"
    state = {"w": ternary((64, 64), 0.5, seed=3), "bias": torch.linspace(-1, 1, 64)}
    export_packed(state, {"w": QuantSpec("ternary", 2)}, path, layouts=("bitmap",))
    tensors = read(path)[0]
    size = {"w.codebook": 1, "w.codes": 8, "bias": 8}[stored]  # 8 code bytes: weight signs
    flip_stored_bytes(path, tensors[stored], size, offset=tensors[stored].numel() - size
                      if stored == "w.codes" else 0)
    with pytest.raises(ValueError, match=re.escape(f"tensor {stored!r} is corrupt")):
        load_packed(path)


def test_a_non_finite_codebook_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    export_packed({"w": ternary((8, 8), 0.5, seed=1)}, {"w": QuantSpec("ternary", 2)}, path)
    tensors, doc = read(path)
    tensors["w.codebook"][0, -1] = float("nan")
    save_file(tensors, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match="tensor 'w': codebook holds NaN or Inf"):
        load_packed(path)
