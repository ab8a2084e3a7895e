"""The shared scheme (weight sharing by D-weighted k-means): local optimality and brute force over
contiguous partitions, plain k-means at d = 1, the packed export's size and exact round trip,
training with QuantizedOptimizer."""

import itertools
import math

import pytest
import torch
from torch import nn

from distq.export import QuantSpec, export_packed, layout_sizes, load_packed
from distq.optim import QuantizedOptimizer
from distq.quant import get_scheme, project
from distq.quant.shared import kmeans, linear_init, reseed


def objective(w, d, q):
    return float((d * (w - q) ** 2).sum())


def brute_force(w, d, k):
    """min over every split of the sorted weights into k contiguous non-empty clusters (the
    optimal 1-D k-means partition is one of them) of the D-weighted error; (error, centroids)."""
    order = w.argsort()
    ws, ds = w[order], d[order]
    best = (math.inf, None)
    for cuts in itertools.combinations(range(1, len(w)), k - 1):
        edges = (0, *cuts, len(w))
        centroids = torch.stack([
            (ds[a:b] * ws[a:b]).sum() / ds[a:b].sum() for a, b in itertools.pairwise(edges)
        ])  # fmt: skip
        error = sum(
            float((ds[a:b] * (ws[a:b] - c) ** 2).sum())
            for (a, b), c in zip(itertools.pairwise(edges), centroids, strict=True)
        )
        if error < best[0]:
            best = (error, centroids)
    return best


def assert_local_optimum(w, d, q, codebook, atol=1e-15):
    """Every weight sits at its nearest centroid; every used centroid is its weights' D-mean
    (to `atol`: the means are prefix-sum differences, which heavy tails make less exact)."""
    distance = (w[:, None] - codebook[None, :]).abs()
    assert torch.all((w - q).abs() <= distance.min(dim=1).values + 1e-12)
    for c in q.unique():
        members = q == c
        mean = (d[members] * w[members]).sum() / d[members].sum()
        assert float(c) == pytest.approx(float(mean), rel=1e-12, abs=atol)


def test_local_optimum_always_and_the_brute_force_optimum_mostly_on_tiny_tensors():
    """Lloyd's iteration ends at a local optimum every time, but a local one: on these 240 fixed
    cases (n = 5..9 weights, k = 2..4) from the linear initialization it reaches the optimum over
    all contiguous partitions in 165 (69%; 147 before emptied clusters were re-seeded; with so
    few weights per cluster a worse partition is often a fixed point). The optimum itself is a
    fixed point: started from its codebook, the solver returns it."""
    optimal = cases = 0
    for seed in range(80):
        g = torch.Generator().manual_seed(seed)
        n = 5 + seed % 5
        w = torch.randn(n, generator=g, dtype=torch.float64)
        d = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.05
        for k in (2, 3, 4):
            q, codebook = kmeans(w[None], d[None], k)
            assert_local_optimum(w, d, q[0], codebook[0])
            best, centroids = brute_force(w, d, k)
            error = objective(w, d, q[0])
            assert error >= best * (1 - 1e-12) - 1e-15
            optimal += error <= best * (1 + 1e-9) + 1e-15
            cases += 1
            q_opt, c_opt = kmeans(w[None], d[None], k, init=centroids[None])
            torch.testing.assert_close(c_opt[0], centroids, rtol=1e-12, atol=1e-15)
            assert objective(w, d, q_opt[0]) == pytest.approx(best, rel=1e-12)
    assert optimal >= 165, f"optimal in {optimal}/{cases}"


def test_the_scheme_projects_onto_a_local_optimum_with_2_to_the_bits_values():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, generator=g, dtype=torch.float64)
    d = torch.rand(300, generator=g, dtype=torch.float64) + 0.01
    for bits in (2, 3, 4):
        p = project(w, d, "shared", bits)
        assert p.alpha.shape == (2**bits,)
        assert torch.isin(p.q, p.alpha).all()
        assert len(p.q.unique()) == 2**bits  # 4 bits: an extreme cluster emptied, re-seeded
        assert_local_optimum(w, d, p.q, p.alpha)


