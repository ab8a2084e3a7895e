"""Device check of the gradient codecs: on a CUDA machine, the codecs' payloads and decoded
values bit-identical to the CPU's for the same keys, their GB/s beside the device's memcpy, and
the DDP hook on NCCL at world size 1. `--device cpu` runs the same checks CPU against CPU, on
small sizes and gloo, so the logic is exercised where no GPU is present.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json

Every compressor in `distq.comm.registry.COMPRESSORS` is checked at every width it sends among
1, 2, 3, 4, 8, with 512-element buckets and one scale, plus fp16 scales at its default width.
Both sides run in this process's compile mode (DISTQ_COMPILE, compiled by default). Exit status:
0 all checks passed, 1 a mismatch or a failed check, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch._dynamo.utils
import torch.distributed as dist
from torch import Tensor, nn

from distq.comm import Key, QuantizedCommState, quantized_hook
from distq.comm.compressors import Compressor
from distq.comm.gradient_bits import bytes_sent
from distq.comm.registry import COMPRESSORS
from distq.comm.wire import WireFormat

WIDTHS = (1, 2, 3, 4, 8)
BUCKETS = (512, None)  # None: one scale for the whole input
# a small ragged size, a ragged one in one kernel block (2^20 elements), whole buckets over two
# blocks, a ragged one over three
CUDA_SIZES = (3_001, 1_000_003, 2_097_152, 2_500_001)
CPU_SIZES = (3_001, 8_192, 20_483)
ROWS = 4  # payload rows of the compress_rows / decode_*_into checks (a collective's ranks)
KEY = Key(seed=7, step=3, rank=1, slot=2)
START = 12_345  # element offset of the `start=` encodes (a chunk inside a larger tensor)
THROUGHPUT_NUMEL = {"cuda": 64 * 2**20, "cpu": 2**20}
THROUGHPUT_BITS = (2, 4)
HOOK_STEPS = 3  # quantized DDP steps after the full-precision warm-up
NO_CUDA = (
    "gpu_check: no CUDA device is present (torch.cuda.is_available() is False); run it on a "
    "CUDA machine, or pass --device cpu to check its logic CPU against CPU"
)


@dataclass(frozen=True)
class Case:
    """One registry compressor at one width, bucket size and scale dtype."""

    compressor: str
    bits: int
    bucket: int | None
    scale_dtype: torch.dtype

    def build(self) -> Compressor:
        """A fresh compressor of this case (one per device: a compressor may keep state)."""
        return COMPRESSORS[self.compressor].build(self.bits, self.bucket, self.scale_dtype)

    def describe(self) -> dict[str, Any]:
        return {
            "compressor": self.compressor,
            "bits": self.bits,
            "bucket": self.bucket,
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
        }

    def label(self) -> str:
        bucket = "one scale" if self.bucket is None else f"bucket {self.bucket}"
        dtype = str(self.scale_dtype).removeprefix("torch.")
        return f"{self.compressor} {self.bits}-bit, {bucket}, {dtype} scales"


def registry_cases() -> tuple[list[Case], list[dict[str, Any]]]:
    """(cases to check, cases skipped with the reason) for every registry compressor: each
    width it sends among WIDTHS × BUCKETS in fp32, and fp16 scales at its default width. A
    case whose wire format an earlier case of the compressor already has is skipped."""
    cases, skipped = [], []
    for name, record in COMPRESSORS.items():
        widths = [b for b in WIDTHS if b in record.widths]
        wanted = [Case(name, b, bucket, torch.float32) for b in widths for bucket in BUCKETS]
        wanted.append(Case(name, record.default_bits, 512, torch.float16))
        seen: set[WireFormat] = set()
        for case in wanted:
            try:
                wire = case.build().wire
            except ValueError as exc:  # a compressor that refuses this bucket size or dtype
                skipped.append({**case.describe(), "reason": str(exc)})
                continue
            if wire in seen:
                skipped.append({**case.describe(), "reason": f"same wire format as before: {wire}"})
                continue
            seen.add(wire)
            cases.append(case)
    return cases, skipped


def gradient(numel: int, seed: int = 0) -> Tensor:
    """A fixed CPU input: Gaussian, with runs of 1,100 zeros and of 1,100 equal values (each
    holds a whole 512-element bucket: a zero scale, and every code on the top level) and an
    outlier in the last bucket, so scales, zeros and rounding all matter."""
    g = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    g[numel // 8 : numel // 8 + 1100] = -0.25
    g[numel // 2 : numel // 2 + 1100] = 0.0
    g[-7] = 9.0
    return g


# -- bit identity --------------------------------------------------------------------------------
Paths = dict[str, Callable[[], Tensor]]


def encode_paths(c: Compressor, x: Tensor, scales: Tensor) -> Paths:
    """Every encode the collectives make of x, on x's device: the local scales, whole payloads
    (from element 0 and from START, and with `scales` given, as TernGrad's shared scale is) and
    ROWS payload rows (`compress_rows`, the scatter's stage 1)."""
    rows = x[: ROWS * (x.numel() // ROWS)]
    return {
        "scales": lambda: c.scales(x, KEY),
        "compress": lambda: c.compress(x, KEY),
        "compress(start)": lambda: c.compress(x, KEY, start=START),
        "compress(scales)": lambda: c.compress(x, KEY, scales=scales.to(x.device)),
        "compress_rows": lambda: c.compress_rows(rows, ROWS, KEY, start=START),
    }


def decode_paths(c: Compressor, payloads: dict[str, Tensor], base: Tensor) -> Paths:
    """Every decode the collectives make, on `base`'s device, of `payloads` (`encode_paths`'s
    names): into a fresh tensor, added to `base`, row by row, and the rows' sum (all, and all
    but row 1 added to `base`, as the scatter's owner does)."""
    whole, rows, key = payloads.get("compress"), payloads.get("compress_rows"), {"key": KEY}
    length = base.numel() // ROWS
    return {
        "decompress_into": lambda: c.decompress_into(whole, torch.empty_like(base), **key),
        "decompress_into(accumulate)": lambda: c.decompress_into(
            whole, base.clone(), accumulate=True, **key
        ),
        "decode_rows_into": lambda: c.decode_rows_into(rows, base.new_empty(ROWS * length), **key),
        "decode_sum_into": lambda: c.decode_sum_into(rows, base.new_empty(length), **key),
        "decode_sum_into(skip, accumulate)": lambda: c.decode_sum_into(
            rows, base[:length].clone(), skip=1, accumulate=True, **key
        ),
    }


def run_paths(paths: Paths) -> dict[str, Tensor | Exception]:
    """Each path's output, or the exception it raised."""
    done: dict[str, Tensor | Exception] = {}
    for name, fn in paths.items():
        try:
            done[name] = fn()
        except Exception as exc:
            done[name] = exc
    return done


def raw_bits(t: Tensor) -> Tensor:
    """t flattened as integers of its element size: floats compare bit for bit (−0.0 ≠ 0.0)."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    if flat.is_floating_point():
        return flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    return flat


def first_difference(expected: Tensor, got: Tensor) -> tuple[int, int] | None:
    """(first flat index whose bits differ, how many differ) or None if identical; tensors of
    another dtype differ everywhere, of another size from the end of the shorter one."""
    a, b = raw_bits(expected), raw_bits(got)
    if a.dtype != b.dtype:
        return 0, max(a.numel(), b.numel())
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero().view(-1)
    count = differ.numel() + max(a.numel(), b.numel()) - n
    if count == 0:
        return None
    return (int(differ[0]) if differ.numel() else n), count


def payload_position(wire: WireFormat, numel: int, index: int) -> str:
    """Where byte `index` of a payload of `numel` elements lies: codes, or a bucket's scale."""
    code_bytes = wire.code_nbytes(numel)
    if index < code_bytes:  # the bucket of the byte's first code
        if wire.bucket_size is None:
            return f"code byte {index} (one scale)"
        return f"code byte {index} (bucket {index * 8 // wire.bits // wire.bucket_size})"
    bucket, byte = divmod(index - code_bytes, wire.scale_dtype.itemsize)
    return f"scale of bucket {bucket}, byte {byte}"


def position(path: str, wire: WireFormat, numel: int, index: int) -> str:
    """Where flat index `index` of `path`'s output lies, in the words of the wire format."""
    if path == "compress_rows":
        length = numel // ROWS
        row, at = divmod(index, wire.payload_nbytes(length))
        return f"row {row}: {payload_position(wire, length, at)}"
    if path.startswith("compress"):
        return payload_position(wire, numel, index)
    if path == "scales":
        return f"bucket {index}"
    bucket = wire.bucket_size or numel
    return f"element {index} (bucket {index // bucket})"


def value_at(t: Tensor, index: int) -> float | int | None:
    """t's flat element `index` as a Python number (None past its end)."""
    flat = t.detach().reshape(-1)
    return flat[index].item() if index < flat.numel() else None


def compare(
    case: Case,
    numel: int,
    expected: dict[str, Tensor | Exception],
    got: dict[str, Tensor | Exception],
    wire: WireFormat,
) -> list[dict[str, Any]]:
    """A record per path whose device output differs from the CPU's (`expected`), or that
    raised on either side; a path the CPU refuses with a ValueError (a compressor that takes
    no given scales) is not one the collectives use with it, and is left out."""
    found = []
    for path, want in expected.items():
        have, where = got[path], {**case.describe(), "size": numel, "path": path}
        if isinstance(want, ValueError):
            continue
        if isinstance(want, Exception) or isinstance(have, Exception):
            error = want if isinstance(want, Exception) else have
            side = "cpu" if error is want else "device"
            found.append({**where, "error": f"{side}: {type(error).__name__}: {error}"})
            continue
        diff = first_difference(want, have)
        if diff is not None:
            index, count = diff
            found.append({
                **where,
                "first_index": index,
                "where": position(path, wire, numel, index),
                "differing": count,
                "cpu": value_at(want, index),
                "device": value_at(have, index),
            })  # fmt: skip
    return found


def check_case(case: Case, numel: int, device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    """(outputs compared, mismatches) of one case and size: the device's encodes against the
    CPU's, then the device's decodes of the CPU's payloads against the CPU's decodes."""
    cpu, dev = case.build(), case.build()
    x, base = gradient(numel), gradient(numel, seed=1)
    cpu_scales = cpu.scales(x, KEY)
    cpu_codes = run_paths(encode_paths(cpu, x, cpu_scales))
    dev_codes = run_paths(encode_paths(dev, x.to(device), cpu_scales))
    payloads = {p: t for p, t in cpu_codes.items() if isinstance(t, Tensor)}
    cpu_values = run_paths(decode_paths(cpu, payloads, base))
    moved = {p: t.to(device) for p, t in payloads.items()}
    dev_values = run_paths(decode_paths(dev, moved, base.to(device)))
    found = compare(case, numel, cpu_codes, dev_codes, cpu.wire)
    found += compare(case, numel, cpu_values, dev_values, cpu.wire)
    outputs = [*cpu_codes.values(), *cpu_values.values()]
    return sum(isinstance(t, Tensor) for t in outputs), found


def describe_mismatch(m: dict[str, Any]) -> str:
    """One line of a mismatch record."""
    if "error" in m:
        return f"size {m['size']} {m['path']}: {m['error']}"
    return (f"size {m['size']} {m['path']}: first at index {m['first_index']} ({m['where']}), "
            f"{m['differing']} differ, cpu {m['cpu']} vs device {m['device']}")  # fmt: skip


def check_identity(
    device: torch.device, sizes: tuple[int, ...], progress: Callable[[str], None]
) -> dict[str, Any]:
    """Every registry case at every size: the figures and mismatches for the JSON."""
    cases, skipped = registry_cases()
    compared, mismatches = 0, []
    for case in cases:
        found = []
        for numel in sizes:
            paths, case_found = check_case(case, numel, device)
            compared += paths
            found += case_found
        mismatches += found
        progress(f"identity  {case.label()}: {len(found)} mismatch(es) over sizes {sizes}")
        for m in found:
            progress(f"  MISMATCH {describe_mismatch(m)}")
    return {
        "compressors": list(COMPRESSORS),
        "cases": [case.describe() for case in cases],
        "skipped": skipped,
        "sizes": list(sizes),
        "outputs_compared": compared,
        "mismatches": mismatches,
    }


# -- throughput ----------------------------------------------------------------------------------
def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call: between CUDA events on the device's stream, else the clock."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, seconds: float, rounds: int = 3
) -> tuple[dict[str, float], int]:
    """(median seconds per call of each fn, rounds): two warm-up calls each (compiles, the
    allocator), then rounds calling each in turn, at least `rounds`, until `seconds` passed."""
    for fn in fns.values():
        fn()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    started, done = time.perf_counter(), 0
    while done < rounds or time.perf_counter() - started < seconds:
        for name, fn in fns.items():
            times[name].append(seconds_of(fn, device))
        done += 1
    return {name: statistics.median(t) for name, t in times.items()}, done


def throughput(device: torch.device, numel: int, seconds: float) -> dict[str, Any]:
    """GB/s of fp32 input for encode (`compress`) and decode (`decompress_into` a preallocated
    tensor) of each registry compressor at THROUGHPUT_BITS it sends, 512-element buckets,
    beside a device-to-device copy of the same numel·4 bytes (GB/s = numel·4 / time, for the
    copy too, which reads and writes them)."""
    x = gradient(numel).to(device)
    out = torch.empty_like(x)
    fns: dict[str, Callable[[], object]] = {"memcpy": lambda: out.copy_(x)}
    codecs = []
    for name, record in COMPRESSORS.items():
        for bits in THROUGHPUT_BITS:
            if bits not in record.widths:
                continue
            c = record.build(bits, 512, torch.float32)
            payload = c.compress(x, KEY)
            label = f"{name} {bits}-bit"
            fns[f"{label} encode"] = lambda c=c: c.compress(x, KEY)
            decode = partial(c.decompress_into, payload, out, key=KEY)
            fns[f"{label} decode"] = decode
            codecs.append((name, bits, label))
    medians, rounds = interleaved_medians(fns, device, seconds)
    gb = numel * 4 / 1e9
    memcpy = gb / medians["memcpy"]
    rows = []
    for name, bits, label in codecs:
        encode, decode = gb / medians[f"{label} encode"], gb / medians[f"{label} decode"]
        rows.append({
            "compressor": name, "bits": bits, "bucket": 512,
            "encode_ms": medians[f"{label} encode"] * 1e3, "encode_gbps": encode,
            "encode_vs_memcpy": encode / memcpy,
            "decode_ms": medians[f"{label} decode"] * 1e3, "decode_gbps": decode,
            "decode_vs_memcpy": decode / memcpy,
        })  # fmt: skip
    return {"numel": numel, "rounds": rounds, "memcpy_ms": medians["memcpy"] * 1e3,
            "memcpy_gbps": memcpy, "codecs": rows}  # fmt: skip


# -- the DDP hook --------------------------------------------------------------------------------
def gradients_of(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """The plain (unhooked) gradients of the cross-entropy of model(x) against y."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    """‖got − want‖² / ‖want‖² over all the tensors."""
    num = sum(float((g - w).double().square().sum()) for g, w in zip(got, want, strict=True))
    return num / sum(float(w.double().square().sum()) for w in want)


def train_with_hook(device: torch.device, steps: int) -> dict[str, Any]:
    """A small MLP under DDP with `quantized_hook` and QuantizedCommState(bits=2), SGD for
    start_iter + `steps` steps on the initialized default group (world size 1). Checked: every
    gradient finite; after start_iter, quantized (0 < ‖q − g‖²/‖g‖² < 10 against an unhooked
    copy's g; ≈ 1.1 measured at 2 bits on CPU); the steps and bytes sent as `bytes_sent`
    predicts (0 at one rank: no payload crosses the group then)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)
    reference = copy.deepcopy(model)
    ids = [device.index or 0] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    state = QuantizedCommState(bits=2, error_every=1)
    ddp.register_comm_hook(state, quantized_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1)
    log, errors = [], []
    try:
        for step in range(state.start_iter + steps):
            x = torch.randn(64, 256, generator=data).to(device)
            y = torch.randint(0, 10, (64,), generator=data).to(device)
            reference.load_state_dict(model.state_dict())
            plain = gradients_of(reference, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            hooked = [p.grad.detach().clone() for p in model.parameters()]
            optimizer.step()
            quantized = step >= state.start_iter
            finite = all(bool(torch.isfinite(g).all()) for g in hooked)
            error = relative_error(hooked, plain)
            log.append({"step": step, "quantized": quantized, "loss": loss.item(),
                        "finite": finite, "relative_error": error})  # fmt: skip
            if not finite:
                errors.append(f"step {step}: non-finite gradients")
            elif quantized and not 0 < error < 10:
                errors.append(f"step {step}: relative error {error}; allowed: in (0, 10)")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats, settings = state.stats, state.settings
    finally:
        state.close()
    world = dist.get_world_size()
    layout = [[(p.numel(), settings.bits) for p in model.parameters()]]  # one DDP bucket (< 1 MB)
    predicted = steps * bytes_sent(layout, settings, world)
    if stats.steps != steps:
        errors.append(f"stats.steps {stats.steps}; expected {steps} quantized steps")
    if stats.bytes_sent != predicted:
        errors.append(f"stats.bytes_sent {stats.bytes_sent}; bytes_sent predicts {predicted}")
    return {
        "world_size": world,
        "start_iter": state.start_iter,
        "quantized_steps": stats.steps,
        "bytes_sent": stats.bytes_sent,
        "bytes_sent_predicted": predicted,
        "fp32_allreduce_bytes": stats.fp32_allreduce_bytes,
        "stats_relative_error": stats.relative_error,
        "steps": log,
        "errors": errors,
    }


def check_hook(device: torch.device) -> dict[str, Any]:
    """`train_with_hook` in a one-process group (NCCL on CUDA, gloo on CPU) over a TCP store
    on 127.0.0.1 (a free port); the group destroyed after. An exception is reported, not
    raised, so the JSON still gets written."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    result: dict[str, Any] = {"backend": backend}
    try:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
        try:
            result.update(train_with_hook(device, HOOK_STEPS))
        finally:
            dist.destroy_process_group()
    except Exception as exc:
        result["errors"] = [*result.get("errors", []), f"{type(exc).__name__}: {exc}"]
    return result


# -- the run -------------------------------------------------------------------------------------
class CompileFailures(logging.Handler):
    """Collects the codec's "torch.compile failed" warnings: those kernels then ran eagerly,
    so the compiled codes were not what got checked."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "torch.compile failed" in record.getMessage():
            self.messages.append(record.getMessage())


def commit() -> str | None:
    """The git commit of this checkout, if it is one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def jsonable(value: Any) -> Any:
    """value with non-finite floats as None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "compile": os.environ.get("DISTQ_COMPILE", "1") != "0",
        "threads": torch.get_num_threads(),
        "commit": commit(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None,
                        help="cuda (default when present), cuda:N, or cpu (CPU against CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write every figure to this JSON")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds of timed rounds for the throughput figures")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="element counts of the identity checks (default: by device)")
    parser.add_argument("--throughput-numel", type=int, default=None,
                        help="elements of the throughput tensor (default: 64 Mi on cuda)")
    return parser.parse_args(argv)  # fmt: skip


def choose_device(name: str | None) -> torch.device | None:
    """The device to check (None: CUDA was asked for, or defaulted to, and is absent)."""
    device = torch.device(name or "cuda")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"gpu_check: --device {name}; allowed: cuda, cuda:N, cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = choose_device(args.device)
    if device is None:
        print(NO_CUDA, file=sys.stderr)
        return 2
    failures = CompileFailures()
    logging.getLogger("distq.comm.kernels").addHandler(failures)
    # each codec kernel is compiled per device, bucket width and one-row block: more than
    # dynamo's default 8 variants of one function, past which it would run eagerly
    torch._dynamo.config.recompile_limit = 64
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    report: dict[str, Any] = {"environment": environment(device)}
    progress(f"gpu_check on {report['environment']['device_name']} ({device}), "
             f"compile {report['environment']['compile']}")  # fmt: skip
    sizes = tuple(args.sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES))
    numel = args.throughput_numel or THROUGHPUT_NUMEL[device.type]
    sections = {
        "identity": lambda: check_identity(device, sizes, progress),
        "throughput": lambda: show_throughput(throughput(device, numel, args.seconds), progress),
        "hook": lambda: show_hook(check_hook(device), progress),
    }
    report["section_seconds"] = {}
    for name, run in sections.items():
        begun = time.perf_counter()
        report[name] = run()
        report["section_seconds"][name] = time.perf_counter() - begun
    report["compile_failures"] = failures.messages
    report["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    report["seconds"] = time.perf_counter() - started
    problems = problem_lines(report)
    report["ok"] = not problems
    if args.out is not None:
        args.out.write_text(json.dumps(jsonable(report), indent=1) + "\n")
    for line in problems:
        progress(f"FAILED: {line}")
    progress("all checks passed" if not problems else f"{len(problems)} check(s) failed")
    return 0 if not problems else 1


def show_throughput(figures: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """Prints the throughput figures; returns them."""
    progress(f"memcpy {figures['numel']} fp32: {figures['memcpy_ms']:.3f} ms = "
             f"{figures['memcpy_gbps']:.3g} GB/s ({figures['rounds']} rounds, medians)")
    for row in figures["codecs"]:
        progress(f"{row['compressor']} {row['bits']}-bit: encode {row['encode_gbps']:.3g} GB/s "
                 f"({row['encode_vs_memcpy']:.0%} of memcpy), decode {row['decode_gbps']:.3g} "
                 f"GB/s ({row['decode_vs_memcpy']:.0%})")  # fmt: skip
    return figures


def show_hook(hook: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """Prints the hook check's steps and byte counts; returns them."""
    for step in hook.get("steps", []):
        progress(f"hook on {hook['backend']} step {step['step']}: loss {step['loss']:.4f}, "
                 f"finite {step['finite']}, ‖q−g‖²/‖g‖² {step['relative_error']:.4f}")
    if "bytes_sent" in hook:
        progress(f"hook: {hook['quantized_steps']} quantized steps, bytes_sent "
                 f"{hook['bytes_sent']} (predicted {hook['bytes_sent_predicted']})")
    return hook


def problem_lines(report: dict[str, Any]) -> list[str]:
    """One line per failed check: mismatches, hook errors, kernels that failed to compile."""
    mismatches = report["identity"]["mismatches"]
    lines = [f"{len(mismatches)} identity mismatch(es)"] if mismatches else []
    lines += [f"hook: {e}" for e in report["hook"].get("errors", [])]
    lines += [f"compile: {m}" for m in report["compile_failures"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
