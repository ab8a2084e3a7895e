"""Layer-wise post-training quantization (distq.ptq): never worse than naive rounding on a
layer's calibration inputs, exact against brute force where the diagonal of E[x xᵀ] is the
whole of it, quantized inputs propagated, the output error measured as reported."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional

from distq.lstm import QuantLSTM
from distq.ptq import quantize_model
from distq.quant import project

SCHEMES = [("ternary", None), ("binary", None), ("linear", 3), ("log", 3), ("shared", 2),
           ("ternary2", None)]  # fmt: skip


def skewed_inputs(n=400, features=24, seed=0):
    """Correlated inputs whose features' scales span 100x."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(features) + 0.3 * torch.randn(features, features, generator=g)
    return (torch.randn(n, features, generator=g) @ mix) * torch.logspace(-1, 1, features)


def output_error(layer_fp, layer_q, x):
    """‖W x − Ŵ x‖² / ‖W x‖² on x, measured on the layers' outputs (biases cancel)."""
    with torch.no_grad():
        y, y_q = layer_fp(x), layer_q(x)
        b = 0.0
        if layer_fp.bias is not None:
            b = layer_fp.bias.reshape(-1, *[1] * (y.dim() - 2))
        return float(((y - y_q) ** 2).sum() / ((y - b) ** 2).sum())


def single(layer, x, scheme, bits, **kw):
    """A copy of `layer` quantized on inputs x, and the result."""
    q = copy.deepcopy(layer)
    result = quantize_model(q, x, scheme, bits, keep_full_precision=[], **kw)
    return q, result


