"""PyTorch Lightning with distq's quantized DDP hook, on any device.

    trainer = pl.Trainer(strategy=DDPStrategy(), callbacks=[QuantizedCommHook(bits=2)], ...)

Why a callback and not `DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`: Lightning
(`DDPStrategy._register_ddp_hooks`) registers a comm hook only when the device is CUDA and drops
it silently on CPU; and a `QuantizedCommState` needs the process group, which Lightning creates
only inside `fit`. The callback builds the state once the group and the DDP model exist
(`on_fit_start`, before the first backward) and registers `quantized_hook` itself.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from distq.comm.extras import require
from distq.comm.hook import QuantizedCommState, quantized_hook

pl = require("pytorch_lightning")


class QuantizedCommHook(pl.Callback):
    """Registers `quantized_hook` with `QuantizedCommState(**state_options)` on the trainer's
    DDP model at the start of `fit`; the state is `self.state` afterwards (byte counters in
    `self.state.compression_stats()`). Needs `strategy=DDPStrategy(...)` without its own hook."""

    def __init__(self, **state_options: Any) -> None:
        self.state_options = state_options
        self.state: QuantizedCommState | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        model = strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"QuantizedCommHook needs strategy=DDPStrategy(...); the trainer runs "
                f"{type(strategy).__name__} with a {type(model).__name__} model"
            )
        if getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError(
                "DDPStrategy(ddp_comm_hook=...) is set as well: give the hook to one of them "
                "(QuantizedCommHook works on every device, Lightning's only on CUDA)"
            )
        if self.state is None:
            self.state = QuantizedCommState(model=model, **self.state_options)
            model.register_comm_hook(self.state, quantized_hook)
