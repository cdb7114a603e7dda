"""Building jaxspec's C++ CPU kernels (XLA FFI custom calls) on first use, and which of them may run.

The kernels' sources lie beside their Python modules. They are compiled together, with the machine's C++
compiler (AVX2 + FMA, x86-64), into one library in the kernels folder of the jaxspec cache (`zoo.cache_root()`),
so that they share one pool of helper threads (cpu_workers.h). The library is keyed by the sources, jax's version
and the flags: an edited source or a new jax builds anew, and concurrent processes leave one whole file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

from jaxspec import zoo
from jaxspec.errors import InputError

_log = logging.getLogger(__name__)
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")


KERNELS = ("small_rows_matmul", "cached_attention")


def enabled(kernel: str) -> bool:
    """Whether `kernel` (one of KERNELS) may be used: JAXSPEC_CPU_KERNELS unset or 1 allows all, 0 none (every
    caller then uses XLA's ops), a comma-separated list of names those only; and the CPU has AVX2/FMA."""
    setting = os.environ.get("JAXSPEC_CPU_KERNELS", "1").strip()
    if setting in ("0", "1"):
        allowed = KERNELS if setting == "1" else ()
    else:
        allowed = tuple(name.strip() for name in setting.split(",") if name.strip())
        unknown = sorted(set(allowed) - set(KERNELS))
        if unknown or not allowed:
            raise InputError(f"JAXSPEC_CPU_KERNELS={setting!r}: expected 1 (all), 0 (none) or a comma-separated "
                             f"list of {KERNELS}" + (f"; unknown: {unknown}" if unknown else ""))
    return kernel in allowed and cpu_has_avx2_fma()


def cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


_HERE = pathlib.Path(__file__).parent
SOURCES = ("cpu_workers.cc", "small_rows_matmul.cc", "cached_attention.cc")
HEADERS = ("cpu_simd.h", "cpu_workers.h")


def threads() -> int:
    """Threads per kernel call, the caller's included: JAXSPEC_CPU_KERNEL_THREADS, else the CPUs this process
    may run on."""
    value = os.environ.get("JAXSPEC_CPU_KERNEL_THREADS")
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not value.strip().isdigit() or int(value) < 1:
        raise InputError(f"JAXSPEC_CPU_KERNEL_THREADS={value!r}: expected a whole number of threads >= 1")
    return int(value)


def build() -> pathlib.Path:
    """The shared library of all the kernels, built once per sources, jax version and flags (an atomic rename).
    Raises RuntimeError naming the command and the compiler's message when it cannot be built."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    text = b"".join((_HERE / name).read_bytes() for name in (*HEADERS, *SOURCES))
    key = hashlib.sha256(text + jax.__version__.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = pathlib.Path(zoo.cache_root()) / "kernels"
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = pathlib.Path(tmp) / lib.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{_HERE}", *(str(_HERE / n) for n in SOURCES),
               "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(built, lib)
    return lib


def load(build_library, symbol: str, target: str) -> bool:
    """Loads the library `build_library()` returns, registers its handler `symbol` with XLA's CPU backend as
    `target` and starts the helper threads (threads()). Returns False, logging why, when it cannot be built or
    loaded."""
    count = threads()  # a bad setting is named before anything is built
    try:
        library = ctypes.cdll.LoadLibrary(str(build_library()))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        library.JaxspecCpuKernelThreads(ctypes.c_int64(count))
    except (OSError, RuntimeError, AttributeError) as err:
        _log.warning("%s: the CPU kernel is not available, XLA's ops are used: %s", target, err)
        return False
    return True
