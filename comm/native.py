"""distq's C codec kernels (comm/rotation_kernel.c), compiled once per machine by the system C
compiler and loaded through ctypes: no torch headers, so the build takes about a second.

`library()` is None, and the torch path runs instead, when DISTQ_NATIVE=0, when no compiler is
found or the build fails (logged once). The shared object is cached under
$XDG_CACHE_HOME/distq (else ~/.cache/distq, else the temporary directory), named by a digest
of the source, the flags and the compiler, and written under a temporary name then renamed, so
ranks building at once on a shared filesystem never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("rotation_kernel.c")
# ISO C without contraction: no fused multiply-adds, so every float op is the one written.
FLAGS = ("-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")

_float, _int64, _int, _ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "distq_eden_code": [_ptr, _int64, _int64, _int64, _int, _ptr, _float, _ptr, _ptr, _int, _ptr,
                        _float, _ptr, _ptr, _int, _int, _ptr, _ptr, _ptr],
    "distq_eden_decode": [_ptr, _ptr, _int, _int64, _int64, _int, _ptr, _float, _ptr, _ptr,
                          _int64, _int],
}  # fmt: skip


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME/distq (else ~/.cache/distq), else a per-user temporary directory."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (Path(base) / "distq", Path(tempfile.gettempdir()) / f"distq-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no writable cache directory for distq's C kernels")


def _build(compiler: str) -> Path:
    """The shared object for this source, flags and compiler, compiled if not cached yet."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()
    ).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"rotation_kernel-{platform.machine()}-{digest}.so"
    if target.is_file():
        return target
    fd, partial = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (module docstring)."""
    if os.environ.get("DISTQ_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found (CC, cc, gcc): the rotated codec runs its torch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("building distq's C kernels failed (%s): torch path instead", detail)
        return None
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return lib


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels are built and these tensors are CPU tensors they can take."""
    return library() is not None and all(t.device.type == "cpu" for t in tensors)


def pointer(t: Tensor) -> int:
    """The address of a contiguous tensor's first element."""
    if not t.is_contiguous():
        raise ValueError("distq's C kernels take contiguous tensors")
    return t.data_ptr()


def pointers(tensors: list[Tensor]) -> ctypes.Array:
    """A C array of the tensors' addresses (each contiguous)."""
    return (ctypes.c_void_p * len(tensors))(*(pointer(t) for t in tensors))


def check(status: int, name: str) -> None:
    if status != 0:
        raise MemoryError(f"{name}: the C kernel could not allocate its scratch buffers")
