"""The collectives used by the TP layers and ZeRO, named once for every torch version.

torch 2.13 renamed ``all_gather_into_tensor``/``reduce_scatter_tensor`` to
``all_gather_single``/``reduce_scatter_single`` (the old names warn). Both write into a
pre-allocated output that is the concatenation along dim 0 of the ranks' inputs.

:func:`all_reduce` (in place), :func:`all_reduced_copy` (into a new tensor) and
:func:`start_all_reduced_copy` (split-phase) are the entries for all-reduces over a TP group,
:func:`all_gather_rows` for its all-gathers. A group may be
given a faster transport with :func:`set_all_reduce_transport` (done once, by
:class:`~tp_trainer.parallel.context.ParallelContext`, for gloo groups on one host: see
``shm.py``); every other group goes through ``torch.distributed``. The table is keyed weakly
by the group object, so it holds no group alive and a destroyed group's entry disappears.

Under ``torch.compile`` the two out-of-place collectives the TP layers call in forward and
backward (:func:`all_reduced_copy`, :func:`all_gather_rows`) are custom operators,
``tp_trainer::all_reduce_copy`` and ``tp_trainer::all_gather_rows``: Dynamo records them as
opaque calls with fake kernels for the shapes, so a TP model compiles into one graph instead of
breaking it at every collective, and Inductor runs them as extern calls in the traced order (the
same program on every rank). They take the group by its name (``group.group_name``), resolved
at run time here or by c10d. Eager calls skip the operator dispatch and call the transport.

:func:`simulated_group` makes a stand-in TP group for one rank of a world that does not exist:
its collectives allocate exactly what a real rank's would and communicate nothing (the sums
are not sums). The memory estimate (``tp_trainer/memory.py``) runs the TP layers of rank 0 on
``meta`` tensors with it, so that the simulated step allocates what a real rank's does.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.profiler import record_function

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_transports: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# torch.compile (``--torch_compile``) must not trace into the TP collectives: the shared-memory
# transport is stateful Python (sequence numbers, slot sets) that a graph would replay wrongly
# (it did: a traced all-gather copied mismatched slots). The ones the TP layers call go through
# custom operators when compiling (see the module docstring); the others run eagerly between graphs.
_opaque_to_compile = torch.compiler.disable
_named_groups: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # the groups c10d cannot resolve


def set_all_reduce_transport(group, transport) -> None:
    """Route the all-reduces on ``group`` through ``transport(tensor, op, out=None)`` and :func:`all_gather_rows`
    through ``transport.all_gather(tensor)`` (``None``: the backend)."""
    if transport is None:
        _transports.pop(group, None)
    else:
        _transports[group] = transport
        _named_groups[group.group_name] = group


def all_reduce_transport(group):
    """The transport :func:`all_reduce` uses for ``group`` (``None``: ``torch.distributed``)."""
    return _transports.get(group) if group is not None else None


class SimulatedGroup:
    """What the TP layers ask of a process group (``size()``, ``rank()``, ``group_name``), for
    :func:`simulated_group`."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank
        self.group_name = f"tp_trainer_simulated_{id(self):x}"

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class _SimulatedTransport:
    """All-reduce: the input copied to the output; all-gather: ``size`` copies of the input, concatenated."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, *, out: torch.Tensor | None = None) -> torch.Tensor:
        return tensor if out is None else out.copy_(tensor)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous().repeat(self.size, *([1] * (tensor.dim() - 1)))


def simulated_group(size: int, rank: int = 0) -> SimulatedGroup:
    """A :class:`SimulatedGroup` of ``size`` ranks seen from ``rank``, with its collectives routed through a
    transport that allocates like the shared-memory one and moves no data (see the module docstring)."""
    group = SimulatedGroup(size, rank)
    set_all_reduce_transport(group, _SimulatedTransport(size))
    return group


@_opaque_to_compile
def all_reduce(tensor: torch.Tensor, group, *, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place: ``tensor = op over the ranks of group of tensor``; returns ``tensor`` (contiguous input).

    Named ``tp_trainer::all_reduce`` in profiler traces (scripts/profile_step.py sums it).
    """
    with record_function("tp_trainer::all_reduce"):
        transport = _transports.get(group)
        if transport is not None:
            return transport(tensor, op)
        dist.all_reduce(tensor, op=op, group=group)
        return tensor


