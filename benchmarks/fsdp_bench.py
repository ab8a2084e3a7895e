"""`distq train --parallel fsdp` on namespace hosts: FSDP2 fp32, FSDP2 bf16 and distq side by side.

For each host count (`--hosts`) and link rate (`--rates`, tc syntax, `none` = unshaped) builds a
virtual cluster (benchmarks/cluster.py: one network-namespace host per rank, each host's egress
shaped by `tc tbf`) and trains the gpt recipe with torchrun's c10d rendezvous, one rank per host,
under each variant in turn (same seed, corpus, model and step count):

  fp32   --scheme none --grad-bits none: FSDP's own fp32 all-gather and reduce-scatter
  bf16   the same with --fsdp-dtype bfloat16: FSDP's MixedPrecisionPolicy, bf16 on both
  distq  the defaults of --parallel fsdp: ternary weights gathered as packed codes, 2-bit
         gradients on the reduce-scatter
  distq-approx  the same with --scheme ternary-approx (LATa: its sharded projection all-reduces
         row sums each iteration, where the exact solver's threshold search all-reduces suffix
         sums at up to 257 edges per round; distq/quant/sharded.py)

Each rank runs `distq train` through this file's `--worker` mode, which wraps the training step
(launch.train._step) to record, per step, its wall time and the bytes this host's eth0 sent
during it (kernel tx_bytes read inside the namespace), and, after the first step, the bytes this
rank holds in latent weights (QuantizedOptimizer.latent, scales) and Adam state (local shards of
DTensors). Start-up, the evaluations and the checkpoint saves fall outside the steps. Per run:
median step time over the steps after `WARMUP`, mean bytes per step over those steps (mean over
hosts), the whole run's tx_bytes (before/after, outside) over its steps, the memory per rank, and
summary.json's held-out loss and bits per byte. A `ddp` run per host count (the distq settings
under --parallel ddp on a `--ddp-chars` corpus, unshaped) measures the replicated memory. The
i-th rate's runs use seed `--seed` + i, so the held-out losses of a host count come from two
seeds. Raw per-run JSON goes to `--out`; `--render-only` prints the markdown tables from it.
Needs root.

    nice -n 10 .venv/bin/python benchmarks/fsdp_bench.py                 # 2 and 4 hosts
    nice -n 10 .venv/bin/python benchmarks/fsdp_bench.py --hosts 2 --rates 200mbit
    .venv/bin/python benchmarks/fsdp_bench.py --render-only --out benchmarks/fsdp_bench_runs/DATE
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
WARMUP = 5  # steps left out of the step time and bytes (first gathers, allocator, codecs)
VARIANTS = {
    "fp32": ["--scheme", "none", "--grad-bits", "none"],
    "bf16": ["--scheme", "none", "--grad-bits", "none", "--fsdp-dtype", "bfloat16"],
    "distq": [],
    "distq-approx": ["--scheme", "ternary-approx"],
}
LABELS = {
    "fp32": "FSDP2 fp32",
    "bf16": "FSDP2 bf16",
    "distq": "distq ternary + 2-bit",
    "distq-approx": "distq ternary-approx + 2-bit",
    "ddp": "DDP (distq settings)",
}


# -- worker: one rank's `distq train` with its steps measured --------------------------------
def _local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if hasattr(t, "numel"):
            total += t.numel() * t.element_size()
    return total


def _memory(optimizer) -> dict[str, int]:
    """This rank's latent weights (+ scales) and base optimizer state, in bytes (scheme none:
    a plain Adam, no latent copy)."""
    base = getattr(optimizer, "optimizer", optimizer)
    state = [t for s in base.state.values() for t in s.values()]
    latent = [*getattr(optimizer, "latent", {}).values(), *getattr(optimizer, "alpha", {}).values()]
    params = [p for g in base.param_groups for p in g["params"]]
    return {
        "latent_bytes": _local_bytes(latent),
        "optimizer_state_bytes": _local_bytes(state),
        "param_bytes": _local_bytes(params),
    }


def worker(argv: list[str], record_path: Path) -> int:
    """`distq train argv` with each step's wall time and eth0 tx bytes recorded to
    record_path (one JSON per rank, written at exit)."""
    import distq.launch.train as train

    counter = Path("/sys/class/net/eth0/statistics/tx_bytes")
    record: dict = {"step_seconds": [], "step_tx_bytes": [], "optimizer_tx_bytes": [],
                    "optimizer_seconds": [], "memory": None}  # fmt: skip
    inner = train._step

    def timed(fn, seconds: list, sent: list):
        def call(*args, **kwargs):
            tx0, t0 = int(counter.read_text()), time.perf_counter()
            out = fn(*args, **kwargs)
            seconds.append(time.perf_counter() - t0)
            sent.append(int(counter.read_text()) - tx0)
            return out

        return call

    def step(job, idx, n):
        optimizer = job.state.optimizer
        if not getattr(optimizer, "bench_timed", False):  # step() (sharded projections) apart
            optimizer.bench_timed = True
            optimizer.step = timed(
                optimizer.step, record["optimizer_seconds"], record["optimizer_tx_bytes"]
            )
        loss = timed(inner, record["step_seconds"], record["step_tx_bytes"])(job, idx, n)
        if record["memory"] is None:  # after the first step: Adam's state exists
            record["memory"] = _memory(optimizer)
        return loss

    train._step = step
    atexit.register(lambda: record_path.write_text(json.dumps(record)))
    return train.main(argv)


# -- driver ---------------------------------------------------------------------------------
def commit() -> str:
    """The checked-out commit, '+changes' if tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def train_args(args: argparse.Namespace, corpus: Path, out: Path, variant: str) -> list[str]:
    """`distq train` flags of one run (variant: a VARIANTS key or 'ddp')."""
    common = [
        "--recipe", "gpt", "--hidden", str(args.hidden), "--depth", str(args.depth),
        "--bptt", str(args.bptt), "--batch-size", str(args.batch), "--lr", str(args.lr),
        "--epochs", "1", "--seed", str(args.run_seed), "--data-dir", str(corpus),
        "--out-dir", str(out), "--checkpoint-every", "none", "--no-progress",
        "--no-monitor", "--metrics-port", "none",
    ]  # fmt: skip
    if variant == "ddp":
        return [*common, "--parallel", "ddp"]
    return [*common, "--parallel", "fsdp", *VARIANTS[variant]]


