"""Measured error per bit (issue 21 item 4): vNMSE = E‖Q(g) − g‖²/‖g‖² of every compressor in
`distq.comm.registry.COMPRESSORS` at 1, 2 and 4 bits, beside the Gaussian figures D_b/(1 − D_b)
(a rotated Lloyd–Max quantizer with the unbiasing scale) and 2^(−2b) (rate–distortion limit).

Vectors: (a) Gaussian and (b) Student-t(3), `--vectors` seeded draws of `--dim` elements each, one
tensor; (c) real gradients of `cluster_bench`'s job (the 256-1400x4-10 MLP on its teacher-student
task, batch 64, Adam lr 3e-4, seed 0, one host), trained here on CPU from the same initialization
and batches as `cluster_worker.py` (4 warm-up steps without updates, then training) inside a
world-size-1 gloo DDP with one 64 MB bucket, captured at `--steps` (1-based training steps) as
DDP's bucket holds them: the whole 6.26 M-element gradient as one flat vector in the bucket's
tensor order. The captured steps take 75 MB, so they are regenerated (seeded) each run, not saved.

Rows, each measured over `--keys` noise keys per vector (vNMSE averaged over keys and vectors):
- every registry compressor as `ExchangeSettings` builds it (bucket 512, unclipped), at each of
  the widths it can send ('terngrad' instead with one scale per tensor, as Wen et al. send it: at
  bucket 512 on one rank it is 'quantize' at 2 bits); compressors named in `EXPECTED` and not yet
  registered are skipped with a note;
- 'quantize' clipped at 2.5·rms per tensor (`clip_by_rms_`; the error against the unclipped g, so
  it includes the clipping bias) and TernGrad clipped alike (Wen et al. clip at 2.5σ);
- PowerSGD rank 1 and 4 by torch's own `powerSGD_hook` (warm start, no error feedback, start at
  iteration 2, one bucket as in cluster_bench): the hook's output bucket against its input bucket
  on the real run at the captured steps (warm-started by every step before), and on `--vectors`
  Gaussian / Student-t draws shaped as the model's parameters (two unmeasured draws first, the
  hook's full-precision start). Its bits per element are its own counters' (4 bytes per sent
  number). 'quantize' rows also carry the exact E‖Q(g) − g‖² (`quantization_error`) as a check.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/error_per_bit.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cluster_worker import WARMUP, Teacher, batch_seed, student
from distq.comm.clipping import clip_by_rms_
from distq.comm.compressors import Compressor
from distq.comm.exchange import ExchangeSettings
from distq.comm.gradient_bits import quantization_error
from distq.comm.noise import Key
from distq.comm.registry import COMPRESSORS
from distq.theory.rotation import lloyd_max_distortion, rate_distortion_limit, rotated_vnmse

HERE = Path(__file__).resolve().parent
EXPECTED = ("quantize", "terngrad", "sign", "rotated", "rotated-stochastic")  # issue 21's rows
BUCKET, CLIP = 512, 2.5


@dataclass(frozen=True)
class Vector:
    """A gradient to compress: flat float32 values and its tensors' lengths (clip segments)."""

    values: Tensor
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class Variant:
    """One table row: a registry compressor, how it is applied, the widths it is measured at."""

    label: str
    name: str
    bucket: int | None
    clip: float | None
    per_tensor: bool
    widths: tuple[int, ...]

    def build(self, bits: int) -> Compressor:
        """The compressor as `ExchangeSettings` builds it (no error feedback)."""
        return ExchangeSettings(compressor=self.name, bits=bits, bucket_size=self.bucket).build(
            bits
        )


def variants(widths: Sequence[int]) -> tuple[list[Variant], list[str]]:
    """The rows from the registry (every compressor at each width it can send), and notes on
    compressors of issue 21 that are not registered yet."""
    rows, notes = [], []
    for name, record in COMPRESSORS.items():
        sendable = tuple(b for b in widths if _sends(name, b))
        if not sendable:
            notes.append(f"{name!r}: none of the widths {list(widths)} (sends {record.fixed_bits})")
            continue
        if name == "terngrad":  # TernGrad's scale is per tensor (per layer)
            rows.append(Variant(name, name, None, None, True, sendable))
            rows.append(Variant(f"{name}, clip {CLIP}", name, None, CLIP, True, sendable))
            continue
        rows.append(Variant(name, name, BUCKET, None, False, sendable))
        if name == "quantize":
            rows.append(Variant(f"{name}, clip {CLIP}", name, BUCKET, CLIP, False, sendable))
    for name in EXPECTED:
        if name not in COMPRESSORS:
            notes.append(f"{name!r} is not in distq.comm.registry.COMPRESSORS yet: skipped")
    return rows, notes


