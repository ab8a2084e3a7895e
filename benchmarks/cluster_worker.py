"""One host's process of `cluster_bench.py`: trains the teacher-student job under each option.

Started once per host by `cluster_bench.py` (env:// rendezvous: MASTER_ADDR is host 0,
RANK/WORLD_SIZE/LOCAL_RANK=0/GROUP_RANK set per host), it runs every (option, repeat) of the
plan in the plan's order inside one process group, so interpreter start-up, rendezvous and
torch.compile of distq's codec are paid once per cluster rather than once per run. Each run
builds a fresh model from the same seed, wraps it in DDP with the option's comm hook, runs
WARMUP steps whose weights are discarded (DDP's bucket rebuild, distq's and PowerSGD's
full-precision start, codec compilation), then trains, evaluating the test set every
`eval_every` steps. Training time excludes the evaluations (each one is followed by a barrier
so no rank's wait for a slower evaluation counts as a step). Rank 0 writes one JSON per run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distq.comm import QuantizedCommState, quantized_hook
from distq.comm import compressors as dq_compressors
from distq.comm import exchange as dq_exchange
from distq.comm.collectives import SEGMENT_ELEMENTS
from distq.comm.rotation import RotatedQuantizer

INPUT, WIDTH, DEPTH, CLASSES = 256, 1400, 4, 10  # 6.26 M parameters, a 25 MB fp32 gradient
TEACHER_HIDDEN = 128
WARMUP = 4  # steps before timing: DDP rebuilds buckets after 1, distq/PowerSGD start at 2
DEVICE = "eth0"

# name -> how the run is set up; "kind" selects the branch in `build`
OPTIONS: dict[str, dict] = {
    "compute-only": {"kind": "local"},
    "fp32 allreduce": {"kind": "ddp"},
    "fp16 hook": {"kind": "fp16"},
    "PowerSGD r1": {"kind": "powersgd", "rank": 1},
    "PowerSGD r4": {"kind": "powersgd", "rank": 4},
    "distq 2-bit allgather": {"kind": "distq", "bits": 2, "collective": "allgather", "clip": 2.5},
    "distq 2-bit scatter": {"kind": "distq", "bits": 2, "collective": "scatter", "clip": 2.5},
    "distq 4-bit allgather": {"kind": "distq", "bits": 4, "collective": "allgather", "clip": 2.5},
    "distq 4-bit scatter": {"kind": "distq", "bits": 4, "collective": "scatter", "clip": 2.5},
    # EDEN (distq.comm.rotation): Hadamard-rotated 512-element buckets, Lloyd–Max 2-bit levels
    "distq rotated 2-bit scatter": {
        "kind": "distq",
        "bits": 2,
        "collective": "scatter",
        "clip": 2.5,
        "compressor": "rotated",
    },
    # ablations: less error per step, by error feedback (as PowerSGD runs) or one more bit
    "distq rotated 2-bit scatter EF": {
        "kind": "distq",
        "bits": 2,
        "collective": "scatter",
        "clip": 2.5,
        "compressor": "rotated",
        "error_feedback": True,
        "ablation": True,
    },
    "distq rotated 3-bit scatter": {
        "kind": "distq",
        "bits": 3,
        "collective": "scatter",
        "clip": 2.5,
        "compressor": "rotated",
        "ablation": True,
    },
    "distq rotated 2-bit allgather": {
        "kind": "distq",
        "bits": 2,
        "collective": "allgather",
        "clip": 2.5,
        "compressor": "rotated",
    },
    # bits chosen by measurement (comm/auto.py): fp32, fp16 or rotated 1/2/4-bit per bucket
    "distq auto rotated scatter": {
        "kind": "distq",
        "bits": "auto",
        "collective": "scatter",
        "clip": 2.5,
        "compressor": "rotated",
    },
    "distq EF-signSGD allgather": {
        "kind": "distq",
        "bits": 1,
        "collective": "allgather",
        "clip": None,
        "compressor": "sign",
        "error_feedback": True,
    },
    # ablation (run only when named with --options): a bucket exchanged in one piece
    "distq 2-bit scatter, unpipelined": {
        "kind": "distq",
        "bits": 2,
        "collective": "scatter",
        "clip": 2.5,
        "segment": None,
        "ablation": True,
    },
    # ablation: the rotated code without clipping (the rotation already spreads outliers)
    "distq rotated 2-bit scatter, no clip": {
        "kind": "distq",
        "bits": 2,
        "collective": "scatter",
        "clip": None,
        "compressor": "rotated",
        "ablation": True,
    },
    # ablation: shorter pipeline segments (more, smaller codec calls and collectives)
    **{
        f"distq 2-bit scatter, segment {size >> 10}k": {
            "kind": "distq",
            "bits": 2,
            "collective": "scatter",
            "clip": 2.5,
            "segment": size,
            "ablation": True,
        }
        for size in (1 << 18, 1 << 19)
    },
}


# -- the task ------------------------------------------------------------------------------------
class Teacher:
    """A fixed random 2-layer tanh network; a sample's label is the argmax of its 10 outputs."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(INPUT, TEACHER_HIDDEN, generator=g) / INPUT**0.5
        self.w2 = torch.randn(TEACHER_HIDDEN, CLASSES, generator=g) / TEACHER_HIDDEN**0.5

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, INPUT, generator=torch.Generator().manual_seed(seed))
        return x, torch.tanh(2 * x @ self.w1).matmul(self.w2).argmax(dim=1)


