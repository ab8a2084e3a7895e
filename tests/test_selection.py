"""Which tensors QuantizedOptimizer quantizes: every matmul weight of a layer, tied weights once,
user-named layer types, and a warning when the policy finds nothing."""

import warnings

import pytest
import torch
from torch import nn

from distq.optim import QuantizedOptimizer
from distq.selection import quantizable, select_quantized


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)


class TiedLM(nn.Module):
    """An embedding, a recurrent layer and an output head sharing the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.rnn = nn.LSTM(8, 8, num_layers=1)
        self.mix = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h, _ = self.rnn(self.embed(tokens))
        h, _ = self.mix(h, h, h)
        return self.head(h)


class Scale(nn.Module):
    """A layer type distq does not know: y = x·W."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))

    def forward(self, x):
        return x @ self.weight


def test_recurrent_attention_and_transposed_conv_weights_are_layers():
    model = nn.Sequential(nn.ConvTranspose1d(2, 4, 3), nn.GRU(4, 6), nn.LSTM(6, 6, proj_size=3))
    mha = nn.MultiheadAttention(4, 2)
    found = {c.name: c.blocks for c in quantizable(model)}
    assert found == {
        "0.weight": 1,
        "1.weight_ih_l0": 3,
        "1.weight_hh_l0": 3,
        "2.weight_ih_l0": 4,
        "2.weight_hh_l0": 4,
        "2.weight_hr_l0": 1,
    }
    assert {c.name: c.blocks for c in quantizable(mha)} == {
        "in_proj_weight": 3,
        "out_proj.weight": 1,
    }


def test_lstm_gates_get_one_scale_each():
    model = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8), nn.Linear(8, 2))
    opt = QuantizedOptimizer(adam(model), model, keep_full_precision=())
    assert opt.blocks["1.weight_ih_l0"] == 4
    assert opt.alpha["1.weight_hh_l0"].shape == (4,)


def test_a_tied_weight_is_quantized_once_under_its_parameter_name():
    model = TiedLM()
    opt = QuantizedOptimizer(adam(model), model, keep_full_precision=())  # KeyError before
    assert opt.names.count("embed.weight") == 1 and "head.weight" not in opt.names
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.unique().numel() <= 3  # ternary: {−α, 0, α}
    tokens = torch.randint(0, 16, (5, 2))
    model(tokens).sum().backward()
    opt.step()
    assert model.embed.weight.unique().numel() <= 3


def test_keep_patterns_reach_a_tied_weight_by_any_of_its_paths():
    model = TiedLM()
    assert "embed.weight" not in select_quantized(model, ("head",))
    assert "embed.weight" not in select_quantized(model, ("last",))  # the head is last
    assert "embed.weight" in select_quantized(model, ("first",))


def test_user_named_layer_types_by_class_or_name():
    model = nn.Sequential(Scale(4), nn.ReLU(), Scale(4))
    assert select_quantized(model, (), quantize_modules=(Scale,)) == ["0.weight", "2.weight"]
    assert select_quantized(model, ("first",), quantize_modules=("Scale",)) == ["2.weight"]
    qualified = f"{Scale.__module__}.{Scale.__qualname__}"
    assert select_quantized(model, (), quantize_modules=(qualified,)) == ["0.weight", "2.weight"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("Nowhere", "matches no module of the model; module types in it: ['ReLU', 'Scale', "),
        (3, "quantize_modules entry 3; allowed: an nn.Module subclass or a class name"),
        ("ReLU", "'ReLU': its modules have no `weight` parameter"),
    ],
)
def test_bad_module_types_are_named(entry, message):
    model = nn.Sequential(Scale(4), nn.ReLU())
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        select_quantized(model, (), quantize_modules=(entry,))


def test_warns_when_nothing_is_quantized():
    model = nn.Sequential(Scale(4), nn.ReLU(), Scale(4))
    with pytest.warns(UserWarning, match="quantizes no tensor of Sequential: it has no layer"):
        QuantizedOptimizer(adam(model), model)
    small = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"all 2 quantizable weights \['0.weight', '1.weight'\]"):
        QuantizedOptimizer(adam(small), small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantizedOptimizer(adam(model), model, keep_full_precision=(), quantize_modules=(Scale,))
