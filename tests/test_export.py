"""Tests for distq.export: exact round trips of packed checkpoints, file size, errors, report.

Quantized tensors come from distq.quant.project, so each scheme's value set is exercised.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distq.export import QuantSpec, export_packed, load_packed
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
    export_packed(model_state, specs, path, metadata={"run": "test"})
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        codes, codebook = f.get_tensor("conv.weight.codes"), f.get_tensor("conv.weight.codebook")
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("ternary.weight"), model_state["ternary.weight"])
    assert "conv.weight" not in keys and "conv.bias" in keys
    assert meta["run"] == "test"
    doc = json.loads(meta["distq"])
    assert doc["format"] == "distq-packed" and doc["layout_version"] == 1
    assert doc["tensors"]["conv.weight"] == {
        "shape": [8, 3, 3, 3],
        "dtype": "float32",
        "scheme": "ternary",
        "bits": 2,
        "per_channel": True,
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
    doc = {"format": "distq-packed", "layout_version": 2, "tensors": {}}
    save_file({"w": torch.zeros(3)}, path, metadata={"distq": json.dumps(doc)})
    with pytest.raises(ValueError, match="layout_version 2"):
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
    assert str(report.quantized_fp32_bytes) in text
    assert str(report.quantized_packed_bytes) in text
    assert str(report.total_fp32_bytes) in text
    assert str(report.file_bytes) in text
    assert f"{report.ratio:.2f}x" in text
    for name in model_state:
        assert name in text
    assert report.total_fp32_bytes == sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model_state.values()
    )
