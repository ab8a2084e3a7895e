"""Self-distillation (distq/distill.py): the teacher is exactly the latent weights and leaves the
model as it found it, the loss is the formula, λ = 0 is plain training, bad values are named,
and 2-rank gloo DDP replicas stay bit-identical with it on."""

import copy
import gc
import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.distill import SelfDistillation, distillation_loss, teacher_logits
from distq.optim import QuantizedOptimizer
from tests.distributed import run_workers


def net():
    return nn.Sequential(
        nn.Linear(6, 24), nn.BatchNorm1d(24), nn.ReLU(),
        nn.Linear(24, 24), nn.BatchNorm1d(24), nn.ReLU(),
        nn.Linear(24, 3),
    )  # fmt: skip


def batch(g, n=16):
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def trained(steps, weight, seed=0, temperature=2.0):
    """A ternary, 50%-sparse model after `steps` steps with distillation weight `weight`."""
    torch.manual_seed(seed)
    model = net()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "ternary",
                             keep_full_precision=["first"], sparsity=0.5)  # fmt: skip
    run_steps(model, opt, SelfDistillation(opt, weight, temperature).loss, seed + 1, steps)
    return model, opt


def run_steps(model, opt, loss, seed, steps):
    """`steps` optimizer steps on `loss(model, x, y)` over batches drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = batch(g)
        opt.zero_grad()
        loss(model, x, y).backward()
        opt.step()


def plain(steps, seed=0):
    """The same training as `trained` with plain cross-entropy, as before distillation existed."""
    torch.manual_seed(seed)
    model = net()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "ternary",
                             keep_full_precision=["first"], sparsity=0.5)  # fmt: skip
    run_steps(model, opt, lambda m, x, y: nn.functional.cross_entropy(m(x), y), seed + 1, steps)
    return model, opt


def test_teacher_forward_uses_exactly_the_latent_weights_and_restores_everything():
    model, opt = trained(5, 0.5)
    x, _ = batch(torch.Generator().manual_seed(7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)  # the latent weights loaded by hand
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in opt.latent:
                p.copy_(opt.latent[name])
        expected = reference(x)
    got = teacher_logits(model, opt, x)
    assert torch.equal(got, expected) and not got.requires_grad
    after = model.state_dict()
    for key, value in before.items():  # ŵ, biases, batch-norm statistics, batch counters
        assert torch.equal(after[key], value), key
    assert after["4.num_batches_tracked"] == before["4.num_batches_tracked"]
    assert not torch.equal(got, model(x))  # ŵ and w really differ


def brute_force(student, teacher, targets, weight, temperature):
    """The module docstring's L in float64, one example (and position) at a time."""
    s, t = student.double(), teacher.double()
    if s.dim() == 2:
        s, t, targets = s.unsqueeze(-1), t.unsqueeze(-1), targets.unsqueeze(-1)
    ce = kl = 0.0
    count = 0
    for i in range(s.shape[0]):
        for j in range(s.shape[2]):
            zs, zt = s[i, :, j].tolist(), t[i, :, j].tolist()
            norm_s = sum(math.exp(v) for v in zs)
            ce -= math.log(math.exp(zs[targets[i, j]]) / norm_s)
            ps = [math.exp(v / temperature) for v in zs]
            pt = [math.exp(v / temperature) for v in zt]
            ps = [v / sum(ps) for v in ps]
            pt = [v / sum(pt) for v in pt]
            kl += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
            count += 1
    return (1 - weight) * ce / count + weight * temperature**2 * kl / count


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6)])  # classes on dim 1, as cross_entropy
@pytest.mark.parametrize(("weight", "temperature"), [(0.0, 2.0), (0.3, 1.0), (0.5, 2.0),
                                                      (1.0, 4.0), (0.9, 0.5)])  # fmt: skip
def test_loss_equals_the_brute_force_formula(shape, weight, temperature):
    g = torch.Generator().manual_seed(len(shape) + int(10 * weight))
    student = 3 * torch.randn(shape, generator=g)
    teacher = 3 * torch.randn(shape, generator=g)
    targets = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    got = distillation_loss(student, teacher, targets, weight, temperature)
    assert got.item() == pytest.approx(
        brute_force(student, teacher, targets, weight, temperature), rel=1e-5
    )


