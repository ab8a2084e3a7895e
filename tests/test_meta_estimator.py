"""The learned gradient through the quantizer (distq/meta.py, QuantizedOptimizer(estimator=)):
"ste" is today's training bit for bit; the meta gradient is the docstring's formula (float64
brute force), and φ's gradient is the paper's derivative through the next forward with the
quantizer straight-through (autograd through that forward, and finite differences); φ trains;
2-rank gloo DDP replicas stay bit-identical; a resume continues bit-exactly; bad values are
named."""

import copy
import gc
import math
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from distq.meta import MetaGradient
from distq.optim import QuantizedOptimizer
from tests.distributed import run_workers

LR = 0.05


def net():
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )  # fmt: skip


def batch(g, n=16, dtype=torch.float32):
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def build(estimator=None, seed=0, base="adam", dtype=torch.float32, **options):
    """A model with its two inner layers binary (the first full precision) and its optimizer."""
    torch.manual_seed(seed)
    model = net().to(dtype)
    if base == "adam":
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=LR)
    kwargs = {} if estimator is None else {"estimator": estimator}
    opt = QuantizedOptimizer(inner, model, "binary", keep_full_precision=["first"], **kwargs,
                             **options)  # fmt: skip
    return model, opt


def run_steps(model, opt, seed, steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = batch(g, dtype=dtype)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model, opt):
    out = {f"param {k}": v.clone() for k, v in model.state_dict().items()}
    out.update((f"latent {k}", v.clone()) for k, v in opt.latent.items())
    if opt.meta is not None:
        out.update((f"phi {k}", v.clone()) for k, v in opt.meta.net.state_dict().items())
    return out


def test_ste_is_todays_training_bit_for_bit_and_meta_is_not():
    runs = {}
    for estimator in (None, "ste", "meta"):
        model, opt = build(estimator)
        run_steps(model, opt, 1, 25)
        runs[estimator] = snapshot(model, opt)
    default, ste, meta = runs[None], runs["ste"], runs["meta"]
    assert default.keys() == ste.keys() and all(torch.equal(default[k], ste[k]) for k in default)
    assert not torch.equal(default["latent 2.weight"], meta["latent 2.weight"])
    assert build("ste")[1].meta is None and "meta" not in build("ste")[1].state_dict()


@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_the_meta_network_gets_a_gradient_and_trains(base):
    model, opt = build("meta", base=base)
    initial = {k: v.clone() for k, v in opt.meta.net.state_dict().items()}
    run_steps(model, opt, 1, 1)
    assert all(p.grad is None for p in opt.meta.net.parameters())  # no previous step yet
    run_steps(model, opt, 2, 6)
    grads = [p.grad for p in opt.meta.net.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # every layer, after a few
    changed = [k for k, v in opt.meta.net.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed == list(initial)


def randomize(meta: MetaGradient, seed: int) -> None:
    """φ away from its STE start (last layer zero), so every layer's gradient is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in meta.net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def brute_force_meta_gradient(phi, g, w):
    """The docstring's G_i = g_i·(1 + m_φ(w_i/rms(w), g_i/rms(g))), one coordinate at a time in
    Python floats; `phi` = [(weight, bias)] of m_φ's three layers, ReLU between them."""
    g, w = g.reshape(-1).tolist(), w.reshape(-1).tolist()
    rms_w = math.sqrt(sum(v * v for v in w) / len(w)) + 1e-12
    rms_g = math.sqrt(sum(v * v for v in g) / len(g)) + 1e-12
    out = []
    for gi, wi in zip(g, w, strict=True):
        h = [wi / rms_w, gi / rms_g]
        for j, (weight, bias) in enumerate(phi):
            rows = zip(weight, bias, strict=True)
            h = [sum(a * b for a, b in zip(row, h, strict=True)) + c for row, c in rows]
            if j < len(phi) - 1:
                h = [max(v, 0.0) for v in h]
        out.append(gi * (1 + h[0]))
    return out


def layers_of(meta: MetaGradient):
    linear = [m for m in meta.net if isinstance(m, nn.Linear)]
    return [(m.weight.tolist(), m.bias.tolist()) for m in linear]


def test_the_latent_update_is_the_docstrings_meta_gradient():
    """Plain SGD, no clipping: w_{k+1} = w_k − η·G_k, G_k from the φ the step has just trained."""
    model, opt = build("meta", base="sgd", dtype=torch.float64, clip_latent=None)
    randomize(opt.meta, 3)
    run_steps(model, opt, 1, 2, torch.float64)
    before = {n: w.clone() for n, w in opt.latent.items()}
    g = torch.Generator().manual_seed(5)
    x, y = batch(g, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in opt.quantized_parameters().items()}
    opt.step()
    phi = layers_of(opt.meta)  # after this step's meta update
    for name, w in before.items():
        expected = brute_force_meta_gradient(phi, grads[name], w)
        got = ((w - opt.latent[name]) / LR).reshape(-1).tolist()
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), name
        # and .grad holds ∇ŵ again after the step
        assert torch.equal(opt.quantized_parameters()[name].grad, grads[name])


def test_phis_gradient_is_the_derivative_through_the_next_forward_with_ste():
    """∂L_k/∂φ from the optimizer = autograd of L_k(ŵ_k) where w_k = w_{k−1} − η·G_{k−1}(φ) and
    ŵ_k = w_k + (Q(w_k) − w_k).detach() (the paper's construction), and = finite differences of
    −η·⟨∇ŵ L_k, G_{k−1}(φ)⟩ with G by brute force."""
    model, opt = build("meta", base="sgd", dtype=torch.float64, clip_latent=None)
    randomize(opt.meta, 4)
    phi0 = copy.deepcopy(opt.meta.net)
    g = torch.Generator().manual_seed(7)
    x0, y0 = batch(g, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x0), y0).backward()
    previous_w = {n: w.clone() for n, w in opt.latent.items()}
    previous_g = {n: p.grad.clone() for n, p in opt.quantized_parameters().items()}
    opt.step()  # the first step: w_1 = w_0 − η·G_0(φ0), no meta update (no step before it)
    assert all(p.grad is None for p in opt.meta.net.parameters())
    x1, y1 = batch(g, dtype=torch.float64)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x1), y1).backward()
    now_g = {n: p.grad.clone() for n, p in opt.quantized_parameters().items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}  # as L_k saw them
    opt.step()
    got = [p.grad.clone() for p in opt.meta.net.parameters()]

    # autograd through the forward, as the paper's modules do it
    reference = MetaGradient(dtype=torch.float64)
    reference.net.load_state_dict(phi0.state_dict())
    proposed = reference.gradients(previous_g, previous_w)
    for name, w_prev in previous_w.items():
        w_k = w_prev - LR * proposed[name]
        params[name] = w_k + (params[name] - w_k).detach()  # ŵ_k = Q(w_k), straight through
    loss = nn.functional.cross_entropy(functional_call(model, params, (x1,)), y1)
    expected = torch.autograd.grad(loss, list(reference.net.parameters()))
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)

    # finite differences of the docstring's surrogate, G by brute force
    def surrogate(phi):
        total = 0.0
        for n, w in previous_w.items():
            proposed = brute_force_meta_gradient(phi, previous_g[n], w)
            total += sum(
                a * b for a, b in zip(now_g[n].reshape(-1).tolist(), proposed, strict=True)
            )
        return -LR * total

    base = layers_of(reference)
    step = 1e-6
    for layer, index in [(0, (3, 1)), (1, (2, 5)), (2, (0, 4))]:  # weights of each layer
        plus, minus = copy.deepcopy(base), copy.deepcopy(base)
        plus[layer][0][index[0]][index[1]] += step
        minus[layer][0][index[0]][index[1]] -= step
        difference = (surrogate(plus) - surrogate(minus)) / (2 * step)
        assert got[2 * layer][index].item() == pytest.approx(difference, rel=1e-5, abs=1e-10)


