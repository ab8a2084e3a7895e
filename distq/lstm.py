"""A quantizable LSTM: the gate matrices are plain Linear weights the QuantizedOptimizer binarizes,
and each W·x and W·h term has its own normalization (Hou et al., NeurIPS 2019).

A binary d×d matrix has spectral norm ≥ √d (‖B‖₂ ≥ ‖B‖_F/√d), so the recurrent Jacobian of a
binarized LSTM is large and gradients explode through time; normalizing each term separately,

    gates_t = N_x(W_x·x_t) + N_h(W_h·h_{t−1}) + b,

with N one of `NORMS`, removes the scale of W from the forward pass and tames the gradients.
W_x (4h×in) and W_h (4h×h) stack the input, forget, cell and output gate matrices (torch's
order i, f, g, o) and are marked with 4 scale blocks (`distq.quant.set_blocks`): each gate
matrix gets its own α. Biases and normalization gains stay full precision.

Norms (each with a learned gain per pre-activation):
  none          the plain term (with NORMS[0] the layer equals torch.nn.LSTM, same weights);
  weight        rows of the (quantized) matrix scaled to unit norm: g ⊙ (W·v) / ‖W_row‖;
  layer         layer normalization over the 4h pre-activations of the term, per example;
  batch-shared  batch normalization per pre-activation: training normalizes every time step
                with its own batch statistics; one set of running statistics, shared by all
                time steps, is kept for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional

from distq.quant import set_blocks

NORMS = ("none", "weight", "layer", "batch-shared")
GATES = 4
EPS = 1e-5

Term = Callable[[Tensor], Tensor]  # normalizes one term W·v, shape (..., 4h)


class TermNorm(nn.Module):
    """Normalization of one W·v term. `bind(W)` precomputes what depends on W only (once per
    forward, not once per time step) and returns the function applied to each term."""

    kind = "none"

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def bind(self, weight: Tensor, calls: int = 1) -> Term:
        """The normalization for terms W·v with this W; `calls`: terms per forward (time steps
        for the recurrent term), for the running statistics of batch-shared."""
        return _identity


def _identity(a: Tensor) -> Tensor:
    return a


class GainNorm(TermNorm):
    """A TermNorm with a learned gain per pre-activation (full precision, starts at 1)."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.gain = nn.Parameter(torch.ones(features))


class WeightNorm(GainNorm):
    """g ⊙ (W·v) / ‖W_row‖: the term of the row-normalized matrix, invariant to scaling W."""

    kind = "weight"

    def bind(self, weight: Tensor, calls: int = 1) -> Term:
        scale = self.gain / weight.norm(dim=1).clamp_min(EPS)
        return lambda a: a * scale


class LayerNorm(GainNorm):
    """Layer normalization over the term's 4h pre-activations with a learned gain."""

    kind = "layer"

    def bind(self, weight: Tensor, calls: int = 1) -> Term:
        return lambda a: functional.layer_norm(a, (self.features,), self.gain, None, EPS)


