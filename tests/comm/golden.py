"""What the golden test pins (tests/comm/test_golden_wire.py): the payload bytes of every
compressor × bit width, the sums every collective returns with the bytes it counts, DDP hook
runs' final weights, the digits job's final weights, and DeepSpeed's and Horovod's runs, each
as a SHA-256 of fixed inputs and keys. `python -m tests.comm.golden` rewrites
tests/comm/golden_wire.json: only when the wire or the training is meant to change, saying so
in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from distq.comm import Key, SignCompressor, StochasticQuantizer, make_compressor, terngrad
from distq.comm.collectives import quantized_sum

os.environ.setdefault("DISTQ_COMPILE", "0")  # the eager kernels: fast, and what the tests run

GOLDEN = Path(__file__).with_name("golden_wire.json")
LENGTHS = (3000, 4096)  # a partial last bucket, and whole buckets


def digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' raw bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gradient(numel: int, seed: int) -> torch.Tensor:
    """A fixed input with an outlier, so clipping and scales both matter."""
    g = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    g[numel // 3] = 9.0
    return g


def compressors() -> dict[str, object]:
    """Every compressor and width the wire carries, by a stable name."""
    out: dict[str, object] = {}
    for bits in range(1, 9):
        out[f"quantize{bits}-b512"] = StochasticQuantizer(bits, 512)
    for bits in (1, 2, 4):
        out[f"quantize{bits}-one"] = StochasticQuantizer(bits, None)
    out["quantize2-b512-fp16"] = StochasticQuantizer(2, 512, torch.float16)
    out["terngrad-b512"] = terngrad(512)
    out["terngrad-one"] = terngrad(None)
    out["sign-b512"] = SignCompressor(512)
    return out


def payloads() -> dict[str, str]:
    """Single-process payload bytes: each compressor on each length, and error feedback's second
    call (which carries the first call's residual)."""
    found = {}
    for name, compressor in compressors().items():
        for numel in LENGTHS:
            payload = compressor.compress(gradient(numel, 0), Key(seed=1, step=5, rank=1))
            found[f"{name}/{numel}"] = digest(payload)
    feedback = make_compressor("sign", 1, 512, error_feedback=True)
    first = feedback.compress(gradient(4096, 0), Key(step=1))
    second = feedback.compress(gradient(4096, 1), Key(step=2))
    found["sign-ef/4096"] = digest(first, second)
    return found


def collective_worker(rank: int, world: int, out: Path) -> None:
    """Each collective's sum and counted bytes, per compressor, on this rank."""
    found = {}
    for name, compressor in compressors().items():
        if name.endswith("-fp16"):
            continue
        for collective in ("allgather", "scatter", "hierarchical"):
            for numel in LENGTHS:
                x = gradient(numel, 10 + rank)
                total, traffic = quantized_sum(x, compressor, Key(seed=2, step=3, rank=rank),
                                               collective)  # fmt: skip
                counts = torch.tensor([traffic.sent, traffic.received, traffic.intra_node_sent])
                found[f"{name}/{collective}/{numel}"] = digest(total, counts)
    for kind, bits in (("quantize", 2), ("sign", 1)):  # error feedback: the 2nd call carries e
        for collective in ("allgather", "scatter", "hierarchical"):
            feedback = make_compressor(kind, bits, 512, error_feedback=True)
            sums = [
                quantized_sum(gradient(4096, 20 * step + rank), feedback,
                              Key(seed=2, step=step, rank=rank), collective)[0]
                for step in (3, 4)
            ]  # fmt: skip
            found[f"{kind}{bits}-ef/{collective}/4096"] = digest(*sums)
    torch.save(found, out / f"rank{rank}.pt")


def collectives(world: int) -> dict[str, str]:
    """Every rank's sums and byte counts of `collective_worker`, world ranks on gloo."""
    from tests.distributed import run_workers

    with tempfile.TemporaryDirectory() as tmp:
        run_workers(collective_worker, world, Path(tmp))
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    return {f"{key}/rank{r}": found[key] for r, found in enumerate(ranks) for key in found}


HOOK_VARIANTS = {  # name -> QuantizedCommState options beyond the model's
    "scatter2-mixed": dict(bits=2, clip=2.5, error_every=3, bits_by_name={"2.weight": 4}),
    "allgather-sign-ef": dict(compressor="sign", collective="allgather", error_feedback=True),
    "scatter-ef": dict(bits=3, error_feedback=True, overlap=False),
    "hierarchical-terngrad": dict(compressor="terngrad", collective="hierarchical"),
    "scatter4-keep-segments": dict(bits=4, segment=1024, keep=True),
}


def hook_worker(rank: int, world: int, out: Path, variant: str) -> None:
    """Eight steps of a small model through the DDP hook with one of HOOK_VARIANTS' settings
    (keep: every other row of the first layer off the wire): final weights and byte counts."""
    from torch import nn

    from distq.comm import QuantizedCommState, quantized_hook

    torch.set_num_threads(1)  # the weights depend on the matmuls' thread count
    options = dict(HOOK_VARIANTS[variant])
    keep = options.pop("keep", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(),
                          nn.Linear(64, 5))  # fmt: skip
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    state = QuantizedCommState(min_numel=0, model=ddp, **options)
    if keep:
        rows = torch.arange(96) % 2 == 0
        state.set_keep_mask(lambda p: rows[:, None].expand_as(p) if p is model[0].weight else None)
    ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(8):
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    stats = state.compression_stats()
    counts = torch.tensor([stats.bytes_sent, stats.bytes_received])
    torch.save(digest(*model.parameters(), counts), out / f"rank{rank}.pt")
    state.close()
    del ddp


def hook_run(variant: str = "scatter2-mixed") -> str:
    from tests.distributed import run_workers

    with tempfile.TemporaryDirectory() as tmp:
        run_workers(hook_worker, 2, Path(tmp), variant)
        ranks = {torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)}
    assert len(ranks) == 1, "replicas differ"
    return ranks.pop()