@pytest.mark.parametrize(("scheme", "bits"), SCHEMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_layer_error_is_at_most_naive_rounding(scheme, bits, per_channel):
    torch.manual_seed(1)
    layer = nn.Linear(24, 16)
    x = skewed_inputs()
    q, result = single(layer, x, scheme, bits, per_channel=per_channel)
    naive, _ = single(layer, x, scheme, bits, per_channel=per_channel, method="naive")
    [report] = result.layers
    err, err_naive = output_error(layer, q, x), output_error(layer, naive, x)
    assert err <= err_naive * (1 + 1e-6)
    # the report's errors come from the moments; they are the outputs' errors
    assert report.error == pytest.approx(err, rel=1e-4)
    assert report.naive_error == pytest.approx(err_naive, rel=1e-4)


def test_input_scales_make_the_layerwise_projection_clearly_better():
    """Without the refit (which d = 1 gets too) only d = E[x²] can make the difference."""
    torch.manual_seed(2)
    layer = nn.Linear(24, 16)
    x = skewed_inputs(seed=3)
    q, result = single(layer, x, "ternary", None, per_channel=True, refit=False)
    naive, _ = single(layer, x, "ternary", None, per_channel=True, method="naive")
    assert output_error(layer, q, x) < 0.85 * output_error(layer, naive, x)
    assert result.layers[0].data_groups > result.layers[0].groups // 2


def diagonal_inputs(scales, n=64, seed=0):
    """x with E[x xᵀ] = diag(scales²) exactly (orthonormal columns, rescaled), float64."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, len(scales), generator=g, dtype=torch.float64))
    return Q * math.sqrt(n) * torch.tensor(scales, dtype=torch.float64)


def brute_force(W, X, levels):
    """min over codes B ∈ levels^rows×cols and α ≥ 0 of ‖(W − αB) xᵀ‖²: (error, Ŵ)."""
    best = (math.inf, None)
    Y = X @ W.T
    for code in itertools.product(levels, repeat=W.numel()):
        B = torch.tensor(code, dtype=W.dtype).reshape(W.shape)
        Z = X @ B.T
        zz = float((Z * Z).sum())
        alpha = max(float((Y * Z).sum()) / zz, 0.0) if zz > 0 else 0.0
        err = float(((Y - alpha * Z) ** 2).sum())
        if err < best[0] - 1e-12:
            best = (err, alpha * B)
    return best


@pytest.mark.parametrize(("scheme", "levels"), [("ternary", (-1, 0, 1)), ("binary", (-1, 1))])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagonal_second_moment_gives_the_brute_force_optimum(scheme, levels, per_channel, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(3, 2, bias=False).double()
    X = diagonal_inputs([0.2, 1.0, 3.0], seed=seed)
    q, _ = single(layer, X, scheme, None, per_channel=per_channel, refit=False)
    W = layer.weight.detach()
    rows = [W[i : i + 1] for i in range(2)] if per_channel else [W]
    expected = [brute_force(r, X, levels) for r in rows]
    got = X @ q.weight.detach().T
    err = float(((X @ W.T - got) ** 2).sum())
    assert err == pytest.approx(sum(e for e, _ in expected), rel=1e-9, abs=1e-12)
    assert torch.allclose(q.weight.detach(), torch.cat([w for _, w in expected]), atol=1e-9)


def test_naive_method_is_the_plain_projection_and_needs_no_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = quantize_model(model, None, "linear", 3, method="naive")
    assert list(result.projections) == ["2.weight"]  # first and last stay full precision
    expected = project(before["2.weight"], None, "linear", 3).q
    assert torch.equal(model[2].weight.detach(), expected)
    assert torch.equal(model[0].weight.detach(), before["0.weight"])


def test_bad_arguments_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="calibration inputs"):
        quantize_model(model, None, "ternary")
    with pytest.raises(ValueError, match="method='fancy'"):
        quantize_model(model, torch.randn(8, 4), "ternary", method="fancy")
    with pytest.raises(ValueError, match="unknown quantization scheme 'fourary'"):
        quantize_model(model, torch.randn(8, 4), "fourary")
    with pytest.raises(ValueError, match="needs bits"):
        quantize_model(model, torch.randn(8, 4), "linear")


def test_later_layers_are_calibrated_on_the_quantized_outputs():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                          nn.Linear(10, 6))  # fmt: skip
    fp = copy.deepcopy(model)
    x = skewed_inputs(features=12, seed=5)
    result = quantize_model(model, x, "ternary", keep_full_precision=[])
    with torch.no_grad():
        h, h_q = torch.relu(fp[0](x)), torch.relu(model[0](x))  # layer 0 is quantized already
        W = fp[2].weight
        naive = project(W, None, "ternary").q
        expected = ((h @ W.T - h_q @ naive.T) ** 2).sum() / ((h @ W.T) ** 2).sum()
        y, y_q = fp[2](h) - fp[2].bias, model[2](h_q) - model[2].bias
    report = result.layers[1]
    assert report.naive_error == pytest.approx(float(expected), rel=1e-4)
    assert report.error == pytest.approx(float(((y - y_q) ** 2).sum() / (y**2).sum()), rel=1e-4)
    assert report.error <= report.naive_error


def test_conv_layer_uses_its_unfolded_patches():
    torch.manual_seed(6)
    layer = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    x = torch.randn(20, 3, 9, 9) * torch.tensor([0.1, 1.0, 5.0])[:, None, None]
    q, result = single(layer, x, "ternary", None, per_channel=True)
    naive, _ = single(layer, x, "ternary", None, per_channel=True, method="naive")
    err = output_error(layer, q, x)
    assert result.layers[0].error == pytest.approx(err, rel=1e-4)
    assert err < output_error(layer, naive, x)


class Functional(nn.Module):
    """A layer applied with functional.linear: its module's forward never runs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.inner = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(functional.linear(self.a(x), self.inner.weight))


def test_a_weight_used_functionally_falls_back_to_the_plain_projection():
    torch.manual_seed(7)
    model = Functional()
    w = model.inner.weight.detach().clone()
    result = quantize_model(model, torch.randn(16, 4), "ternary")
    [report] = result.layers
    assert report.source.startswith("d = 1") and math.isnan(report.error)
    assert torch.equal(model.inner.weight.detach(), project(w, None, "ternary").q)


class TwoCallLSTM(nn.Module):
    """An LSTM stack read as the char LM reads it: a burn-in call, then a call from its state."""

    def __init__(self, features=5, hidden=6, depth=2, norm="none"):
        super().__init__()
        self.lstm = QuantLSTM(features, hidden, depth, norm)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        _, state = self.lstm(x[:, :4])
        out, _ = self.lstm(x[:, 4:], state)
        return self.head(out)


def gate_inputs(model, x):
    """Per LSTM layer, its W_x rows (x_t) and W_h rows (h_{t−1}) over both calls, by hand."""
    rows = []

    def previous(h0, out):
        return torch.cat([h0[:, None], out[:, :-1]], 1).reshape(-1, out.shape[-1])

    with torch.no_grad():
        a, b = x[:, :4], x[:, 4:]
        for layer in model.lstm.layers:
            out_a, last = layer(a)
            out_b, _ = layer(b, last)
            X = torch.cat([a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])])
            h0 = torch.zeros(len(a), layer.hidden_size)
            rows.append((X, torch.cat([previous(h0, out_a), previous(last[0], out_b)])))
            a, b = out_a, out_b
    return rows