def run_one(args, cluster, corpus: Path, out: Path, variant: str, port: int) -> dict:
    """One training run on every host of `cluster`; its record (raises if a rank failed)."""
    from tests.launch.commands import run_on_hosts

    out.mkdir(parents=True, exist_ok=True)
    flags = train_args(args, corpus, out, variant)
    commands = []
    for i in range(cluster.hosts):
        launcher = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={cluster.hosts}",
            "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={cluster.address(0)}:{port}", f"--rdzv_id=fsdp-{port}",
            f"--local_addr={cluster.address(i)}",
            *(["--rdzv_conf=is_host=1"] if i == 0 else []),
        ]  # fmt: skip
        worker_cmd = [str(Path(__file__).resolve()), "--worker", str(out / f"rank{i}.json")]
        commands.append([*launcher, *worker_cmd, "--", *flags])
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    before = [cluster.tx_bytes(i) for i in range(cluster.hosts)]
    started = time.monotonic()
    outputs = run_on_hosts(cluster, commands, env, timeout=args.timeout)
    seconds = time.monotonic() - started
    after = [cluster.tx_bytes(i) for i in range(cluster.hosts)]
    summary = json.loads((out / "summary.json").read_text())
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(cluster.hosts)]
    return {
        "variant": variant,
        "hosts": cluster.hosts,
        "rate": cluster.rate or "none",
        "argv": flags,
        "wall_seconds": seconds,
        "run_tx_bytes": [b - a for a, b in zip(before, after, strict=True)],
        "summary": {k: v for k, v in summary.items() if k != "checkpoint"},
        "ranks": ranks,
        "traffic_line": next(
            (line for line in outputs[0].splitlines() if "FSDP traffic" in line), None
        ),
        "loadavg": os.getloadavg(),
    }