def student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(INPUT, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


def batch_seed(seed: int, rank: int, step: int) -> int:
    """Distinct, reproducible stream per (seed, rank, step); warm-up steps are negative."""
    return (seed * 1_000_003 + rank * 10_007 + step + 1_000) % (2**62)


class _TimedWork:
    """An async collective's Work whose wait() counts toward the collective's category: with
    distq's pipelined exchange the wire time is spent there, not in the call that starts it."""

    def __init__(self, work: dist.Work, timers: HookTimers, category: str) -> None:
        self._work, self._timers, self._category = work, timers, category

    def wait(self) -> bool:
        return self._timers.measure(self._category, self._work.wait)


# -- instrumentation of distq's hook (timers only; distq's code is not changed) ----------------
class HookTimers:
    """Seconds spent inside distq's hook on its worker thread, by category, exclusive: time in
    a wrapped call nested in another (the codec inside the error measurement) counts for the
    inner one only. "bucket total" is GradientExchange.average end to end (inclusive); its
    exclusive part, "other", is the hook's own work: scratch buffer, copies, division.

    Wraps, by attribute replacement in this process only (distq's code is not changed):
    GradientExchange.average, clip_by_rms_, the error measurement, the codecs' (BucketCodec's,
    RotatedQuantizer's) encode and decode methods, and the gloo collectives when called from
    distq's thread (starting one, and waiting for it). Overhead: a few perf_counter calls per
    wrapped call, tens per bucket.
    """

    CATEGORIES = (
        "other",
        "clip",
        "error measurement",
        "compress",
        "decompress",
        "all_to_all",
        "all_gather",
        "all_reduce",
    )

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)  # wall seconds
        self.cpu: dict[str, float] = defaultdict(float)  # CPU seconds of the hook's thread
        self.calls: dict[str, int] = defaultdict(int)
        self.active = False
        self.events: list[tuple[int, int, float, float]] = []  # bucket, numel, start, end
        self._local = threading.local()

    def wrap(self, owner, attr: str, category: str, only_thread: str | None = None) -> None:
        """Time owner.attr under `category`; an async collective's Work is timed on wait()."""
        original = getattr(owner, attr)
        timers = self

        def timed(*args, **kwargs):
            if not timers.active or (
                only_thread and threading.current_thread().name != only_thread
            ):
                return original(*args, **kwargs)
            result = timers.measure(category, original, *args, **kwargs)
            if isinstance(result, dist.Work):
                return _TimedWork(result, timers, category)
            return result

        setattr(owner, attr, timed)

    def measure(self, category: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), its wall and thread-CPU time added to `category` (exclusive of
        wrapped calls inside it)."""
        stack = self._local.__dict__.setdefault("stack", [])
        # wall start, thread-CPU start, wall and CPU spent in wrapped children
        frame = [time.perf_counter(), time.thread_time(), 0.0, 0.0]
        stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            wall = time.perf_counter() - frame[0]
            cpu = time.thread_time() - frame[1]
            self.totals[category] += wall - frame[2]
            self.cpu[category] += cpu - frame[3]
            self.calls[category] += 1
            if stack:
                stack[-1][2] += wall
                stack[-1][3] += cpu
            else:
                self.totals["bucket total"] += wall
                self.cpu["bucket total"] += cpu

    def install(self) -> None:
        exchange = dq_exchange.GradientExchange
        self.wrap(exchange, "average", "other")
        timed_average = exchange.average

        def average(state, buffer, lengths, widths, index, *args, **kwargs):  # bucket timeline
            start = time.perf_counter()
            try:
                return timed_average(state, buffer, lengths, widths, index, *args, **kwargs)
            finally:
                if self.active:
                    self.events.append((index, buffer.numel(), start, time.perf_counter()))

        exchange.average = average
        self.wrap(dq_exchange, "clip_by_rms_", "clip")
        self.wrap(exchange, "_measure", "error measurement")
        for codec in (dq_compressors.BucketCodec, RotatedQuantizer):
            for attr in ("compress", "compress_rows"):
                self.wrap(codec, attr, "compress")
            for attr in ("decompress_into", "decode_rows_into", "decode_sum_into"):
                self.wrap(codec, attr, "decompress")
        for attr, category in (
            ("all_to_all_single", "all_to_all"),
            ("all_gather_single", "all_gather"),
            ("all_reduce", "all_reduce"),
        ):
            self.wrap(dist, attr, category, only_thread="distq-comm")

    def reset(self) -> None:
        self.totals.clear()
        self.cpu.clear()
        self.calls.clear()
        self.events.clear()

    def timeline(self, backward_starts: list[float]) -> dict[int, dict]:
        """Per DDP bucket: elements, and the median ms from the start of its step's backward
        to the start and the end of its reduction on distq's thread."""
        per_bucket: dict[int, dict] = {}
        for index, numel, start, end in self.events:
            origin = max((b for b in backward_starts if b <= start), default=None)
            if origin is None:
                continue
            entry = per_bucket.setdefault(index, {"numel": numel, "start": [], "end": []})
            entry["start"].append(1e3 * (start - origin))
            entry["end"].append(1e3 * (end - origin))
        return {
            i: {
                "numel": e["numel"],
                "start_ms": statistics.median(e["start"]),
                "end_ms": statistics.median(e["end"]),
            }
            for i, e in sorted(per_bucket.items())
        }


