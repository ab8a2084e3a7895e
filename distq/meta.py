"""A learned gradient through the quantizer (MetaQuant), the alternative to the straight-through
estimator in QuantizedOptimizer (`estimator="meta"`).

The idea is Chen, Wang & Pan's (NeurIPS 2019, "MetaQuant: Learning to Quantize by Learning to
Penetrate Non-differentiable Quantization", github.com/csyhhu/MetaQuant): ŵ = Q(w) has no useful
derivative, so instead of passing ∇ŵ straight through to the latent w (STE), a small network
M_φ, applied coordinate by coordinate and shared by every quantized tensor, maps the gradient
w.r.t. ŵ and the latent weight to the gradient the optimizer applies to w. φ is trained on the
task loss itself: the update w_k = w_{k−1} − η·M_φ(…) decides the next ŵ_k = Q(w_k), so the next
step's loss L_k(ŵ_k) depends on φ. With the quantizer's derivative taken straight through and
the base optimizer's transform of the gradient (momentum, Adam's scaling) taken as the identity,
as the paper's code does (it detaches that part):

    ∂L_k/∂φ = −η_{k−1} · Σ_tensors ⟨ ∇ŵ L_k , ∂G_{k−1}(φ)/∂φ ⟩

where G_{k−1} is the gradient M_φ produced at the previous step. φ moves to raise the agreement
between the gradient it proposed and the one the task loss shows one step later.

distq's M_φ, with g = ∇ŵ L (after DDP's average) and w the latent weight, per coordinate i of a
tensor:

    G_i = g_i · (1 + m_φ(w_i / rms(w), g_i / rms(g))),    rms(t) = √(mean(t²)) + 1e-12

    m_φ: R² -> R,  Linear(2, 8) -> ReLU -> Linear(8, 8) -> ReLU -> Linear(8, 1)

So ∂L_k/∂φ = −η Σ_i g_{k,i} · g_{k−1,i} · ∂m_φ(x_{k−1,i})/∂φ: m grows where consecutive
gradients agree in sign and shrinks where they oscillate (a binary weight flipping about 0).
With m_φ a constant c this is hypergradient descent on a learning-rate multiplier 1 + c (Baydin
et al., ICLR 2018): what the meta network learns includes a step size, so the benchmark
(benchmarks/README.md) runs the STE at the learned gain times the learning rate as a control.
φ is stepped by Adam (lr 1e-3, no weight decay: the paper code's meta optimizer), once per step,
before the latent update, so step k's update uses the φ that the loss at step k has just trained.

What is the paper's: the coordinate-wise meta network shared across layers, its inputs (the
gradient w.r.t. the quantized weight and the weight), its output replacing the STE gradient in
the optimizer's update, its training through the next forward with the quantizer straight-through
and the optimizer's transform detached, Adam at 1e-3 for φ. What is distq's own:

- the form g·(1 + m_φ): the paper's code multiplies the gradient by the net's output on the weight
  ("MultiFC") or maps the gradient alone ("FC-Grad"); its README's command and stored runs use no
  non-linearity, which makes either a learned multiple (of w·g, or of g). Here m_φ sees both
  inputs, each normalized per tensor by its root mean square so one net serves layers of
  different scales; it has ReLU non-linearities (one of the paper code's options; tanh doubled
  the CIFAR-style step on a CPU), hidden width 8 (the paper's 100 costs too much on a CPU at
  ~285k weights) and a last layer that starts at zero, so training starts as exactly the STE;
- the gradient reaches φ by the formula above computed as a vector-Jacobian product at the next
  step (M_φ re-evaluated on the stored inputs of the previous step, contracted with the new
  ∇ŵ), not by putting w − η·G(φ) into the model's forward as the paper's modules do: the same
  derivative, with the model's forward untouched and ŵ in the parameters as everywhere in distq;
- the step order: the paper's code updates w at step k with the meta gradient computed from step
  k−1's ∇ŵ (one step late) and evaluates its forward at a lookahead of the previous update; here
  step k's update uses step k's ∇ŵ, and its forward runs on exactly Q(w_k);
- Q is distq's projection (distq/quant), loss-aware with Adam; the paper used DoReFa and BWN
  forward quantizers and started from a pretrained full-precision model.

Measured (benchmarks/README.md, binary weights, CIFAR-style recipe, 300 steps, 2 seeds): with SGD
the meta gradient beats the STE by 11.71 points (70.88% vs 59.17%, both seeds), having learned a
gain of 4.9-6.4 on every weight, and the STE at that larger learning rate closes the gap on one
seed of the two; with Adam it is moot (+1.17, inside the seeds' spread); a step costs 1.54x.

Cost: m_φ runs three times a step over every quantized weight (the new G, and forward and
backward on the previous inputs), and the previous step's g and w are kept: two more copies of
the quantized weights, in memory and in checkpoints.

Under DDP every rank holds the same φ (built from a fixed seed, not the global RNG), the same
Adam state and the same stored inputs, and computes the meta step from the averaged gradient:
the replicas stay identical with no communication of their own. The state (φ, its Adam, the
stored inputs) is in QuantizedOptimizer's state_dict, so a resume continues bit-exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

ESTIMATORS = ("ste", "meta")
HIDDEN = 8  # width of m_φ's two hidden layers
META_LR = 1e-3  # Adam's learning rate for φ (the paper's code)
SEED = 0  # φ's initialization: the same on every rank, whatever the global RNG holds


def rms(t: Tensor) -> Tensor:
    """√(mean(t²)) + 1e-12: the per-tensor scale the meta network's inputs are divided by."""
    return t.square().mean().sqrt() + 1e-12


