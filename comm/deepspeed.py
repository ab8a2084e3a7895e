"""DeepSpeed with distq's quantized gradient exchange (DeepSpeed 0.19 ships no compressed
backend and no 1-bit Adam any more).

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    exchange = quantize_engine(engine, QuantizedCommState(bits=2, clip=2.5))

`quantize_engine` turns off the gradient all-reduce that `engine.enable_backward_allreduce` gates
(1-bit Adam's contract); the backward that ends a gradient-accumulation window returns with the
gradients averaged by the state's exchange, and DeepSpeed clips and steps alike on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from distq.comm.buckets import DEFAULT_CAP_MB, BucketedExchange
from distq.comm.extras import require
from distq.comm.hook import QuantizedCommState

deepspeed = require("deepspeed")
log = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.19.",)
FLAG = "enable_backward_allreduce"


class DeepSpeedExchange(BucketedExchange):
    """Averages a DeepSpeed engine's gradients over ranks through `state`'s exchange at each
    gradient-accumulation boundary (see the module docstring); made by `quantize_engine`.
    `state` keeps its DDP-hook meaning: `start_iter` fp32 warm-up steps, `compression_stats()`,
    and `state_dict()` for the step counter and error-feedback residuals."""

    def __init__(self, engine: Any, state: QuantizedCommState, bucket_cap_mb: float) -> None:
        state.close()  # the DDP hook's worker thread: the buckets here have their own
        super().__init__(
            state.exchange,
            engine.module.parameters(),
            lambda: state.iter,
            state.start_iter,
            bucket_cap_mb,
            state.overlap,
            counting=engine.is_gradient_accumulation_boundary,
        )
        self.engine, self.state = engine, state
        self._queued = False

    def _on_grad(self, param: Tensor) -> None:
        """On the first gradient of a boundary backward, queue `exchange` for when it ends."""
        if not self._queued and self.counting():
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.exchange)
        super()._on_grad(param)

    def exchange(self) -> None:
        """Average every parameter's gradient over ranks now (all ranks must call it)."""
        self._queued = False
        try:
            self.finish()
        finally:
            self.state.iter += 1

    def remove(self) -> None:
        """Unregister the hooks and give the engine its own all-reduce back."""
        self.close()
        setattr(self.engine, FLAG, True)


def quantize_engine(
    engine: Any, state: QuantizedCommState, bucket_cap_mb: float = DEFAULT_CAP_MB
) -> DeepSpeedExchange:
    """Switch `engine`'s gradient all-reduce off and exchange its gradients through `state`.

    Call it right after `deepspeed.initialize` and before the first backward. Raises
    AttributeError if this DeepSpeed has no `enable_backward_allreduce` flag, and ValueError
    for configurations whose gradients do not live in `param.grad` in fp32 (fp16/bf16, ZeRO ≥ 1).
    """
    if not deepspeed.__version__.startswith(TESTED_VERSIONS):
        log.warning(
            "distq's DeepSpeed adapter is tested with %s, not %s",
            TESTED_VERSIONS,
            deepspeed.__version__,
        )
    if not hasattr(engine, FLAG) or not isinstance(getattr(engine, FLAG), bool):
        raise AttributeError(
            f"{type(engine).__name__} has no boolean '{FLAG}' attribute: this DeepSpeed "
            f"({deepspeed.__version__}) changed the contract distq relies on to switch off its "
            "gradient all-reduce; distq cannot run on it"
        )
    stage = engine.zero_optimization_stage()
    if stage != 0:
        raise ValueError(
            f"zero_optimization.stage={stage}; allowed: 0 (ZeRO ≥ 1 reduces gradients into its "
            "own partitioned buffers, which distq's exchange does not fill)"
        )
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise ValueError("fp16/bf16 engines are not supported: allowed: fp32 (no 'fp16'/'bf16')")
    if not engine.managed_gradient_accumulation():
        raise ValueError("managed_gradient_accumulation=false is not supported; allowed: true")
    setattr(engine, FLAG, False)
    return DeepSpeedExchange(engine, state, bucket_cap_mb)