TIMERS = HookTimers()


# -- one run -------------------------------------------------------------------------------------
def machine_busy() -> float:
    """CPU seconds all cores of the machine have been busy (/proc/stat: not idle, not iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process of this machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def foreign_cores(result: dict) -> float:
    """Cores busy with other work than this job's processes during a run's timed part."""
    return (result["machine_busy_seconds"] - result["own_cpu_seconds"]) / result["run_seconds"]


def wait_for_quiet(pids: list[int], max_load: float, limit: float, window: float = 2.0) -> float:
    """Rank 0 waits (up to `limit` s) until other work uses at most `max_load` cores over a
    `window`-second sample, then lets everyone go; returns the seconds waited."""
    waited = [0.0]
    if dist.get_rank() == 0:
        start = time.perf_counter()
        while time.perf_counter() - start < limit:
            busy, own = machine_busy(), sum(process_cpu(p) for p in pids)
            time.sleep(window)
            load = (machine_busy() - busy - (sum(process_cpu(p) for p in pids) - own)) / window
            if load <= max_load:
                break
        waited[0] = time.perf_counter() - start - window
    dist.broadcast_object_list(waited, src=0)
    return max(waited[0], 0.0)


def tx_bytes() -> int:
    return int(Path(f"/sys/class/net/{DEVICE}/statistics/tx_bytes").read_text())


def build(option: dict, model: nn.Module, repeat: int):
    """(module to train, hook state or None, closer)."""
    kind = option["kind"]
    if kind == "local":
        return model, None
    if kind == "powersgd":
        # one bucket: torch's PowerSGD hook on gloo breaks with several (ENVIRONMENT.md)
        ddp = DistributedDataParallel(model, bucket_cap_mb=64)
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=option["rank"],
            start_powerSGD_iter=2,
            random_seed=repeat,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return ddp, state
    ddp = DistributedDataParallel(model)
    if kind == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return ddp, None
    if kind == "distq":
        state = QuantizedCommState(
            bits=option["bits"],
            bucket_size=512,
            clip=option["clip"],
            collective=option["collective"],
            compressor=option.get("compressor", "quantize"),
            error_feedback=option.get("error_feedback", False),
            seed=repeat,
            segment=option.get("segment", SEGMENT_ELEMENTS),
        )
        ddp.register_comm_hook(state, quantized_hook)
        return ddp, state
    return ddp, None


def forget_warmup(option: dict, state) -> None:
    """Drop error-feedback residuals accumulated from the warm-up gradients."""
    if option["kind"] == "powersgd":
        state.error_dict.clear()
    elif option["kind"] == "distq":
        state.exchange.reset_residuals()


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, local: bool
) -> tuple[float, float]:
    """(test accuracy, mean test cross-entropy); the test set is split across ranks. The
    compute-only runs (no exchange: every rank's model differs) are not evaluated."""
    if local:
        return float("nan"), float("nan")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = x[rank::world], y[rank::world]
    with torch.no_grad():
        out = model(x)
        sums = torch.tensor(
            [
                float((out.argmax(1) == y).sum()),
                float(nn.functional.cross_entropy(out, y, reduction="sum")),
                float(y.numel()),
            ],
            dtype=torch.float64,
        )
    dist.all_reduce(sums)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def run_one(name: str, repeat: int, plan: dict, teacher: Teacher, test, target: float | None):
    option = OPTIONS[name]
    rank = dist.get_rank()
    seed, steps, batch = plan["seed"], plan["steps"], plan["batch"]
    local = option["kind"] == "local"
    # options other than fp32 may go on past `steps` until they reach fp32's accuracy
    extend = target is not None and option["kind"] not in ("ddp", "local")
    max_steps = plan["max_steps"] if extend else steps
    batches = [teacher.sample(batch, batch_seed(seed, rank, s)) for s in range(-WARMUP, max_steps)]

    model = student(seed)
    module, state = build(option, model, repeat)
    optimizer = torch.optim.Adam(module.parameters(), lr=plan["lr"])
    loss_fn = nn.CrossEntropyLoss()

    dist.barrier()
    warm_start = time.perf_counter()
    for x, y in batches[:WARMUP]:  # gradients exchanged, weights not updated
        module.zero_grad(set_to_none=True)
        loss_fn(module(x), y).backward()
    module.zero_grad(set_to_none=True)
    if state is not None:
        forget_warmup(option, state)
    warmup_seconds = time.perf_counter() - warm_start
    dist.barrier()

    TIMERS.reset()
    TIMERS.active = option["kind"] == "distq"
    acc, test_loss = evaluate(module, *test, local)
    evals = [{"step": 0, "train_seconds": 0.0, "accuracy": acc, "loss": test_loss}]
    dist.barrier()
    busy0, own0, wall0 = machine_busy(), time.process_time(), time.perf_counter()
    step_times, phases, train_losses, backward_starts = [], [], [], []
    sent, train_seconds, step = 0, 0.0, 0
    segment_tx = tx_bytes()
    while step < max_steps:
        x, y = batches[WARMUP + step]
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module(x), y)
        t1, c1 = time.perf_counter(), time.thread_time()
        backward_starts.append(t1)
        loss.backward()
        t2, c2 = time.perf_counter(), time.thread_time()
        optimizer.step()
        t3 = time.perf_counter()
        step_times.append(t3 - t0)
        phases.append((t1 - t0, t2 - t1, t3 - t2, c2 - c1))
        train_losses.append(float(loss.detach()))
        train_seconds += t3 - t0
        step += 1
        if step % plan["eval_every"] == 0 or step in (max_steps, steps):
            sent += tx_bytes() - segment_tx
            acc, test_loss = evaluate(module, *test, local)
            evals.append(
                {"step": step, "train_seconds": train_seconds, "accuracy": acc, "loss": test_loss}
            )
            if rank == 0:
                print(
                    f"    {name} r{repeat} step {step}: acc {acc:.4f} loss {test_loss:.4f} "
                    f"({train_seconds:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            dist.barrier()
            segment_tx = tx_bytes()
            if step >= steps and (not extend or acc >= target):
                break
    TIMERS.active = False
    dist.barrier()
    busy1, own1, wall1 = machine_busy(), time.process_time(), time.perf_counter()

    stats = None
    if option["kind"] == "distq":
        s = state.compression_stats()
        stats = {
            "steps": s.steps,
            "bytes_sent": s.bytes_sent,
            "uncompressed_bytes_sent": s.uncompressed_bytes_sent,
            "fp32_allreduce_bytes": s.fp32_allreduce_bytes,
            "relative_error": s.relative_error,
            "requant_relative_error": s.requant_relative_error,
            "clip_bias": s.clip_bias,
            "measured_step": s.measured_step,
            "auto_choices": dict(s.choices),  # bits="auto": each bucket's choice and why
        }
    hook_profile = (
        {
            "seconds": dict(TIMERS.totals),
            "cpu_seconds": dict(TIMERS.cpu),
            "calls": dict(TIMERS.calls),
            "buckets": TIMERS.timeline(backward_starts),
        }
        if option["kind"] == "distq"
        else None
    )
    mine = {
        "rank": rank,
        "step_times": step_times,
        "phases": phases,
        "tx_bytes": sent,
        "hook_profile": hook_profile,
        "cpu_seconds": own1 - own0,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)

    if state is not None and hasattr(state, "close"):
        state.close()
    del module, model, optimizer, state
    gc.collect()
    dist.barrier()
    return {
        "option": name,
        "repeat": repeat,
        "steps_run": step,
        "steps": steps,
        "warmup_steps": WARMUP,
        "warmup_seconds": warmup_seconds,
        "step_times": step_times,  # rank 0
        "phases": phases,  # rank 0: forward, backward (incl. DDP's wait), optimizer
        "train_losses": train_losses,  # rank 0's local minibatch
        "evals": evals,
        "target": target if extend else None,
        "tx_bytes_per_host": [r["tx_bytes"] for r in everyone],
        "tx_steps": step,
        "median_step_per_rank": [statistics.median(r["step_times"]) for r in everyone],
        "hook_profile_per_rank": [r["hook_profile"] for r in everyone],
        # CPU the whole machine was busy minus our processes' own, over the timed part: other
        # work sharing the cores (and kernel work not charged to a process, e.g. softirqs)
        "run_seconds": wall1 - wall0,
        "machine_busy_seconds": busy1 - busy0,
        "own_cpu_seconds": sum(r["cpu_seconds"] for r in everyone),
        "distq_stats": stats,
    }


def rounded(value):
    """Floats to 6 significant digits, so the raw JSON stays small."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def acc_at_budget(result: dict, steps: int) -> float:
    return next(e["accuracy"] for e in result["evals"] if e["step"] == steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    plan = json.loads(args.plan.read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    rank = dist.get_rank()
    TIMERS.install()
    teacher = Teacher(plan["seed"])
    test = teacher.sample(plan["test_size"], 2**40 + plan["seed"])
    target = plan.get("target")
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    for index, (name, repeat) in enumerate(plan["runs"]):
        attempts: list[dict] = []
        for attempt in range(plan["attempts"]):
            waited = wait_for_quiet(pids, plan["max_load"], plan["quiet_wait"])
            if rank == 0:
                print(
                    f"  [{index + 1}/{len(plan['runs'])}] {name}, repeat {repeat + 1}"
                    + (f", attempt {attempt + 1}" if attempt else "")
                    + (f" (waited {waited:.0f} s for other work to end)" if waited >= 1 else ""),
                    file=sys.stderr,
                    flush=True,
                )
            result = run_one(name, repeat, plan, teacher, test, target)
            result["waited_for_quiet"] = waited
            attempts.append(result)
            # rank 0 decides for everyone: rerun a run that other work on the machine slowed
            verdict = [foreign_cores(result) <= plan["max_load"]]
            dist.broadcast_object_list(verdict, src=0)
            if verdict[0]:
                break
            if rank == 0:
                print(
                    f"  !! {foreign_cores(result):.2f} cores of other work during this run",
                    file=sys.stderr,
                    flush=True,
                )
        result = min(attempts, key=foreign_cores)  # the least disturbed attempt
        result["attempts"] = [
            {
                "other_load_cores": foreign_cores(r),
                "median_step": statistics.median(r["step_times"]),
            }
            for r in attempts
        ]
        if name == "fp32 allreduce" and target is None:
            # fp32's accuracy at the step budget is the target of every later run
            target = acc_at_budget(result, plan["steps"])
        if rank == 0:
            result.update(hosts=dist.get_world_size(), rate=plan["rate"], index=index)
            path = args.out / f"{plan['tag']}-{index:02d}.json"
            path.write_text(json.dumps(rounded(result)))
            hosts = result["tx_bytes_per_host"]
            mb = sum(hosts) / len(hosts) / result["tx_steps"] / 1e6
            acc = acc_at_budget(result, plan["steps"])
            print(
                f"  -> {name}: median step {statistics.median(result['step_times']):.3f} s, "
                f"{mb:.2f} MB/host/step, acc@{plan['steps']} {acc:.4f}, other load "
                f"{foreign_cores(result):.2f} cores",
                file=sys.stderr,
                flush=True,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
