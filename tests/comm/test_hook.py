"""distq's DDP comm hook in real gloo process groups: replicas identical, bytes as documented,
exact resume, accumulation, half precision, NaN handling."""

import gc
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distq.comm import QuantizedCommState, prime_buckets, quantized_hook
from distq.optim import QuantizedOptimizer
from tests.distributed import run_workers

pytestmark = pytest.mark.slow
os.environ.setdefault("DISTQ_COMPILE", "0")  # spawned workers inherit it: fast start-up


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 5),
    ).to(dtype)


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 20, generator=g).to(dtype), torch.randint(0, 5, (8,), generator=g)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def setup(opts, dtype=torch.float32):
    model = make_model(dtype)
    ddp = DistributedDataParallel(model, bucket_cap_mb=opts.pop("bucket_cap_mb", 0.01))
    state = QuantizedCommState(**opts)
    ddp.register_comm_hook(state, quantized_hook)
    return model, ddp, state


def step(ddp, opt, rank, i, dtype=torch.float32, accumulate=1):
    opt.zero_grad()
    for micro in range(accumulate):
        x, y = batch(rank, i * accumulate + micro, dtype)
        if micro < accumulate - 1:
            with ddp.no_sync():
                nn.functional.cross_entropy(ddp(x).float(), y).backward()
        else:
            nn.functional.cross_entropy(ddp(x).float(), y).backward()
    opt.step()


def train_worker(rank, world, out, opts, steps, dtype=torch.float32, accumulate=1):
    model, ddp, state = setup(dict(opts), dtype)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    before = flat_params(model)
    for i in range(steps):
        step(ddp, opt, rank, i, dtype, accumulate)
    stats = state.compression_stats()
    torch.save(
        {
            "params": flat_params(model),
            "before": before,
            "iter": state.iter,
            "sent": stats.bytes_sent,
            "received": stats.bytes_received,
            "ratio": stats.compression_ratio,
            "error": stats.relative_error,
            "dtypes": {p.grad.dtype for p in model.parameters()},
        },
        out / f"rank{rank}.pt",
    )
    state.close()
    del ddp
    gc.collect()


def results(out, world):
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_identical(res):
    for other in res[1:]:
        assert torch.equal(res[0]["params"], other["params"])


@pytest.mark.parametrize("collective", ["allgather", "scatter", "hierarchical"])
def test_fifty_steps_keep_replicas_bit_identical(tmp_path, collective):
    opts = {"bits": 2, "bucket_size": 512, "clip": 2.5, "collective": collective, "min_numel": 0}
    run_workers(train_worker, 2, tmp_path, opts, 50)
    res = results(tmp_path, 2)
    assert_identical(res)
    assert res[0]["iter"] == 50
    assert (res[0]["params"] - res[0]["before"]).abs().max() > 1e-3  # it trained
    if collective != "hierarchical":  # one host: hierarchical stays full precision in-node
        assert res[0]["ratio"] > 10  # tiny DDP buckets: chunks pad to whole 512-element buckets
        assert 0 < res[0]["error"] < 10


@pytest.mark.parametrize("world", [3, 4])
def test_three_and_four_ranks_with_error_feedback(tmp_path, world):
    opts = {
        "bits": 3,
        "bucket_size": 128,
        "collective": "scatter",
        "error_feedback": True,
        "min_numel": 0,
    }
    run_workers(train_worker, world, tmp_path, opts, 20)
    assert_identical(results(tmp_path, world))


@pytest.mark.parametrize("compressor", ["terngrad", "sign"])
def test_terngrad_and_sign_keep_replicas_identical(tmp_path, compressor):
    bits = 2 if compressor == "terngrad" else 1
    opts = {
        "bits": bits,
        "compressor": compressor,
        "collective": "allgather",
        "error_feedback": compressor == "sign",
        "min_numel": 0,
    }
    run_workers(train_worker, 2, tmp_path, opts, 20)
    assert_identical(results(tmp_path, 2))