def _sends(name: str, bits: int) -> bool:
    try:
        ExchangeSettings(compressor=name, bits=bits)
    except ValueError:
        return False
    return True


def vnmse(variant: Variant, bits: int, g: Vector, keys: int) -> list[float]:
    """‖Q(x) − g‖²/‖g‖² for each of `keys` noise keys, x = g clipped as the variant says; the
    vector is compressed whole (or tensor by tensor for a per-tensor variant) as one bucket."""
    compressor = variant.build(bits)
    x = g.values
    if variant.clip is not None:
        x = clip_by_rms_(x.clone(), variant.clip, g.lengths)
    pieces = x.split(g.lengths) if variant.per_tensor else (x,)
    norm = float(torch.linalg.vector_norm(g.values, dtype=torch.float64)) ** 2
    out = []
    for seed in range(keys):
        key = Key(seed=seed)
        decoded = torch.cat([_round_trip(compressor, p, key) for p in pieces])
        error = torch.linalg.vector_norm(decoded.sub_(g.values), dtype=torch.float64)
        out.append(float(error) ** 2 / norm)
    return out


def _round_trip(compressor: Compressor, x: Tensor, key: Key) -> Tensor:
    """decode(encode(x)); the key goes to the decoder where it takes one (a rotation's signs)."""
    payload = compressor.compress(x, key)
    if "key" in inspect.signature(compressor.decompress).parameters:
        return compressor.decompress(payload, x.numel(), key=key)
    return compressor.decompress(payload, x.numel())


def clip_bias(variant: Variant, g: Vector) -> float:
    """‖Clip(g) − g‖²/‖g‖², the part of a clipped row's error that no noise key changes."""
    if variant.clip is None:
        return 0.0
    x = clip_by_rms_(g.values.clone(), variant.clip, g.lengths)
    return float((x.double() - g.values.double()).square().sum() / g.values.double().square().sum())


def exact_quantize_vnmse(variant: Variant, bits: int, g: Vector) -> float | None:
    """E‖Q(x) − g‖²/‖g‖² of 'quantize' exactly (variance + clipping bias²), else None."""
    if variant.name != "quantize":
        return None
    x = (
        g.values
        if variant.clip is None
        else clip_by_rms_(g.values.clone(), variant.clip, g.lengths)
    )
    variance = quantization_error(x, bits, variant.bucket)
    return variance / float(g.values.double().square().sum()) + clip_bias(variant, g)


def wire_bits(variant: Variant, bits: int, g: Vector) -> float:
    """Bits per element a payload of g takes (codes and scales)."""
    wire = variant.build(bits).wire
    pieces = g.lengths if variant.per_tensor else (g.values.numel(),)
    return 8 * sum(wire.payload_nbytes(n) for n in pieces) / g.values.numel()


# -- synthetic vectors ----------------------------------------------------------------------------
def gaussian(n: int, seed: int) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def student_t3(n: int, seed: int) -> Tensor:
    """Student-t with 3 degrees of freedom: z/√(χ²₃/3), all from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen)
    chi2 = torch.randn(3, n, generator=gen).square().sum(0)
    return z / (chi2 / 3).sqrt()


DISTRIBUTIONS: dict[str, Callable[[int, int], Tensor]] = {
    "gaussian": gaussian,
    "student_t3": student_t3,
}


# -- PowerSGD through torch's own hook ---------------------------------------------------------
class Recorder:
    """DDP comm-hook state: runs torch's `powerSGD_hook` for each rank on a copy of the bucket,
    records ‖out − in‖²/‖in‖² when `measure` is set, keeps the input bucket when `capture` is
    set, and hands DDP the input unchanged (training follows the fp32 trajectory)."""

    def __init__(self, ranks: Sequence[int], seed: int = 0) -> None:
        self.states = {
            r: powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=r,
                start_powerSGD_iter=2,
                use_error_feedback=False,
                warm_start=True,
                random_seed=seed,
            )
            for r in ranks
        }
        self.errors: dict[int, list[float]] = {r: [] for r in ranks}
        self.measure = False
        self.capture = False
        self.captured: list[Vector] = []

    def bits_per_element(self, rank: int) -> float:
        """32 × numbers sent / gradient elements, from the hook's own counters."""
        state = self.states[rank]
        return 32 * state.total_numel_after_compression / state.total_numel_before_compression