def measure(record: dict) -> dict:
    """The table's numbers of one run record: step time (median over steps after WARMUP, the
    slowest rank's), bytes per step per host (mean over those steps, mean over hosts; and the
    whole run's tx / steps), memory per rank (max over ranks), held-out loss and bpb."""
    ranks = record["ranks"]
    steps = record["summary"]["steps"]
    timed = [r["step_seconds"][WARMUP:] for r in ranks]
    sent = [r["step_tx_bytes"][WARMUP:] for r in ranks]
    memory = [r["memory"] for r in ranks]
    metrics = record["summary"].get("metrics", {})
    return {
        "steps": steps,
        "step_s": max(statistics.median(t) for t in timed) if all(timed) else float("nan"),
        "bytes_per_step": statistics.mean(statistics.mean(s) for s in sent)
        if all(sent)
        else float("nan"),
        "run_bytes_per_step": statistics.mean(record["run_tx_bytes"]) / steps,
        "optimizer_bytes_per_step": statistics.mean(
            statistics.mean(r["optimizer_tx_bytes"][WARMUP:] or [float("nan")]) for r in ranks
        ),
        "optimizer_s": max(
            statistics.median(r["optimizer_seconds"][WARMUP:] or [float("nan")]) for r in ranks
        ),
        "latent_opt_bytes": max(m["latent_bytes"] + m["optimizer_state_bytes"] for m in memory),
        "param_bytes": max(m["param_bytes"] for m in memory),
        "test_loss": metrics.get("test_loss", float("nan")),
        "test_bpb": metrics.get("test_bpb", float("nan")),
    }


def render(records: list[dict]) -> str:
    """Markdown tables, one per (hosts, rate), the variants' ratios against FSDP2 fp32 and the
    memory against DDP's on the same hosts."""
    ddp = {r["hosts"]: measure(r) for r in records if r["variant"] == "ddp"}
    groups: dict[tuple[int, str], dict[str, dict]] = {}
    for r in records:
        if r["variant"] != "ddp":
            groups.setdefault((r["hosts"], r["rate"]), {})[r["variant"]] = measure(r)
    lines = []
    for (hosts, rate), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        base = runs.get("fp32")
        replicated = ddp.get(hosts)
        lines += [
            f"\n{hosts} hosts, {'unshaped' if rate == 'none' else rate}:\n",
            "| run | steps | step time (ms) | × fp32 | KB/step/host | fp32 ÷ this | of which "
            "optimizer.step (KB) | KB/step (whole run) | latent+Adam per rank (KB) | "
            "× world ÷ DDP's | held-out loss | bpb |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in [v for v in VARIANTS if v in runs]:
            m = runs[variant]
            mem_ratio = (
                m["latent_opt_bytes"] / replicated["latent_opt_bytes"] * hosts
                if replicated and variant.startswith("distq")
                else None
            )
            lines.append(
                f"| {LABELS[variant]} | {m['steps']} | {1e3 * m['step_s']:.0f} | "
                f"{m['step_s'] / base['step_s']:.2f} | {m['bytes_per_step'] / 1e3:.1f} | "
                f"{base['bytes_per_step'] / m['bytes_per_step']:.1f} | "
                f"{m['optimizer_bytes_per_step'] / 1e3:.1f} | "
                f"{m['run_bytes_per_step'] / 1e3:.1f} | {m['latent_opt_bytes'] / 1e3:.1f} | "
                f"{'—' if mem_ratio is None else f'{mem_ratio:.3f}'} | {m['test_loss']:.4f} | "
                f"{m['test_bpb']:.4f} |"
                if base
                else f"| {LABELS[variant]} | {m['steps']} | (no fp32 run) |"
            )
        if replicated:
            lines.append(
                f"| {LABELS['ddp']} | {replicated['steps']} | — | — | — | — | — | — | "
                f"{replicated['latent_opt_bytes'] / 1e3:.1f} | — | — | — |"
            )
    lines += [
        "\nHeld-out loss / bpb per host count, mean over the rates' runs (one seed each):\n",
        "| hosts | run | runs | held-out loss | bpb |",
        "|---|---|---|---|---|",
    ]
    for hosts in sorted({h for h, _ in groups}):
        for variant in VARIANTS:
            ms = [
                runs[variant] for (h, _), runs in groups.items() if h == hosts and variant in runs
            ]
            if ms:
                loss = statistics.mean(m["test_loss"] for m in ms)
                bpb = statistics.mean(m["test_bpb"] for m in ms)
                lines.append(
                    f"| {hosts} | {LABELS[variant]} | {len(ms)} | {loss:.4f} | {bpb:.4f} |"
                )
    return "\n".join(lines)


def load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/record.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", nargs="+", default=["200mbit", "none"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--bptt", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the first rate's runs; the i-th rate's: +i"
    )
    parser.add_argument("--corpus-chars", type=int, default=300_000)
    parser.add_argument("--ddp-chars", type=int, default=40_000, help="corpus of the ddp run")
    parser.add_argument(
        "--ddp", action=argparse.BooleanOptionalAction, default=True, help="the ddp memory runs"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=HERE / "fsdp_bench_runs" / "latest")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        drive(args)
    print(render(load(args.out)))


