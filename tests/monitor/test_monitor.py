"""The convergence monitor on real objects: weight errors, gradient errors from a real 2-rank
hook, theory bounds, alarms, JSONL, the Prometheus exporter's text, and the report's PNGs."""

import gc
import json
import urllib.request

import pytest
import torch
from prometheus_client import generate_latest
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.comm import QuantizedCommState, quantized_hook
from distq.monitor import ConvergenceMonitor, GradientSetup, MetricsExporter, weight_errors
from distq.monitor.report import write_report
from distq.optim import QuantizedOptimizer
from distq.theory import grad_blowup_clipped, grad_blowup_unclipped
from distq.theory.rotation import rotated_vnmse
from tests.distributed import run_workers


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    return model


def train_steps(model, opt, steps, first=0):
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_weight_errors_are_the_d_weighted_distance():
    model = make()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "linear", 3)
    train_steps(model, opt, 5)
    errors = weight_errors(opt)
    assert set(errors) == {"2.weight", "4.weight"}
    for name, e in errors.items():
        p = dict(model.named_parameters())[name]
        d, w = opt.curvature(p), opt.latent[name]
        expected = float((d * (p.detach() - w) ** 2).sum())
        assert e.error == pytest.approx(expected, rel=1e-6)
        assert e.relative == pytest.approx(expected / float((d * w**2).sum()), rel=1e-6)
        assert e.delta_w == pytest.approx(1 / 3)
        assert 0 < e.error <= e.rounding_bound  # latent weights lie within ±α·(1 + Δ/2) here


def test_the_rounding_term_sums_over_scale_groups():
    """Per channel: Σ_c n_c·α_c²·Δ_w²/4 (the product of mean α and numel undercounts it)."""
    model = make()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "linear", 3,
                             per_channel=True)  # fmt: skip
    train_steps(model, opt, 5)
    for name, e in weight_errors(opt).items():
        alpha = opt.alpha[name].double()
        n = opt.latent[name].numel() / alpha.numel()
        assert e.rounding_bound == pytest.approx(float((n * alpha**2 / 9 / 4).sum()), rel=1e-9)
        assert e.alpha == pytest.approx(float(alpha.mean()), rel=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_codebooks_rounding_term_is_its_widest_gap_by_brute_force(per_channel):
    """shared: α·Δ_w of a group is the largest distance from a point of [c₁, c_k] to its nearest
    codebook value, ×2 (brute force over a fine grid and every pairwise midpoint), the term sums
    n_g·(α·Δ_w)²/4 over the groups, and latent weights inside [c₁, c_k] are within α·Δ_w/2 of
    ŵ (before: the record's nominal 2/(k − 1) times the codebook's mean as α)."""
    model = make()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "shared", 3,
                             per_channel=per_channel)  # fmt: skip
    train_steps(model, opt, 5)
    params = dict(model.named_parameters())
    for name, e in weight_errors(opt).items():
        codebooks = opt.alpha[name].double().reshape(-1, 8)
        latent = opt.latent[name].double().reshape(len(codebooks), -1)
        q = params[name].detach().double().reshape(len(codebooks), -1)
        bound, scales, spacings = 0.0, [], []
        for c, w, wq in zip(codebooks, latent, q, strict=True):
            mids = ((c[:, None] + c[None, :]) / 2).flatten()
            grid = torch.linspace(float(c.min()), float(c.max()), 4001, dtype=torch.float64)
            points = torch.cat([grid, mids])
            farthest = float((points[:, None] - c[None, :]).abs().amin(dim=1).max())
            bound += w.numel() * farthest**2  # n_g·(2·farthest)²/4
            scales.append(float(c.abs().max()))
            spacings.append(2 * farthest / scales[-1])
            inside = (w >= c.min()) & (w <= c.max())
            assert inside.any()
            assert float((wq - w)[inside].abs().max()) <= farthest + 1e-12
        assert e.rounding_bound == pytest.approx(bound, rel=1e-9)
        assert e.alpha == pytest.approx(sum(scales) / len(scales), rel=1e-6)
        assert e.delta_w == pytest.approx(sum(spacings) / len(spacings), rel=1e-6)


def test_loss_terms_go_to_the_log_and_to_their_own_gauges(tmp_path):
    exporter = MetricsExporter(0)
    monitor = ConvergenceMonitor(tmp_path, exporter=exporter, every=100)
    monitor.step(1, 0.9, 0.01, {"ce": 0.5, "kl": 0.125})
    monitor.step(2, 0.8, 0.01)
    with pytest.raises(ValueError, match=r"loss terms \['mse'\]; allowed: ce, kl"):
        monitor.step(3, 0.8, 0.01, {"mse": 1.0})
    monitor.close()
    first, second = [json.loads(line) for line in (tmp_path / "monitor-rank0.jsonl").open()]
    assert (first["loss_ce"], first["loss_kl"]) == (0.5, 0.125)
    assert "loss_ce" not in second
    text = generate_latest(exporter.registry).decode()
    assert 'distq_loss_ce{rank="0"} 0.5' in text and 'distq_loss_kl{rank="0"} 0.125' in text
    assert tmp_path / "loss.png" in write_report(tmp_path)  # the parts drawn beside the loss


