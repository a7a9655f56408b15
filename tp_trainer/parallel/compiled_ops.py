"""The TP collectives as custom operators, so that ``torch.compile`` keeps a TP model in one graph.

Dynamo cannot trace into a collective: the shared-memory transport is stateful Python (sequence
numbers, slot sets) that a graph would replay wrongly (it did: a traced all-gather copied
mismatched slots), and a disabled function breaks the graph at every call (the benchmark
model's tp=2 step broke 41 times). The three out-of-place collectives the mappings call in
forward and backward are registered here as operators:

==================================================  ==========================================
``tp_trainer::all_reduce_copy(x, comm)``            ``TPComm.all_reduced_copy``, shape of ``x``
``tp_trainer::all_gather_rows(x, comm, size)``      ``TPComm.all_gather_rows``, ``[size n, ...]``
``tp_trainer::reduce_scatter_rows(x, comm, size)``  ``TPComm.reduce_scatter_rows``, ``[n/size, ...]``
==================================================  ==========================================

Dynamo records each as one opaque call, with the fake kernels below for the shapes, and Inductor
runs them as extern calls in the traced order (the same program on every rank). ``comm``, the
:class:`~tp_trainer.parallel.collectives.TPComm` the layers hold, is registered as an opaque
*reference* type: a graph takes it as an input and hands the very object to the operator, so the
compiled call reaches the transport the context chose, with no table to look it up in. ``size``
is given as an integer because fake kernels cannot call into the object. Importing this module
registers them (``tp_trainer/parallel/__init__.py`` does, before any layer exists).
"""

from __future__ import annotations

import torch
from torch._library.opaque_object import MemberType, register_opaque_type

from .collectives import TPComm

# Dynamo reads size() and rank() (the mappings' chunking) from the real object at trace time
register_opaque_type(TPComm, typ="reference", members={"size": MemberType.USE_REAL, "rank": MemberType.USE_REAL})


@torch.library.custom_op("tp_trainer::all_reduce_copy", mutates_args=())
def all_reduce_copy_op(tensor: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """:func:`~tp_trainer.parallel.collectives.all_reduced_copy` as an operator for compiled graphs."""
    return comm.all_reduced_copy(tensor)


@all_reduce_copy_op.register_fake
def _(tensor, comm):
    return tensor.new_empty(tensor.shape)


@torch.library.custom_op("tp_trainer::all_gather_rows", mutates_args=())
def all_gather_rows_op(tensor: torch.Tensor, comm: TPComm, size: int) -> torch.Tensor:
    """:func:`~tp_trainer.parallel.collectives.all_gather_rows` as an operator for compiled graphs."""
    return comm.all_gather_rows(tensor)


@all_gather_rows_op.register_fake
def _(tensor, comm, size):
    return tensor.new_empty((size * tensor.shape[0], *tensor.shape[1:]))


@torch.library.custom_op("tp_trainer::reduce_scatter_rows", mutates_args=())
def reduce_scatter_rows_op(tensor: torch.Tensor, comm: TPComm, size: int) -> torch.Tensor:
    """:func:`~tp_trainer.parallel.collectives.reduce_scatter_rows` as an operator for compiled graphs."""
    return comm.reduce_scatter_rows(tensor)


@reduce_scatter_rows_op.register_fake
def _(tensor, comm, size):
    return tensor.new_empty((tensor.shape[0] // size, *tensor.shape[1:]))
