"""Memory of DDP training with and without distq's hook, 2 ranks on gloo.

Each configuration runs in fresh processes: a 6.3 M-parameter MLP, DDP's default 25 MB
buckets. After WARMUP steps (kernels compiled, buffers allocated, error-feedback residuals
created) the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and STEPS more steps
run; the steady-state step peak above the RSS at the reset is what a training step adds. The
hook's extra memory is that peak minus plain DDP's, in units of the largest DDP bucket (the
bound: ≤ 2× the bucket being sent). Lifetime peaks (imports and torch.compile included) and the
persistent growth (error-feedback residuals) are reported beside it.

glibc keeps freed memory of mid-sized allocations in per-thread arenas, which would make RSS
report the allocator's retention rather than live tensors; the workers run with
MALLOC_MMAP_THRESHOLD_=65536 so every tensor above 64 KiB is mapped on allocation and returned
on free, and RSS tracks live memory.

    .venv/bin/python benchmarks/hook_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from distq.comm import QuantizedCommState, quantized_hook

TORCH_HOOK = "torch allreduce_hook"
CONFIGS = {
    "DDP fp32 all-reduce": None,
    "DDP + torch's Python allreduce_hook": TORCH_HOOK,
    "distq 2-bit scatter": {"bits": 2, "collective": "scatter"},
    "distq 2-bit allgather": {"bits": 2, "collective": "allgather"},
    "distq 2-bit scatter + error feedback": {"bits": 2, "collective": "scatter",
                                             "error_feedback": True},
}
WIDTH, DEPTH, WARMUP, STEPS = 1400, 4, 4, 8


def status_mib(field: str) -> float:
    """A VmRSS/VmHWM line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(256, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def worker(rank: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ddp = DistributedDataParallel(model())
    options = CONFIGS[name]
    state = QuantizedCommState(**options) if isinstance(options, dict) else None
    if state:
        ddp.register_comm_hook(state, quantized_hook)
    elif options == TORCH_HOOK:  # reference: the cost of any Python comm hook in DDP
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    start_rss = 0.0
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
            start_rss = status_mib("VmRSS")
        x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    step_peak = status_mib("VmHWM") - start_rss
    buckets = ddp.reducer._get_zeros_like_grad_buckets()  # DDP's (rebuilt) bucket layout
    bucket_bytes = max(b.buffer().numel() * b.buffer().element_size() for b in buckets)
    lifetime_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{rank}.json").write_text(json.dumps({
        "lifetime_mib": lifetime_mib, "step_peak_mib": step_peak, "rss_mib": start_rss,
        "bucket_mib": bucket_bytes / 2**20,
    }))
    if state:
        state.close()
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    params = sum(p.numel() for p in model().parameters())
    rows = {}
    for name in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(free_port(), name, tmp), nprocs=2,
                               start_method="spawn")
            rows[name] = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(2)]
    plain = rows["DDP fp32 all-reduce"]
    bucket = plain[0]["bucket_mib"]
    base_step = max(r["step_peak_mib"] for r in plain)
    base_rss = max(r["rss_mib"] for r in plain)
    base_life = max(r["lifetime_mib"] for r in plain)
    print(f"MLP {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.1f} MiB of gradients), "
          f"2 ranks, largest DDP bucket {bucket:.1f} MiB; {WARMUP} warm-up + {STEPS} measured "
          "steps; max over the two ranks\n")
    print("| configuration | step peak above RSS (MiB) | hook's extra per step (MiB) | "
          "÷ largest bucket | steady RSS vs plain (MiB) | lifetime peak vs plain (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, ranks in rows.items():
        step_peak = max(r["step_peak_mib"] for r in ranks)
        rss = max(r["rss_mib"] for r in ranks)
        life = max(r["lifetime_mib"] for r in ranks)
        print(f"| {name} | {step_peak:.1f} | {step_peak - base_step:+.1f} | "
              f"{(step_peak - base_step) / bucket:.2f} | {rss - base_rss:+.1f} | "
              f"{life - base_life:+.0f} |")


if __name__ == "__main__":
    main()
