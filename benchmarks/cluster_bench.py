"""Step time, bytes and time-to-accuracy of every gradient exchange on a bandwidth-limited cluster.

For each host count (`--hosts`) and link rate (`--rates`, tc syntax, `none` = unshaped) builds a
virtual cluster (benchmarks/cluster.py: network-namespace hosts on a bridge, each host's egress
shaped by `tc tbf`), starts one process per host (`cluster_worker.py`, env:// rendezvous,
OMP_NUM_THREADS=1), trains the same job under every option in alternating order (`--repeats`
times, the order reversed every other repeat) and tears the cluster down. The job: a 6.26
M-parameter MLP (256-1400x4-10) on a synthetic teacher-student task (labels from a fixed random
tanh network, fresh samples every step, 2048 test samples), batch 64 per host, Adam.

Per option: median step time and its ratio to fp32 all-reduce, bytes each host sent per step
(kernel tx_bytes of its eth0), test accuracy and loss after `--steps` steps, and the training
time (evaluations excluded) to reach fp32's accuracy at `--steps`; options other than fp32 may
train on up to `--max-steps` to get there. "compute-only" is the same training without any
exchange, run by all hosts at once (so with the same number of processes sharing the cores);
"ideal" is compute-only + (bytes the busiest host sent per step) / link rate. Raw per-run JSON
goes to `--out`; `--render-only` prints the tables and draws the PNG from it. Needs root.

    .venv/bin/python benchmarks/cluster_bench.py                      # full matrix
    .venv/bin/python benchmarks/cluster_bench.py --quick              # 2 hosts, 200mbit, short
    .venv/bin/python benchmarks/cluster_bench.py --render-only        # tables + PNG again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cluster import VirtualCluster
from benchmarks.cluster_worker import OPTIONS

HERE = Path(__file__).resolve().parent
FP32, COMPUTE = "fp32 allreduce", "compute-only"
# fp32 first: the others of repeat 1 stop once they reach fp32's accuracy at the step budget
ABLATIONS = [name for name, option in OPTIONS.items() if option.get("ablation")]
# run and table order; ablations run only when --options names them
ORDER = [FP32, *(name for name in OPTIONS if name not in (FP32, COMPUTE)), COMPUTE]
DEFAULT_OPTIONS = [name for name in ORDER if name not in ABLATIONS]
QUICK_OPTIONS = [FP32, "fp16 hook", "PowerSGD r1", "distq 2-bit scatter", COMPUTE]


def rate_bits(rate: str) -> float | None:
    """tc rate string -> bits per second (tc: kbit/mbit/gbit are powers of 1000); none -> None."""
    if rate == "none":
        return None
    m = re.fullmatch(r"([0-9.]+)\s*([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}; allowed: e.g. 200mbit, 1gbit, none")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def commit() -> str:
    """The checked-out commit, '+changes' if the tree differs from it: what was measured."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_cluster(hosts: int, rate: str, plan: dict, out: Path, timeout: float, port: int) -> None:
    """One virtual cluster, one worker process per host running the whole plan."""
    plan_path = out / f"plan-{plan['tag']}.json"
    plan_path.write_text(json.dumps(plan))
    with (
        VirtualCluster(hosts, rate=None if rate == "none" else rate) as cluster,
        tempfile.TemporaryDirectory() as logs,
    ):
        procs = []
        for i in range(hosts):
            env = {
                "MASTER_ADDR": cluster.address(0),
                "MASTER_PORT": str(port),
                "RANK": str(i),
                "WORLD_SIZE": str(hosts),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                "GROUP_RANK": str(i),
                "OMP_NUM_THREADS": "1",
            }
            log = None if i == 0 else open(Path(logs) / f"host{i}.log", "w")  # noqa: SIM115
            procs.append(
                (
                    cluster.popen(
                        i,
                        [
                            sys.executable,
                            str(HERE / "cluster_worker.py"),
                            "--plan",
                            str(plan_path),
                            "--out",
                            str(out),
                        ],
                        env,
                        stderr=log,
                        stdout=log,
                    ),
                    log,
                )
            )
        deadline = time.monotonic() + timeout
        failed = []
        try:
            for i, (p, _) in enumerate(procs):
                try:
                    if p.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                        failed.append(f"host {i} exited {p.returncode}")
                except subprocess.TimeoutExpired:
                    failed.append(f"host {i} timed out after {timeout:.0f} s")
        finally:
            for p, log in procs:
                p.kill()
                p.wait()
                if log:
                    log.close()
        if failed:
            tails = "\n".join(
                f"--- host {i} ---\n" + (Path(logs) / f"host{i}.log").read_text()[-3000:]
                for i in range(1, hosts)
            )
            raise RuntimeError(f"{hosts} hosts at {rate}: {'; '.join(failed)}\n{tails}")


