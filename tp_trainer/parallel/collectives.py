"""The collectives of the TP layers and ZeRO: one entry per operation, on the transport the group was given.

A TP group travels as a :class:`TPComm`: the process group together with the transport its
all-reduces and all-gathers take, chosen once by
:class:`~tp_trainer.parallel.context.ParallelContext` (``kernels.py``): the shared-memory
transport of ``shm.py`` for gloo ranks on one host, ``None`` (``torch.distributed``) otherwise.
The layers receive it at construction and pass it to every call; nothing here is looked up in a
table. A plain process group (ZeRO's dp group, a caller's own) is the backend.

Operations, each writing a new tensor unless said otherwise (``[n, ...]`` on each of ``tp`` ranks):

==========================  ============================================================
:func:`all_reduce`          in place: ``tensor = sum over ranks`` (gradients, norms)
:func:`all_reduced_copy`    ``sum over ranks of tensor``, ``tensor`` untouched (autograd)
:func:`all_gather_rows`     ``cat(rank 0, rank 1, ...)`` along dim 0: ``[tp n, ...]``
:func:`reduce_scatter_rows` this rank's ``n/tp`` rows of the sum: ``[n/tp, ...]``
:func:`all_gather_flat`,    ZeRO's flat buckets into pre-allocated outputs; torch 2.13 renamed
:func:`reduce_scatter_flat` ``all_gather_into_tensor``/``reduce_scatter_tensor`` to
                            ``all_gather_single``/``reduce_scatter_single`` (the old names warn)
==========================  ============================================================

**Timeouts.** Every wait is bounded by its group's timeout, the one ``torch.distributed`` gives the
group (``--ddp_timeout`` once :func:`bound_waits` has set it on the world, TP and DP groups:
accelerate's CPU path and the device mesh's subgroups otherwise keep torch's 30-minute default).
The shared-memory transport reads the same value (:func:`group_timeout_s`). A collective that
fails on the backend because a peer died (connection closed) or did not arrive in time is
re-raised as :class:`PeerFailure`, naming the operation, the group's global ranks and the peer
where the group has one other rank; the transport's own failures name the peer rank and its state.

Under ``torch.compile`` the out-of-place ones (what the mappings call in forward and backward)
dispatch to the custom operators of ``compiled_ops.py``, which take the :class:`TPComm` itself as
an opaque object; eager calls skip the operator dispatch. Profiler traces name them
``tp_trainer::all_reduce`` / ``tp_trainer::all_gather`` (``scripts/profile_step.py`` sums them).
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._opaque_base import OpaqueBase
from torch.profiler import record_function

from .peers import PEER_FAILURE_WORDS

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
DEFAULT_TIMEOUT_S = 1800.0  # torch's default for gloo groups (and ddp_timeout's default)


class PeerFailure(RuntimeError):
    """A collective could not complete because a peer rank died, stopped or never arrived; the message
    names the operation, the ranks and the timeout, and what to do."""


# ----------------------------------------------------------------------------------------- timeouts
def group_timeout_s(group) -> float:
    """The timeout ``torch.distributed`` applies to ``group``'s collectives, in seconds (a :class:`TPComm`:
    its process group's). A group without one (the estimator's simulated group) has torch's default."""
    group = group.group if isinstance(group, TPComm) else group
    try:
        backend = group._get_backend(torch.device("cpu" if _backend_name(group) == "gloo" else "cuda"))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError, ValueError):
        return DEFAULT_TIMEOUT_S


def _backend_name(group) -> str | None:
    try:
        return dist.get_backend(group)
    except (RuntimeError, ValueError, AttributeError):
        return None


def bound_waits(timeout, *groups) -> None:
    """Set ``timeout`` (seconds or a ``timedelta``; ``--ddp_timeout``) on each process group in ``groups``
    (``None`` entries and repeats skipped; collective-free). torch gives the world group the timeout
    ``init_process_group`` was called with (transformers passes none on the CPU) and every subgroup its
    30-minute default; after this a rank that died or stopped fails its peers' collectives, and the
    shared-memory transport's waits, within ``timeout``."""
    delta = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if delta.total_seconds() <= 0:
        raise ValueError(f"a collective timeout must be positive, got {delta.total_seconds()} s (set --ddp_timeout "
                         "to the longest a rank may wait for the others, in seconds)")
    seen = set()
    for group in groups:
        group = group.group if isinstance(group, TPComm) else group
        if group is None or id(group) in seen or not isinstance(group, dist.ProcessGroup):
            continue
        seen.add(id(group))
        dist.distributed_c10d._set_pg_timeout(delta, group)