def all_reduced_copy(tensor: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: the sum of ``tensor`` over ``group``; ``tensor`` is left as it is.

    For autograd functions, whose inputs and incoming gradients must not be modified. On the
    shared-memory transport the sum is written straight into the new tensor (no extra copy of
    ``tensor``); on the backend it is ``clone()`` + in-place all-reduce.
    """
    if torch.compiler.is_compiling():
        return torch.ops.tp_trainer.all_reduce_copy(tensor, group.group_name)
    return _all_reduced_copy(tensor, group)


def _all_reduced_copy(tensor: torch.Tensor, group) -> torch.Tensor:
    with record_function("tp_trainer::all_reduce"):
        tensor = tensor.contiguous()
        transport = _transports.get(group)
        if transport is not None:
            return transport(tensor, dist.ReduceOp.SUM, out=torch.empty_like(tensor))
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out


class _BackendPending:
    """``start_all_reduced_copy`` on ``torch.distributed`` (gloo, NCCL): an ``async_op`` all-reduce.
    On NCCL it runs on its own stream, so work issued before ``wait()`` truly overlaps it."""

    def __init__(self, out: torch.Tensor, work):
        self._out, self._work = out, work

    def wait(self) -> torch.Tensor:
        with record_function("tp_trainer::all_reduce"):
            self._work.wait()
        return self._out


class _Done:
    def __init__(self, out: torch.Tensor):
        self._out = out

    def wait(self) -> torch.Tensor:
        return self._out


@_opaque_to_compile
def start_all_reduced_copy(tensor: torch.Tensor, group):
    """Begin :func:`all_reduced_copy`; returns a handle whose ``wait()`` gives the sum.

    Between the two calls the caller may compute but must issue no other collective on
    ``group`` and must not modify ``tensor``: the TP backward overlaps the input-gradient
    all-reduce with the weight-gradient matmul this way (``layers.py``).
    """
    if _transports.get(group) is not None:
        # The shared-memory transport moves the bytes with this rank's own CPU, so there is
        # no transfer to hide, and a matmul between a publish and its combine evicts the
        # slots from cache: a split-phase version measured 8 ms slower per fp32 benchmark step
        # (in-process A/B, alternating steps). So it reduces at once (traced there, once).
        return _Done(all_reduced_copy(tensor, group))
    with record_function("tp_trainer::all_reduce"):
        out = tensor.contiguous().clone()
        return _BackendPending(out, dist.all_reduce(out, group=group, async_op=True))


def all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """A new tensor ``cat([tensor of rank 0, rank 1, ...], dim=0)`` over ``group`` (equal shapes).

    Named ``tp_trainer::all_gather`` in profiler traces.
    """
    if torch.compiler.is_compiling():
        return torch.ops.tp_trainer.all_gather_rows(tensor, group.group_name, group.size())
    return _all_gather_rows(tensor, group)


def _all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    with record_function("tp_trainer::all_gather"):
        transport = _transports.get(group)
        if transport is not None:
            return transport.all_gather(tensor)
        tensor = tensor.contiguous()
        out = torch.empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        all_gather_flat(out, tensor, group)
        return out


def _group_named(name: str):
    group = _named_groups.get(name)
    return group if group is not None else dist.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("tp_trainer::all_reduce_copy", mutates_args=())
def _all_reduce_copy_op(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    """:func:`all_reduced_copy` as an operator for compiled graphs."""
    return _all_reduced_copy(tensor, _group_named(group_name))


@_all_reduce_copy_op.register_fake
def _(tensor, group_name):
    return tensor.new_empty(tensor.shape)


@torch.library.custom_op("tp_trainer::all_gather_rows", mutates_args=())
def _all_gather_rows_op(tensor: torch.Tensor, group_name: str, group_size: int) -> torch.Tensor:
    """:func:`all_gather_rows` as an operator for compiled graphs."""
    return _all_gather_rows(tensor, _group_named(group_name))


@_all_gather_rows_op.register_fake
def _(tensor, group_name, group_size):
    return tensor.new_empty((group_size * tensor.shape[0], *tensor.shape[1:]))


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


def all_gather_flat(output, tensor, group) -> None:
    """``output = cat([tensor of rank 0, tensor of rank 1, ...], dim=0)`` over ``group``."""
    _all_gather(output, tensor, group=group)


def reduce_scatter_flat(output, tensor, group, *, op=dist.ReduceOp.SUM) -> None:
    """``output = op over ranks of tensor.chunk(size)[rank]`` over ``group``."""
    _reduce_scatter(output, tensor, op=op, group=group)