def test_an_emptied_cluster_is_reseeded_at_the_weight_of_largest_weighted_error():
    """Linear start 0, 3, 6, 9 on {0, 0, 0, 1, 1, 5, 5, 9}: the cluster at 3 empties in the first
    round; it is re-seeded at the 1s (error (1 − 0.4)² against 0.4² for the 0s), and the fit
    ends with the four distinct values, error 0 (before re-seeding: the centroid stayed at 3)."""
    w = torch.tensor([[0.0, 0, 0, 1, 1, 5, 5, 9]], dtype=torch.float64)
    q, codebook = kmeans(w, torch.ones_like(w), 4)
    assert codebook.tolist() == [[0.0, 1.0, 5.0, 9.0]] and torch.equal(q, w)


def test_reseeding_picks_the_argmax_of_d_times_the_distance_to_the_other_centroids():
    """Brute force over every weight, holes filled one after another, each seed counted as a
    centroid for the next; d = 0 weights are never seeds; a group with no live centroid or no
    positive error keeps its holes' values."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        G, n, k = 3, 6 + seed % 7, 2 + seed % 5
        values = torch.randn(G, n, generator=g, dtype=torch.float64).sort(dim=1).values
        d = torch.rand(G, n, generator=g, dtype=torch.float64) * (
            torch.rand(G, n, generator=g) > 0.2
        )
        c = torch.randn(G, k, generator=g, dtype=torch.float64)
        live = torch.rand(G, k, generator=g) > 0.5
        live[0] = False  # no live centroid: kept
        got = reseed(values, d, c, live)
        for r in range(G):
            expect = c[r].clone()
            known = [float(x) for x, alive in zip(c[r], live[r], strict=True) if alive]
            for j in range(k):
                if live[r, j] or not known:
                    continue
                errors = [float(d[r, i]) * min((float(values[r, i]) - x) ** 2 for x in known)
                          for i in range(n)]  # fmt: skip
                best = max(range(n), key=lambda i: (errors[i], -i))
                if errors[best] > 0:
                    expect[j] = values[r, best]
                    known.append(float(values[r, best]))
            assert torch.equal(got[r], expect), (seed, r)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_no_centroid_is_left_empty_when_the_group_has_k_distinct_values(bits):
    """Heavy tails, a few outliers, repeated values, exactly k distinct values, zero curvature
    on some weights, warm starts from a codebook far off: every one of the k values is used."""
    k = 2**bits
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        n = 40 + 7 * seed
        kind = seed % 5
        if kind == 0:  # Cauchy: a few huge weights stretch the linear start
            w = torch.tan(3.14159 * (torch.rand(4, n, generator=g, dtype=torch.float64) - 0.5))
        elif kind == 1:  # one outlier
            w = torch.randn(4, n, generator=g, dtype=torch.float64)
            w[:, 0] = 50.0
        elif kind == 2:  # exactly k distinct values, repeated unevenly
            levels = torch.randn(4, k, generator=g, dtype=torch.float64) ** 3
            w = levels.gather(1, torch.randint(0, k, (4, n), generator=g))
            w[:, :k] = levels
        elif kind == 3:  # few distinct values, many more than k
            w = torch.randint(-20, 21, (4, n), generator=g).double() ** 3
        else:
            w = torch.randn(4, n, generator=g, dtype=torch.float64)
        d = torch.rand(4, n, generator=g, dtype=torch.float64) + 0.01
        inits = [None, torch.linspace(100.0, 101.0, k, dtype=torch.float64).expand(4, k)]
        for init in inits:
            q, codebook = kmeans(w, d, k, init)
            for r in range(4):
                if len(w[r].unique()) >= k:
                    assert len(q[r].unique()) == k, (seed, kind, r, codebook[r])
                assert_local_optimum(w[r], d[r], q[r], codebook[r], 1e-12 * float(w.abs().max()))


def plain_lloyd(x, k, rounds=1000):
    """Textbook k-means on 1-D points (argmin distance, plain means), linear initialization."""
    c = torch.linspace(float(x.min()), float(x.max()), k, dtype=x.dtype)
    for _ in range(rounds):
        a = (x[:, None] - c[None, :]).abs().argmin(dim=1)
        new = torch.stack([x[a == j].mean() if (a == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return c[a], c


def test_unit_curvature_is_plain_k_means():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(400, generator=g, dtype=torch.float64)
    for bits in (2, 3, 4):
        q, c = plain_lloyd(w, 2**bits)
        p = project(w, None, "shared", bits)
        torch.testing.assert_close(p.alpha, c, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(p.q, q, rtol=1e-12, atol=1e-15)
        scaled = project(w, torch.full_like(w, 3.0), "shared", bits)  # same clusters
        torch.testing.assert_close(scaled.q, p.q, rtol=1e-12, atol=1e-15)


def test_integer_curvature_is_k_means_on_the_weights_repeated_d_times():
    """The D weighting is exactly weight multiplicity: dᵢ = 3 counts wᵢ three times."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(120, generator=g, dtype=torch.float64)
    d = torch.randint(1, 5, (120,), generator=g).double()
    repeated = w.repeat_interleave(d.long())
    p = project(w, d, "shared", 3)
    _, c = plain_lloyd(repeated, 8)
    torch.testing.assert_close(p.alpha, c, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(project(w, None, "shared", 3).alpha, p.alpha)  # d matters


def test_warm_start_from_its_own_result_is_a_fixed_point_and_a_collapsed_codebook_restarts():
    g = torch.Generator().manual_seed(4)
    w, d = torch.randn(64, 50, generator=g), torch.rand(64, 50, generator=g) + 0.1
    p = project(w, d, "shared", 3, per_channel=True)
    again = project(w, d, "shared", 3, per_channel=True, alpha_init=p.alpha)
    assert torch.equal(again.q, p.q) and torch.equal(again.alpha, p.alpha)
    collapsed = project(w, d, "shared", 3, per_channel=True, alpha_init=torch.zeros(64, 8))
    assert torch.equal(collapsed.q, p.q)
    with pytest.raises(ValueError, match="8 per group"):
        project(w, d, "shared", 3, per_channel=True, alpha_init=torch.zeros(64, 4))


def test_record_and_refusals():
    spec = get_scheme("shared")
    assert spec.codebook and spec.warm_start and spec.loss_aware and spec.bits == (2, 3, 4)
    with pytest.raises(ValueError, match="takes no sparsity"):
        project(torch.randn(20), None, "shared", 2, sparsity=0.5)
    with pytest.raises(ValueError, match=r"allowed: 2\.\.4"):
        project(torch.randn(20), None, "shared", 5)
    start = linear_init(torch.tensor([[1.0, -1.0, 0.5]]), 3)
    assert torch.equal(start, torch.tensor([[-1.0, 0.0, 1.0]]))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("per_channel", "groups"), [(False, 1), (True, 24)])