def test_a_resume_continues_bit_exactly():
    whole_model, whole_opt = build("meta")
    run_steps(whole_model, whole_opt, 1, 8)
    run_steps(whole_model, whole_opt, 2, 8)
    model, opt = build("meta")
    run_steps(model, opt, 1, 8)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert saved["optimizer"]["quantization"]["estimator"] == "meta"
    resumed_model, resumed_opt = build("meta", seed=5)  # another init: all comes from the load
    resumed_model.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    run_steps(resumed_model, resumed_opt, 2, 8)
    whole, split = snapshot(whole_model, whole_opt), snapshot(resumed_model, resumed_opt)
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    adam = (whole_opt.meta.optimizer.state_dict(), resumed_opt.meta.optimizer.state_dict())
    assert all(torch.equal(adam[0]["state"][i]["exp_avg_sq"], adam[1]["state"][i]["exp_avg_sq"])
               for i in adam[0]["state"])  # fmt: skip


def test_a_checkpoint_of_another_estimator_is_refused_and_an_older_one_reads_as_ste():
    model, opt = build("meta")
    run_steps(model, opt, 1, 3)
    with pytest.raises(ValueError, match=r"estimator: checkpoint 'meta' vs now 'ste'"):
        build("ste")[1].load_state_dict(opt.state_dict())
    _, ste = build("ste")
    older = ste.state_dict()
    del older["quantization"]["estimator"]  # a checkpoint from before the option
    build()[1].load_state_dict(older)
    with pytest.raises(ValueError, match=r"estimator: checkpoint 'ste' vs now 'meta'"):
        build("meta")[1].load_state_dict(older)


@pytest.mark.parametrize("bad", ["metaquant", "STE", None, 1])
def test_an_unknown_estimator_is_named_with_the_allowed_ones(bad):
    model = net()
    with pytest.raises(ValueError, match=re.escape(f"estimator={bad!r}; allowed: ste, meta")):
        QuantizedOptimizer(torch.optim.Adam(model.parameters()), model, "binary", estimator=bad)


@pytest.mark.slow
def test_ddp_replicas_stay_bit_identical_with_the_meta_estimator(tmp_path):
    run_workers(meta_replica, 2, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0.keys() == r1.keys() and sum(k.startswith("phi") for k in r0) == 6
    assert [k for k in r0 if not torch.equal(r0[k], r1[k])] == []
    assert not torch.equal(r0["phi 4.weight"], torch.zeros_like(r0["phi 4.weight"]))  # trained


def meta_replica(rank, world_size, out_dir):
    torch.manual_seed(rank)  # each rank its own init: DDP and the latent sync must fix it
    model = net()
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "binary",
                             keep_full_precision=["first"], estimator="meta")  # fmt: skip
    ddp = DistributedDataParallel(model)  # built after the optimizer: latent w differ by rank
    run_steps(ddp, opt, 100 + rank, 20)  # each rank sees its own data
    record = snapshot(model, opt)
    meta = opt.meta.state_dict()
    record.update((f"meta adam {i} {k}", t) for i, s in meta["optimizer"]["state"].items()
                  for k, t in s.items())  # fmt: skip
    record.update((f"previous {n} {k}", v["grad" if k == 0 else "latent"])
                  for n, v in meta["previous"].items() for k in (0, 1))  # fmt: skip
    torch.save(record, out_dir / f"rank{rank}.pt")
    del ddp
    gc.collect()
