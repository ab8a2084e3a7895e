"""QuantizedOptimizer on one worker: the proximal step, exact resume, NaN safety, memory; and
built before DDP on 2 real ranks (as the Hugging Face Trainer builds it)."""

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

from distq.optim import QuantizedOptimizer
from distq.quant import project
from tests.distributed import run_workers


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    )


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)


def train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def build(model, scheme="ternary", bits=None, base="adam", **kw):
    base_opt = (
        torch.optim.Adam(model.parameters(), lr=1e-2)
        if base == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    return QuantizedOptimizer(base_opt, model, scheme=scheme, bits=bits, **kw)


def test_parameters_hold_the_projection_of_the_latent_weights_with_adam_curvature():
    model = make_model()
    opt = build(model)
    train(model, opt, 5)
    assert opt.names == ["2.weight", "5.weight"]
    for name in opt.names:
        p = dict(model.named_parameters())[name]
        state = opt.base_optimizer.state[p]
        beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
        d = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps
        assert torch.equal(opt.curvature(p), d)
        assert torch.equal(p.data, project(opt.latent[name], d, "ternary").q)
        assert len(p.data.unique()) <= 3
        assert opt.latent[name].abs().max() <= 1.0


def test_sgd_means_unit_curvature():
    model = make_model()
    opt = build(model, base="sgd")
    train(model, opt, 3)
    p = model[2].weight
    assert opt.curvature(p) is None
    assert torch.equal(p.data, project(opt.latent["2.weight"], None, "ternary").q)


def test_full_precision_layers_and_biases_are_untouched():
    model = make_model()
    opt = build(model, keep_full_precision=("first", "last", r"5\..*"))
    assert opt.names == ["2.weight"]
    train(model, opt, 3)
    assert len(model[0].weight.unique()) > 100
    assert len(model[2].bias.unique()) > 3


def test_unknown_keep_pattern_names_the_choices():
    with pytest.raises(ValueError, match=r"matches no quantizable weight.*2\.weight"):
        build(make_model(), keep_full_precision=("first", "conv9"))


@pytest.mark.parametrize(
    ("scheme", "bits", "base"),
    [
        ("ternary", None, "adam"),
        ("ternary-approx", None, "adam"),
        ("linear", 3, "adam"),
        ("binary", None, "sgd"),
        ("log", 4, "adam"),
        ("shared", 3, "adam"),
    ],
)
def test_resume_from_state_dict_is_bit_exact(tmp_path, scheme, bits, base):
    model = make_model()
    opt = build(model, scheme, bits, base)
    train(model, opt, 7)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, 8, first=7)

    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed_opt = build(resumed, scheme, bits, base)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, 8, first=7)

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name in opt.names:
        assert torch.equal(opt.latent[name], resumed_opt.latent[name])


def test_lr_scheduler_still_drives_the_wrapped_optimizer_after_a_resume():
    """load_state_dict replaces the wrapped optimizer's group dicts: the wrapper must expose the
    new ones, or a scheduler built on it goes on changing stale copies."""
    opt = build(make_model(), "ternary", None, "sgd")
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    opt.load_state_dict(opt.state_dict())
    schedule.step()
    schedule.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] / 3)


def test_resume_refuses_another_quantization_setup():
    model = make_model()
    state = build(model).state_dict()
    other = build(make_model(), "binary")
    with pytest.raises(ValueError, match="scheme: checkpoint 'ternary' vs now 'binary'"):
        other.load_state_dict(state)


def test_nan_gradient_skips_the_step_and_keeps_latent_weights():
    model = make_model()
    opt = build(model)
    train(model, opt, 3)
    latent = copy.deepcopy(opt.latent)
    params = [p.detach().clone() for p in model.parameters()]
    x, y = batch(99)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"non-finite gradient in \['2.weight'\]"):
        opt.step()
    assert opt.skipped_steps == 1
    for name in opt.names:
        assert torch.equal(opt.latent[name], latent[name])
    for p, before in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, before)
    train(model, opt, 2, first=100)  # and training goes on, finite
    assert all(torch.isfinite(t).all() for t in opt.latent.values())


def test_nan_gradient_raises_when_asked():
    model = make_model()
    opt = build(model, nonfinite="raise")
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    model[5].weight.grad.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"5\.weight"):
        opt.step()


def test_memory_is_one_latent_copy_and_does_not_grow():
    def tensor_bytes(opt):
        state = opt.state_dict()
        tensors = list(state["latent"].values())
        for per_param in state["base"]["state"].values():
            tensors += [t for t in per_param.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors), len(tensors)

    model = make_model()
    opt = build(model)
    quantized_bytes = sum(dict(model.named_parameters())[n].numel() * 4 for n in opt.names)
    assert sum(t.numel() * t.element_size() for t in opt.latent.values()) == quantized_bytes
    train(model, opt, 3)
    after_3 = tensor_bytes(opt)
    train(model, opt, 20, first=3)
    assert tensor_bytes(opt) == after_3


def test_works_with_lr_schedulers():
    model = make_model()
    opt = build(model)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            train(model, opt, 1, first=step)
            schedule.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "quinary"}, "allowed"),
        ({"scheme": "linear"}, "needs bits"),
        ({"nonfinite": "ignore"}, "allowed: skip, raise"),
        ({"clip_latent": -1.0}, "clip_latent"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(make_model(), **kwargs)


def test_loss_aware_off_projects_with_unit_curvature():
    model = make_model()
    opt = build(model, "ternary", None, "adam", loss_aware=False)
    train(model, opt, 3)
    for name, p in opt.quantized_parameters().items():
        assert opt.curvature(p) is None
        expected = project(opt.latent[name], None, "ternary").q
        assert torch.equal(p.detach(), expected), name


def train_built_before_ddp(rank, world_size, out_dir):
    model = make_model(seed=rank)  # no shared seed: each rank starts from its own weights
    opt = build(model, scheme="ternary-approx")  # warm-started α must agree too
    initial = {n: t.clone() for n, t in opt.latent.items()}
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's ŵ, not its latent w
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(10):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}  # BatchNorm's stats: per rank
    torch.save({"params": params, "latent": opt.latent, "initial": initial},
               out_dir / f"rank{rank}.pt")  # fmt: skip
    del ddp
    gc.collect()


@pytest.mark.slow
def test_built_before_ddp_replicas_stay_bit_identical_without_a_shared_seed(tmp_path):
    run_workers(train_built_before_ddp, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert not torch.equal(r0["initial"]["2.weight"], r1["initial"]["2.weight"])
    for kind in ("params", "latent"):
        different = [n for n in r0[kind] if not torch.equal(r0[kind][n], r1[kind][n])]
        assert not different, (kind, different)