def test_export_round_trips_bit_exactly_at_a_codebook_and_index_bits_per_weight(
    tmp_path, bits, per_channel, groups
):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 37, generator=g)
    d = torch.rand(24, 37, generator=g) + 0.1
    q = project(w, d, "shared", bits, per_channel=per_channel).q
    spec = QuantSpec("shared", bits, per_channel=per_channel)
    report = export_packed({"w": q, "b": torch.ones(3)}, {"w": spec}, tmp_path / "m.safetensors")
    expected = 4 * 2**bits * groups + math.ceil(q.numel() * bits / 8)
    (size,) = [t for t in report.tensors if t.name == "w"]
    assert layout_sizes(q, spec)["dense"] == expected
    # the smallest layout is the one stored (every cluster is in use: dense, as a rule)
    assert size.packed_bytes == min(layout_sizes(q, spec).values()) <= expected
    if not per_channel:
        assert size.layout == "dense" and size.packed_bytes == expected
    rebuilt = load_packed(tmp_path / "m.safetensors")
    assert torch.equal(rebuilt["w"], q) and rebuilt["w"].dtype == q.dtype


def test_quantized_optimizer_trains_with_it_and_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))  # fmt: skip
    opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, "shared", 2,
                             keep_full_precision=[], per_channel=True)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, (losses[:10], losses[-10:])
    state = model.state_dict()
    for name in opt.names:
        assert opt.alpha[name].shape == (state[name].shape[0], 4)
        assert all(len(row.unique()) <= 4 for row in state[name])
    specs = {n: QuantSpec("shared", opt.stored_bits, per_channel=True) for n in opt.names}
    export_packed(state, specs, tmp_path / "m.safetensors")
    rebuilt = load_packed(tmp_path / "m.safetensors")
    assert all(torch.equal(rebuilt[n], t) for n, t in state.items())