def hook_runs() -> dict[str, str]:
    """Every HOOK_VARIANTS run but the first (pinned as "hook")."""
    return {name: hook_run(name) for name in list(HOOK_VARIANTS)[1:]}


def digits_run() -> str:
    """The main job (digits, ternary weights, 2-bit scatter, 2 workers), 2 epochs: the final
    model state of its checkpoint. Batch-norm statistics stay the running averages training
    left (--bn-recalibration 0, as when this was pinned): what the exchange moved, alone."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTQ_COMPILE": "0"}
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "distq.launch.train", "--epochs", "2", "--out-dir", tmp, "--no-progress",
             "--no-monitor", "--bn-recalibration", "0"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        state = torch.load(Path(tmp) / "checkpoint.pt", weights_only=True)
    model = state["model"]
    return digest(*(model[k] for k in sorted(model)))


ENGINE_RUNS = {  # name -> (engine, worker options): DeepSpeed's and Horovod's own exchange paths
    "deepspeed-scatter2-accum2": ("deepspeed", ["--bits", "2", "--accumulation", "2"]),
    "horovod-scatter2": ("horovod", ["--bits", "2"]),
    "horovod-allgather4": ("horovod", ["--bits", "4", "--collective", "allgather"]),
}


def engine_runs() -> dict[str, str]:
    """tests/integrations/worker.py under the real deepspeed launcher and horovodrun, 2 ranks,
    8 steps each: both replicas' final weights, losses and byte counters."""
    from tests.integrations.conftest import run_worker

    found = {}
    for name, (engine, options) in ENGINE_RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            ranks = run_worker(engine, Path(tmp), "--steps", "8", *options)
        found[name] = [
            digest(*(r["state"][k] for k in sorted(r["state"])),
                   torch.tensor(r["losses"], dtype=torch.float64),
                   torch.tensor(list(r["stats"].values())))
            for r in ranks
        ]  # fmt: skip
    return found


def everything() -> dict[str, object]:
    return {
        "payloads": payloads(),
        "collectives2": collectives(2),
        "collectives3": collectives(3),
        "hook": hook_run(),
        "hooks": hook_runs(),
        "digits": digits_run(),
        "engines": engine_runs(),
    }


if __name__ == "__main__":
    assert not dist.is_initialized()
    GOLDEN.write_text(json.dumps(everything(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
