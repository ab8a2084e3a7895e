"""Peak memory of DDP training with and without distq's hook, 2 ranks on gloo.

Each configuration runs in fresh processes (peak RSS is per process lifetime): a 6.3 M-parameter
MLP, DDP's default 25 MB buckets, 12 steps. Reports each rank's peak RSS, the difference to
plain DDP, and that difference in units of the largest DDP bucket (the issue's bound: the hook's
extra memory ≤ 2× the bucket being sent, plus one gradient-sized buffer for error feedback).

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
from torch.nn.parallel import DistributedDataParallel

from distq.comm import QuantizedCommState, quantized_hook

CONFIGS = {
    "DDP fp32 all-reduce": None,
    "distq 2-bit scatter": {"bits": 2, "collective": "scatter"},
    "distq 2-bit allgather": {"bits": 2, "collective": "allgather"},
    "distq 2-bit scatter + error feedback": {"bits": 2, "collective": "scatter",
                                             "error_feedback": True},
}
WIDTH, DEPTH, STEPS = 1400, 4, 12


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
    state = QuantizedCommState(**options) if options else None
    if state:
        ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    buckets = ddp.reducer._get_zeros_like_grad_buckets()  # DDP's (rebuilt) bucket layout
    bucket_bytes = max(b.buffer().numel() * b.buffer().element_size() for b in buckets)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out, f"{rank}.json").write_text(json.dumps({"peak_mib": peak_kib / 1024,
                                                     "bucket_mib": bucket_bytes / 2**20}))
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
    params = sum(p.numel() for p in model().parameters())
    rows = {}
    for name in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(free_port(), name, tmp), nprocs=2,
                               start_method="spawn")
            rows[name] = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(2)]
    base = max(r["peak_mib"] for r in rows["DDP fp32 all-reduce"])
    bucket = rows["DDP fp32 all-reduce"][0]["bucket_mib"]
    print(f"MLP {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.1f} MiB of gradients), "
          f"2 ranks, largest DDP bucket {bucket:.1f} MiB, {STEPS} steps\n")
    print("| configuration | peak RSS rank 0 / rank 1 (MiB) | extra vs plain DDP (MiB) | "
          "extra ÷ largest bucket |")
    print("|---|---|---|---|")
    for name, (r0, r1) in rows.items():
        peak = max(r0["peak_mib"], r1["peak_mib"])
        print(f"| {name} | {r0['peak_mib']:.0f} / {r1['peak_mib']:.0f} | {peak - base:+.0f} | "
              f"{(peak - base) / bucket:.2f} |")


if __name__ == "__main__":
    main()