def meta_network(hidden: int = HIDDEN) -> nn.Sequential:
    """m_φ: (w / rms(w), g / rms(g)) -> gain correction, last layer zero (starts as the STE);
    initialized from a private generator seeded with SEED."""
    net = nn.Sequential(
        nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for layer in net[:-1]:
            if isinstance(layer, nn.Linear):
                bound = 1 / layer.in_features**0.5
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
                layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) * 2 * bound - bound)
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    return net


class MetaGradient:
    """The meta network, its Adam and the inputs of the last step: `replace(...)` trains φ on the
    new gradients, then returns the meta gradients G for the latent update (module docstring)."""

    def __init__(
        self, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.net = meta_network().to(device=device, dtype=dtype)  # the weights' device and dtype
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=META_LR)
        # name -> (g, w, η) of the previous step: G_{k−1}(φ) is re-evaluated on them
        self.previous: dict[str, tuple[Tensor, Tensor, float]] = {}

    def gradients(self, grads: dict[str, Tensor], latent: dict[str, Tensor]) -> dict[str, Tensor]:
        """G = g·(1 + m_φ(w/rms(w), g/rms(g))) for each name, in the graph of φ."""
        names = list(grads)
        features = torch.cat(
            [
                torch.stack([latent[n] / rms(latent[n]), grads[n] / rms(grads[n])], -1).view(-1, 2)
                for n in names
            ]
        )
        gains = 1 + self.net(features).view(-1)
        out, start = {}, 0
        for n in names:
            size = grads[n].numel()
            out[n] = grads[n] * gains[start : start + size].view_as(grads[n])
            start += size
        return out

    def train_step(self, grads: dict[str, Tensor]) -> None:
        """One Adam step on φ with ∂L_k/∂φ = −Σ η_{k−1}·⟨g_k, ∂G_{k−1}(φ)/∂φ⟩ (nothing at the
        first step, which has no previous one)."""
        previous = {n: v for n, v in self.previous.items() if n in grads}
        if not previous:
            return
        with torch.enable_grad():
            proposed = self.gradients(
                {n: v[0] for n, v in previous.items()}, {n: v[1] for n, v in previous.items()}
            )
            loss = -sum(lr * (grads[n] * proposed[n]).sum() for n, (_, _, lr) in previous.items())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def replace(
        self, grads: dict[str, Tensor], latent: dict[str, Tensor], lrs: dict[str, float]
    ) -> dict[str, Tensor]:
        """Train φ on `grads` (∇ŵ of this step), store (g, w, η) for the next step, and return
        the meta gradients for the latent update."""
        self.train_step(grads)
        meta = self.gradients(grads, latent)
        self.previous = {n: (grads[n].clone(), latent[n].clone(), lrs[n]) for n in grads}
        return meta

    def state_dict(self) -> dict[str, Any]:
        """φ, its Adam state and the previous step's inputs (what an exact resume needs)."""
        return {
            "net": {k: v.clone() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "previous": {
                n: {"grad": g.clone(), "latent": w.clone(), "lr": lr}
                for n, (g, w, lr) in self.previous.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.previous = {
            n: (v["grad"].clone(), v["latent"].clone(), float(v["lr"]))
            for n, v in state["previous"].items()
        }


def check_estimator(estimator: object) -> None:
    """ValueError naming an estimator that is not one of ESTIMATORS."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; allowed: {', '.join(ESTIMATORS)}")
