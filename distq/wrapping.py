"""OptimizerWrapper: the base of an optimizer that wraps another (distq.optim's
QuantizedOptimizer, distq.comm's Horovod optimizer) and shares its groups, state and checkpoints."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# The hook tables torch.optim.Optimizer.__init__ makes; a wrapper skips that __init__, which
# would copy the groups into param_groups of its own.
_HOOK_TABLES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class OptimizerWrapper(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose param_groups, state, defaults, zero_grad and checkpoints
    are those of `optimizer`; a subclass defines step() around the wrapped one's.

    Groups and state are looked up on every use: the wrapped optimizer's load_state_dict
    replaces its group dicts, and LR schedulers must go on acting on the live ones. Torch's
    step hooks (`register_step_pre_hook`, ...) work on the wrapper as on any optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        for table in _HOOK_TABLES:
            setattr(self, table, OrderedDict())
        self._patch_step_function()  # what Optimizer.__init__ does: step() runs the hooks

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


def closure_loss(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """The loss a step's `closure` returns, evaluated with gradients on as torch's optimizers
    do (a wrapper's step may run under no_grad); None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
