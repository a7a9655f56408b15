"""Who the other ranks are, and what became of one that stopped answering.

A collective that fails because a peer is gone says little: gloo reports ``Timed out waiting
30000ms for recv operation`` or ``Connection closed by peer [127.0.0.1]:41234``, naming neither
the rank nor the operation. This module supplies both:

* :func:`gather_identities` (collective, once, on the world group): every rank's host, pid and
  process start time (``/proc/PID/stat`` field 22, which tells a reused pid apart);
* :func:`peer_state`: for a rank on this host, ``running``, ``stopped`` (SIGSTOP, a debugger) or
  ``exited`` (gone, a zombie, its pid reused), from ``/proc``; ranks on other hosts cannot be seen;
* :func:`failed_collective`: from an exception's traceback, the ``torch.distributed`` operation
  that failed and the first caller outside ``torch``, when the error has the backend's words for
  a missing peer;
* :func:`describe_peers`: one line for the given ranks (their state, or their host).

No collective is issued once a failure is being described: the peers may be stopped.
"""

from __future__ import annotations

import os
import socket
import traceback

# how the backends word a peer that is gone or late (gloo: "Timed out waiting 30000ms for recv operation",
# "Connection closed by peer", "Connection reset by peer"; NCCL: "Watchdog caught collective operation timeout")
PEER_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")
_STATE_WORDS = {"exited": "has exited", "stopped": "is stopped (SIGSTOP or a debugger)", "running": "is running",
                "unknown": "is in an unknown state"}


def process_identity(pid: int | None = None) -> tuple[int, int | None]:
    """``(pid, start time in clock ticks since boot)`` of a process (``None``: no ``/proc`` record)."""
    pid = os.getpid() if pid is None else pid
    return pid, _proc_stat(pid)[1]


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state letter, start time) from ``/proc/PID/stat``; ``(None, None)`` when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    except OSError:
        return None, None
    return fields[0], int(fields[19])  # field 3 (state) and field 22 (starttime) of proc(5)


def peer_state(pid: int, start: int | None) -> str:
    """``"exited"`` (gone, a zombie, or its pid reused), ``"stopped"``, ``"running"``, or ``"unknown"``
    (no ``/proc`` record of it when its identity was taken)."""
    if start is None:
        return "unknown"
    state, now_start = _proc_stat(pid)
    if state is None or state in "ZXx" or now_start != start:
        return "exited"
    return "stopped" if state in "Tt" else "running"


def state_words(state: str) -> str:
    return _STATE_WORDS[state]


def gather_identities(group=None) -> list[tuple[str, int, int | None]]:
    """``(host, pid, start)`` of every rank of ``group`` (default: the world), in rank order. Collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [(socket.gethostname(), *process_identity())]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, (socket.gethostname(), *process_identity()), group=group)
    return out


def describe_peers(identities, ranks, me: int) -> str:
    """``rank 1 (pid 42) is stopped (SIGSTOP or a debugger); rank 2 on host b (not visible from here)``."""
    host = socket.gethostname()
    parts = []
    for r in ranks:
        if r == me or r >= len(identities):
            continue
        peer_host, pid, start = identities[r]
        if peer_host != host:
            parts.append(f"rank {r} on host {peer_host} (not visible from here)")
        else:
            parts.append(f"rank {r} (pid {pid}) {state_words(peer_state(pid, start))}")
    return "; ".join(parts)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) has the backend's words for a missing peer."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RuntimeError) and any(w in str(err).lower() for w in PEER_FAILURE_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def failed_collective(err: BaseException) -> str | None:
    """``"all_gather (torch.distributed), called from transformers/trainer_pt_utils.py:123 in distributed_concat"``
    for a peer failure raised inside ``torch.distributed``; ``None`` for anything else."""
    if not is_peer_failure(err):
        return None
    frames = traceback.extract_tb(err.__traceback__)
    op, caller = None, None
    for i, frame in enumerate(frames):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/distributed/" in path and frame.name not in ("wrapper", "__exit__"):
            op = op or frame.name
            outside = [f for f in frames[:i] if "/torch/" not in f.filename.replace(os.sep, "/")]
            if outside and caller is None:
                caller = outside[-1]
    if op is None:
        return None
    if caller is None:
        return f"{op} (torch.distributed)"
    short = "/".join(caller.filename.replace(os.sep, "/").split("/")[-2:])
    return f"{op} (torch.distributed), called from {short}:{caller.lineno} in {caller.name}"
