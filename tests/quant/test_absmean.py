"""The absmean scheme (BitNet b1.58): against a per-element brute force per tensor, per channel
and per block, ties rounded half to even as BitNet's reference does, all-zero groups, its
difference from TWN, its registry facts, a sparsity cap, and `distq train --scheme absmean`."""

import json
import math

import pytest
import torch

from distq.launch import config, train
from distq.quant import SCHEMES, get_scheme, level_spacing, project
from distq.quant.sparse import max_nonzeros


def brute_force(values: list[float]) -> tuple[float, list[int]]:
    """α = Σ|w|/n and clip(round(w/α), −1, 1) one weight at a time (Python's round is half
    to even, as torch.round is); α = 0 gives codes 0."""
    alpha = math.fsum(abs(v) for v in values) / len(values)
    if alpha == 0:
        return 0.0, [0] * len(values)
    return alpha, [max(-1, min(1, round(v / alpha))) for v in values]


def check_group(q: torch.Tensor, alpha: torch.Tensor, w: torch.Tensor) -> None:
    expected_alpha, codes = brute_force(w.flatten().tolist())
    assert alpha.item() == pytest.approx(expected_alpha, rel=1e-12, abs=0)
    assert torch.equal(q.flatten(), alpha * torch.tensor(codes, dtype=q.dtype))


def test_per_tensor_matches_the_per_element_definition():
    g = torch.Generator().manual_seed(0)
    for shape, scale in (((6, 5, 4), 1.0), ((300,), 0.01), ((7, 9), 30.0)):
        w = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        p = project(w, None, "absmean")
        assert p.alpha.shape == () and p.q.shape == w.shape
        check_group(p.q, p.alpha, w)
        assert 0 < int((p.q != 0).sum()) < w.numel()


def test_per_channel_and_per_block_scales_are_each_groups_own():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, 4, generator=g, dtype=torch.float64) * torch.arange(1, 7.0)[:, None, None]
    p = project(w, None, "absmean", per_channel=True)
    assert p.alpha.shape == (6,)
    for row in range(6):
        check_group(p.q[row], p.alpha[row], w[row])
    blocks = project(w, None, "absmean", blocks=3)
    assert blocks.alpha.shape == (3,)
    for b in range(3):
        check_group(blocks.q[2 * b : 2 * b + 2], blocks.alpha[b], w[2 * b : 2 * b + 2])


def test_ties_round_half_to_even_as_bitnets_reference_does():
    # mean|w| = 8/8 = 1, so w/α is exact: ±0.5 are ties (half to even: 0), ±1.5 and 2.5 round to
    # ±2 and 2, clipped to ±1; a rule rounding ties away from zero would give ±1 at ±0.5.
    w = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, 0.0, 0.75, -0.75], dtype=torch.float64)
    codes = [0, 0, 1, -1, 1, 0, 1, -1]
    for scale in (1.0, 0.375, 2.0**-20):  # powers of two times 3: w/α stays exact
        p = project(w * scale, None, "absmean")
        assert p.alpha.item() == scale
        assert (p.q / p.alpha).tolist() == codes
        assert not p.q[p.q == 0].signbit().any()  # +0.0, never −0.0
        # BitNet b1.58's reference weight_quant: scale 1/max(mean|w|, 1e-5), round, clamp.
        s = 1.0 / (w * scale).abs().mean().clamp(min=1e-5)
        reference = ((w * scale) * s).round().clamp(-1, 1) / s
        if scale >= 1e-5:
            assert torch.equal(p.q, reference)


def test_all_zero_groups_get_scale_zero_and_zero_codes():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    w[1] = 0.0
    p = project(w, None, "absmean", per_channel=True)
    assert p.alpha[1].item() == 0.0 and torch.equal(p.q[1], torch.zeros(8))
    assert torch.isfinite(p.q).all() and (p.alpha[[0, 2]] > 0).all()
    whole = project(torch.zeros(5), None, "absmean")
    assert whole.alpha.item() == 0.0 and torch.equal(whole.q, torch.zeros(5))


def test_it_is_not_twn_threshold_and_scale_differ():
    w = torch.randn(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = w.abs()
    absmean, twn = project(w, None, "absmean"), project(w, None, "twn")
    assert torch.equal(absmean.q != 0, a > 0.5 * a.mean())  # threshold α/2, α = mean|w|
    assert torch.equal(twn.q != 0, a > 0.7 * a.mean())
    assert absmean.alpha.item() == pytest.approx(a.mean().item(), rel=1e-12)
    assert twn.alpha.item() == pytest.approx(a[a > 0.7 * a.mean()].mean().item(), rel=1e-12)
    least_squares = a[absmean.q != 0].mean()  # the best scale for absmean's own codes
    assert absmean.alpha < least_squares


def test_registry_facts_and_curvature_is_ignored():
    spec = get_scheme("absmean")
    assert "absmean" in SCHEMES and spec.bits == (2,) and not spec.loss_aware
    assert not spec.capped_exact({}) and not spec.warm_start and not spec.codebook
    assert level_spacing("absmean") == 1.0
    w = torch.randn(40, generator=torch.Generator().manual_seed(4))
    d = torch.rand(40, generator=torch.Generator().manual_seed(5)) + 0.01
    assert torch.equal(project(w, d, "absmean").q, project(w, None, "absmean").q)
    assert config.TrainConfig(scheme="absmean").weights.scheme == "absmean"


def test_under_a_sparsity_cap_it_prunes_and_keeps_its_scale():
    # Not the capped ternary solver's problem (whose α is the mean over the support), so the
    # record says capped_exact = never: prune the cheapest codes, keep α = mean|w|.
    w = torch.randn(4, 50, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    free = project(w, None, "absmean", per_channel=True)
    capped = project(w, None, "absmean", per_channel=True, sparsity=0.8)
    cap = max_nonzeros(50, 0.8)
    assert ((capped.q != 0).sum(1) <= cap).all()
    assert torch.equal(capped.alpha, free.alpha)
    kept = capped.q != 0
    assert torch.equal(capped.q[kept], free.q[kept])  # the kept codes are the free ones
    for row in range(4):  # the largest |w| of each row are the ones kept
        pruned = (free.q[row] != 0) & ~kept[row]
        assert w[row].abs()[kept[row]].min() >= w[row].abs()[pruned].max()


def test_distq_train_with_absmean_on_digits(tmp_path):
    cfg = config.TrainConfig(
        scheme="absmean", hidden=32, depth=2, epochs=2, out_dir=str(tmp_path), progress=False,
        metrics_port=None, monitor_every=10,
    )  # fmt: skip
    result = train.run(cfg)
    assert result.test_accuracy > 0.8  # chance is 0.1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert [s["scheme"] for s in state["quantized"].values()] == ["absmean"]
    name = next(iter(state["quantized"]))
    latent, w_hat = state["optimizer"]["latent"][name].double(), state["model"][name].double()
    alpha = latent.abs().mean()  # ŵ is absmean's projection of the latent weights
    assert w_hat.abs().max().item() == pytest.approx(alpha.item(), rel=1e-6)
    assert torch.equal(w_hat.sign(), torch.round(latent / alpha).clamp(-1, 1))
    records = [json.loads(line) for line in (tmp_path / "monitor-rank0.jsonl").open()]
    errors = [r["weights"] for r in records if "weights" in r]
    assert errors and all(name in e for e in errors)  # the monitor's Δ_w comes from the record