def test_gradient_bounds_only_where_proven():
    """Lemma 3's bucket bound for m ≥ 2 bits, clipped or not; B for the stochastic sign (the
    Lemma 3 form, 12.8 at B = 512, was shown where 236.8 was measured); none for TernGrad's
    shared scale, the biased sign compressor, the rotated ones (their Gaussian law is shown
    beside, as for the clipped quantizer), or nothing quantized."""
    for clip in (2.5, None):
        setup = GradientSetup(bits=2, clip=clip, bucket_numel=512, quantizations=2)
        assert setup.blowup_bound() == pytest.approx(grad_blowup_unclipped(512, 1.0))
    assert GradientSetup(bits=3, clip=None, bucket_numel=4096).blowup_bound() == pytest.approx(
        grad_blowup_unclipped(4096, 1 / 3)
    )
    assert GradientSetup(bits=1, clip=2.5, bucket_numel=512).blowup_bound() == 512
    assert GradientSetup(bits=2, clip=2.5, bucket_numel=512).gaussian_blowup() == pytest.approx(
        grad_blowup_clipped(2.5, 1.0)
    )
    for name, stochastic in (("rotated", False), ("rotated-stochastic", True)):
        rotated = GradientSetup(bits=2, clip=2.5, bucket_numel=512, compressor=name)
        assert rotated.blowup_bound() is None  # a Gaussian law, not a bound
        assert rotated.gaussian_blowup() == 1 + rotated_vnmse(2, 512, stochastic)
        assert GradientSetup(2, 2.5, 32, compressor=name).gaussian_blowup() is None
    for setup in (
        GradientSetup(bits=2, clip=2.5, bucket_numel=512, quantizations=0, compressor="rotated"),
        GradientSetup(bits=2, clip=2.5, bucket_numel=512, compressor="terngrad"),
        GradientSetup(bits=1, clip=None, bucket_numel=512, compressor="sign"),
        GradientSetup(bits=2, clip=2.5, bucket_numel=512, quantizations=0),
    ):
        assert setup.blowup_bound() is None and setup.gaussian_blowup() is None


def test_rising_combined_error_raises_an_alarm(tmp_path):
    model = make()
    opt = QuantizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, "ternary")
    monitor = ConvergenceMonitor(tmp_path, optimizer=opt, every=1, rising=3)
    for step in range(1, 7):
        with torch.no_grad():  # push the latent weights away from ŵ, further each step
            for name, p in opt.quantized_parameters().items():
                opt.latent[name].copy_(p + 0.01 * step * torch.sign(torch.randn_like(p)))
        monitor.step(step, loss=1.0, step_seconds=0.01)
    monitor.close()
    assert monitor.alarms == {"combined_error_rising": 1}  # once, at step 4, for this streak
    lines = (tmp_path / "monitor-rank0.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "weights" in json.loads(lines[-1])


def monitored_worker(rank, world, out):
    model = make()
    ddp = DistributedDataParallel(model)
    state = QuantizedCommState(bits=2, bucket_size=64, collective="scatter", min_numel=0,
                               clip=2.5, error_every=10)
    ddp.register_comm_hook(state, quantized_hook)
    opt = QuantizedOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, "ternary")
    exporter = MetricsExporter(rank)
    exporter.start(0)
    # the bound of 8-bit codes on 1-element buckets (1.008) is far below 2-bit blow-ups
    tight = GradientSetup(bits=8, clip=2.5, bucket_numel=1, quantizations=2)
    monitor = ConvergenceMonitor(out, rank, opt, state, tight, exporter, every=10)
    for i in range(30):
        g = torch.Generator().manual_seed(100 * rank + i)
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        monitor.step(i + 1, loss.item(), 0.01)
    text = urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics").read().decode()
    (out / f"metrics{rank}.txt").write_text(text)
    (out / f"alarms{rank}.json").write_text(json.dumps(monitor.alarms))
    monitor.close()
    state.close()
    del ddp
    gc.collect()


@pytest.mark.slow
def test_monitor_with_a_real_hook_logs_exports_and_plots(tmp_path):
    run_workers(monitored_worker, 2, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "monitor-rank0.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 31))
    measured = [r for r in records if "grad_blowup" in r]
    # hook steps 0 and 1 are fp32 warm-up; it measures at hook steps 10 and 20 (steps 11, 21)
    assert [r["grad_measured_at_hook_step"] for r in measured] == [10, 20]
    assert [r["step"] for r in measured] == [11, 21]
    for r in measured:
        assert r["grad_blowup"] > 1.0  # unbiased: E‖Q(g)‖² = ‖g‖² + error
        assert r["grad_first_error_relative"] > 0 and r["grad_second_error_relative"] > 0
        assert r["grad_clip_bias_relative"] >= 0
        assert r["grad_error_relative"] == pytest.approx(
            r["grad_first_error_relative"] + r["grad_second_error_relative"])
        assert r["grad_second_blowup"] == pytest.approx(1 + r["grad_second_error_relative"])
        assert r["grad_blowup_bound"] == pytest.approx(1 + 1 / 127)
        assert r["bytes_sent"] > 0 and r["compression_ratio"] > 5
    # both quantizations' blow-ups exceed that bound at both measurements: 4 alarms
    assert json.loads((tmp_path / "alarms0.json").read_text()) == {"blowup_above_bound": 4}
    text = (tmp_path / "metrics1.txt").read_text()
    assert 'distq_weight_quant_error{rank="1",tensor="2.weight"}' in text
    assert 'distq_weight_bits{rank="1",tensor="2.weight"} 2.0' in text  # ternary codes
    assert 'distq_wire_bytes_total{direction="sent",rank="1"}' in text
    assert 'distq_alarms_total{kind="blowup_above_bound",rank="1"} 4.0' in text
    assert "distq_grad_clip_bias_predicted{" in text
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "weight_error.png", "grad_blowup.png",
                                       "bytes.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
