"""The LSTM evidence in the monitor: power-iteration spectral norms against torch's SVD, the
√d lower bound of binary matrices, gradient-norm records in the JSONL log and their plot."""

import json

import pytest
import torch

from distq.launch.recipes.charlm import CharLM
from distq.monitor import ConvergenceMonitor, RecurrentProbe, spectral_norm
from distq.monitor.report import write_report
from distq.optim import QuantizedOptimizer


@pytest.mark.parametrize("shape", [(40, 40), (64, 16), (3, 30, 30)])
def test_power_iteration_matches_the_exact_spectral_norm(shape):
    torch.manual_seed(0)
    m = torch.randn(*shape, dtype=torch.float64)
    sigma, v = spectral_norm(m, iterations=1000, tol=1e-10)
    exact = torch.linalg.matrix_norm(m, ord=2)
    torch.testing.assert_close(sigma, exact, rtol=1e-4, atol=0)
    assert v.shape == shape[:-2] + shape[-1:]
    assert bool((sigma <= exact * (1 + 1e-12)).all())  # ‖Mv‖ with ‖v‖ = 1 never overshoots


def test_warm_start_converges_in_few_iterations():
    torch.manual_seed(1)
    m = torch.randn(50, 50, dtype=torch.float64)
    _, v = spectral_norm(m, iterations=1000, tol=1e-12)
    perturbed = m + 1e-4 * torch.randn_like(m)
    sigma, _ = spectral_norm(perturbed, iterations=3, v=v)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(perturbed, ord=2), rtol=1e-4, atol=0)


def test_a_zero_matrix_does_not_stick_and_null_space_starts_are_avoided():
    """A W_h that was all zero at one check read 0 at every later one (its warm-start vector
    was zero), and a ternary matrix whose rows sum to 0 read 0 from the all-ones start."""
    sigma, v = spectral_norm(torch.zeros(3, 8, 8))
    assert torch.equal(sigma, torch.zeros(3))
    m = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4))
    sigma, _ = spectral_norm(m, iterations=1000, tol=1e-12, v=v)
    assert torch.allclose(sigma, torch.linalg.matrix_norm(m, ord=2), rtol=1e-4)
    balanced = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]] * 2)
    sigma, _ = spectral_norm(balanced, iterations=1000, tol=1e-12)
    assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(balanced, ord=2).item(), rel=1e-4)


@pytest.mark.parametrize("d", [16, 64, 256])
def test_binary_square_matrices_have_spectral_norm_at_least_sqrt_d(d):
    torch.manual_seed(d)
    signs = torch.where(torch.rand(8, d, d) < 0.5, -1.0, 1.0).double()
    exact = torch.linalg.matrix_norm(signs, ord=2)
    assert bool((exact >= d**0.5 * (1 - 1e-9)).all())  # ‖B‖₂ ≥ ‖B‖_F/√d = √d
    estimate, _ = spectral_norm(signs, iterations=200)
    assert bool((estimate >= d**0.5).all())
    alpha = 0.01  # a scaled binary matrix α·B: the bound scales with α
    scaled, _ = spectral_norm(alpha * signs, iterations=200)
    assert bool((scaled >= alpha * d**0.5).all())


def test_monitor_logs_gradient_norms_and_spectral_norms_and_report_plots_them(tmp_path):
    torch.manual_seed(2)
    model = CharLM(vocab=11, hidden=8, depth=1, norm="none", burn_in=3)
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model,
                             "binaryconnect")
    probe = RecurrentProbe.of(model)
    assert list(probe.layers) == ["lstm.layers.0"]
    monitor = ConvergenceMonitor(tmp_path, optimizer=opt, every=2, recurrent=probe)
    x, y = torch.randint(0, 11, (4, 9)), torch.randint(0, 11, (4, 6))
    for step in range(1, 7):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        monitor.step(step, loss.item(), 0.0)
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / "monitor-rank0.jsonl").open()]
    checks = [r for r in records if "recurrent" in r]
    assert [r["step"] for r in checks] == [2, 4, 6]
    lstm = checks[-1]["recurrent"]["lstm.layers.0"]
    assert len(lstm["grad_norms"]) == 6 and all(g > 0 for g in lstm["grad_norms"])
    assert len(lstm["spectral_norm_blocks"]) == 4
    w_h = model.lstm.layers[0].hh.weight.detach().double()
    assert set(w_h.abs().unique().tolist()) == {1.0}  # BinaryConnect: ±1, no scale
    exact_blocks = torch.linalg.matrix_norm(w_h.reshape(4, 8, 8), ord=2)
    assert all(b >= 8**0.5 - 1e-6 for b in lstm["spectral_norm_blocks"])
    torch.testing.assert_close(
        torch.tensor(lstm["spectral_norm_blocks"], dtype=torch.float64), exact_blocks, rtol=0.02,
        atol=0,
    )
    paths = write_report(tmp_path)
    assert tmp_path / "lstm_gradients.png" in paths
    assert (tmp_path / "lstm_gradients.png").stat().st_size > 10_000


def test_models_without_an_lstm_have_no_probe():
    assert RecurrentProbe.of(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