def recording_hook(recorder, bucket):  # no annotations: DDP checks them, and they are strings here
    """Recorder's DDP comm hook (see `Recorder`): a completed future of the unchanged bucket."""
    buffer = bucket.buffer()
    original = buffer.detach().clone()
    norm = float(original.double().square().sum())
    for rank, state in recorder.states.items():
        buffer.copy_(original)
        out = powerSGD_hook.powerSGD_hook(state, bucket).wait()
        if recorder.measure:
            error = float((out.double() - original.double()).square().sum())
            recorder.errors[rank].append(error / norm)
    if recorder.capture:
        lengths = tuple(t.numel() for t in bucket.gradients())
        recorder.captured.append(Vector(original.clone(), lengths))
    buffer.copy_(original)
    fut: torch.futures.Future[Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


@contextmanager
def one_process_group() -> Iterator[None]:
    """A real world-size-1 gloo group (the one already there, if it has one rank)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"needs a one-rank group; this one has {dist.get_world_size()}")
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def ddp(module: nn.Module, recorder: Recorder) -> DistributedDataParallel:
    """One 64 MB bucket, as cluster_bench runs PowerSGD (several break its hook on gloo)."""
    model = DistributedDataParallel(module, bucket_cap_mb=64)
    model.register_comm_hook(recorder, recording_hook)
    return model


def real_gradients(
    steps: Sequence[int], ranks: Sequence[int], seed: int = 0, batch: int = 64, lr: float = 3e-4
) -> tuple[list[Vector], Recorder]:
    """cluster_bench's job on one host: WARMUP exchanges without updates, then Adam training to
    the last of `steps` (1-based); the bucket captured and PowerSGD measured at `steps`."""
    teacher = Teacher(seed)
    recorder = Recorder(ranks, seed)
    model = ddp(student(seed), recorder)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for s in range(-WARMUP, max(steps)):
        x, y = teacher.sample(batch, batch_seed(seed, 0, s))
        recorder.measure = recorder.capture = s + 1 in steps
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if s >= 0:
            optimizer.step()
    return recorder.captured, recorder


class Probe(nn.Module):
    """Parameters shaped as a model's; forward(gs) = Σ⟨p, g⟩, so backward's gradients are gs."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)

    def forward(self, gs: Sequence[Tensor]) -> Tensor:
        return sum((p * g).sum() for p, g in zip(self.ps, gs, strict=True))


def powersgd_on(
    shapes: Sequence[torch.Size],
    draw: Callable[[int, int], Tensor],
    seeds: Sequence[int],
    ranks: Sequence[int],
) -> Recorder:
    """PowerSGD's errors on gradients drawn by `draw(numel, seed)` in `shapes`, one per seed,
    after two unmeasured draws (the hook's full-precision iterations)."""
    recorder = Recorder(ranks)
    model = ddp(Probe(shapes), recorder)
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    for i, seed in enumerate([-2, -1, *seeds]):
        flat = draw(total, 10_000 + seed)
        gs = [piece.view(s) for piece, s in zip(flat.split(sizes), shapes, strict=True)]
        recorder.measure = i >= 2
        model.zero_grad(set_to_none=True)
        model(gs).backward()
    return recorder


# -- the run --------------------------------------------------------------------------------------
def theory(bits: int) -> dict[str, float]:
    """D_b, D_b/(1 − D_b) and 2^(−2b) (`distq.theory.rotation`)."""
    d = lloyd_max_distortion(bits)
    return {
        "lloyd_max_D": d,
        "rotated_law": d / (1 - d),
        "rate_distortion": rate_distortion_limit(bits),
    }


def law(variant: Variant, bits: int) -> float | None:
    """`rotated_vnmse` (bucket-width law, `distq.theory.rotation`) for a rotated row, else None."""
    if not variant.name.startswith("rotated") or variant.bucket is None:
        return None
    return rotated_vnmse(bits, variant.bucket, stochastic=variant.name.endswith("stochastic"))


def commit() -> str:
    """The checked-out commit, '+changes' if tracked files differ from it."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def measure(args: argparse.Namespace) -> dict:
    rows, notes = variants(args.widths)
    for note in notes:
        print(f"note: {note}", flush=True)
    start = time.perf_counter()
    with one_process_group():
        captured, real_recorder = real_gradients(args.steps, args.powersgd_ranks)
        shapes = [p.shape for p in student(0).parameters()]
        synthetic_psgd = {
            kind: powersgd_on(shapes, draw, range(args.vectors), args.powersgd_ranks)
            for kind, draw in DISTRIBUTIONS.items()
        }
    print(
        f"real gradients captured at steps {list(args.steps)} "
        f"({captured[0].values.numel()} elements, {time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    sets = {
        kind: [Vector(draw(args.dim, seed), (args.dim,)) for seed in range(args.vectors)]
        for kind, draw in DISTRIBUTIONS.items()
    }
    sets["real"] = captured
    results = []
    for variant in rows:
        for bits in variant.widths:
            entry = {
                "compressor": variant.label,
                "name": variant.name,
                "bits": bits,
                "bucket": variant.bucket,
                "clip": variant.clip,
                "per_tensor": variant.per_tensor,
                "wire_bits_real": wire_bits(variant, bits, captured[0]),
                **theory(bits),
                "law": law(variant, bits),
            }
            for kind, vectors in sets.items():
                t0 = time.perf_counter()
                per_vector = [vnmse(variant, bits, g, args.keys) for g in vectors]
                flat = [v for values in per_vector for v in values]
                entry[kind] = {
                    "vnmse": sum(flat) / len(flat),
                    "per_vector": [sum(v) / len(v) for v in per_vector],
                    "sd_over_keys": [
                        torch.tensor(v, dtype=torch.float64).std().item() for v in per_vector
                    ],
                }
                if variant.clip is not None:
                    entry[kind]["clip_bias"] = _mean([clip_bias(variant, g) for g in vectors])
                exact = [exact_quantize_vnmse(variant, bits, g) for g in vectors]
                if exact[0] is not None:
                    entry[kind]["exact"] = sum(exact) / len(exact)
                print(
                    f"{variant.label:>16} {bits} bit {kind:>10}: {entry[kind]['vnmse']:.4f} "
                    f"({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
            results.append(entry)
    powersgd = []
    for rank in args.powersgd_ranks:
        entry = {
            "compressor": f"PowerSGD rank {rank}",
            "rank": rank,
            "wire_bits_real": real_recorder.bits_per_element(rank),
            "real": {
                "vnmse": _mean(real_recorder.errors[rank]),
                "per_vector": real_recorder.errors[rank],
            },
        }
        for kind, recorder in synthetic_psgd.items():
            entry[kind] = {
                "vnmse": _mean(recorder.errors[rank]),
                "per_vector": recorder.errors[rank],
            }
        powersgd.append(entry)
    return {
        "issue": "21 item 4",
        "commit": commit(),
        "command": " ".join(["OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "distq_compile": os.environ.get("DISTQ_COMPILE", "1"),
        "settings": {
            "dim": args.dim,
            "vectors": args.vectors,
            "keys": args.keys,
            "steps": list(args.steps),
            "bucket": BUCKET,
            "clip": CLIP,
            "real_elements": captured[0].values.numel(),
            "real_layout": "DDP's one 64 MB bucket: the whole gradient, flat, in bucket order",
            "powersgd": "torch powerSGD_hook, warm start, no error feedback, "
            "start_powerSGD_iter=2, min_compression_rate 2, one bucket",
            "powersgd_synthetic_elements": sum(math.prod(s) for s in shapes),
        },
        "notes": notes,
        "compressors": results,
        "powersgd": powersgd,
        "seconds": time.perf_counter() - start,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def table(record: dict) -> str:
    """The Markdown table: one row per compressor and width."""
    lines = [
        "| compressor | bits | wire bits/element (real) | Gaussian | Student-t(3) | real gradients "
        "| rotated law | D_b/(1−D_b) | 2^(−2b) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in record["compressors"]:
        lines.append(
            f"| {e['compressor']} | {e['bits']} | {e['wire_bits_real']:.3f} "
            f"| {e['gaussian']['vnmse']:.4f} | {e['student_t3']['vnmse']:.4f} "
            f"| {e['real']['vnmse']:.4f} | {'' if e['law'] is None else format(e['law'], '.4f')} "
            f"| {e['rotated_law']:.4f} | {e['rate_distortion']:.4f} |"
        )
    for e in record["powersgd"]:
        lines.append(
            f"| {e['compressor']} | — | {e['wire_bits_real']:.3f} "
            f"| {e['gaussian']['vnmse']:.4f} | {e['student_t3']['vnmse']:.4f} "
            f"| {e['real']['vnmse']:.4f} | | | |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1 << 20, help="synthetic vector length")
    parser.add_argument("--vectors", type=int, default=5, help="seeded synthetic vectors")
    parser.add_argument("--keys", type=int, default=20, help="noise keys per vector")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[1, 10, 30],
        help="1-based training steps whose gradients are captured",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--powersgd-ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", type=Path, default=HERE / "error_per_bit.json")
    args = parser.parse_args(argv)
    for name, values, low in (
        ("dim", [args.dim], 1),
        ("vectors", [args.vectors], 1),
        ("keys", [args.keys], 2),
        ("steps", args.steps, 1),
        ("powersgd-ranks", args.powersgd_ranks, 1),
    ):
        bad = [v for v in values if v < low]
        if bad:
            parser.error(f"--{name} {bad[0]}; allowed: an int >= {low}")
    if bad := [b for b in args.widths if not 1 <= b <= 8]:
        parser.error(f"--widths {bad[0]}; allowed: ints in 1..8")
    record = measure(args)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))
    print(f"\n{record['seconds']:.0f} s, commit {record['commit']}; wrote {args.json}")


if __name__ == "__main__":
    main()
