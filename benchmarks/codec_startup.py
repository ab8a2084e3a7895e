"""Start-up cost of the compiled codec: the first quantized DDP steps, cold and warm.

Runs `torchrun --nproc_per_node=2` of a small DDP job (an MLP of ~1.1 M parameters, 2-bit
`scatter`, 512-element buckets) four ways, each in fresh processes:
- cold: an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), as on a new machine;
- warm: the same cache again, as for a second job on the same machine;
- eager: DISTQ_COMPILE=0 (no compile at all);
and prints each step's wall time on rank 0 (steps 0-1 are DDP's fp32 warm-up, 2 is the first
quantized one), plus the steady-state step time (median of the last steps).

    .venv/bin/python benchmarks/codec_startup.py [--steps 12] [--out benchmarks/codec_startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """
import json, os, sys, time
import torch, torch.distributed as dist
from torch import nn
from distq.comm import QuantizedCommState, quantized_hook
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
                      nn.Linear(512, 10))
ddp = nn.parallel.DistributedDataParallel(model)
state = QuantizedCommState(bits=2, collective="scatter")
ddp.register_comm_hook(state, quantized_hook)
opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
times = []
for step in range(int(sys.argv[1])):
    x = torch.randn(64, 512)
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(ddp(x), torch.randint(0, 10, (64,))).backward()
    opt.step()
    times.append(time.perf_counter() - start)
if rank == 0:
    print("TIMES " + json.dumps(times))
state.close()
del ddp
dist.barrier()
dist.destroy_process_group()
"""


def run(steps: int, cache: Path, compile_codec: bool) -> list[float]:
    """Step times of rank 0 in a fresh 2-process torchrun job."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "DISTQ_COMPILE": "1" if compile_codec else "0",
        "OMP_NUM_THREADS": "1",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", f.name, str(steps)],
        env=env, capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    os.unlink(f.name)
    line = next(x for x in done.stdout.splitlines() if x.startswith("TIMES "))
    return json.loads(line[len("TIMES ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "inductor"
        for name, compile_codec in (("cold", True), ("warm", True), ("eager", False)):
            start = time.perf_counter()
            times = run(args.steps, cache, compile_codec)
            results[name] = {"steps": times, "job_seconds": time.perf_counter() - start}
    print("| run | step 0 | step 1 | step 2 (1st quantized) | step 3 | steady step | job |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["steps"]
        steady = statistics.median(t[-5:])
        print(
            f"| {name} | {t[0]:.3f} s | {t[1]:.3f} s | {t[2]:.3f} s | {t[3]:.3f} s "
            f"| {steady * 1e3:.1f} ms | {r['job_seconds']:.1f} s |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