def test_the_distillers_terms_are_the_brute_force_parts_of_its_loss():
    """`terms` after a step: CE (λ = 0 in the brute force) and KL (λ = 1, divided by T²), and
    the loss is (1 − λ)·CE + λ·T²·KL of them."""
    torch.manual_seed(0)
    model = net()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "ternary")
    x, y = batch(torch.Generator().manual_seed(5))
    distiller = SelfDistillation(opt, 0.4, 3.0)
    loss = distiller.loss(model, x, y)
    assert set(distiller.terms) == {"ce", "kl"}
    student = model(x).detach()
    teacher = teacher_logits(model, opt, x)
    ce, kl = distiller.terms["ce"].item(), distiller.terms["kl"].item()
    assert ce == pytest.approx(brute_force(student, teacher, y, 0.0, 3.0), rel=1e-5)
    assert kl == pytest.approx(brute_force(student, teacher, y, 1.0, 3.0) / 9, rel=1e-4)
    assert loss.item() == pytest.approx(0.6 * ce + 0.4 * 9 * kl, rel=1e-6)


def test_the_kl_terms_gradient_is_t_times_the_softened_difference():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(5, 4, generator=g, requires_grad=True)
    teacher = torch.randn(5, 4, generator=g, requires_grad=True)
    temperature = 3.0
    distillation_loss(
        student, teacher, torch.zeros(5, dtype=torch.long), 1.0, temperature
    ).backward()
    soft = [torch.softmax(z.detach() / temperature, dim=1) for z in (student, teacher)]
    assert torch.allclose(student.grad, temperature * (soft[0] - soft[1]) / 5, atol=1e-6)
    assert teacher.grad is None  # the teacher is a target, not trained through the loss


def test_weight_zero_is_todays_training_bit_for_bit_and_a_positive_weight_is_not():
    ce_model, ce_opt = plain(30)
    zero_model, zero_opt = trained(30, 0.0)
    for key, value in ce_model.state_dict().items():
        assert torch.equal(zero_model.state_dict()[key], value), key
    for name in ce_opt.latent:
        assert torch.equal(zero_opt.latent[name], ce_opt.latent[name]), name
    on_model, _ = trained(30, 0.5)
    assert not torch.equal(on_model.state_dict()["3.weight"], ce_model.state_dict()["3.weight"])
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    assert torch.equal(
        distillation_loss(z, torch.randn(8, 3), y, 0.0), nn.functional.cross_entropy(z, y)
    )


@pytest.mark.parametrize(
    ("weight", "temperature", "message"),
    [
        (-0.1, 2.0, r"λ=-0.1; allowed: a number in \[0, 1\]"),
        (1.5, 2.0, r"λ=1.5; allowed: a number in \[0, 1\]"),
        (float("nan"), 2.0, r"λ=nan; allowed"),
        (0.5, 0.0, r"temperature T=0.0; allowed: a finite number above 0"),
        (0.5, -1.0, r"T=-1.0; allowed: a finite number above 0"),
        (0.5, float("inf"), r"T=inf; allowed"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(weight, temperature, message):
    _, opt = trained(0, 0.0)
    with pytest.raises(ValueError, match=message):
        SelfDistillation(opt, weight, temperature)
    with pytest.raises(ValueError, match=message):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2).long(), weight,
                          temperature)  # fmt: skip


def test_an_optimizer_without_latent_weights_is_refused():
    model = net()
    with pytest.raises(ValueError, match=r"needs a QuantizedOptimizer.*got Adam"):
        SelfDistillation(torch.optim.Adam(model.parameters()), 0.5)


@pytest.mark.slow
def test_ddp_replicas_stay_bit_identical_with_distillation_on(tmp_path):
    run_workers(distill_replica, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0.keys() == r1.keys() and len(r0) == 1 + 10 + 2 + 3 * 10
    assert [k for k in r0 if not torch.equal(r0[k], r1[k])] == []  # the first teacher's too
    assert (r0["param 3.weight"] == 0).float().mean() >= 0.74  # sparsified as asked


def distill_replica(rank, world_size, out_dir):
    torch.manual_seed(rank)  # each rank its own init: DDP and the teacher's sync must fix it
    model = net()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "ternary",
                             keep_full_precision=["first"], sparsity=0.75)  # fmt: skip
    ddp = DistributedDataParallel(model)  # built after the optimizer: latent w differ by rank
    distill = SelfDistillation(opt, 0.5)
    x0, _ = batch(torch.Generator().manual_seed(99))
    first_teacher = teacher_logits(ddp, opt, x0)  # before any step: rank 0's w on every rank
    run_steps(ddp, opt, distill.loss, 100 + rank, 20)  # each rank sees its own data
    adam = opt.state_dict()["base"]["state"]
    record = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    record.update((f"latent {n}", t) for n, t in opt.latent.items())
    record.update((f"adam {i} {k}", t) for i, s in adam.items() for k, t in s.items())
    torch.save({**record, "first teacher": first_teacher}, out_dir / f"rank{rank}.pt")
    del ddp
    gc.collect()