# -- rendering -----------------------------------------------------------------------------------
def load(out: Path) -> dict[tuple[int, str], list[dict]]:
    runs: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for path in sorted(out.glob("run-*.json")):
        r = json.loads(path.read_text())
        runs[(r["hosts"], r["rate"])].append(r)
    return runs


def acc_at(run: dict, step: int) -> tuple[float, float]:
    e = next(e for e in run["evals"] if e["step"] == step)
    return e["accuracy"], e["loss"]


def time_to(run: dict, target: float) -> float | None:
    """Training seconds at the first evaluation reaching `target`; None if never."""
    return next((e["train_seconds"] for e in run["evals"] if e["accuracy"] >= target), None)


def foreign_cores(run: dict) -> float:
    """Average cores busy with something other than this run's processes during its timed part
    (includes kernel time not charged to a process, e.g. the veth softirqs of heavy traffic)."""
    if "machine_busy_seconds" not in run:
        return float("nan")
    return (run["machine_busy_seconds"] - run["own_cpu_seconds"]) / run["run_seconds"]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict], rate: str) -> tuple[dict, float | None]:
    by_option: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_option[r["option"]].append(r)
    target = None
    if FP32 in by_option:
        steps = by_option[FP32][0]["steps"]
        target = med([acc_at(r, steps)[0] for r in by_option[FP32]])
    compute = min(
        [statistics.median(r["step_times"]) for r in by_option.get(COMPUTE, [])],
        default=float("nan"),
    )
    link = rate_bits(rate)
    rows = {}
    for name in [o for o in ORDER if o in by_option]:
        rs = by_option[name]
        run_meds = [statistics.median(r["step_times"]) for r in rs]
        per_host = [
            sum(r["tx_bytes_per_host"]) / len(r["tx_bytes_per_host"]) / r["tx_steps"] for r in rs
        ]
        busiest = [max(r["tx_bytes_per_host"]) / r["tx_steps"] for r in rs]
        # the least disturbed run: other work on the machine only ever slows a run down
        row = {
            "runs": rs,
            "run_medians": run_meds,
            "step": min(run_meds),
            "tx": statistics.mean(per_host),
            "tx_max": statistics.mean(busiest),
        }
        if name != COMPUTE:
            steps = rs[0]["steps"]
            row["acc"] = statistics.mean(acc_at(r, steps)[0] for r in rs)
            row["loss"] = statistics.mean(acc_at(r, steps)[1] for r in rs)
            row["accs"] = [acc_at(r, steps)[0] for r in rs]
            if target is not None:
                ttt = [time_to(r, target) for r in rs]
                row["ttt_runs"] = ttt
                reached = [t for t in ttt if t is not None]
                row["ttt"] = min(reached) if reached else None
                row["ttt_lower"] = max(r["evals"][-1]["train_seconds"] for r in rs)
                row["steps_to_target"] = [
                    next((e["step"] for e in r["evals"] if e["accuracy"] >= target), None)
                    for r in rs
                ]
            if link and compute == compute:
                row["ideal"] = compute + row["tx_max"] * 8 / link
        rows[name] = row
    return rows, target


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render_tables(runs: dict[tuple[int, str], list[dict]]) -> tuple[str, dict]:
    lines, summaries = [], {}
    for hosts, rate in sorted(runs, key=lambda k: (k[0], rate_bits(k[1]) or math.inf)):
        rows, target = summarize(runs[(hosts, rate)], rate)
        summaries[(hosts, rate)] = (rows, target)
        any_run = runs[(hosts, rate)][0]
        steps = any_run["steps"]
        repeats = max(len(r["runs"]) for r in rows.values())
        lines.append(f"\n### {hosts} hosts, {'unshaped links' if rate == 'none' else rate}\n")
        lines.append(
            f"{steps}-step budget; target = fp32's test accuracy at step {steps}: "
            f"{fmt(target, '.4f')}; {repeats} runs per option, step time and time to "
            "target from the faster run (every run below); accuracy and loss: mean\n"
        )
        lines.append(
            "| option | step s (median) | ÷ fp32 | MB sent per host per step | "
            "ideal s | ÷ ideal | test acc @ budget | test loss @ budget | "
            "time to target s | fp32 ÷ this (time to target) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        fp32 = rows.get(FP32)
        for name, row in rows.items():
            ratio = row["step"] / fp32["step"] if fp32 else None
            ideal = row.get("ideal")
            if name == COMPUTE:
                lines.append(
                    f"| {name} | {fmt(row['step'])} | {fmt(ratio, '.3f')} | "
                    f"{fmt(row['tx'] / 1e6, '.3f')} | - | - | - | - | - | - |"
                )
                continue
            ttt = row.get("ttt")
            if ttt is None and "ttt_runs" in row:
                ttt_text = f"> {row['ttt_lower']:.1f} (not in {row['runs'][0]['steps_run']} steps)"
                speed = "-"
            else:
                ttt_text = fmt(ttt, ".1f")
                speed = fmt(fp32["ttt"] / ttt, ".2f") + "x" if fp32 and fp32.get("ttt") else "-"
            lines.append(
                f"| {name} | {fmt(row['step'])} | {fmt(ratio, '.3f')} | "
                f"{fmt(row['tx'] / 1e6, '.3f')} | {fmt(ideal)} | "
                f"{fmt(row['step'] / ideal if ideal else None, '.2f')} | "
                f"{fmt(row['acc'], '.4f')} | "
                f"{fmt(row['loss'], '.4f')} | {ttt_text} | {speed} |"
            )
        lines.append(
            "\nper run (in run order within each repeat): median step s; steps to target; "
            "test acc @ budget; warm-up s; other load on the machine, cores (tries: runs repeated "
            "because other work slowed them; the least disturbed one is kept)"
        )
        for name, row in rows.items():
            parts = []
            for i, r in enumerate(row["runs"]):
                text = f"{row['run_medians'][i]:.3f}"
                if name != COMPUTE:
                    stt = row.get("steps_to_target", [None] * len(row["runs"]))[i]
                    text += f"; {stt if stt is not None else '-'}; {row['accs'][i]:.4f}"
                text += f"; {r['warmup_seconds']:.1f}; {foreign_cores(r):.2f}"
                if len(r.get("attempts", [])) > 1:
                    text += f" ({len(r['attempts'])} tries)"
                parts.append(text)
            lines.append(f"- {name}: " + " | ".join(parts))
    return "\n".join(lines), summaries


def render_profile(runs: dict[tuple[int, str], list[dict]]) -> str:
    """Where distq's time goes: ms per step inside its hook, wall / CPU of the hook's thread, by
    exclusive category (mean over ranks, faster run), beside rank 0's backward pass, which
    holds DDP's wait for the last bucket."""
    cats = [
        "clip",
        "error measurement",
        "compress",
        "decompress",
        "all_to_all",
        "all_gather",
        "all_reduce",
        "other",
    ]
    lines = [
        "| hosts | rate | option | step s | backward s wall / CPU (compute-only's wall) | "
        "hook total ms | " + " | ".join(f"{c} ms" for c in cats) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(cats),
    ]
    for hosts, rate in sorted(runs, key=lambda k: (k[0], rate_bits(k[1]) or math.inf)):
        by_option = defaultdict(list)
        for r in runs[(hosts, rate)]:
            by_option[r["option"]].append(r)
        compute_bwd = min(
            [statistics.median(p[1] for p in r["phases"]) for r in by_option.get(COMPUTE, [])],
            default=float("nan"),
        )
        for name in ORDER:
            if not name.startswith("distq") or name not in by_option:
                continue
            r = min(by_option[name], key=lambda r: statistics.median(r["step_times"]))

            def per_step(kind: str, cat: str, r=r) -> float:
                return 1e3 * statistics.mean(
                    p.get(kind, {}).get(cat, 0.0) / r["steps_run"]
                    for p in r["hook_profile_per_rank"]
                )

            def cell(cat: str) -> str:
                wall, cpu = per_step("seconds", cat), per_step("cpu_seconds", cat)
                return (
                    f"{wall:.1f} / {cpu:.1f}"
                    if cat not in ("all_to_all", "all_gather", "all_reduce")
                    else f"{wall:.1f}"
                )

            step = statistics.median(r["step_times"])
            bwd = statistics.median(p[1] for p in r["phases"])
            bwd_cpu = (
                statistics.median(p[3] for p in r["phases"])
                if len(r["phases"][0]) > 3
                else float("nan")
            )
            lines.append(
                f"| {hosts} | {rate} | {name} | {step:.3f} | {bwd:.3f} / "
                f"{bwd_cpu:.3f} ({fmt(compute_bwd)}) | {cell('bucket total')} | "
                + " | ".join(cell(c) for c in cats)
                + " |"
            )
    return "\n".join(lines)


def render_buckets(runs: dict[tuple[int, str], list[dict]]) -> str:
    """When each DDP bucket is reduced on distq's thread, in ms from the start of backward
    (rank 0, median over steps, faster run), beside compute-only's backward."""
    lines = [
        "| hosts | rate | option | compute-only backward ms | bucket: elements, start-end ms |",
        "|---|---|---|---|---|",
    ]
    for hosts, rate in sorted(runs, key=lambda k: (k[0], rate_bits(k[1]) or math.inf)):
        by_option = defaultdict(list)
        for r in runs[(hosts, rate)]:
            by_option[r["option"]].append(r)
        compute_bwd = min(
            [statistics.median(p[1] for p in r["phases"]) for r in by_option.get(COMPUTE, [])],
            default=float("nan"),
        )
        for name in ORDER:
            if not name.startswith("distq") or name not in by_option:
                continue
            r = min(by_option[name], key=lambda r: statistics.median(r["step_times"]))
            buckets = r["hook_profile_per_rank"][0].get("buckets", {})
            cells = "; ".join(
                f"{i}: {b['numel'] / 1e6:.2f} M, {b['start_ms']:.0f}-{b['end_ms']:.0f}"
                for i, b in buckets.items()
            )
            lines.append(f"| {hosts} | {rate} | {name} | {1e3 * compute_bwd:.0f} | {cells} |")
    return "\n".join(lines)


def plot(summaries: dict, path: Path) -> None:
    """Per cluster (host count: a pair of rows; rate: a column): test accuracy against training
    time, and median step time per option beside its ideal and the compute-only time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = sorted({k[0] for k in summaries})
    rates = sorted({k[1] for k in summaries}, key=lambda r: rate_bits(r) or math.inf)
    fig, axes = plt.subplots(
        2 * len(hosts), len(rates), figsize=(5 * len(rates), 7.5 * len(hosts)), squeeze=False
    )
    names = [n for n in ORDER if n != COMPUTE]
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    for (h, rate), (rows, target) in summaries.items():
        row0, col = 2 * hosts.index(h), rates.index(rate)
        title = f"{h} hosts, {'unshaped links' if rate == 'none' else rate}"
        ax = axes[row0][col]
        for name, row in rows.items():
            if name == COMPUTE:
                continue
            for i, r in enumerate(row["runs"]):
                points = [e for e in r["evals"] if e["train_seconds"] > 0]
                ax.plot(
                    [e["train_seconds"] for e in points],
                    [e["accuracy"] for e in points],
                    color=colors[name],
                    lw=1.2,
                    alpha=0.9 if i == 0 else 0.35,
                    label=name if i == 0 else None,
                )
        if target is not None:
            ax.axhline(target, color="k", ls=":", lw=1, label="target: fp32 at the budget")
        ax.set_xscale("log")
        ax.set_xlabel("training time, s (evaluations excluded)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}: accuracy vs time")
        ax = axes[row0 + 1][col]
        shown = [n for n in names if n in rows]
        ax.bar(
            range(len(shown)), [rows[n]["step"] for n in shown], color=[colors[n] for n in shown]
        )
        for i, n in enumerate(shown):
            if rows[n].get("ideal"):
                ax.plot([i - 0.4, i + 0.4], [rows[n]["ideal"]] * 2, color="k", lw=2)
        if COMPUTE in rows:
            ax.axhline(rows[COMPUTE]["step"], color="gray", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("median step time, s")
        ax.set_title(f"{title}: step time (black: ideal, dashed: compute-only)", fontsize=9)
    for h in hosts:  # a host count not run at every rate leaves its cells empty
        for col, rate in enumerate(rates):
            if (h, rate) not in summaries:
                axes[2 * hosts.index(h)][col].set_axis_off()
                axes[2 * hosts.index(h) + 1][col].set_axis_off()
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["200mbit", "1gbit", "none"],
        help="tc tbf rate of each host's egress; 'none' leaves links unshaped",
    )
    parser.add_argument("--steps", type=int, default=60, help="step budget (accuracy reported)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="options other than fp32 train on to this many steps until they "
        "reach fp32's accuracy at --steps (default 2x --steps)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--options",
        nargs="+",
        default=None,
        choices=list(OPTIONS),
        metavar="OPTION",
        help=f"subset of: {', '.join(OPTIONS)}",
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--test-size", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64, help="per host")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 hosts at 200mbit, 20 steps, 5 options, 2 repeats (~3 min)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "cluster_bench_runs",
        help="raw per-run JSON (replaced unless --render-only)",
    )
    parser.add_argument("--png", type=Path, default=HERE / "cluster_bench.png")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--max-load",
        type=float,
        default=0.25,
        help="a run during which other work on the machine used more cores than this is run "
        "again (up to --attempts times; the least disturbed one is kept), and each run first "
        "waits up to --quiet-wait s for the machine to be this quiet",
    )
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=300)
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per cluster")
    args = parser.parse_args()
    if args.quick:
        args.hosts, args.rates, args.steps = [2], ["200mbit"], 20
        args.options = args.options or QUICK_OPTIONS
    options = [o for o in ORDER if o in (args.options or DEFAULT_OPTIONS)]

    if not args.render_only:
        if os.geteuid() != 0:
            sys.exit("cluster_bench.py needs root for ip netns")
        for rate in args.rates:
            rate_bits(rate)
        args.out.mkdir(parents=True, exist_ok=True)
        started, measured = time.monotonic(), commit()  # before the runs rewrite --out
        configs = [(h, r) for h in args.hosts for r in args.rates]
        for c, (hosts, rate) in enumerate(configs):
            runs = [
                (name, repeat)
                for repeat in range(args.repeats)
                for name in (options if repeat % 2 == 0 else options[::-1])
            ]
            plan = {
                "tag": f"run-h{hosts}-{rate}",
                "rate": rate,
                "steps": args.steps,
                "max_steps": args.max_steps or 2 * args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
                "eval_every": args.eval_every,
                "test_size": args.test_size,
                "max_load": args.max_load,
                "attempts": args.attempts,
                "quiet_wait": args.quiet_wait,
                "runs": runs,
            }
            print(
                f"[{c + 1}/{len(configs)}] {hosts} hosts, {rate}: {len(runs)} runs "
                f"({time.monotonic() - started:.0f} s so far)",
                file=sys.stderr,
                flush=True,
            )
            # a config's earlier results are replaced; other configs' are kept
            for old in args.out.glob(f"{plan['tag']}-*.json"):
                old.unlink()
            config_started = time.monotonic()
            run_cluster(hosts, rate, plan, args.out, args.timeout, 29600 + c)
            meta_path = args.out / "meta.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            meta[plan["tag"]] = {
                "date": time.strftime("%Y-%m-%d"),
                "seconds": time.monotonic() - config_started,
                "argv": sys.argv[1:],
                "machine": machine(),
                "commit": measured,
            }
            meta_path.write_text(json.dumps(meta, indent=1))

    runs = load(args.out)
    if not runs:
        sys.exit(f"no run-*.json in {args.out}")
    meta_path = args.out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    plans = [json.loads(p.read_text()) for p in sorted(args.out.glob("plan-*.json"))]
    settings = {(p["batch"], p["lr"], p["seed"], p["test_size"], p["eval_every"]) for p in plans}
    batch, lr, seed, test_size, eval_every = settings.pop() if len(settings) == 1 else ("?",) * 5
    any_run = next(iter(runs.values()))[0]
    dates = sorted({m["date"] for m in meta.values()})
    machines = sorted({m["machine"] for m in meta.values()})
    seconds = sum(m["seconds"] for m in meta.values())
    print(
        f"Teacher-student MLP 256-1400x4-10 (6.26 M parameters, 25.0 MB fp32 gradient), batch "
        f"{batch} per host, Adam lr {lr}, seed {seed}, {test_size} test samples evaluated every "
        f"{eval_every} steps, 1 process per host (OMP_NUM_THREADS=1), "
        f"{any_run['warmup_steps']} warm-up steps excluded; {', '.join(dates) or '?'}; "
        f"{'; '.join(machines) or '?'}; {seconds / 60:.0f} min for {len(meta)} cluster(s)"
    )
    print(
        "Measured: "
        + "; ".join(
            f"{tag.removeprefix('run-')} on {m['date']} at commit {m.get('commit', '?')}"
            for tag, m in sorted(meta.items())
        )
    )
    tables, summaries = render_tables(runs)
    print(tables)
    print(
        "\nWhere distq's time goes: ms per step in its hook, wall / CPU of the hook's thread "
        "(collectives: wall only), mean over ranks, faster run; the hook runs on its own "
        "thread, overlapping backward:\n"
    )
    print(render_profile(runs))
    print("\nWhen each DDP bucket is reduced, ms after backward starts (rank 0, median step):\n")
    print(render_buckets(runs))
    plot(summaries, args.png)
    print(f"\nplot: {args.png}", file=sys.stderr)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}"


if __name__ == "__main__":
    main()
