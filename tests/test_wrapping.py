"""OptimizerWrapper shares the wrapped optimizer's groups, state and checkpoints, and torch's
step hooks run on it as on any optimizer."""

import pytest
import torch
from torch import nn

from distq.optim import QuantizedOptimizer
from distq.wrapping import OptimizerWrapper, closure_loss


class Stepping(OptimizerWrapper):
    """The smallest wrapper: its step is the wrapped optimizer's."""

    def step(self, closure=None):
        return self.optimizer.step(closure)


def adam_and_wrapper():
    layer = nn.Linear(3, 2)
    adam = torch.optim.Adam(layer.parameters(), lr=0.1)
    return layer, adam, Stepping(adam)


def test_groups_state_and_defaults_are_the_live_ones_of_the_wrapped_optimizer():
    layer, adam, wrapper = adam_and_wrapper()
    layer(torch.ones(1, 3)).sum().backward()
    wrapper.step()
    assert wrapper.param_groups is adam.param_groups
    assert wrapper.state is adam.state and wrapper.defaults is adam.defaults
    wrapper.load_state_dict(wrapper.state_dict())  # adam makes new group dicts
    assert wrapper.param_groups is adam.param_groups
    schedule = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)
    wrapper.step()
    schedule.step()
    assert adam.param_groups[0]["lr"] == 0.05


def test_zero_grad_and_checkpoints_pass_through():
    layer, adam, wrapper = adam_and_wrapper()
    layer(torch.ones(1, 3)).sum().backward()
    wrapper.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())
    wrapper.zero_grad()
    assert all(p.grad is None for p in layer.parameters())
    assert wrapper.state_dict().keys() == adam.state_dict().keys()


def quantized_and_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    adam = torch.optim.Adam(model.parameters())
    return model, QuantizedOptimizer(adam, model, keep_full_precision=())


@pytest.mark.parametrize("make", [adam_and_wrapper, quantized_and_model])
def test_step_hooks_run_on_a_wrapper_from_its_first_step(make):
    net, *_, opt = make()
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_closure_loss_runs_the_closure_with_gradients_on_even_under_no_grad():
    assert closure_loss(None) is None
    w = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        loss = closure_loss(lambda: (w * w).sum())
    assert loss.requires_grad and loss.item() == 2.0


def test_a_quantized_step_returns_its_closures_loss_after_the_closure_made_the_gradients():
    model, opt = quantized_and_model()

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 3)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and all(p.grad is not None for p in model.parameters())
