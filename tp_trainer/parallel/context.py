"""The process layout of a run: a ``dp x tp`` mesh, built in exactly one place.

Ranks are laid out row-major over ``(dp, tp)``: the TP group of global rank ``r`` is the
contiguous block ``[r // tp * tp, r // tp * tp + tp)`` (tensor-parallel traffic is the
heaviest, so it stays inside a node), and the DP group of ``r`` holds the ranks with the
same ``tp_rank``: ``{tp_rank, tp_rank + tp, tp_rank + 2 tp, ...}``.

Example, world 4, tp 2::

    tp groups: [0, 1], [2, 3]        dp groups: [0, 2], [1, 3]

The device and the backend are chosen here and nowhere else: NCCL on CUDA, gloo on CPU. So are
the kernels and transports beyond stock PyTorch (``kernels.py``: decided from the device, the
backend and the user's ``cpu_kernels`` flag, then narrowed to what the machine grants), among
them the TP group's transport: ``tp_comm`` is the TP group with it (``collectives.TPComm``; the
shared-memory transport of ``shm.py`` for gloo ranks on one host). Every other module receives
the :class:`ParallelContext` (or its ``tp_comm``, or one of its groups) as an argument; there is
no module-level state.
"""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .collectives import TPComm, bound_waits
from .host import keep_freed_memory_in_heap
from .kernels import Kernels, choose_kernels
from .shm import maybe_shared_memory_all_reduce


def default_device_and_backend(*, use_cpu: bool = False) -> tuple[torch.device, str]:
    """``(cuda:LOCAL_RANK, "nccl")`` when CUDA is present and not declined (``use_cpu``, the Trainer's
    ``--use_cpu``), ``(cpu, "gloo")`` otherwise."""
    if torch.cuda.is_available() and not use_cpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl"
    return torch.device("cpu"), "gloo"


