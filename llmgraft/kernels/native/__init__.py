"""The compiled CPU path of exact top-N selection with tail statistics (``top_n.cpp``).

Built on first use with the system C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``; about a
second, no Python or torch headers) for this machine's CPU, and cached under ``$LLMGRAFT_CACHE_DIR`` (default
``~/.cache/llmgraft``) keyed by the source, the compiler and the CPU, so each process after the first only
loads it. It is used only where its loops are vector loops (AVX-512, or AVX2 with FMA); everywhere else (no
compiler, a failed build, another CPU, ``LLMGRAFT_NATIVE=0``) :func:`top_n` returns None and callers take
their torch path, which gives the same values (see ``truncation.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("top_n.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
STATISTICS = {"none": 0, "mass": 1, "mass+entropy": 2}
#: Below this many logits per call one thread does the work: waking a second one costs more than it saves.
_THREADED_MIN_LOGITS = 1 << 14

_lock = threading.Lock()
_loaded: dict[tuple, ctypes._CFuncPtr | None] = {}


def enabled() -> bool:
    """False when ``LLMGRAFT_NATIVE=0`` asks for the torch path everywhere."""
    return os.environ.get("LLMGRAFT_NATIVE", "1") != "0"


def extra_flags() -> tuple[str, ...]:
    """Compiler flags added from ``LLMGRAFT_NATIVE_FLAGS`` (e.g. ``-mno-avx512f`` to run the AVX2 loops)."""
    return tuple(os.environ.get("LLMGRAFT_NATIVE_FLAGS", "").split())


def cache_dir() -> Path:
    root = os.environ.get("LLMGRAFT_CACHE_DIR") or Path.home() / ".cache" / "llmgraft"
    return Path(root) / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def build(cxx: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``top_n.cpp`` (unless cached) and return the shared library's path.

    Written to a temporary file in the cache directory and renamed into place, so concurrent processes
    never load a half-written library. Raises ``RuntimeError`` with the compiler's message on failure.
    """
    flags = FLAGS + tuple(extra_flags)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *flags, _cpu_signature()]).encode())
    target = cache_dir() / f"top_n-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".top_n-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(SOURCE), "-o", temporary], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def load(extra_flags: tuple[str, ...] = ()):
    """The library's ``llmgraft_top_n`` function with its ``vectorized`` flag and ``isa`` name, or None when it
    cannot be built (or, for the default flags, when the CPU has no vector unit the kernel uses, so the build
    would go unused).

    Built and loaded once per process and flag set; a failure is logged once and not retried. Samplers call
    this on every step, so a settled flag set is answered without taking the lock.
    """
    key = tuple(extra_flags)
    if key in _loaded:
        return _loaded[key]
    with _lock:
        if key not in _loaded:
            _loaded[key] = _build_and_load(key)  # published once settled: lock-free readers never see a gap
        return _loaded[key]


def _build_and_load(key: tuple[str, ...]):
    cxx = compiler()
    flags = set(_cpu_signature().split())
    if not key and "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        log.info("llmgraft: no AVX-512 or AVX2 on this CPU; the truncation samplers use their torch path")
        return None
    if cxx is None:
        log.info("llmgraft: no C++ compiler found; the truncation samplers use their torch path")
        return None
    try:
        library = ctypes.CDLL(str(build(cxx, key)))
    except (OSError, RuntimeError) as err:
        log.warning("llmgraft: the native top-N kernel is unavailable, using torch: %s", err)
        return None
    function = library.llmgraft_top_n
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    level = library.llmgraft_top_n_vectorized()
    function.vectorized = level > 0
    function.isa = ("scalar", "AVX2", "AVX-512")[level]
    return function


def describe() -> str:
    """Which path the truncation samplers take here, for benchmark titles: compiled (and its loops) or torch."""
    function = load(extra_flags()) if enabled() else None
    return f"compiled, {function.isa}" if function is not None and function.vectorized else "torch"


def prepare() -> None:
    """Build or load the kernel now: hosts call this at start-up, so no request waits for the compiler."""
    if enabled():
        load(extra_flags())


def applies(logits: torch.Tensor) -> bool:
    """Whether :func:`top_n` can take these logits: float32 [B, V] rows on the CPU, each contiguous."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and 0 < logits.shape[1] < 1 << 31 and not logits.requires_grad)


def top_n(logits: torch.Tensor, n: int, statistics: str = "none", function=None):
    """The ``n`` largest logits of every row, sorted descending (ties: lowest index first), their indices, and
    the tail sums [B, 2] float64: R = Σ_tail exp(x - m) and W = Σ_tail exp(x - m)·(x - m) (zero unless asked
    for by ``statistics``; see ``truncation.py``), or None where the native path does not apply.

    A row with NaN or +inf, or with no token above -inf, comes back with a non-finite first value: the caller
    then takes its torch path, which applies the bad-logit policy. Rows with fewer than ``n`` tokens above
    -inf are completed with -inf tokens (lowest indices first). ``logits`` is only read.
    """
    if function is None:
        if not enabled() or not applies(logits):
            return None
        function = load(extra_flags())
        if function is None or not function.vectorized:
            return None
    batch, vocab = logits.shape
    values = torch.empty(batch, n, dtype=torch.float32)
    index = torch.empty(batch, n, dtype=torch.int64)
    tail = torch.empty(batch, 2, dtype=torch.float64)
    threads = torch.get_num_threads() if batch * vocab >= _THREADED_MIN_LOGITS else 1
    status = function(logits.data_ptr(), batch, vocab, logits.stride(0), n, STATISTICS[statistics],
                      values.data_ptr(), index.data_ptr(), tail.data_ptr(), threads)
    if status != 0:
        raise ValueError(f"native top_n rejected its arguments: shape {tuple(logits.shape)}, n={n}")
    return values, index, tail
