"""The quantizable LSTM: equal to torch.nn.LSTM without normalization, correct gradients with
every normalization, each normalization's invariance to the scale of W, per-gate-block scales
in the optimizer and the packed export, and the recorded ‖∂ℓ/∂h_t‖."""

import copy

import pytest
import torch

from distq.export import QuantSpec, export_packed, load_packed
from distq.lstm import NORMS, QuantLSTM, QuantLSTMLayer
from distq.optim import QuantizedOptimizer
from distq.quant import SCHEMES, blocks_of, get_scheme, project, set_blocks


def copy_from_torch(layer: QuantLSTMLayer, ref: torch.nn.LSTM) -> None:
    with torch.no_grad():
        layer.ih.weight.copy_(ref.weight_ih_l0)
        layer.hh.weight.copy_(ref.weight_hh_l0)
        layer.bias.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)


def test_unnormalized_layer_equals_torch_lstm_outputs_and_gradients():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, batch_first=True).double()
    layer = QuantLSTMLayer(5, 7).double()
    copy_from_torch(layer, ref)
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 7, dtype=torch.float64)
    c0 = torch.randn(3, 7, dtype=torch.float64)
    target = torch.randn(3, 6, 7, dtype=torch.float64)

    out_ref, (h_ref, c_ref) = ref(x, (h0[None], c0[None]))
    ((out_ref - target) ** 2).sum().backward()
    grads_ref = (x.grad.clone(), ref.weight_ih_l0.grad, ref.weight_hh_l0.grad, ref.bias_ih_l0.grad)
    x.grad = None
    out, (h, c) = layer(x, (h0, c0))
    ((out - target) ** 2).sum().backward()
    grads = (x.grad, layer.ih.weight.grad, layer.hh.weight.grad, layer.bias.grad)

    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_ref[0], rtol=0, atol=1e-12)
    for mine, theirs in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_gradients_match_finite_differences(norm):
    torch.manual_seed(1)
    layer = QuantLSTMLayer(3, 2, norm).double()
    layer.probe_gradients = False
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w_ih, w_hh):
        weights = {"ih.weight": w_ih, "hh.weight": w_hh}
        return torch.func.functional_call(layer, weights, (x,))[0]

    w_ih = layer.ih.weight.detach().clone().requires_grad_()
    w_hh = layer.hh.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w_ih, w_hh), eps=1e-6, atol=1e-5)


def scaled_output(layer: QuantLSTMLayer, x: torch.Tensor, scale_ih, scale_hh) -> torch.Tensor:
    with torch.no_grad():
        layer.ih.weight.mul_(scale_ih)
        layer.hh.weight.mul_(scale_hh)
        return layer(x)[0]


@pytest.mark.parametrize(
    ("norm", "per_row"), [("weight", True), ("layer", False), ("batch-shared", True)]
)
def test_normalized_terms_do_not_depend_on_the_scale_of_w(norm, per_row):
    """Weight and batch norm are invariant to scaling each row of W, layer norm to a scalar:
    why a binary matrix's √d-sized norm stops mattering."""
    torch.manual_seed(2)
    layer = QuantLSTMLayer(6, 5, norm).double()
    x = torch.randn(8, 4, 6, dtype=torch.float64)
    base = 10.0  # the norms' ε matters for tiny terms: start from larger ones
    before = scaled_output(layer, x, base, base)
    rows = 20
    s_ih = torch.rand(rows, 1, dtype=torch.float64) * 5 + 0.5 if per_row else 7.0
    s_hh = torch.rand(rows, 1, dtype=torch.float64) * 5 + 0.5 if per_row else 3.0
    after = scaled_output(layer, x, s_ih, s_hh)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    plain = QuantLSTMLayer(6, 5, "none").double()
    assert not torch.allclose(scaled_output(plain, x, 1.0, 1.0), scaled_output(plain, x, 7.0, 7.0))


def test_batch_shared_keeps_one_set_of_running_statistics_for_evaluation():
    torch.manual_seed(3)
    layer = QuantLSTMLayer(4, 3, "batch-shared")
    x = torch.randn(16, 5, 4) * 3 + 1
    for _ in range(50):
        layer(x)
    assert layer.norm_x.running_mean.shape == (12,)  # shared by every time step
    terms = torch.nn.functional.linear(x, layer.ih.weight).reshape(-1, 12)
    torch.testing.assert_close(layer.norm_x.running_mean, terms.mean(0), rtol=0.05, atol=0.05)
    layer.eval()
    one = layer(x[:1])[0]
    assert torch.isfinite(one).all()  # a batch of one evaluates with the running statistics


def test_gate_matrices_are_marked_with_four_blocks():
    layer = QuantLSTMLayer(3, 5)
    assert blocks_of(layer.ih.weight) == 4 and blocks_of(layer.hh.weight) == 4
    assert blocks_of(layer.bias) == 1
    with pytest.raises(ValueError, match="does not split"):
        set_blocks(torch.nn.Parameter(torch.zeros(6, 2)), 4)