def _destroy_process_group_at_exit(backend: str) -> None:
    """Let gloo's worker threads go idle, then tear the process groups down, before interpreter shutdown.

    A gloo worker thread destroys each finished collective itself, and dropping the work's
    tensors needs the GIL. If the interpreter is already finalizing (e.g. right after the
    Trainer's last ``store_flos`` all-gather), CPython ends that thread with a forced unwind
    through a C++ ``noexcept`` frame: ``terminate called without an active exception``,
    SIGABRT, and torchrun reports a finished run as failed (seen in ~1 of 4 short runs on 2
    cores, core dump: ``~AsyncAllgatherWork -> decref -> take_gil -> pthread_exit``). Releasing
    the GIL for a moment here lets those threads finish first.
    """
    if backend == "gloo":  # also when the script destroyed the groups itself: their threads live on
        time.sleep(0.2)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_layout(world_size: int, tp_size: int) -> int:
    """Validate ``tp_size`` against the world and return ``dp_size``; raises before any work."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}.")
    if world_size % tp_size != 0:
        raise ValueError(
            f"world_size={world_size} is not divisible by tp_size={tp_size}: the dp x tp mesh needs "
            f"world_size = dp_size * tp_size. Launch a multiple of {tp_size} processes "
            f"(e.g. --nproc-per-node {tp_size * max(1, world_size // tp_size)}) or pick a tp_size that divides {world_size}."
        )
    return world_size // tp_size


@dataclass(frozen=True)
class ParallelContext:
    """Ranks, groups, device, backend and kernel choices of one process in the ``dp x tp`` mesh.

    ``tp_group``/``dp_group`` are ``None`` when the corresponding size is 1 (no collective is
    ever issued on a trivial group), so single-process code paths stay free of
    ``torch.distributed``. ``tp_comm`` is ``tp_group`` with the transport its TP collectives take
    (what the TP layers and the TP gradient sums are given); ``kernels`` what the run uses
    (:class:`~tp_trainer.parallel.kernels.Kernels`). Left out, both are derived from the other
    fields: ``tp_comm`` from ``tp_group`` (a group that brings its own transport, such as the
    estimator's ``simulated.SimulatedGroup``, keeps it), ``kernels`` by ``choose_kernels`` for the
    device and backend, with the shared-memory transport where ``tp_comm`` has a transport and no
    allocator setting (only :meth:`from_environment` applies that).
    """

    tp_size: int = 1
    dp_size: int = 1
    rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    mesh: object | None = None
    tp_comm: TPComm | None = None
    kernels: Kernels | None = None

    def __post_init__(self):
        if self.tp_comm is None and self.tp_group is not None:
            object.__setattr__(self, "tp_comm", TPComm.of(self.tp_group))
        if self.kernels is None:
            shm = self.tp_comm is not None and self.tp_comm.transport is not None
            kernels = choose_kernels(self.device, self.backend).granted(shm_all_reduce=shm, malloc_tuning=False)
            object.__setattr__(self, "kernels", kernels)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this process's TP group, in tp-rank order."""
        base = self.dp_rank * self.tp_size
        return list(range(base, base + self.tp_size))

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks of this process's DP group, in dp-rank order."""
        return [self.tp_rank + d * self.tp_size for d in range(self.dp_size)]

    @classmethod
    def single(cls) -> "ParallelContext":
        device, backend = default_device_and_backend()
        return cls(device=device, backend=backend)

    @classmethod
    def from_environment(cls, tp_size: int, *, timeout=None, use_cpu: bool = False,
                         cpu_kernels: str = "auto") -> "ParallelContext":
        """Build the mesh over the default process group, initialising it if needed, and decide the
        kernels (``cpu_kernels``: ``"auto"`` or ``"off"``, see ``kernels.py``).

        Under ``torchrun``/``accelerate launch`` the environment (``RANK``, ``WORLD_SIZE``, ...)
        describes the world; without it the world is this single process.
        """
        device, backend = default_device_and_backend(use_cpu=use_cpu)
        kernels = choose_kernels(device, backend, cpu_kernels)
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        dp_size = check_layout(world_size, tp_size)
        # host.py: no page faults on re-allocated activations
        kernels = kernels.granted(malloc_tuning=kernels.malloc_tuning and keep_freed_memory_in_heap())
        if world_size == 1:
            return cls(device=device, backend=backend, kernels=kernels.granted(shm_all_reduce=False))
        if not dist.is_initialized():
            kwargs = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group(backend=backend, **kwargs)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        atexit.unregister(_destroy_process_group_at_exit)  # once per process, however many contexts
        atexit.register(_destroy_process_group_at_exit, backend)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dp_size, tp_size), mesh_dim_names=("dp", "tp"))
        rank = dist.get_rank()
        tp_group = mesh.get_group("tp") if tp_size > 1 else None
        if timeout is not None:  # torch gives subgroups (and gloo's world) its 30-minute default otherwise
            bound_waits(timeout, dist.group.WORLD, tp_group, mesh.get_group("dp") if dp_size > 1 else None)
        # gloo on one host: the TP activation all-reduces go through shared memory (shm.py). Every TP
        # rank takes part in the vote, also one that does not want it: the group agrees or stays on gloo.
        transport = (maybe_shared_memory_all_reduce(tp_group, dist.get_backend(), wanted=kernels.shm_all_reduce)
                     if tp_group is not None else None)
        return cls(
            tp_size=tp_size,
            dp_size=dp_size,
            rank=rank,
            tp_rank=rank % tp_size,
            dp_rank=rank // tp_size,
            tp_group=tp_group,
            dp_group=mesh.get_group("dp") if dp_size > 1 else None,
            world_group=dist.group.WORLD,
            device=device,
            backend=dist.get_backend(),
            mesh=mesh,
            tp_comm=TPComm(tp_group, transport) if tp_group is not None else None,
            kernels=kernels.granted(shm_all_reduce=transport is not None),
        )

    def describe(self) -> str:
        shm = " + shared-memory TP all-reduce" if self.kernels.shm_all_reduce else ""
        return (
            f"world={self.world_size} = dp {self.dp_size} x tp {self.tp_size} ({self.backend}{shm}, {self.device.type}); "
            f"rank {self.rank}: tp_rank {self.tp_rank} of {self.tp_ranks}, dp_rank {self.dp_rank} of {self.dp_ranks}"
        )
