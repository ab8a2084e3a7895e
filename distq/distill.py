"""Self-distillation while compressing: the QuantizedOptimizer's latent full-precision weights
teach the quantized (and sparsified) network they are projected onto.

The idea is O'Neill, Dutta & Assem's (arXiv 2109.15014, "Deep Neural Compression via Concurrent
Pruning and Self-Distillation"): prune and distill in one training run rather than in two
stages, the unpruned version of a network teaching its pruned version, with no separate student
network. What is distq's own:

- the teacher is no second model: it is the same network with the latent w that
  QuantizedOptimizer keeps anyway swapped in for ŵ = P(w) (the projection, distq/optim.py).
  Teacher and student share every parameter that is not quantized (biases, norms, the layers
  kept in full precision) and differ exactly by w − ŵ; the teacher moves as w trains. It costs
  one extra forward pass per step, under torch.no_grad(), and one copy of ŵ and the buffers;
- the objective is Hinton, Vinyals & Dean's (2015) KL on temperature-softened logits. The
  paper's is a cross-correlation between the two versions' representations, which it also uses
  to inform the pruning criterion; its exact form (which representations, how off-diagonal
  terms are weighted) was not at hand when this was written, so it is not offered. Masks here
  come from the projection of w alone (distq/quant/sparse.py). With student logits z_s,
  teacher logits z_t, p^T = softmax(z/T) over the class dimension and labels y:

      L = (1 − λ)·CE(z_s, y) + λ·T²·KL(p_t^T ‖ p_s^T),   KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)

  averaged over the examples (and over positions for sequence logits, class dimension 1 as in
  cross_entropy). ∂/∂z_s of the KL term is T·(p_s^T − p_t^T): the T² factor keeps its
  gradient on CE's scale as T changes (for T ≫ the logits' spread it tends to (z_s − z_t)/C
  with C classes and zero-mean logits: logit matching). λ = 0 is plain CE and skips the teacher.

Default T = 2, untuned: teacher and student are one network that fits the training set, so at
T = 1 the teacher's softmax is close to one-hot on the label and the KL term mostly repeats CE;
T = 2 keeps the teacher's ranking of the other classes visible, and the T² factor keeps the term
on CE's scale.

Measured (benchmarks/README.md, ternary at 75% and 90% sparsity, λ = 0.5): no gain on digits and
about 8 points lost on the CIFAR-style recipe, where the latent weights as a network test worse
than ŵ: a teacher no stronger than its student.

Under DDP the teacher runs on the unwrapped module: no reducer hook, no buffer broadcast, and
its buffers (batch-norm statistics) are restored after it, so every replica ends each step as
it would have without the teacher's forward, save for the gradients the KL term changes (the
same on every rank after the all-reduce).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distq.optim import QuantizedOptimizer
from distq.selection import unwrap


@torch.no_grad()
def teacher_logits(model: nn.Module, optimizer: QuantizedOptimizer, inputs: Tensor) -> Tensor:
    """`model`'s output on `inputs` with the latent weights w in place of ŵ (in the mode the
    model is in: a training-mode batch norm normalizes with the batch's statistics).

    Call it before the student's forward: the student's autograd graph must not see the swap.
    ŵ and every buffer are restored bit-exactly afterwards (copied back, not recomputed).
    `model` may be the DDP wrapper; the forward runs on the module inside it.
    """
    module = unwrap(model)
    optimizer.take_rank0_latent()  # before the first step, rank 0's w is every rank's teacher
    params = optimizer.quantized_parameters()
    quantized = {n: p.detach().clone() for n, p in params.items()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    try:
        for name, p in params.items():
            p.copy_(optimizer.latent[name])
        return module(inputs)
    finally:
        for name, p in params.items():
            p.copy_(quantized[name])
        for name, b in module.named_buffers():
            b.copy_(buffers[name])


def distillation_terms(
    student: Tensor, teacher: Tensor, targets: Tensor, temperature: float = 2.0
) -> tuple[Tensor, Tensor]:
    """The loss' two parts, unweighted: CE(student, targets) and KL(p_t^T ‖ p_s^T) (nats,
    without the T² factor), each averaged over examples (and positions)."""
    log_p_s = nn.functional.log_softmax(student / temperature, dim=1)
    log_p_t = nn.functional.log_softmax(teacher.detach() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return nn.functional.cross_entropy(student, targets), kl


def distillation_loss(
    student: Tensor, teacher: Tensor, targets: Tensor, weight: float, temperature: float = 2.0
) -> Tensor:
    """(1 − λ)·CE(student, targets) + λ·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), with
    λ = `weight` and T = `temperature` (the module docstring); gradients reach `student` only."""
    check_options(weight, temperature)
    if weight == 0:
        return nn.functional.cross_entropy(student, targets)
    ce, kl = distillation_terms(student, teacher, targets, temperature)
    return (1 - weight) * ce + weight * temperature**2 * kl


class SelfDistillation:
    """The latent weights as teacher: `loss(net, inputs, targets)` runs the teacher's forward,
    then the student's (through `net`, e.g. the DDP wrapper) and returns the distillation loss;
    `terms` then holds its unweighted parts {"ce": CE, "kl": KL} (detached; the monitor logs
    them as loss_ce and loss_kl).

    Args:
        optimizer: the QuantizedOptimizer whose latent weights teach.
        weight: λ in [0, 1]: 0 is plain cross-entropy (no teacher forward), 1 the KL term alone.
        temperature: T > 0 of both softmaxes (default 2: the module docstring says why).
    """

    __slots__ = ("optimizer", "temperature", "terms", "weight")

    def __init__(
        self, optimizer: QuantizedOptimizer, weight: float, temperature: float = 2.0
    ) -> None:
        check_options(weight, temperature)
        if not isinstance(optimizer, QuantizedOptimizer):
            raise ValueError(
                f"self-distillation needs a QuantizedOptimizer (its latent weights are the "
                f"teacher), got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.terms: dict[str, Tensor] = {}

    def loss(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """The student's loss on one batch: teacher forward first, then the student's."""
        teacher = teacher_logits(net, self.optimizer, inputs) if self.weight else None
        student = net(inputs)
        if teacher is None:
            loss = nn.functional.cross_entropy(student, targets)
            self.terms = {"ce": loss.detach()}
            return loss
        ce, kl = distillation_terms(student, teacher, targets, self.temperature)
        self.terms = {"ce": ce.detach(), "kl": kl.detach()}
        return (1 - self.weight) * ce + self.weight * self.temperature**2 * kl


def check_options(weight: float, temperature: float) -> None:
    """ValueError naming a weight outside [0, 1] or a temperature that is not above 0."""
    if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
        raise ValueError(f"distillation weight λ={weight!r}; allowed: a number in [0, 1]")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
        temperature <= 0
    ):
        raise ValueError(
            f"distillation temperature T={temperature!r}; allowed: a finite number above 0"
        )
