"""Run a function on N real processes and collect what each rank returns; the test device lives here.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with the
torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``, ``LOCAL_RANK``),
one thread each, initialises the default process group, calls ``fn(*args)`` on every rank and
returns the list of results in rank order (tensors on the CPU). An exception on any rank fails
the caller with that rank's traceback. Spawning costs a few seconds on 2 cores, so tests group
many checks into one spawned world.

The one place the tests take their device and backend from: ``TP_TRAINER_TEST_DEVICE``, ``cpu``
(the default: gloo) or ``cuda`` (NCCL, rank ``r`` on GPU ``r``). NCCL cannot put two ranks on one
GPU, so under ``cuda`` a world larger than ``torch.cuda.device_count()`` is skipped ("needs N
GPUs, found M"), never run on the CPU instead. ``tests/conftest.py`` checks the choice once per
session (an unknown value or ``cuda`` without CUDA stops the run), hides the GPUs under ``cpu`` so
that the library, the Trainer and accelerate all take the CPU path, and skips the tests marked
``cpu_only`` under ``cuda``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

DEVICE_ENV = "TP_TRAINER_TEST_DEVICE"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # test device -> process-group backend


def resolve_test_device(environ=None) -> str:
    """The test device named by ``TP_TRAINER_TEST_DEVICE`` (``cpu`` when unset); anything else is an error."""
    environ = os.environ if environ is None else environ
    value = environ.get(DEVICE_ENV, "").strip().lower() or "cpu"
    if value not in BACKENDS:
        raise ValueError(f"{DEVICE_ENV}={environ.get(DEVICE_ENV)!r} is not a test device: allowed values are "
                         f"{', '.join(repr(d) for d in BACKENDS)} (unset means 'cpu')")
    return value


TEST_DEVICE = resolve_test_device()
TEST_BACKEND = BACKENDS[TEST_DEVICE]


def check_cuda_available() -> None:
    """Under ``cuda``, refuse loudly when torch sees no GPU (the tests must never fall back to the CPU)."""
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda, but torch {torch.__version__} (built for CUDA {torch.version.cuda}) "
                           f"sees no CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           f"refusing to run the CUDA tests on the CPU. Unset {DEVICE_ENV} (or set it to 'cpu') "
                           "to test the CPU path.")


def skip_unless_world_fits(world_size: int) -> None:
    """Skip the calling test when a ``world_size``-rank world cannot run on this machine's test device."""
    if TEST_DEVICE != "cuda":
        return
    check_cuda_available()
    found = torch.cuda.device_count()
    if world_size > found:
        import pytest

        pytest.skip(f"needs {world_size} GPUs, found {found} (NCCL runs one rank per GPU)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, env, backend="gloo"):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    torch.set_num_threads(1)
    import torch.distributed as dist

    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # LOCAL_RANK == rank: one GPU per rank, as the library picks it
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure, including SystemExit from argument parsing
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _wait_for_nccl_ranks(procs, timeout: float, grace: float = 120) -> None:
    """Join the ranks; once one has exited, give the others ``grace`` seconds. A rank that failed leaves
    its peers blocked in an NCCL collective (gloo notices the closed connection, NCCL waits for its own
    10-minute timeout): they are killed below, and the failing rank's traceback is what gets reported."""
    deadline, first_exit = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        alive = sum(p.is_alive() for p in procs)
        if alive == 0:
            return
        if alive < len(procs):
            first_exit = first_exit or time.monotonic()
            if time.monotonic() - first_exit > grace:
                return
        time.sleep(0.1)


def run_distributed(fn, world_size: int, *args, env: dict | None = None, timeout: float = 600):
    skip_unless_world_fits(world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, env or {}, TEST_BACKEND))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        if TEST_BACKEND == "nccl":
            _wait_for_nccl_ranks(procs, timeout)
        else:
            for p in procs:
                p.join(timeout)
        results, errors = [], []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(30)
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {p.exitcode} and no result")
                continue
            # CUDA results come back on the CPU: ranks' tensors on different GPUs compare there
            rec = torch.load(path, weights_only=False, map_location="cpu" if TEST_BACKEND == "nccl" else None)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}:\n{rec['error']}")
        if errors:
            raise AssertionError("distributed run failed\n" + "\n".join(errors))
        return results
