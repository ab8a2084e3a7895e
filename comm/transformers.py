"""The Hugging Face Trainer with distq's quantized DDP hook, on any device:
`Trainer(model, args, train_dataset=data, callbacks=[QuantizedCommCallback(bits=2)])`.

The Trainer wraps the model in DDP only inside `train()` and hands callbacks the unwrapped model,
so `on_train_begin` finds the DDP wrapper among the live objects (~0.1 s, once per `train()`).
Gradient accumulation and `ddp_static_graph` work, not both at once (torch's reducer asserts)."""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.comm.extras import require
from distq.comm.hook import QuantizedCommState, quantized_hook

transformers = require("transformers")
log = logging.getLogger(__name__)


def find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The live DistributedDataParallel wrapper whose `.module` is `model`, or None."""
    kinds, stack = {DistributedDataParallel}, [DistributedDataParallel]
    while stack:  # DDP and its subclasses: a set lookup per object keeps the scan fast
        for sub in stack.pop().__subclasses__():
            kinds.add(sub)
            stack.append(sub)
    for obj in gc.get_objects():
        if type(obj) in kinds and obj.module is model:
            return obj
    return None


class QuantizedCommCallback(transformers.TrainerCallback):
    """Registers `quantized_hook` with `QuantizedCommState(**state_options)` (then
    `callback.state`) on the Trainer's DDP model when training begins; one process: a warning,
    nothing registered; a distributed Trainer without DDP (DeepSpeed, FSDP): ValueError."""

    def __init__(self, **state_options: Any) -> None:
        self.state_options = state_options
        self.state: QuantizedCommState | None = None
        self._ddp: weakref.ref | None = None  # the model registered on; weak, so it can be freed

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        if args.world_size < 2:
            log.warning("QuantizedCommCallback: one process, no gradient exchange to quantize")
            return
        ddp = find_ddp(model)
        if ddp is None:
            raise ValueError(
                f"QuantizedCommCallback needs the Trainer to wrap {type(model).__name__} in "
                f"DistributedDataParallel; it runs {args.world_size} processes without DDP "
                "(DeepSpeed: distq.comm.deepspeed.quantize_engine; FSDP is not supported)"
            )
        if self._ddp is not None and self._ddp() is ddp:  # a second train(): registered already
            return
        self.state = QuantizedCommState(model=ddp, **self.state_options)
        ddp.register_comm_hook(self.state, quantized_hook)
        self._ddp = weakref.ref(ddp)
        log.info("distq's quantized DDP hook registered on %s", type(model).__name__)
