"""Recovery from a SIGKILLed worker under `torchrun --max-restarts=1`: time, steps lost, exactness.

Runs the digits job on 2 local workers (gloo) under `torchrun --standalone --max-restarts=1` with
`--resume` and a checkpoint every `--checkpoint-every` steps. Once rank 0's monitor log
(out_dir/monitor-rank0.jsonl) shows step `--kill-at-step`, one worker gets SIGKILL (rank 0 and
rank 1 in turn, `--ranks`); torchrun notices, stops the survivor, starts a new group, which resumes
from the newest checkpoint. Per killed run, in seconds after the SIGKILL:

  failure seen     torchrun logs "Worker group FAILED ... will restart worker group"
  group restarted  torchrun logs its second "Starting worker group" (survivor stopped, new
                   rendezvous done, new workers being spawned)
  resumed          rank 0 prints "resumed from .../step-N.pt at step N" (imports, process group,
                   data, checkpoint loaded, DDP buckets primed)
  step starts      the first resumed step starts: its monitor record's "time" - "step_seconds"
  step done        that step (N + 1) is done: its monitor record's "time"

plus steps lost (last step rank 0 logged before the kill minus N), torchrun's exit code, whether
the final weights (checkpoint.pt "model" and the optimizer's "latent" tensors) equal, bit for bit
(torch.equal), those of one uninterrupted run with the same settings, and the wall-clock time the
kill added to the whole run. Log-line times are when this script read the line from torchrun's
stdout/stderr (PYTHONUNBUFFERED=1, LOGLEVEL=INFO for torchrun's own log lines).

The monitor log is flushed every `--monitor-every` steps (default 10), so `--train-args` defaults
to `--monitor-every 1`: otherwise step S only shows up at the next multiple of 10 and the kill
lands there. Default invocation: about 1.5 minutes on a 2-core machine.

    .venv/bin/python benchmarks/fault_recovery.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESUMED = re.compile(r"resumed from (\S+/step-(\d+)\.pt) at step (\d+)")
FAILED = "will restart worker group"
STARTING = "Starting worker group"


@dataclass
class Run:
    """One torchrun invocation: its process, and every output line with the time it was read."""

    proc: subprocess.Popen
    out_dir: Path
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(line for _, line in sorted(self.lines))

    def first(self, needle: str, after: float = 0.0, nth: int = 1) -> tuple[float, str] | None:
        """The nth line (by read time) containing `needle`, read after `after`."""
        hits = [(t, line) for t, line in sorted(self.lines) if needle in line and t > after]
        return hits[nth - 1] if len(hits) >= nth else None


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def launch(args: argparse.Namespace, out_dir: Path) -> Run:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=1", "-m", "distq.launch.train", "--resume", "--no-progress",
        "--metrics-port", "none", "--checkpoint-every", str(args.checkpoint_every),
        "--epochs", str(args.epochs), "--out-dir", str(out_dir), *shlex.split(args.train_args),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so a failed run can be cleaned up
    )
    run = Run(proc, out_dir, time.time())
    for stream in (proc.stdout, proc.stderr):
        reader = threading.Thread(target=_read_lines, args=(stream, run.lines), daemon=True)
        reader.start()
        run.readers.append(reader)
    return run


def _read_lines(stream, sink: list[tuple[float, str]]) -> None:
    for line in stream:
        sink.append((time.time(), line.rstrip("\n")))


def finish(run: Run, timeout: float) -> tuple[int, float]:
    """Wait for torchrun to exit; its exit code and the wall-clock seconds since launch."""
    try:
        code = run.proc.wait(timeout=max(1.0, run.started + timeout - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)  # the group this script started
        run.proc.wait()
        raise RuntimeError(
            f"run in {run.out_dir} took over {timeout:.0f} s:\n{run.text()}"
        ) from None
    finally:
        for reader in run.readers:
            reader.join(timeout=10)
        (run.out_dir / "torchrun-output.txt").write_text(run.text() + "\n")
    return code, time.time() - run.started


def monitor_records(out_dir: Path) -> list[dict]:
    """Rank 0's monitor records in the order they were written (complete lines only)."""
    path = out_dir / "monitor-rank0.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().split("\n")[:-1]:  # the part after the last newline may be torn
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def wait_for_step(run: Run, step: int, timeout: float) -> None:
    """Return as soon as rank 0's monitor log holds a record of `step` (or a later one)."""
    path, seen, pending = run.out_dir / "monitor-rank0.jsonl", 0, ""
    handle = None
    while True:
        if handle is None and path.exists():
            handle = path.open()
        if handle is not None:
            pending += handle.read()
            *lines, pending = pending.split("\n")
            for line in lines:
                try:
                    seen = max(seen, json.loads(line)["step"])
                except (json.JSONDecodeError, KeyError):
                    continue
        if seen >= step:
            if handle is not None:
                handle.close()
            return
        if run.proc.poll() is not None:
            raise RuntimeError(f"torchrun exited before step {step}:\n{run.text()}")
        if time.time() - run.started > timeout:
            os.killpg(run.proc.pid, signal.SIGKILL)
            raise RuntimeError(f"no step {step} within {timeout:.0f} s:\n{run.text()}")
        time.sleep(0.005)


def worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of the worker torchrun started with RANK=`rank` (children of torchrun)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise RuntimeError(f"no worker with RANK={rank} among torchrun's children {children}")


def final_state(out_dir: Path) -> dict:
    state = torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {"step": state["step"], "model": state["model"], "latent": state["optimizer"]["latent"]}


def same_weights(a: dict, b: dict) -> bool:
    if a["step"] != b["step"]:
        return False
    for part in ("model", "latent"):
        if a[part].keys() != b[part].keys():
            return False
        if not all(torch.equal(a[part][name], b[part][name]) for name in a[part]):
            return False
    return True


def killed_run(args: argparse.Namespace, out_dir: Path, rank: int, reference: dict) -> dict:
    """One run with a SIGKILL to `rank` after step `--kill-at-step`; its measurements."""
    run = launch(args, out_dir)
    wait_for_step(run, args.kill_at_step, args.timeout)
    pid = worker_of_rank(run.proc.pid, rank)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    code, wall = finish(run, args.timeout)

    records = monitor_records(out_dir)
    before = [r for r in records if r["time"] <= killed]
    last_logged = before[-1]["step"] if before else 0
    restart = run.first(STARTING, after=killed)
    resumed_line = run.first("resumed from", after=killed)
    failed = run.first(FAILED, after=killed)
    result = {
        "rank": rank,
        "exit": code,
        "last": last_logged,
        "wall": wall,
        "resumed_from": None,
        "lost": None,
        "failed": None,
        "restarted": None,
        "resumed": None,
        "step_start": None,
        "step_done": None,
        "equal": False,
    }
    if failed:
        result["failed"] = failed[0] - killed
    if restart:
        result["restarted"] = restart[0] - killed
    if resumed_line:
        match = RESUMED.search(resumed_line[1])
        if match:
            resumed_from = int(match.group(3))
            result["resumed_from"] = resumed_from
            result["lost"] = last_logged - resumed_from
            result["resumed"] = resumed_line[0] - killed
            # the new group's first record: written after the restart, of step N + 1
            after = restart[0] if restart else killed
            first = next(
                (r for r in records if r["time"] > after and r["step"] == resumed_from + 1), None
            )
            if first is not None:
                result["step_start"] = first["time"] - first["step_seconds"] - killed
                result["step_done"] = first["time"] - killed
    if code == 0 and (out_dir / "checkpoint.pt").exists():
        result["equal"] = same_weights(final_state(out_dir), reference)
    if code != 0 or resumed_line is None:
        say(f"  warning: exit code {code}, resumed line {resumed_line}; output:\n{run.text()}")
    return result


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=3, help="killed runs (default: 3)")
    parser.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[0, 1],
        choices=(0, 1),
        help="rank to kill in repeat 1, 2, ..., cycled (default: 0 1, i.e. alternate)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        metavar="K",
        help="distq --checkpoint-every: steps between checkpoints (default: 10)",
    )
    parser.add_argument(
        "--kill-at-step",
        type=int,
        default=15,
        metavar="S",
        help="SIGKILL a worker once rank 0 has logged step S; pick S between two multiples of K "
        "so the kill lands mid-way between checkpoints (default: 15)",
    )
    parser.add_argument(
        "--train-args",
        default="--monitor-every 1",
        help="extra distq train flags, one string, for every run, reference included "
        "(default: '--monitor-every 1', so the monitor log is flushed every step)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run (default 300)")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: temp)")
    args = parser.parse_args()
    if args.kill_at_step % args.checkpoint_every == 0:
        say(
            f"note: S={args.kill_at_step} is a multiple of K={args.checkpoint_every}: "
            "the kill lands right after a checkpoint"
        )

    with tempfile.TemporaryDirectory(prefix="fault_recovery.") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        say("uninterrupted reference run ...")
        ref = launch(args, base / "reference")
        code, ref_wall = finish(ref, args.timeout)
        if code != 0:
            raise RuntimeError(f"the reference run failed ({code}):\n{ref.text()}")
        reference = final_state(base / "reference")
        total = reference["step"]
        say(f"  {total} steps, {ref_wall:.1f} s wall")
        if not 0 < args.kill_at_step < total:
            parser.error(f"--kill-at-step {args.kill_at_step}: the run has {total} steps")

        results = []
        for repeat in range(args.repeats):
            rank = args.ranks[repeat % len(args.ranks)]
            say(
                f"repeat {repeat + 1}/{args.repeats}: SIGKILL rank {rank} after step "
                f"{args.kill_at_step} ..."
            )
            r = killed_run(args, base / f"killed{repeat + 1}-rank{rank}", rank, reference)
            r["extra"] = r["wall"] - ref_wall
            results.append(r)
            say(
                f"  last step logged {r['last']}, resumed from {r['resumed_from']}, "
                f"first resumed step starts at +{fmt(r['step_start'])} s, done at "
                f"+{fmt(r['step_done'])} s, exit {r['exit']}, same weights {r['equal']}"
            )

    print(
        f"\nDigits job, 2 workers (gloo, OMP_NUM_THREADS=1), torchrun --max-restarts=1, "
        f"{args.epochs} epochs = {total} steps, checkpoint every {args.checkpoint_every} steps, "
        f"SIGKILL once rank 0 logged step {args.kill_at_step}; extra flags: "
        f"`{args.train_args}`. Seconds after the SIGKILL; uninterrupted run {ref_wall:.1f} s wall\n"
    )
    print(
        "| repeat | killed rank | last step before kill | resumed from step | steps lost "
        "| failure seen s | group restarted s | 'resumed from' printed s "
        "| first resumed step starts s | ... done s | extra wall s | exit code "
        "| weights = uninterrupted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = ("failed", "restarted", "resumed", "step_start", "step_done", "extra")
    for i, r in enumerate(results, 1):
        times = " | ".join(fmt(r[k]) for k in keys)
        print(
            f"| {i} | {r['rank']} | {r['last']} | {fmt(r['resumed_from'], 0)} "
            f"| {fmt(r['lost'], 0)} | {times} | {r['exit']} | {'yes' if r['equal'] else 'NO'} |"
        )
    times = " | ".join(fmt(median([r[k] for r in results])) for k in keys)
    lost = median([r["lost"] for r in results])
    equal = sum(r["equal"] for r in results)
    exits = sum(r["exit"] == 0 for r in results)
    print(
        f"| median | | | | {fmt(lost, 1)} | {times} | {exits}/{len(results)} exit 0 "
        f"| {equal}/{len(results)} equal |"
    )


if __name__ == "__main__":
    main()