class BatchSharedNorm(GainNorm):
    """Batch normalization with statistics shared over time steps (see the module docstring).

    In training each call normalizes with the batch statistics of its time step (over the
    first dimension); the running mean and variance move by `momentum` per forward, averaged
    over its calls, and evaluation uses them for every time step. With momentum None they are
    a cumulative average instead, each forward weighing alike (what distq.batchnorm's
    recalibration sets after `reset_running_stats`).
    """

    kind = "batch-shared"

    def __init__(self, features: int, momentum: float | None = 0.1) -> None:
        super().__init__(features)
        self.momentum = momentum
        self.tracked = 0.0  # forwards in the cumulative average (momentum None)
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def reset_running_stats(self) -> None:
        """Running statistics back to their start (mean 0, variance 1), none averaged in."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.tracked = 0.0

    def bind(self, weight: Tensor, calls: int = 1) -> Term:
        if not self.training:
            shift, scale = self.running_mean, self.gain / (self.running_var + EPS).sqrt()
            return lambda a: (a - shift) * scale

        def normalize(a: Tensor) -> Tensor:
            var, mean = torch.var_mean(a, dim=0, unbiased=False)
            with torch.no_grad():  # per-step statistics averaged into one shared running set
                flat_mean = mean.reshape(-1, self.features).mean(0)
                flat_var = (
                    var.reshape(-1, self.features).mean(0) * a.shape[0] / max(a.shape[0] - 1, 1)
                )
                if self.momentum is None:  # a call weighs 1/calls of a forward
                    self.tracked += 1.0 / calls
                    step = 1.0 / (calls * self.tracked)
                else:
                    step = self.momentum / calls
                self.running_mean.lerp_(flat_mean, step)
                self.running_var.lerp_(flat_var, step)
            return (a - mean) * (self.gain / (var + EPS).sqrt())

        return normalize


_NORM_CLASSES: dict[str, type[TermNorm]] = {
    "none": TermNorm,
    "weight": WeightNorm,
    "layer": LayerNorm,
    "batch-shared": BatchSharedNorm,
}


def make_norm(kind: str, features: int) -> TermNorm:
    """The TermNorm called `kind` (one of NORMS) over `features` pre-activations."""
    if kind not in _NORM_CLASSES:
        raise ValueError(f"LSTM norm {kind!r} is not known; allowed: {', '.join(NORMS)}")
    return _NORM_CLASSES[kind](features)


class QuantLSTMLayer(nn.Module):
    """One LSTM layer, batch first, unrolled in Python so every gate matrix is quantizable and
    each term normalizable; records ‖∂ℓ/∂h_t‖ per time step during backward (`grad_norms`).
    Its forward reads `ih.weight` and `hh.weight` itself, so a sharding wrapper must gather the
    layer as one unit (`distq_shard_whole`, read by distq.comm.fsdp.shard_model).

    Parameters: `ih.weight` W_x (4h×in) and `hh.weight` W_h (4h×h), each with 4 scale blocks;
    `bias` b (4h, full precision; the forget gate's starts at 1); the norms' gains.
    """

    distq_shard_whole = True

    def __init__(self, input_size: int, hidden_size: int, norm: str = "none") -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        features = GATES * hidden_size
        self.ih = nn.Linear(input_size, features, bias=False)
        self.hh = nn.Linear(hidden_size, features, bias=False)
        self.bias = nn.Parameter(torch.zeros(features))
        bound = hidden_size**-0.5  # torch.nn.LSTM's initialization
        with torch.no_grad():
            nn.init.uniform_(self.ih.weight, -bound, bound)
            nn.init.uniform_(self.hh.weight, -bound, bound)
            self.bias[hidden_size : 2 * hidden_size] = 1.0
        self._mark_gate_blocks()
        self.norm_x = make_norm(norm, features)
        self.norm_h = make_norm(norm, features)
        self.norm = norm
        self.probe_gradients = True
        self._grad_norms: list[Tensor | None] = []

    def _mark_gate_blocks(self) -> None:
        set_blocks(self.ih.weight, GATES)
        set_blocks(self.hh.weight, GATES)

    def __setstate__(self, state: dict) -> None:
        """Mark the gates again: `copy.deepcopy` builds fresh Parameters without the marking."""
        super().__setstate__(state)
        self._mark_gate_blocks()

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, in) -> outputs h_1..h_T (B, T, h) and the last (h, c)."""
        B, T, _ = x.shape
        n = self.hidden_size
        if state is None:
            h = x.new_zeros(B, n)
            c = x.new_zeros(B, n)
        else:
            h, c = state
        x_terms = self.norm_x.bind(self.ih.weight)(functional.linear(x, self.ih.weight))
        norm_h = self.norm_h.bind(self.hh.weight, calls=T)
        probe = self.probe_gradients and self.training and torch.is_grad_enabled()
        if probe:
            self._grad_norms = [None] * T
        outputs = []
        for t in range(T):
            gates = x_terms[:, t] + norm_h(functional.linear(h, self.hh.weight)) + self.bias
            sig = torch.sigmoid(gates)
            c = sig[:, n : 2 * n] * c + sig[:, :n] * torch.tanh(gates[:, 2 * n : 3 * n])
            h = sig[:, 3 * n :] * torch.tanh(c)
            if probe and h.requires_grad:
                h.register_hook(self._recorder(t))
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)

    def _recorder(self, t: int) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            self._grad_norms[t] = grad.detach().norm()

        return record

    def grad_norms(self) -> Tensor | None:
        """‖∂ℓ/∂h_t‖ (Frobenius over the batch) for t = 1..T of the last backward, or None."""
        norms = self._grad_norms
        if not norms or any(g is None for g in norms):
            return None
        return torch.stack(norms)


class QuantLSTM(nn.Module):
    """A stack of QuantLSTMLayers (batch first); `layers.{k}` is the k-th layer."""

    def __init__(self, input_size: int, hidden_size: int, depth: int = 1, norm: str = "none"):
        super().__init__()
        self.layers = nn.ModuleList(
            QuantLSTMLayer(input_size if k == 0 else hidden_size, hidden_size, norm)
            for k in range(depth)
        )

    def forward(
        self, x: Tensor, state: list[tuple[Tensor, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """x (B, T, in) -> last layer's outputs (B, T, h) and every layer's last (h, c)."""
        states = []
        for k, layer in enumerate(self.layers):
            x, last = layer(x, None if state is None else state[k])
            states.append(last)
        return x, states
