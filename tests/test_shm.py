"""The shared-memory all-reduce (tp_trainer/parallel/shm.py) against gloo's, on real processes.

Exactness: every rank combines the same slots in rank order with the same kernels, so the
results must be bit-identical across ranks and, for 2 ranks (one addition, rounded once like
gloo's), bit-identical to gloo's all-reduce; with 3 ranks they equal ``(x0 + x1) + x2``
computed locally, bit for bit. No tolerance is needed anywhere.
"""

import os

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

pytestmark = pytest.mark.cpu_only(reason="the shared-memory transport and its gloo fallback serve CPU ranks only")

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _input(rank: int, numel: int, dtype, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, (numel,), generator=g)
    return torch.randn(numel, generator=g).to(dtype)


def _reference(world: int, numel: int, dtype, step: int, op) -> torch.Tensor:
    combine = torch.add if op == dist.ReduceOp.SUM else torch.maximum
    acc = combine(_input(0, numel, dtype, step), _input(1, numel, dtype, step))
    for j in range(2, world):
        acc = combine(acc, _input(j, numel, dtype, step))
    return acc


def shm_suite(slot_bytes: int):
    from tp_trainer.parallel.shm import maybe_shared_memory_all_reduce

    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    reducer = maybe_shared_memory_all_reduce(group, "gloo", slot_bytes=slot_bytes)
    assert reducer is not None
    dist.barrier()  # rank 0 has unlinked the file once the constructor returned there
    out = {"file_left": os.path.exists(reducer.path), "mismatch": [], "gloo_mismatch": [], "checked": 0}
    # sizes below, at and far above one slot (chunked), odd sizes, many ops in a row (double buffering)
    sizes = [1, 7, slot_bytes // 8, slot_bytes // 4 + 3, 5 * slot_bytes + 1, 1000, 2, 12345]
    step = 0
    for dtype in DTYPES:
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
            for numel in sizes:
                step += 1
                x = _input(rank, numel, dtype, step)
                got = reducer(x.clone(), op)
                if not torch.equal(got, _reference(world, numel, dtype, step, op)):
                    out["mismatch"].append((str(dtype), str(op), numel))
                if world == 2:  # the same single rounding as gloo's sum
                    expected = x.clone()
                    dist.all_reduce(expected, op=op)
                    if not torch.equal(got, expected):
                        out["gloo_mismatch"].append((str(dtype), str(op), numel))
                out["checked"] += 1
    # all-gather along dim 0, chunked (rows of 100 floats = 400 bytes > one 256-byte slot)
    gathered = reducer.all_gather(torch.full((3, 100), float(rank)))
    out["all_gather_ok"] = torch.equal(gathered, torch.arange(world, dtype=torch.float32).repeat_interleave(3)
                                       .unsqueeze(1).expand(3 * world, 100))
    errors = []
    for bad in (lambda: reducer(torch.ones(4, 4).t()), lambda: reducer(torch.ones(4), dist.ReduceOp.PRODUCT)):
        try:
            bad()
        except ValueError as err:
            errors.append(str(err))
    out["errors"] = errors
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_all_reduce_is_exact(world):
    results = run_distributed(shm_suite, world, 256)
    for rank, r in enumerate(results):
        assert r["checked"] == 3 * 2 * 8
        assert r["mismatch"] == [], f"rank {rank}: differs from the rank-order reference: {r['mismatch']}"
        assert r["gloo_mismatch"] == [], f"rank {rank}: differs from gloo's all-reduce: {r['gloo_mismatch']}"
        assert not r["file_left"], "the buffer file must be unlinked once every rank mapped it"
        assert r["all_gather_ok"]
        assert "contiguous" in r["errors"][0] and "PRODUCT" in r["errors"][1]


def context_suite(cpu_kernels):
    from tp_trainer.parallel.context import ParallelContext

    ctx = ParallelContext.from_environment(2, cpu_kernels=cpu_kernels)
    return {"transport": ctx.tp_comm.transport is not None, "kernels": ctx.kernels.shm_all_reduce,
            "describe": ctx.describe()}


@pytest.mark.parametrize("setting, cpu_kernels", [("1", "auto"), ("0", "auto"), ("1", "off")])
def test_context_picks_shared_memory_on_one_host_unless_disabled(setting, cpu_kernels):
    results = run_distributed(context_suite, 2, cpu_kernels, env={"TP_TRAINER_SHM_ALLREDUCE": setting})
    wanted = setting == "1" and cpu_kernels == "auto"
    for r in results:
        assert r["transport"] is wanted and r["kernels"] is wanted
        assert ("shared-memory" in r["describe"]) is wanted


def disagreeing_ranks_suite():
    from tp_trainer.parallel.context import ParallelContext

    # rank 1 declines the transport: the vote keeps the whole TP group on gloo, and nobody waits
    ctx = ParallelContext.from_environment(2, cpu_kernels="off" if dist.get_rank() == 1 else "auto")
    x = torch.full((3,), float(dist.get_rank() + 1))
    from tp_trainer.parallel.collectives import all_reduce

    all_reduce(x, ctx.tp_comm)
    return {"transport": ctx.tp_comm.transport is not None, "sum": x.tolist()}


def test_ranks_that_disagree_stay_on_the_backend():
    for r in run_distributed(disagreeing_ranks_suite, 2):
        assert not r["transport"] and r["sum"] == [3.0, 3.0, 3.0]


def full_shm_suite():
    import errno

    from tp_trainer.parallel import shm

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    shm.os.posix_fallocate = no_space  # this spawned rank only: /dev/shm is "full"
    before = set(os.listdir("/dev/shm"))
    reducer = shm.maybe_shared_memory_all_reduce(dist.group.WORLD, "gloo")
    dist.barrier()
    x = torch.full((3,), float(dist.get_rank() + 1))
    dist.all_reduce(x)  # the backend still works
    return {"reducer": reducer is None, "new_files": sorted(set(os.listdir("/dev/shm")) - before),
            "sum": x.tolist()}


def test_full_dev_shm_falls_back_to_the_backend_and_leaves_no_file():
    for r in run_distributed(full_shm_suite, 2):
        assert r["reducer"], "no shared-memory transport when its pages cannot be reserved"
        assert not [f for f in r["new_files"] if f.startswith("tp_trainer_allreduce_")]
        assert r["sum"] == [3.0, 3.0, 3.0]


def test_the_segment_is_created_exclusively_and_owner_only(tmp_path):
    from tp_trainer.parallel import shm

    # another local user must neither read the segment (activations, gradients) nor plant one
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        path = str(tmp_path / "segment")
        shm.create_segment(path, 4096, "token")
        assert os.stat(path).st_mode & 0o777 == 0o600
        with open(path, "rb") as f:
            assert f.read()[-5:] == b"token"
        with pytest.raises(FileExistsError):
            shm.create_segment(path, 4096, "token")  # never reuses an existing file
        target = tmp_path / "elsewhere"
        os.symlink(target, tmp_path / "planted")
        with pytest.raises(FileExistsError):
            shm.create_segment(str(tmp_path / "planted"), 4096, "token")  # nor follows a planted link
        assert not target.exists()
    finally:
        os.umask(old_umask)
