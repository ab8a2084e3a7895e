"""PyTorch Lightning with distq's quantized DDP hook, on any device:
`pl.Trainer(strategy=DDPStrategy(), callbacks=[QuantizedCommHook(bits=2)], ...)`.

A callback because Lightning registers `DDPStrategy(ddp_comm_hook=...)` only on CUDA (silently
dropped on CPU), and the state needs the process group, which exists only inside `fit`."""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from distq.comm.extras import require
from distq.comm.hook import QuantizedCommState, quantized_hook

pl = require("pytorch_lightning")


class QuantizedCommHook(pl.Callback):
    """Registers distq's DDP hook at the start of `fit`: `QuantizedCommState(**state_options)`
    with a plain `DDPStrategy()`, or, with no options, `DDPStrategy(ddp_comm_state=...,
    ddp_comm_hook=...)`'s (built under torchrun) where Lightning did not register it (off CUDA).
    The state (`compression_stats()`) is `self.state` afterwards."""

    def __init__(self, **state_options: Any) -> None:
        self.state_options = state_options
        self.state: QuantizedCommState | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.state is not None:  # a second fit: the hook is registered already
            return
        strategy = trainer.strategy
        model = strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"QuantizedCommHook needs strategy=DDPStrategy(...); the trainer runs "
                f"{type(strategy).__name__} with a {type(model).__name__} model"
            )
        # DDPStrategy keeps its hook arguments in these attributes (Lightning 2.x)
        hook = getattr(strategy, "_ddp_comm_hook", None)
        if hook is None:
            self.state = QuantizedCommState(model=model, **self.state_options)
            model.register_comm_hook(self.state, quantized_hook)
            return
        if self.state_options:
            raise ValueError(
                "DDPStrategy(ddp_comm_hook=...) is set and QuantizedCommHook got state options "
                f"{sorted(self.state_options)}: configure the hook in one place"
            )
        if getattr(strategy, "_ddp_comm_wrapper", None) is not None:
            raise ValueError("DDPStrategy(ddp_comm_wrapper=...) is not supported with distq's hook")
        self.state = strategy._ddp_comm_state
        if strategy.root_device.type != "cuda":  # Lightning registered it only on CUDA
            model.register_comm_hook(self.state, hook)