def drive(args: argparse.Namespace) -> None:
    """Every (hosts, rate) cluster, each variant in turn, then the ddp memory run per host
    count; each run's record to out/<tag>/record.json (its checkpoints deleted)."""
    import shutil
    import tempfile

    from benchmarks.cluster import VirtualCluster
    from distq.launch.recipes import charlm

    if os.geteuid() != 0:
        sys.exit("fsdp_bench.py needs root for ip netns")
    args.out.mkdir(parents=True, exist_ok=True)
    measured = commit()
    work = Path(tempfile.mkdtemp(prefix="fsdp_bench-"))
    corpora = {}
    for chars in {args.corpus_chars, args.ddp_chars}:
        corpora[chars] = work / f"corpus-{chars}.py"
        corpora[chars].write_text(charlm.default_corpus(chars))
    plan = [(h, r, v) for h in args.hosts for r in args.rates for v in args.variants]
    plan += [(h, "none", "ddp") for h in args.hosts if args.ddp]
    seeds = {rate: args.seed + i for i, rate in enumerate(args.rates)}  # a seed per rate
    port = 29700
    for hosts, rate, variant in plan:
        tag = f"h{hosts}-{rate}-{variant}"
        chars = args.ddp_chars if variant == "ddp" else args.corpus_chars
        print(f"{time.strftime('%H:%M:%S')} {tag}", file=sys.stderr, flush=True)
        run_dir = work / tag
        with VirtualCluster(hosts, rate=None if rate == "none" else rate) as cluster:
            args.run_seed = seeds.get(rate, args.seed)
            record = run_one(args, cluster, corpora[chars], run_dir, variant, port)
        port += 1
        record.update(commit=measured, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        record["corpus_chars"] = chars
        (args.out / tag).mkdir(exist_ok=True)
        (args.out / tag / "record.json").write_text(json.dumps(record, indent=1) + "\n")
        m = measure(record)
        print(f"  {json.dumps(m)}", file=sys.stderr, flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        rest = sys.argv[3:]
        sys.exit(worker(rest[1:] if rest[:1] == ["--"] else rest, Path(sys.argv[2])))
    main()