def bytes_worker(rank, world, out, collective, bits, bucket):
    model, ddp, state = setup(
        {
            "bits": bits,
            "bucket_size": bucket,
            "collective": collective,
            "min_numel": 0,
            "clip": None,
            "bucket_cap_mb": 100,
        }
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for i in range(5):
        step(ddp, opt, rank, i)
    numel = sum(p.numel() for p in model.parameters())
    torch.save(
        {"sent": state.stats.bytes_sent, "received": state.stats.bytes_received, "numel": numel},
        out / f"rank{rank}.pt",
    )
    state.close()
    del ddp
    gc.collect()


def documented_bytes(collective, n, numel, bits, bucket):
    """README's formulas: allgather (n−1)·P(N); scatter 2(n−1)·P(c), c = padded chunk."""

    def payload(m):
        scales = 1 if bucket is None else -(-m // bucket)
        return -(-m * bits // 8) + 4 * scales

    if collective == "allgather":
        return (n - 1) * payload(numel)
    per_byte = 8 // __import__("math").gcd(bits, 8)
    unit = per_byte if bucket is None else __import__("math").lcm(bucket, per_byte)
    chunk = -(-numel // (n * unit)) * unit
    return 2 * (n - 1) * payload(chunk)


@pytest.mark.parametrize(
    ("collective", "world", "bits", "bucket"),
    [
        ("allgather", 2, 2, 512),
        ("scatter", 2, 2, 512),
        ("scatter", 3, 3, 100),
        ("scatter", 4, 2, None),
        ("allgather", 3, 4, None),
    ],
)
def test_counted_bytes_match_the_documented_formula(tmp_path, collective, world, bits, bucket):
    run_workers(bytes_worker, world, tmp_path, collective, bits, bucket)
    res = results(tmp_path, world)
    quantized_steps = 5 - 2  # start_iter = 2: the first two steps are fp32 all-reduce
    expected = quantized_steps * documented_bytes(collective, world, res[0]["numel"], bits, bucket)
    for r in res:
        assert r["sent"] == expected and r["received"] == expected


def resume_worker(rank, world, out, phase):
    """phase 'full': 16 steps straight; 'first': 8 steps + save; 'second': load + 8 steps."""
    opts = {
        "bits": 2,
        "bucket_size": 64,
        "collective": "scatter",
        "error_feedback": True,
        "min_numel": 0,
    }
    model, ddp, state = setup(opts)
    opt = QuantizedOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, "ternary")
    steps = range(16) if phase == "full" else range(8) if phase == "first" else range(8, 16)
    if phase == "second":
        saved = torch.load(out / f"ckpt{rank}.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state.load_state_dict(saved["comm"])
        prime_buckets(ddp, state, batch(rank, 0)[0])
    for i in steps:
        step(ddp, opt, rank, i)
    if phase == "first":
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "comm": state.state_dict()},
            out / f"ckpt{rank}.pt",
        )
    torch.save(flat_params(model), out / f"{phase}{rank}.pt")
    state.close()
    del ddp
    gc.collect()


def test_resume_from_hook_state_is_bit_exact(tmp_path):
    for phase in ("full", "first", "second"):
        run_workers(resume_worker, 2, tmp_path, phase)
    for rank in range(2):
        full = torch.load(tmp_path / f"full{rank}.pt")
        resumed = torch.load(tmp_path / f"second{rank}.pt")
        assert torch.equal(full, resumed)
    assert torch.load(tmp_path / "ckpt0.pt")["comm"]["residuals"]  # EF state was in it


def test_gradient_accumulation_with_no_sync(tmp_path):
    opts = {"bits": 2, "collective": "scatter", "min_numel": 0}
    run_workers(train_worker, 2, tmp_path, opts, 10, torch.float32, 3)
    res = results(tmp_path, 2)
    assert_identical(res)
    assert res[0]["iter"] == 10  # the hook runs once per synchronized step


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(tmp_path, dtype):
    opts = {"bits": 4, "collective": "allgather", "min_numel": 0}
    run_workers(train_worker, 2, tmp_path, opts, 6, dtype)
    res = results(tmp_path, 2)
    assert_identical(res)
    assert res[0]["dtypes"] == {dtype}
    assert torch.isfinite(res[0]["params"]).all()


def nan_worker(rank, world, out, policy):
    model, ddp, state = setup(
        {"bits": 2, "collective": "scatter", "min_numel": 0, "nonfinite": policy}
    )
    opt = QuantizedOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, "ternary")
    raised = []
    for i in range(6):
        opt.zero_grad()
        x, y = batch(rank, i)
        if i == 4 and rank == 1:
            x[0, 0] = float("nan")  # only rank 1 sees a NaN
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
        except FloatingPointError as exc:  # the documented type reaches the caller
            raised.append((i, type(exc).__name__, str(exc)))  # and training goes on
    torch.save(
        {"params": flat_params(model), "raised": raised, "skipped": opt.skipped_steps},
        out / f"rank{rank}.pt",
    )
    state.close()
    del ddp
    gc.collect()


def test_nan_on_one_rank_raises_on_every_rank(tmp_path):
    """`except FloatingPointError` around backward catches it on every rank (DDP turned a
    failed future into RuntimeError("Unable to cast …")), and DDP keeps working afterwards."""
    run_workers(nan_worker, 2, tmp_path, "raise")
    res = results(tmp_path, 2)
    for r in res:
        assert len(r["raised"]) == 1 and r["raised"][0][:2] == (4, "FloatingPointError")
        assert "non-finite gradient" in r["raised"][0][2]
        assert torch.isfinite(r["params"]).all()  # steps 5 and on trained normally
    assert_identical(res)


class WithOffset(nn.Module):
    """A normal layer beside a parameter whose gradient is exactly 1.0 everywhere."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(20, 64)
        self.offset = nn.Parameter(torch.zeros(2048))

    def forward(self, x):
        return self.layer(x).pow(2).mean() + self.offset.sum()


def constant_worker(rank, world, out, collective):
    model = WithOffset()
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)
    state = QuantizedCommState(bits=2, clip=2.5, collective=collective, min_numel=0)
    ddp.register_comm_hook(state, quantized_hook)
    grads = []
    for i in range(4):
        ddp.zero_grad()
        ddp(batch(rank, i)[0]).backward()
        grads.append(model.offset.grad.clone())
    torch.save({"grads": grads}, out / f"rank{rank}.pt")
    state.close()
    del ddp
    gc.collect()


def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    run_workers(nan_worker, 2, tmp_path, "propagate")
    res = results(tmp_path, 2)
    for r in res:
        assert r["raised"] == [] and r["skipped"] == 1
        assert torch.isfinite(r["params"]).all()
    assert_identical(res)


class Linear1D(nn.Module):
    """loss = ⟨p, c⟩: the gradient of p is exactly the given vector c."""

    def __init__(self, n):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n))

    def forward(self, c):
        return (self.p * c).sum()


def terngrad_error_worker(rank, world, out):
    n = 1 << 18
    model = Linear1D(n)
    ddp = DistributedDataParallel(model, bucket_cap_mb=2)
    state = QuantizedCommState(compressor="terngrad", clip=None, collective="allgather",
                               min_numel=0, error_every=1)  # fmt: skip
    ddp.register_comm_hook(state, quantized_hook)
    gradients = [torch.randn(n, generator=torch.Generator().manual_seed(r)) * (1 + 9 * r)
                 for r in range(world)]  # fmt: skip
    for _ in range(3):
        ddp.zero_grad()
        ddp(gradients[rank]).backward()
    torch.save({"error": state.compression_stats().relative_error, "gradients": gradients},
               out / f"rank{rank}.pt")  # fmt: skip
    state.close()
    del ddp
    gc.collect()


def test_terngrad_error_is_measured_with_the_shared_scale_it_sends(tmp_path):
    """Rank 0's gradient is 10x smaller than rank 1's: its codes go with rank 1's scales, so
    its error is ~10x what its own scale would give (it was measured with its own). One draw:
    ~6000 elements round up, so the measurement is within ~1.3% (1σ) of its expectation."""
    run_workers(terngrad_error_worker, 2, tmp_path)
    res = results(tmp_path, 2)
    g = res[0]["gradients"]
    shared = torch.stack([x.abs().view(-1, 512).amax(1) for x in g]).amax(0)
    for rank in range(2):
        rows = g[rank].view(-1, 512)  # 2-bit levels {−s, 0, s}: E‖Q(g) − g‖² = Σ s‖g‖₁ − ‖g‖²
        expected = float((shared * rows.abs().sum(1)).sum()) / float(rows.square().sum()) - 1
        assert res[rank]["error"] == pytest.approx(expected, rel=0.06)
    assert res[0]["error"] > 15  # with its own scale: ~2.6


def zero_worker(rank, world, out):
    model, ddp, state = setup({"bits": 2, "collective": "scatter", "min_numel": 0})
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    before = flat_params(model)
    for i in range(4):
        opt.zero_grad()
        x, _ = batch(rank, i)
        (ddp(x) * 0.0).sum().backward()
        opt.step()
    torch.save({"before": before, "params": flat_params(model)}, out / f"rank{rank}.pt")
    state.close()
    del ddp
    gc.collect()


def test_zero_gradients_stay_zero(tmp_path):
    run_workers(zero_worker, 2, tmp_path)
    for r in results(tmp_path, 2):
        assert torch.equal(r["before"], r["params"])


def world_change_worker(rank, world, out):
    _, ddp, state = setup({"bits": 2, "error_feedback": True, "min_numel": 0})
    saved = {
        "iter": 7,
        "world_size": 4,
        "rank": rank,
        "config": state.config(),
        "residuals": {"2/0": torch.zeros(3)},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state.load_state_dict(saved)
    torch.save(
        {
            "warned": [str(w.message) for w in caught],
            "iter": state.iter,
            "residuals": state.state_dict()["residuals"],
        },
        out / f"rank{rank}.pt",
    )
    state.close()
    del ddp
    gc.collect()


def test_resume_with_another_world_size_resets_error_feedback_with_a_warning(tmp_path):
    run_workers(world_change_worker, 2, tmp_path)
    for r in results(tmp_path, 2):
        assert any("world size 4" in w and "reset" in w for w in r["warned"])
        assert r["iter"] == 7 and r["residuals"] == {}


def bad_args_worker(rank, world, out):
    errors = []
    for kwargs in (
        {"bits": 9},
        {"collective": "ring"},
        {"start_iter": 1},
        {"clip": -1.0},
        {"compressor": "topk"},
        {"bits_by_name": {"0.weight": 4}},
    ):
        try:
            QuantizedCommState(**kwargs)
        except ValueError as exc:
            errors.append(str(exc))
    torch.save(errors, out / f"rank{rank}.pt")


def test_bad_arguments_name_the_value_and_the_choices(tmp_path):
    run_workers(bad_args_worker, 2, tmp_path)
    errors = torch.load(tmp_path / "rank0.pt")
    assert len(errors) == 6
    assert "bits=9" in errors[0] and "1..8" in errors[0]
    assert "allowed: allgather, scatter, hierarchical" in errors[1]
    assert "start_iter=1" in errors[2]
    assert "needs model=" in errors[5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compressor": "sign", "bits": 4}, "bits=4 with compressor 'sign', which sends 1 bit"),
        ({"compressor": "terngrad", "bits": 6}, "bits=6 with compressor 'terngrad'"),
        (
            {"compressor": "sign", "bits": 1, "bits_by_name": {"w": 4}, "model": nn.Linear(2, 2)},
            r"bits_by_name\['w'\]=4 with compressor 'sign'",
        ),
    ],
)
def test_contradictory_bits_are_refused(kwargs, message):
    """sign sent 1 bit and terngrad 2 whatever `bits` said, while checkpoints recorded it."""
    with pytest.raises(ValueError, match=message):
        QuantizedCommState(**kwargs)


def test_state_built_before_the_process_group_binds_later():
    """As torch's PowerSGDState can be: built before init_process_group (the hook binds it on
    its first run; the Lightning DDPStrategy test trains with one); used too early, it says so."""
    assert not dist.is_initialized()
    state = QuantizedCommState(bits=2)
    try:
        with pytest.raises(RuntimeError, match="init_process_group"):
            state.state_dict()
    finally:
        state.close()


def hierarchical_worker(rank, world, out):
    os.environ["GROUP_RANK"] = str(rank // 2)  # two emulated nodes of two ranks each
    model, ddp, state = setup({"bits": 2, "collective": "hierarchical", "min_numel": 0})
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for i in range(12):
        step(ddp, opt, rank, i)
    stats = state.compression_stats()
    torch.save({"params": flat_params(model), "sent": stats.bytes_sent,
                "intra": stats.intra_node_bytes_sent, "quantizations": state.quantizations(),
                "measured": stats.measured_step}, out / f"rank{rank}.pt")  # fmt: skip
    state.close()
    del ddp
    gc.collect()


def test_hierarchical_across_two_emulated_nodes(tmp_path):
    run_workers(hierarchical_worker, 4, tmp_path)
    res = results(tmp_path, 4)
    assert_identical(res)
    leaders, others = (res[0], res[2]), (res[1], res[3])
    assert all(r["sent"] > 0 and r["intra"] > 0 for r in leaders)  # quantized between nodes
    assert all(r["sent"] == 0 and r["intra"] > 0 for r in others)  # only fp32 inside the node
    assert all(r["quantizations"] == 2 for r in res)
    assert [r["measured"] >= 10 for r in res] == [True, False, True, False]  # leaders measure


def one_node_worker(rank, world, out):
    _, ddp, state = setup({"bits": 2, "collective": "hierarchical", "min_numel": 0})
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for i in range(12):
        step(ddp, opt, rank, i)
    torch.save({"quantizations": state.quantizations(),
                "measured": state.compression_stats().measured_step}, out / f"rank{rank}.pt")
    state.close()
    del ddp
    gc.collect()


def test_hierarchical_on_one_node_counts_no_quantization(tmp_path):
    """Nothing is quantized on one node, so the monitor gets no measurement and shows no bound
    (it counted two quantizations there)."""
    run_workers(one_node_worker, 2, tmp_path)
    for r in results(tmp_path, 2):
        assert r == {"quantizations": 0, "measured": -1}


def mixed_widths_worker(rank, world, out):
    torch.manual_seed(0)
    model = make_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=100)  # one bucket, three widths
    state = QuantizedCommState(bits=2, bits_by_name={"0.weight": 4, r"6\..*": 8}, model=model,
                               min_numel=0, error_feedback=True)
    ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    before = flat_params(model)
    for i in range(12):
        step(ddp, opt, rank, i)
    torch.save({"params": flat_params(model), "before": before,
                "widths": sorted(state.state_dict()["residuals"])}, out / f"rank{rank}.pt")
    state.close()
    del ddp
    gc.collect()


def test_bits_by_name_sends_each_width(tmp_path):
    run_workers(mixed_widths_worker, 2, tmp_path)
    res = results(tmp_path, 2)
    assert_identical(res)
    assert (res[0]["params"] - res[0]["before"]).abs().max() > 1e-3
    assert {name.split("/")[0] for name in res[0]["widths"]} == {"2", "4", "8"}


def test_small_buckets_go_uncompressed(tmp_path):
    opts = {"bits": 2, "min_numel": 10**9}
    run_workers(train_worker, 2, tmp_path, opts, 6)
    res = results(tmp_path, 2)
    assert_identical(res)
    assert res[0]["sent"] == 0 and res[0]["ratio"] == pytest.approx(1.0)


def sparse_worker(rank, world, out, sparse_gradients):
    """Ternary weights at 75% sparsity; with sparse_gradients the pruned entries stay home."""
    model, ddp, state = setup({"bits": 2, "min_numel": 16})
    opt = QuantizedOptimizer(torch.optim.Adam(ddp.parameters(), lr=1e-2), ddp, "ternary",
                             sparsity=0.75)
    if sparse_gradients:
        state.set_keep_mask(opt.mask_of)
    zero_where_pruned = []
    for i in range(12):
        opt.zero_grad()
        x, y = batch(rank, i)
        nn.functional.cross_entropy(ddp(x), y).backward()
        if i >= state.start_iter:
            pruned = [(p.grad[p == 0] == 0).all() for p in opt.quantized_parameters().values()]
            zero_where_pruned.append(bool(torch.stack(pruned).all()))
        opt.step()
    stats = state.compression_stats()
    torch.save({"params": flat_params(model), "sent": stats.bytes_sent,
                "zero": zero_where_pruned}, out / f"{sparse_gradients}-{rank}.pt")
    state.close()
    del ddp
    gc.collect()


def test_pruned_weights_gradients_stay_off_the_wire(tmp_path):
    for sparse_gradients in (False, True):
        run_workers(sparse_worker, 2, tmp_path, sparse_gradients)
    dense = [torch.load(tmp_path / f"False-{r}.pt") for r in range(2)]
    sparse = [torch.load(tmp_path / f"True-{r}.pt") for r in range(2)]
    assert torch.equal(sparse[0]["params"], sparse[1]["params"])  # the masks agreed
    assert all(sparse[0]["zero"]) and not any(dense[0]["zero"])
    # 2 quantized 64x64 layers at 25% density: their traffic drops to about a quarter.
    assert sparse[0]["sent"] < 0.6 * dense[0]["sent"]


def refuse_worker(rank, world, out):
    state = QuantizedCommState(error_feedback=True)
    with pytest.raises(ValueError, match="error_feedback"):
        state.set_keep_mask(lambda p: None)
    state.close()


def test_keep_mask_refuses_error_feedback():
    run_workers(refuse_worker, 2, None)