def relative(W, X, W_q, X_q):
    return float(((X @ W.T - X_q @ W_q.T) ** 2).sum() / ((X @ W.T) ** 2).sum())


@pytest.mark.parametrize(("scheme", "bits"), [("ternary", None), ("binary", None), ("linear", 3)])
def test_lstm_gate_matrices_are_calibrated_on_their_inputs_and_beat_naive_rounding(scheme, bits):
    """W_x on x_t and W_h on h_{t−1} over both calls (the state carried into the second); the
    reported errors are those of the outputs W·v, with ĥ from the network whose W_x (and earlier
    layers) are quantized; never above naive rounding's."""
    torch.manual_seed(8)
    model = TwoCallLSTM()
    fp = copy.deepcopy(model)
    x = torch.randn(32, 10, 5) * torch.logspace(-1, 1, 5)
    result = quantize_model(model, x, scheme, bits, keep_full_precision=["last"])
    assert [r.name for r in result.layers] == [
        f"lstm.layers.{k}.{m}.weight" for k in (0, 1) for m in ("ih", "hh")
    ]
    for r in result.layers:
        assert r.source == "inputs" and r.error <= r.naive_error * (1 + 1e-6), r
    exact = gate_inputs(fp, x)
    partly = copy.deepcopy(fp)  # layer 0's W_x quantized, the rest full precision: ĥ of layer 0
    partly.lstm.layers[0].ih.weight.data.copy_(model.lstm.layers[0].ih.weight)
    X, H = exact[0]
    _, H_q = gate_inputs(partly, x)[0]
    W_x, W_h = fp.lstm.layers[0].ih.weight.detach(), fp.lstm.layers[0].hh.weight.detach()
    Q_x, Q_h = model.lstm.layers[0].ih.weight.detach(), model.lstm.layers[0].hh.weight.detach()
    assert result.layers[0].error == pytest.approx(relative(W_x, X, Q_x, X), rel=1e-4)
    assert result.layers[1].error == pytest.approx(relative(W_h, H, Q_h, H_q), rel=1e-4)
    naive = project(W_h, None, scheme, bits, blocks=4).q
    assert result.layers[1].naive_error == pytest.approx(relative(W_h, H, naive, H_q), rel=1e-4)
    assert result.layers[1].error < result.layers[1].naive_error  # the data helps W_h too


@pytest.mark.parametrize(("scheme", "levels"), [("ternary", (-1, 0, 1)), ("binary", (-1, 1))])
def test_lstm_input_matrix_with_a_diagonal_second_moment_is_the_brute_force_optimum(scheme, levels):
    """Inputs x_t (all rows over batch and time) with E[x xᵀ] diagonal: each gate's row of W_x
    (one scale a gate block) equals the brute-force best code and scale."""
    torch.manual_seed(9)
    layer = QuantLSTM(3, 1, 1).double()
    torch.manual_seed(9)
    model = QuantLSTM(3, 1, 1).double()  # not a deepcopy: that drops the gate-block marker
    X = diagonal_inputs([0.2, 1.0, 3.0], n=64, seed=4)
    quantize_model(model, X.reshape(8, 8, 3), scheme, keep_full_precision=[], refit=False)
    W = layer.layers[0].ih.weight.detach()
    got = model.layers[0].ih.weight.detach()
    for gate in range(4):
        _, expected = brute_force(W[gate : gate + 1], X, levels)
        assert torch.allclose(got[gate : gate + 1], expected, atol=1e-9), gate
