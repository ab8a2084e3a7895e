"""Batch-norm statistics re-estimated for the weights a model has now.

A batch norm evaluates with running statistics, exponential averages (momentum 0.1) of the
batch statistics its training forwards saw. Quantized weights move in jumps: a ternary or
m-bit weight flips between levels as its latent weight crosses a threshold, so the averages
mix the activations of the last few dozen steps' weights, and the final weights' activations
can differ from them by more than the averages' own noise. Evaluated with those statistics a
quantized network scores below what its weights give: distq's ternary CIFAR-style CNN, one
run scored 81.58% with its stored statistics and 85.17% with recomputed ones
(benchmarks/README.md, channel pruning). Nagel et al. (ICML 2022, "Overcoming Oscillations in
Quantization-Aware Training") name the effect and its remedy, batch-norm re-estimation:
recompute the statistics with the weights held fixed. That is what `recalibrate` does.

What it computes, for each batch norm and batches x_1..x_K: running_mean = (1/K) Σ_k μ_k and
running_var = (1/K) Σ_k σ²_k, with μ_k and σ²_k (unbiased) the batch statistics of that
norm's input in batch k; PyTorch's cumulative average (momentum None). For distq's batch-shared
LSTM norm (distq/lstm.py) μ_k and σ²_k are its statistics averaged over the time steps of
batch k, as its running averages take them. Training is unchanged: in training mode a batch
norm normalizes with its batch's statistics, not the running ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distq.lstm import BatchSharedNorm


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's batch norms that keep running statistics: torch's, and distq's LSTM
    batch-shared norm (distq/lstm.py), which keeps one set for all time steps."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, _BatchNorm) and m.track_running_stats) or isinstance(m, BatchSharedNorm)
    ]


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Sequence[Tensor]) -> int:
    """Recompute every batch norm's running statistics over `batches` with the weights as they
    are (the module docstring's averages); returns how many norms were recomputed.

    Only the norms run in training mode (dropout and the rest in eval mode); modes and
    momenta are restored afterwards. Under torch.distributed every rank must call it with the
    same number of batches; each then takes rank 0's statistics, so replicas stay identical.
    A model without batch norms returns 0 at once, without a forward.
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    if not batches:
        raise ValueError("recalibrate needs at least one batch; got none")
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
        norm.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for norm in norms:
            for buffer in (norm.running_mean, norm.running_var):
                dist.broadcast(buffer, src=0)
    return len(norms)
