"""Per-tensor weight widths in QuantizedOptimizer (bits_by_name, set_bits): each tensor's
projection, the monitor's Δ_w, the summary, the packed export and resume follow its own width."""

import math
import re

import pytest
import torch

from distq.export import QuantSpec, export_packed, load_packed
from distq.launch.resume import quantized_specs
from distq.monitor.weights import weight_errors
from distq.quant import levels_per_sign, project
from tests.test_optim import build, make_model, train

ALL = {"keep_full_precision": ()}  # quantize 0, 2, 5 and 7.weight
MIXED = {"2.weight": 2, r"[57]\.weight": 4}  # 0.weight keeps bits=3
WIDTHS = {"0.weight": 3, "2.weight": 2, "5.weight": 4, "7.weight": 4}


def test_each_tensor_is_projected_at_its_own_width():
    model = make_model()
    opt = build(model, "linear", 3, bits_by_name=MIXED, **ALL)
    assert opt.tensor_bits == WIDTHS
    for name, p in opt.quantized_parameters().items():  # at construction: cold, d ≡ 1
        expected = project(opt.latent[name], None, "linear", WIDTHS[name]).q
        assert torch.equal(p, expected), name
        assert p.unique().numel() <= 2 * levels_per_sign(WIDTHS[name]) + 1
    train(model, opt, 3)
    before = {n: a.clone() for n, a in opt.alpha.items()}
    train(model, opt, 1, first=3)
    for name, p in opt.quantized_parameters().items():  # after a step: Adam's d, warm start
        d = opt.curvature(p)
        proj = project(opt.latent[name], d, "linear", WIDTHS[name], alpha_init=before[name])
        assert torch.equal(p, proj.q), name
        wrong = project(opt.latent[name], d, "linear", 3, alpha_init=before[name]).q
        assert torch.equal(p, wrong) == (WIDTHS[name] == 3), name


def test_an_identity_mapping_trains_exactly_as_the_uniform_width():
    uniform_model, mapped_model = make_model(), make_model()
    uniform = build(uniform_model, "log", 3, **ALL)
    mapped = build(mapped_model, "log", 3, bits_by_name={".*": 3}, **ALL)
    train(uniform_model, uniform, 5)
    train(mapped_model, mapped, 5)
    for (name, a), b in zip(
        uniform_model.state_dict().items(), mapped_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("scheme", "bits", "mapping", "message"),
    [
        ("ternary", None, {"2.weight": 2}, "needs a scheme of several widths (linear, log, "
         "shared); scheme 'ternary' has only 2 bit(s)"),
        ("linear", 3, {"2.weight": 9}, "bits_by_name['2.weight']: bits=9 is not supported by "
         "scheme 'linear'; allowed: 2..8"),
        ("shared", 3, {"2.weight": 5}, "allowed: 2..4"),
        ("linear", 3, {"3.weight": 2}, "entries ['3.weight'] match no quantized parameter; "
         "quantized: ['0.weight', '2.weight', '5.weight', '7.weight']"),
    ],
)  # fmt: skip
def test_bad_widths_are_refused_naming_what_is_allowed(scheme, bits, mapping, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(make_model(), scheme, bits, bits_by_name=mapping, **ALL)


def test_set_bits_switches_only_the_named_tensors_and_the_summary_follows():
    model = make_model()
    opt = build(model, "shared", 3, **ALL)
    train(model, opt, 4)
    kept = {n: p.clone() for n, p in opt.quantized_parameters().items()}
    opt.set_bits({"2.weight": 2, "5.weight": 4})
    params = opt.quantized_parameters()
    for name in ("0.weight", "7.weight"):  # unchanged width: ŵ and α as they were
        assert torch.equal(params[name], kept[name]) and opt.alpha[name].shape[-1] == 8
    for name, width in (("2.weight", 2), ("5.weight", 4)):  # a cold projection at the new width
        d = opt.curvature(params[name])
        assert torch.equal(params[name], project(opt.latent[name], d, "shared", width).q)
        assert opt.alpha[name].shape[-1] == 2**width
    rows = {r.name: r for r in opt.summary.rows}
    assert [rows[n].bits for n in WIDTHS] == [3, 2, 4, 3]
    assert "shared, 2 bit" in opt.summary.to_str() and "shared, 4 bit" in opt.summary.to_str()
    numel = {n: p.numel() for n, p in params.items()}
    full = sum(4 * p.numel() for p in model.parameters())
    assert opt.summary.packed_bytes - (full - 4 * sum(numel.values())) == sum(
        (numel[n] * b + 7) // 8 for n, b in opt.tensor_bits.items()
    )
    assert "2..4 per tensor" in repr(opt)
    with pytest.raises(ValueError, match="read each with stored_bits_of"):
        _ = opt.stored_bits


def test_the_monitor_reads_each_tensors_level_spacing():
    model = make_model()
    opt = build(model, "linear", 3, bits_by_name=MIXED, **ALL)
    train(model, opt, 2)
    for name, e in weight_errors(opt).items():
        assert e.bits == WIDTHS[name]
        assert e.delta_w == pytest.approx(1 / levels_per_sign(WIDTHS[name]))
        assert 0 < e.error <= e.rounding_bound


def test_the_packed_export_stores_each_tensor_at_its_width(tmp_path):
    model = make_model()
    opt = build(model, "linear", 3, bits_by_name=MIXED, **ALL)
    train(model, opt, 3)
    specs = {n: QuantSpec(**s) for n, s in quantized_specs(opt).items()}
    assert {n: s.bits for n, s in specs.items()} == WIDTHS
    report = export_packed(
        model.state_dict(), specs, tmp_path / "m.safetensors", layouts=("dense",)
    )
    sizes = {t.name: t for t in report.tensors}
    for name, bits in WIDTHS.items():  # ⌈n·m/8⌉ code bytes + one fp32 codebook row of 2^m
        numel = opt.quantized_parameters()[name].numel()
        assert sizes[name].bits == bits
        assert sizes[name].packed_bytes == math.ceil(numel * bits / 8) + 4 * 2**bits
    loaded = load_packed(tmp_path / "m.safetensors")
    for name, p in opt.quantized_parameters().items():
        assert torch.equal(loaded[name], p.detach()), name


def test_resume_keeps_allocated_widths_bit_exactly_and_refuses_others(tmp_path):
    model = make_model()
    opt = build(model, "linear", 3, **ALL)
    train(model, opt, 4)
    opt.set_bits({"2.weight": 2, "5.weight": 4})
    train(model, opt, 3, first=4)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, 5, first=7)

    resumed = make_model(seed=123)
    resumed_opt = build(resumed, "linear", 3, **ALL)  # built uniform, as a resumed run is
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.tensor_bits == {**dict.fromkeys(WIDTHS, 3), "2.weight": 2, "5.weight": 4}
    assert resumed_opt.summary.to_str() == opt.summary.to_str()
    train(resumed, resumed_opt, 5, first=7)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    other = build(make_model(), "linear", 3, bits_by_name={"2.weight": 4}, **ALL)
    with pytest.raises(ValueError, match=r"bits_by_name: checkpoint \{\} vs now \{'2.weight': 4\}"):
        other.load_state_dict(saved["opt"])
    allocated = build(make_model(), "linear", 3, **ALL)
    allocated.set_bits({"2.weight": 4})
    with pytest.raises(ValueError, match=r"other weight widths.*'2.weight': \(2, 4\)"):
        allocated.load_state_dict(saved["opt"])
