"""All-reduce (and all-gather) through shared memory for a process group whose ranks share one CPU host.

Why our own: on CPU, gloo moves every all-reduce through loopback TCP and its own I/O threads.
A TP step issues one activation-sized all-reduce per row-parallel layer forward and per
column-parallel input backward (9 + 9 per step for the 4-layer benchmark model); through a
shared buffer each is a few memory copies (per-size timings against gloo: docs/benchmarks.md,
"Kernel measurements"; inside a step, ``scripts/profile_step.py`` shows what the collectives cost). NCCL on GPUs is untouched: this
path is only chosen for gloo groups (``kernels.py`` decides, :func:`maybe_shared_memory_all_reduce`
checks the host), and the :class:`~tp_trainer.parallel.context.ParallelContext` hands it to the
TP layers inside its ``tp_comm``.

Protocol, for a group of ``n`` ranks and a buffer of two *sets* of ``n`` slots of ``S`` bytes::

    flags:  [n] int64 (one 64-byte line each)      data: [2, n, S] bytes

    op number k (every rank calls the group's all-reduces in the same order):
      s = k % 2
      copy my chunk into data[s, rank]; flags[rank] = k      (publish)
      wait until flags[j] >= k for every j                   (everyone published op k)
      out = data[s, 0] (+) data[s, 1] (+) ... (+) data[s, n-1]   in rank order, on every rank

Every rank combines the same slots in the same order with the same kernels, so all ranks
hold bit-identical results (TP replicas never drift). Reusing a set is safe without a
second barrier: a rank writes ``data[s]`` again at op ``k + 2`` only after seeing every
flag at ``k + 1``, and a rank publishes ``k + 1`` only after it finished reading op ``k``.
Tensors larger than ``S`` go through in chunks, one op each.

Waiting is bounded: a rank that waits for a slot longer than the process group's timeout
(``collectives.group_timeout_s``: ``--ddp_timeout`` once the context set it) raises
:class:`~tp_trainer.parallel.collectives.PeerFailure` naming the operation and the late peers'
global ranks, pids and states (running, stopped). Every rank records its pid and process start
time at setup; while it waits, a rank looks at its late peers in ``/proc`` about once a second and
fails at once when one has exited (a killed rank never publishes again, and the elastic agent only
replaces the world once every rank has exited).

Memory ordering: the data is written before the flag by the same thread; x86-64 (TSO) keeps
stores in order and loads in order, and glibc's non-temporal memcpy ends with ``sfence``.
Weaker memory models (ARM, POWER) are not given this path.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import uuid

import torch
import torch.distributed as dist

from .collectives import PeerFailure, group_timeout_s
from .peers import peer_state, process_identity, state_words

_FLAG_STRIDE = 8  # int64 entries per flag: one 64-byte cache line each, no false sharing
_SUPPORTED_OPS = (dist.ReduceOp.SUM, dist.ReduceOp.MAX)
_CHECK_EVERY_S = 1.0  # how often a waiting rank looks at its late peers (dead: fail now) and at the clock


class SharedMemoryTransport:
    """SUM/MAX all-reduce (in place) and dim-0 all-gather of CPU tensors over ``group``, whose ranks share a host.

    Built by :func:`maybe_shared_memory_all_reduce` (collectively): rank 0 of the group creates
    the buffer file in ``/dev/shm``, every rank maps it, and rank 0 unlinks it once everyone
    holds the mapping, so nothing is left behind even if a process is killed.
    """

    def __init__(self, group, path: str, *, slot_bytes: int, peers: list[tuple[int, int | None]] | None = None,
                 timeout_s: float | None = None):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_ranks = dist.get_process_group_ranks(group)
        self.slot_bytes = slot_bytes
        self.timeout_s = timeout_s  # None: the group's own timeout, read when a wait gets long
        self.peers = peers  # (pid, start time) of every group rank, from the setup; None: unknown
        self.path = path  # unlinked by rank 0 right after every rank mapped it
        flag_bytes = _flag_bytes(self.size)
        buf = torch.from_file(path, shared=True, size=_total_bytes(self.size, slot_bytes), dtype=torch.uint8)
        self._buffer = buf  # keeps the mapping alive
        self._flags = buf[:flag_bytes].view(torch.int64).numpy()[::_FLAG_STRIDE]
        self._data = buf[flag_bytes:].view(2, self.size, slot_bytes)
        self._seq = 0
        self._operation = "all_reduce"  # what the current wait is for (named if it fails)
        # {"all_reduce" | "all_gather": [calls, bytes of the full tensor]} served (for benchmarks)
        self.stats = {"all_reduce": [0, 0], "all_gather": [0, 0]}
        self.wait_s = 0.0  # seconds spent waiting for the other ranks' slots, cumulative (for benchmarks)

    def __call__(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reduce ``tensor`` (contiguous, CPU) over the group into ``out`` (default: ``tensor``, in place)
        and return it. Out of place costs nothing extra: the combine reads the slots, not ``tensor``,
        so a caller that must keep its input (an autograd gradient) needs no ``clone()``."""
        if op not in _SUPPORTED_OPS:
            raise ValueError(f"shared-memory all-reduce supports SUM and MAX, not {op}")
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError("shared-memory all-reduce needs a contiguous CPU tensor")
        out = tensor if out is None else out
        self._count("all_reduce", tensor)
        self._operation = "all_reduce"
        flat, flat_out = tensor.view(-1), out.view(-1)
        per_chunk = self.slot_bytes // tensor.element_size()
        for start in range(0, flat.numel(), per_chunk):
            self._reduce_chunk(flat[start:start + per_chunk], op, flat_out[start:start + per_chunk])
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``cat([tensor of group rank 0, rank 1, ...], dim=0)`` (equal shapes on every rank), a new tensor.

        Same protocol as the all-reduce, with a copy out instead of a combine: each rank
        publishes its (chunk of the) tensor in its slot and copies every slot into its output.
        """
        if tensor.device.type != "cpu":
            raise ValueError("shared-memory all-gather needs a CPU tensor")
        flat = tensor.contiguous().view(-1)
        out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
        parts = out.view(self.size, -1)
        self._count("all_gather", out)
        self._operation = "all_gather"
        per_chunk = self.slot_bytes // tensor.element_size()
        for start in range(0, flat.numel(), per_chunk):
            chunk = flat[start:start + per_chunk]
            slots = self._publish(chunk)
            parts[:, start:start + chunk.numel()].copy_(slots)
        return out

    def _count(self, kind: str, tensor: torch.Tensor) -> None:
        self.stats[kind][0] += 1
        self.stats[kind][1] += tensor.numel() * tensor.element_size()

    def _publish(self, chunk: torch.Tensor) -> torch.Tensor:
        """Write ``chunk`` into this rank's slot of the next op and wait for every rank's; returns the
        ``[n, numel]`` view of all slots (valid until this rank's op after next)."""
        self._seq += 1
        nbytes = chunk.numel() * chunk.element_size()
        slots = self._data[self._seq % 2, :, :nbytes].view(chunk.dtype)
        slots[self.rank].copy_(chunk)
        self._flags[self.rank] = self._seq
        self._wait_all(self._seq)
        return slots

    def _reduce_chunk(self, chunk: torch.Tensor, op, out: torch.Tensor) -> None:
        _combine(self._publish(chunk), op, out)

    def _wait_all(self, seq: int) -> None:
        flags = self._flags
        if flags.min() >= seq:  # everyone is here already
            return
        t0 = time.perf_counter()
        try:
            self._spin(seq)
        finally:
            self.wait_s += time.perf_counter() - t0

    def _spin(self, seq: int) -> None:
        flags = self._flags
        spins, start = 0, time.monotonic()
        next_check = start + _CHECK_EVERY_S
        while flags.min() < seq:
            spins += 1
            if spins < 64:
                continue  # the peer is usually microseconds behind
            time.sleep(0)  # yield the core: on a busy host the peer may need it
            if spins % 256 == 0 and time.monotonic() >= next_check:
                next_check = time.monotonic() + _CHECK_EVERY_S
                self._check_late_peers(seq, time.monotonic() - start)

    def _check_late_peers(self, seq: int, waited_s: float) -> None:
        """Raise :class:`PeerFailure` if a late peer has exited, or once ``waited_s`` exceeds the timeout."""
        late = [j for j in range(self.size) if self._flags[j] < seq]
        states = {j: peer_state(*self.peers[j]) if self.peers else "unknown" for j in late}
        dead = [j for j in late if states[j] == "exited"]
        timeout = self.timeout_s if self.timeout_s is not None else group_timeout_s(self.group)
        if not dead and waited_s <= timeout:
            return
        who = "; ".join(f"rank {self.global_ranks[j]}" + (f" (pid {self.peers[j][0]})" if self.peers else "")
                        + _late_words(states[j]) for j in (dead or late))
        when = "" if dead else f" within {timeout:.0f} s (the process group's timeout, --ddp_timeout)"
        raise PeerFailure(
            f"shared-memory {self._operation} (op {seq}) over ranks {self.global_ranks} on rank "
            f"{self.global_ranks[self.rank]}: waited {waited_s:.1f} s for {who}{when}. "
            + ("Its own log says why it exited; torchrun's --max-restarts (tp-trainer train: max_restarts) restarts "
               "the world from the last checkpoint." if dead else
               "A stopped rank (SIGSTOP, a debugger) or a hung one never arrives; a rank that is legitimately slower "
               "needs a larger --ddp_timeout; ranks that issued different collectives are a bug. --cpu_kernels off "
               "(or TP_TRAINER_SHM_ALLREDUCE=0) uses the backend's collectives instead."))


def _late_words(state: str) -> str:
    if state == "unknown":
        return " has not arrived"
    return f" {state_words(state)}" + ("" if state == "exited" else " and has not arrived")


def _combine(slots: torch.Tensor, op, out: torch.Tensor) -> None:
    """``out = slots[0] (+) slots[1] (+) ...`` in rank order (bit-identical on every rank)."""
    combine = torch.add if op == dist.ReduceOp.SUM else torch.maximum
    combine(slots[0], slots[1], out=out)
    for j in range(2, slots.shape[0]):
        combine(out, slots[j], out=out)


def _flag_bytes(size: int) -> int:
    return 8 * _FLAG_STRIDE * size


def _total_bytes(size: int, slot_bytes: int) -> int:
    return _flag_bytes(size) + 2 * size * slot_bytes


def create_segment(path: str, nbytes: int, token: str) -> None:
    """Create the segment file: new (never an existing file or a planted symlink), owner-only (0600).

    The ranks of a TP group run as one user; other local users must not read the activations and
    gradients that pass through it, nor swap in a file of their own before it is mapped. The
    pages are reserved now: a sparse file on a full ``/dev/shm`` (Docker's default is 64 MB) would
    map fine and then kill the process with SIGBUS on first touch. The token sits in the last
    bytes, away from the flags, for the other ranks to check that they see this very file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, nbytes)
        f.seek(nbytes - len(token))
        f.write(token.encode())


def maybe_shared_memory_all_reduce(group, backend: str, *, wanted: bool = True,
                                   slot_bytes: int = 4 << 20) -> SharedMemoryTransport | None:
    """A :class:`SharedMemoryTransport` for ``group`` when it is the faster transport, else ``None``.

    Chosen when the backend is gloo (CPU tensors), every rank ``wanted`` it (the context's
    decision, ``kernels.py``), the machine is x86-64, and every rank of the group sees the file
    rank 0 created in its ``/dev/shm`` with the same random token and the same host name (a
    node-local tmpfs: ranks on other hosts, or in containers with separate ``/dev/shm``, cannot
    see it). Collective: every rank of ``group`` must call it, wanting it or not; all ranks return
    the same kind of answer.
    """
    if group is None or backend != "gloo":
        return None
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    usable = wanted and platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")
    votes = [None] * size
    dist.all_gather_object(votes, usable, group=group)
    if not all(votes):
        return None
    offer = [None]
    if rank == 0:
        token = uuid.uuid4().hex
        path = os.path.join("/dev/shm", f"tp_trainer_allreduce_{token}")
        try:
            create_segment(path, _total_bytes(size, slot_bytes), token)
            offer[0] = (path, token, socket.gethostname())
        except OSError:  # /dev/shm full or read-only: stay on the backend
            offer[0] = None
            if os.path.exists(path) and not os.path.islink(path):
                os.unlink(path)
    dist.broadcast_object_list(offer, src=dist.get_global_rank(group, 0), group=group)
    if offer[0] is None:
        return None
    path, token, host = offer[0]
    try:
        with open(path, "rb") as f:
            f.seek(_total_bytes(size, slot_bytes) - len(token))
            visible = f.read(len(token)).decode() == token and socket.gethostname() == host
    except OSError:
        visible = False
    dist.all_gather_object(votes, (visible, process_identity()), group=group)
    # same host, same /dev/shm: the pids name the peers (checked: a pid namespace of its own shows another start time)
    peers = [identity for _, identity in votes]
    if any(peer_state(*identity) != "running" for identity in peers):
        peers = None
    reducer = SharedMemoryTransport(group, path, slot_bytes=slot_bytes, peers=peers) if all(v for v, _ in votes) \
        else None
    dist.barrier(group=group)  # everyone has mapped the file (or given up)
    if rank == 0:
        os.unlink(path)  # mappings stay valid; no file outlives the processes
    return reducer