def test_copies_and_pickles_keep_the_gate_blocks(tmp_path):
    """A deep copy (EMA, teacher copies) or a pickled model still gets one scale per gate."""
    model = QuantLSTM(3, 5, depth=2)
    torch.save(model, tmp_path / "model.pt")
    for copy_ in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        marked = {n: blocks_of(p) for n, p in copy_.named_parameters() if blocks_of(p) > 1}
        assert sorted(marked) == [f"layers.{i}.{m}.weight" for i in (0, 1) for m in ("hh", "ih")]
        assert set(marked.values()) == {4}


@pytest.mark.parametrize("scheme", ["binary", "bwn", "ternary", "twn"])
def test_per_block_alpha_is_each_blocks_closed_form(scheme):
    torch.manual_seed(4)
    w = torch.randn(4 * 6, 5) * torch.tensor([0.1, 1.0, 3.0, 0.5]).repeat_interleave(6)[:, None]
    d = torch.rand_like(w) + 0.1
    proj = project(w, d, scheme, blocks=4)
    assert proj.alpha.shape == (4,)
    for b, (wb, db) in enumerate(zip(w.chunk(4), d.chunk(4), strict=True)):
        alone = project(wb, db, scheme)
        torch.testing.assert_close(proj.alpha[b], alone.alpha)
        torch.testing.assert_close(proj.q.chunk(4)[b], alone.q)
    if scheme == "binary":
        expected = torch.stack([(db * wb.abs()).sum() / db.sum() for wb, db in
                                zip(w.chunk(4), d.chunk(4), strict=True)])
        torch.testing.assert_close(proj.alpha, expected)


def test_optimizer_gives_each_gate_block_its_own_scale():
    torch.manual_seed(5)
    model = QuantLSTM(4, 6, depth=1)
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model, "binary",
                             keep_full_precision=[])
    x = torch.randn(5, 7, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x)[0].pow(2).mean().backward()
        opt.step()
    for name in ("layers.0.ih.weight", "layers.0.hh.weight"):
        w_hat = dict(model.named_parameters())[name].detach()
        alpha = opt.alpha[name]
        assert alpha.shape == (4,) and len(alpha.unique()) == 4
        for b, block in enumerate(w_hat.chunk(4)):
            torch.testing.assert_close(block.abs(), alpha[b].expand_as(block))
        latent, d = opt.latent[name], opt.curvature(dict(model.named_parameters())[name])
        expected = torch.stack([(db * lb.abs()).sum() / db.sum()
                                for lb, db in zip(latent.chunk(4), d.chunk(4), strict=True)])
        torch.testing.assert_close(alpha, expected)
    assert opt.blocks == {"layers.0.ih.weight": 4, "layers.0.hh.weight": 4}


def test_packed_export_stores_one_bit_codes_with_a_codebook_row_per_block(tmp_path):
    torch.manual_seed(6)
    w = project(torch.randn(16, 8), scheme="binary", blocks=4).q
    assert len(w.unique()) == 8  # four blocks, ±α each: one scale for all would need 3 bits
    with pytest.raises(ValueError, match="more than the 2"):
        export_packed({"w": w}, {"w": QuantSpec("binary", 1)}, tmp_path / "one.safetensors")
    report = export_packed({"w": w}, {"w": QuantSpec("binary", 1, blocks=4)},
                           tmp_path / "blocks.safetensors")
    assert report.tensors[0].packed_bytes == 16 * 8 // 8 + 4 * 4 * 2
    assert torch.equal(load_packed(tmp_path / "blocks.safetensors")["w"], w)


def test_gradient_norms_are_recorded_per_time_step():
    torch.manual_seed(7)
    layer = QuantLSTMLayer(3, 4)
    out, _ = layer(torch.randn(2, 5, 3))
    assert layer.grad_norms() is None  # no backward yet
    out.sum().backward()
    norms = layer.grad_norms()
    assert norms.shape == (5,) and bool((norms > 0).all())
    # at the last step only the output's own gradient (all ones) reaches h_T
    torch.testing.assert_close(norms[-1], torch.tensor(8.0).sqrt())
    with torch.no_grad():
        layer(torch.randn(2, 5, 3))
    assert layer.grad_norms() is not None  # an evaluation pass keeps the last training record


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_quantizes_the_gate_blocks_and_exports(scheme, tmp_path):
    torch.manual_seed(8)
    model = QuantLSTM(3, 4, depth=1, norm="weight")
    bits = 3 if len(get_scheme(scheme).bits) > 1 else None
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, scheme, bits,
                             keep_full_precision=[])
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 5, 3))[0].sum().backward()
        opt.step()
    levels = 2**opt.bits
    state = model.state_dict()
    for name in opt.names:
        assert opt.alpha[name].shape[0] == 4  # one scale (or pair of scales) per gate block
        assert all(len(block.unique()) <= levels for block in state[name].chunk(4))
    specs = {n: QuantSpec(scheme, opt.stored_bits, blocks=4) for n in opt.names}
    export_packed(state, specs, tmp_path / "m.safetensors")
    rebuilt = load_packed(tmp_path / "m.safetensors")
    assert all(torch.equal(rebuilt[n], t) for n, t in state.items())