def global_ranks(group) -> list[int]:
    """The global ranks of ``group`` (a :class:`TPComm` or a process group) in group-rank order."""
    group = group.group if isinstance(group, TPComm) else group
    try:
        return dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError, AttributeError):
        return list(range(group.size()))


class naming_failures:  # noqa: N801 (used as a context manager, like contextlib's lower-case ones)
    """``with naming_failures("all_reduce", group): ...`` re-raises a backend failure caused by a missing peer
    as :class:`PeerFailure` naming the operation, the group's global ranks, the peer (when the group has
    just one other rank) and the timeout. A class, not a generator: it wraps every backend collective."""

    __slots__ = ("operation", "group", "start")

    def __init__(self, operation: str, group):
        self.operation, self.group = operation, group

    def __enter__(self):
        self.start = time.monotonic()

    def __exit__(self, kind, err, tb):
        if (kind is None or not issubclass(kind, RuntimeError) or isinstance(err, PeerFailure)
                or not any(s in str(err).lower() for s in PEER_FAILURE_WORDS)):
            return False
        raise PeerFailure(describe_failure(self.operation, self.group, time.monotonic() - self.start,
                                           str(err))) from err


def describe_failure(operation: str, group, waited_s: float, cause: str) -> str:
    ranks = global_ranks(group)
    me = dist.get_rank() if dist.is_initialized() else 0
    others = [r for r in ranks if r != me]
    peer = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
    return (f"{operation} over ranks {ranks} failed on rank {me} after {waited_s:.1f} s: {peer} died, stopped or "
            f"did not reach it within the group's timeout of {group_timeout_s(group):.0f} s ({cause.strip()}). "
            "Look at that rank's log for its own error; a rank that is legitimately slower (a long save or "
            "evaluation) needs a larger --ddp_timeout.")


