"""tp_trainer/parallel/host.py: freed large blocks stay in the heap, so re-allocating them faults no new pages.

The mechanism, checked without timing or load-dependent counts: in a fresh interpreter (the
setting is process-wide), malloc 8 MiB, touch every page, free it, malloc 8 MiB again and touch
it. Untuned glibc serves 8 MiB with a fresh ``mmap`` (above its 128 KiB threshold) and unmaps
it on free, so the second touch faults all 2,048 pages again; tuned, the block comes back from
the heap and faults none (a few for malloc's own bookkeeping). The per-step effect on a training
step is a benchmark: ``python scripts/host_faults.py``.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only(reason="host malloc tuning: the CPU device's activation memory")

REALLOC_FAULTS = r"""
import ctypes, ctypes.util, os, resource
from tp_trainer.parallel.host import keep_freed_memory_in_heap
from tp_trainer.parallel.kernels import choose_kernels
# what ParallelContext does: tune where the kernels decision (TP_TRAINER_CPU_MALLOC included) says so
applied = choose_kernels("cpu", "gloo").malloc_tuning and keep_freed_memory_in_heap()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 8 << 20

def touch_faults():
    ptr = libc.malloc(SIZE)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(ptr, 1, SIZE)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    libc.free(ptr)
    return faults

touch_faults()
print(applied, touch_faults())
"""
PAGES = (8 << 20) // 4096


def _refaults(**env) -> tuple[bool, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    out = subprocess.run([sys.executable, "-c", REALLOC_FAULTS], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="the tuning targets glibc's malloc (Linux)")
def test_freed_blocks_are_reused_from_the_heap_unless_disabled():
    applied, faults = _refaults()
    assert applied and faults < PAGES // 16, f"tuned: re-allocating 8 MiB faulted {faults} of {PAGES} pages"
    applied, faults = _refaults(TP_TRAINER_CPU_MALLOC="0")
    assert not applied and faults >= PAGES * 0.9, f"untuned: expected every page faulted again, got {faults}"
