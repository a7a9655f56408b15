"""The shared-memory all-reduce (tp_trainer/parallel/shm.py) against gloo's, on real processes.

Exactness: every rank combines the same slots in rank order with the same kernels, so the
results must be bit-identical across ranks and, for 2 ranks (one addition, rounded once like
gloo's), bit-identical to gloo's all-reduce; with 3 ranks they equal ``(x0 + x1) + x2``
computed locally, bit for bit. No tolerance is needed anywhere.
"""

import os
import time

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


# ------------------------------------------------------------------------------ bounded waits, named peers
def stopped_peer_suite(timeout_s: float):
    """Rank 1 stops itself (SIGSTOP) before an op; rank 0 must fail within the group's timeout naming it,
    then lets it continue (SIGCONT), and the op rank 0 published completes on rank 1."""
    import signal
    import time

    from tp_trainer.parallel.collectives import PeerFailure, bound_waits, group_timeout_s

    group = dist.group.WORLD
    reducer = maybe_transport(group)
    bound_waits(timeout_s, group)  # after the setup: the transport reads the group's timeout when it waits
    x = torch.full((1000,), float(dist.get_rank() + 1))
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        return {"sum": reducer(x).tolist()[:1]}
    start = time.monotonic()
    try:
        reducer(x)
    except PeerFailure as err:
        out = {"error": str(err), "elapsed": time.monotonic() - start, "timeout": group_timeout_s(group)}
    else:
        out = {"error": None}
    os.kill(reducer.peers[1][0], signal.SIGCONT)
    return out


def maybe_transport(group):
    from tp_trainer.parallel.shm import maybe_shared_memory_all_reduce

    reducer = maybe_shared_memory_all_reduce(group, "gloo", slot_bytes=4096)
    assert reducer is not None and reducer.peers is not None
    return reducer


def test_a_stopped_peer_fails_the_wait_within_the_group_timeout_naming_it():
    timeout = 3.0
    rank0, rank1 = run_distributed(stopped_peer_suite, 2, timeout)
    assert rank0["error"] is not None, "the wait must end"
    assert rank0["timeout"] == timeout  # the transport's bound is the process group's timeout
    # bounded: not before the timeout, and at most one liveness period (1 s) plus scheduling noise after it
    assert timeout <= rank0["elapsed"] < timeout + 5, rank0
    err = rank0["error"]
    assert "all_reduce" in err and "rank 1 (pid" in err and "stopped" in err and "--ddp_timeout" in err, err
    assert rank1["sum"] == [3.0]  # resumed, it finds rank 0's published op and completes it


def killed_peer_suite(report: str):
    """Rank 1 is killed (SIGKILL) before an op; rank 0 must notice within about a second, long before the
    (default, 30-minute) timeout, and name it."""
    import json
    import signal
    import time

    from tp_trainer.parallel.collectives import PeerFailure

    reducer = maybe_transport(dist.group.WORLD)
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        reducer(torch.ones(10))
        error = None
    except PeerFailure as err:
        error = str(err)
    with open(report, "w") as f:
        json.dump({"error": error, "elapsed": time.monotonic() - start}, f)


def test_a_killed_peer_fails_the_wait_at_once_naming_it(tmp_path):
    import json

    report = str(tmp_path / "rank0.json")
    with pytest.raises(AssertionError, match="rank 1: exited with code -9"):
        run_distributed(killed_peer_suite, 2, report)
    rank0 = json.loads(open(report).read())
    assert rank0["error"] is not None and "rank 1 (pid" in rank0["error"] and "has exited" in rank0["error"]
    assert rank0["elapsed"] < 10, rank0  # one liveness check (1 s) after the kill, not the 1800 s timeout


def backend_failure_suite(timeout_s: float):
    """The backend path (gloo): a stopped peer's timeout and a subgroup's timeout are --ddp_timeout's, and the
    failure names the operation, the peer and the timeout."""
    import signal
    import time

    from tp_trainer.parallel import collectives

    world = dist.group.WORLD
    sub = dist.new_group([0, 1])  # subgroups start with torch's 30-minute default
    before = collectives.group_timeout_s(sub)
    collectives.bound_waits(timeout_s, world, sub, None, sub)
    out = {"before": before, "after": [collectives.group_timeout_s(world), collectives.group_timeout_s(sub)]}
    pid = [None, None]
    dist.all_gather_object(pid, os.getpid())
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
        return out
    start = time.monotonic()
    try:
        collectives.all_reduce(torch.ones(4), sub)
    except collectives.PeerFailure as err:
        out.update(error=str(err), elapsed=time.monotonic() - start)
    os.kill(pid[1], signal.SIGCONT)
    try:
        collectives.bound_waits(0, world)
    except ValueError as err:
        out["zero"] = str(err)
    return out


def test_backend_collectives_take_the_timeout_and_name_the_peer():
    timeout = 3.0
    rank0, rank1 = run_distributed(backend_failure_suite, 2, timeout)
    assert rank0["before"] == 1800.0 and rank0["after"] == [timeout, timeout] == rank1["after"]
    assert timeout <= rank0["elapsed"] < timeout + 5, rank0
    err = rank0["error"]
    assert "all_reduce over ranks [0, 1] failed on rank 0" in err and "rank 1 died, stopped" in err, err
    assert "timeout of 3 s" in err and "--ddp_timeout" in err
    assert "0.0 s" in rank0["zero"] and "--ddp_timeout" in rank0["zero"]


def test_peer_states_from_proc():
    import signal
    import subprocess
    import sys

    from tp_trainer.parallel.peers import peer_state, process_identity

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = process_identity(child.pid)
        assert peer_state(*me) == "running"
        os.kill(child.pid, signal.SIGSTOP)
        assert _eventually(lambda: peer_state(*me) == "stopped")  # signals are delivered asynchronously
        assert peer_state(me[0], me[1] + 1) == "exited"  # same pid, another start time: a reused pid
    finally:
        child.kill()
    assert _eventually(lambda: peer_state(*me) == "exited")  # a zombie until reaped
    child.wait()
    assert peer_state(*me) == "exited"
    assert peer_state(me[0], None) == "unknown"


def _eventually(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