class TPComm(OpaqueBase):
    """A process group and the transport its collectives take (``None``: the group's backend).

    ``transport(tensor, op, out=None)`` reduces (SUM, MAX), ``transport.all_gather(tensor)`` gathers
    dim 0 (``shm.SharedMemoryTransport``, ``simulated.SimulatedTransport``). Compiled graphs carry
    it as an opaque reference (``compiled_ops.py``), so the graph calls the same object eager code does.
    """

    def __init__(self, group, transport=None):
        self.group, self.transport = group, transport

    @classmethod
    def of(cls, group) -> "TPComm | None":
        """``group`` as a :class:`TPComm`: itself if it is one, with the transport a group brings along
        (``simulated.SimulatedGroup``), else on its backend; ``None`` stays ``None`` (tp 1)."""
        if group is None or isinstance(group, TPComm):
            return group
        return cls(group, getattr(group, "transport", None))

    def size(self) -> int:
        return self.group.size()

    def rank(self) -> int:
        return self.group.rank()

    def __repr__(self) -> str:
        how = type(self.transport).__name__ if self.transport is not None else "backend"
        return f"TPComm(size={self.size()}, rank={self.rank()}, {how})"

    def __copy__(self) -> "TPComm":
        return self  # a handle on the group and its buffers: copies of a layer share them

    def __deepcopy__(self, memo) -> "TPComm":
        return self

    def all_reduced_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """Eager :func:`all_reduced_copy`. On a transport the sum is written straight into the new tensor
        (the combine reads the slots, not ``tensor``); on the backend it is ``clone()`` + in-place all-reduce."""
        with record_function("tp_trainer::all_reduce"):
            tensor = tensor.contiguous()
            if self.transport is not None:
                return self.transport(tensor, dist.ReduceOp.SUM, out=torch.empty_like(tensor))
            out = tensor.clone()
            with naming_failures("all_reduce", self.group):
                dist.all_reduce(out, group=self.group)
            return out

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Eager :func:`all_gather_rows`: one dim-0 all-gather into a single new buffer."""
        with record_function("tp_trainer::all_gather"):
            if self.transport is not None:
                return self.transport.all_gather(tensor)
            tensor = tensor.contiguous()
            out = tensor.new_empty((self.size() * tensor.shape[0], *tensor.shape[1:]))
            with naming_failures("all_gather", self.group):
                _all_gather(out, tensor, group=self.group)
            return out

    def reduce_scatter_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Eager :func:`reduce_scatter_rows`. A transport has no reduce-scatter: it all-reduces and keeps
        this rank's rows (the same bytes per rank cross shared memory; gloo's own is not faster there)."""
        size = self.size()
        if tensor.shape[0] % size:
            raise ValueError(f"reduce-scatter of {tensor.shape[0]} rows over {size} ranks: dim 0 must divide")
        with record_function("tp_trainer::reduce_scatter"):
            tensor = tensor.contiguous()
            if self.transport is not None:
                full = self.transport(tensor, dist.ReduceOp.SUM, out=torch.empty_like(tensor))
                return full.chunk(size)[self.rank()].clone()
            out = tensor.new_empty((tensor.shape[0] // size, *tensor.shape[1:]))
            with naming_failures("reduce_scatter", self.group):
                _reduce_scatter(out, tensor, op=dist.ReduceOp.SUM, group=self.group)
            return out


# torch.compile must not trace into these: the shared-memory transport is stateful Python
# (sequence numbers, slot sets) that a graph would replay wrongly. The out-of-place ones become
# custom operators when compiling; ``all_reduce`` (gradients, norms: outside the model) stays eager.
@torch.compiler.disable
def all_reduce(tensor: torch.Tensor, group, *, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place: ``tensor = op over the ranks of group of tensor``; returns ``tensor`` (contiguous input).
    ``group``: a :class:`TPComm` (its transport) or a process group (its backend)."""
    comm = TPComm.of(group)
    with record_function("tp_trainer::all_reduce"):
        if comm.transport is not None:
            return comm.transport(tensor, op)
        with naming_failures("all_reduce", comm.group):
            dist.all_reduce(tensor, op=op, group=comm.group)
        return tensor


def all_reduced_copy(tensor: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: the sum of ``tensor`` over ``group`` (a :class:`TPComm`); ``tensor`` is left as it is,
    as autograd functions need for their inputs and incoming gradients."""
    if torch.compiler.is_compiling():
        return torch.ops.tp_trainer.all_reduce_copy(tensor, group)
    return TPComm.of(group).all_reduced_copy(tensor)


def all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """A new tensor ``cat([tensor of rank 0, rank 1, ...], dim=0)`` over ``group`` (equal shapes)."""
    if torch.compiler.is_compiling():
        return torch.ops.tp_trainer.all_gather_rows(tensor, group, group.size())
    return TPComm.of(group).all_gather_rows(tensor)


def reduce_scatter_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: this rank's chunk of dim 0 of the sum of ``tensor`` over ``group``."""
    if torch.compiler.is_compiling():
        return torch.ops.tp_trainer.reduce_scatter_rows(tensor, group, group.size())
    return TPComm.of(group).reduce_scatter_rows(tensor)


def all_gather_flat(output, tensor, group) -> None:
    """``output = cat([tensor of rank 0, tensor of rank 1, ...], dim=0)`` over ``group`` (a process group)."""
    with naming_failures("all_gather", group):
        _all_gather(output, tensor, group=group)


def reduce_scatter_flat(output, tensor, group, *, op=dist.ReduceOp.SUM) -> None:
    """``output = op over ranks of tensor.chunk(size)[rank]`` over ``group`` (a process group)."""
    with naming_failures("reduce_scatter", group):
        _reduce_scatter(output, tensor, op=op, group=group)


def free_now(*tensors: torch.Tensor) -> None:
    """Free the memory of CPU ``tensors`` that a finished collective used and the caller is done with.

    gloo's work object keeps its tensors referenced until its worker thread drops it, which may be
    after the (synchronous) call has returned: 2 ranks, 200 all-reduces of a 74k-element fp32
    tensor, the storage was still alive right after ``del`` in 26-28 of them. ZeRO's transient
    buckets could then outlive their step and sit beside the next buffer, e.g. the fp32 master
    gradients, and the peak ``tp_trainer.memory`` predicts would hold only most of the time
    (bf16, ZeRO-0, dp=2 on a tiny Llama: 17% over it in those steps). Resizing the storage to 0
    frees it at once, whoever still holds it. Only the tensors' own storages (no views of
    something still in use). CUDA tensors are left to the caching allocator, whose stream
    ordering decides when NCCL's buffers may be reused.
    """
    for t in tensors:
        if t.device.type == "cpu":
            t.untyped_storage().resize_(0)


# The estimator's stand-in group lives in simulated.py; this name is kept for planner/validate.py.
from .simulated import simulated_group  # noqa: E402,F401
