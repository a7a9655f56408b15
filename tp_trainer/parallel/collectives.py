"""The collectives used by the TP layers and ZeRO, named once for every torch version.

torch 2.13 renamed ``all_gather_into_tensor``/``reduce_scatter_tensor`` to
``all_gather_single``/``reduce_scatter_single`` (the old names warn). Both write into a
pre-allocated output that is the concatenation along dim 0 of the ranks' inputs.

:func:`all_reduce` is the one entry for in-place all-reduces over a TP group. A group may be
given a faster transport with :func:`set_all_reduce_transport` (done once, by
:class:`~tp_trainer.parallel.context.ParallelContext`, for gloo groups on one host: see
``shm.py``); every other group goes through ``torch.distributed``. The table is keyed weakly
by the group object, so it holds no group alive and a destroyed group's entry disappears.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.profiler import record_function

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_transports: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_all_reduce_transport(group, transport) -> None:
    """Route :func:`all_reduce` on ``group`` through ``transport(tensor, op)`` and :func:`all_gather_rows`
    through ``transport.all_gather(tensor)`` (``None``: the backend)."""
    if transport is None:
        _transports.pop(group, None)
    else:
        _transports[group] = transport


def all_reduce_transport(group):
    """The transport :func:`all_reduce` uses for ``group`` (``None``: ``torch.distributed``)."""
    return _transports.get(group) if group is not None else None


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


def all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """A new tensor ``cat([tensor of rank 0, rank 1, ...], dim=0)`` over ``group`` (equal shapes).

    Named ``tp_trainer::all_gather`` in profiler traces.
    """
    with record_function("tp_trainer::all_gather"):
        transport = _transports.get(group)
        if transport is not None:
            return transport.all_gather(tensor)
        tensor = tensor.contiguous()
        out = torch.empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        all_gather_flat(out, tensor, group)
        return out


def all_gather_flat(output, tensor, group) -> None:
    """``output = cat([tensor of rank 0, tensor of rank 1, ...], dim=0)`` over ``group``."""
    _all_gather(output, tensor, group=group)


def reduce_scatter_flat(output, tensor, group, *, op=dist.ReduceOp.SUM) -> None:
    """``output = op over ranks of tensor.chunk(size)[rank]`` over ``group``."""
    _reduce_scatter(output, tensor, op=op, group=group)
