"""Run a function on N real gloo processes and collect what each rank returns.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with the
torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``, ``LOCAL_RANK``),
one thread each, initialises the default gloo group, calls ``fn(*args)`` on every rank and
returns the list of results in rank order. An exception on any rank fails the caller with
that rank's traceback. Spawning costs a few seconds on 2 cores, so tests group many checks
into one spawned world.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, env):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    torch.set_num_threads(1)
    import torch.distributed as dist

    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure, including SystemExit from argument parsing
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, env: dict | None = None, timeout: float = 600):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, env or {}))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        results, errors = [], []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {p.exitcode} and no result")
                continue
            rec = torch.load(path, weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r}:\n{rec['error']}")
        if errors:
            raise AssertionError("distributed run failed\n" + "\n".join(errors))
        return results
