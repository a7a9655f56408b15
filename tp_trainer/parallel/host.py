"""CPU training processes: keep freed activation memory in the heap instead of giving it back to the OS.

Why: a training step frees and re-allocates the same activation-sized buffers (MiBs each) every
step. glibc serves blocks above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
with fresh ``mmap`` calls and trims freed heap tops back to the OS, so those buffers come back
as new pages that the kernel faults in and zeroes on first touch: ~10,000 minor faults per
step for the benchmark model (``scripts/bench.py``; what that costs a step: docs/benchmarks.md,
"Kernel measurements", and ``scripts/host_faults.py``). Serving large blocks from the heap (threshold 32 MiB, the glibc
maximum) and never trimming it makes the faults disappear after the first step; the price is
that the resident set stays at its peak, which a training loop reaches every step anyway.

This is the allocator tuning CPU training guides ask users to do by hand (``MALLOC_*``
variables, or preloading jemalloc/tcmalloc); here it is applied once per process by
:class:`~tp_trainer.parallel.context.ParallelContext` where ``kernels.py`` decides it (CPU runs;
not with ``--cpu_kernels off`` or ``TP_TRAINER_CPU_MALLOC=0``). A no-op off glibc (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20   # glibc's ceiling for the threshold on 64-bit
TRIM_THRESHOLD = 1 << 30    # effectively never give the heap top back while training
TOP_PAD = 64 << 20          # grow the heap in large steps


def keep_freed_memory_in_heap() -> bool:
    """Tune glibc's malloc as described above; returns whether it was applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
