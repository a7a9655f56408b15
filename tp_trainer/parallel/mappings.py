"""Megatron's mappings: the autograd-aware collectives of tensor parallelism, and nothing else.

Each is an autograd Function whose backward is the conjugate of its forward (Shoeybi et al. 2019:
``f`` and ``g``; Korthikanti et al. 2022: the sequence-parallel pair), with a public wrapper that
takes the TP group (a :class:`~tp_trainer.parallel.collectives.TPComm`) explicitly; with
``group=None`` (tp 1) every wrapper is the identity. ``layers.py`` and ``norms.py`` are built only
on these wrappers. Shapes for ``tp`` ranks:

=============================================  ==============================  =============================
wrapper                                        forward                         backward
=============================================  ==============================  =============================
:func:`copy_to_tp_region` (``f``)              identity                        all-reduce (sum)
:func:`reduce_from_tp_region` (``g``)          all-reduce (sum)                identity
:func:`gather_from_tp_region`                  all-gather dim -1: ``[.., tp h]``  keep own chunk of dim -1
:func:`scatter_to_tp_region`                   keep own chunk of dim -1        all-gather dim -1
:func:`scatter_to_sequence_parallel_region`    keep own chunk of ``dim``       all-gather ``dim``
:func:`gather_from_sequence_parallel_region`   all-gather ``dim``: ``tp n``    reduce-scatter ``dim``, or keep
                                                                               own chunk (``replicated_grad``)
:func:`reduce_scatter_to_sequence_parallel_region`  reduce-scatter ``dim``     all-gather ``dim``
=============================================  ==============================  =============================

``f`` goes where a replicated activation enters column-parallel layers: each rank's layers produce
the part of ``dL/dx`` that comes from its output columns, and the all-reduce in ``f``'s backward
sums the parts. Where several column-parallel layers read one activation (q/k/v, gate/up, GPT-J's
attention and MLP on one normed input), :func:`copy_to_tp_region_once` gives them all the same
``f`` node, memoised on the input tensor: autograd adds their partial gradients into that node's
input buffer, and one all-reduce serves all of them (in eager and compiled mode alike).

The sequence wrappers take the token dim (``dim``: 0 of ``[N, H]``, the default; 1 of ``[B, S, H]``).
The pair without a reduction (``scatter_to_sequence_parallel_region`` and
``gather_from_sequence_parallel_region(..., replicated_grad=True)``) splits the *tokens* of a
replicated activation: ``norms.py`` computes a per-token norm on ``N / tp`` rows per rank that way.
Its backward relies on what holds for every replicated activation in Megatron-style TP: the
gradient arriving at the gathered output is the same on every rank, so keeping this rank's rows of
it is exact. Sequence parallelism (``sequence.py``: activations split along the sequence between the
TP regions) uses the reducing pair: the all-gather before the column-parallel layers, whose
backward reduce-scatters their partial input gradients in place of ``f``'s all-reduce, and the
reduce-scatter in place of the row-parallel layers' ``g``.
"""

from __future__ import annotations

import torch

from .collectives import all_gather_rows, all_reduced_copy, reduce_scatter_rows


# ------------------------------------------------------------------------------ tensor-level helpers
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over ``group`` as a new tensor (``x``, an autograd input or gradient, is untouched)."""
    return all_reduced_copy(x, group)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim``."""
    size, rank = group.size(), group.rank()
    if x.shape[dim] % size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the TP size {size}")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenation of the ranks' ``x`` along ``dim``: one dim-0 all-gather into a single buffer (no list
    of tensors); for another dim, moving the gathered dim into place is one copy (none when the dims
    before ``dim`` have size 1, e.g. dim 1 of a ``[1, s, h]`` batch)."""
    out = all_gather_rows(x.contiguous(), group)
    dim = dim % x.dim()
    if dim == 0:
        return out
    size = group.size()
    full = out.view(size, *x.shape).movedim(0, dim).reshape(*x.shape[:dim], size * x.shape[dim], *x.shape[dim + 1:])
    # where no copy was needed it is a view of the buffer: detached (same storage, no autograd view), the
    # callers' callers may modify it in place
    return full.detach()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk along ``dim`` of the sum of ``x`` over the ranks: one dim-0 reduce-scatter of ``x``
    with the chunks of ``dim`` moved to the front (a copy unless the dims before ``dim`` have size 1)."""
    dim = dim % x.dim()
    if dim == 0:
        return reduce_scatter_rows(x.contiguous(), group)
    size, shape = group.size(), list(x.shape)
    if shape[dim] % size:
        raise ValueError(f"dim {dim} of size {shape[dim]} is not divisible by the TP size {size}")
    chunks = x.reshape(*shape[:dim], size, shape[dim] // size, *shape[dim + 1:]).movedim(dim, 0).contiguous()
    # [size * d0, d1, .., n, ..] -> this rank's [d0, d1, .., n, ..]: already the chunk's shape
    return reduce_scatter_rows(chunks.view(size * shape[0], *chunks.shape[2:]), group)


# ------------------------------------------------------------------------------ autograd functions
class _CopyToTPRegion(torch.autograd.Function):
    """``f``. Forward: identity; backward: all-reduce (sum) of the input gradient.

    The forward returns ``x.detach()``, which shares ``x``'s storage and version counter but is no
    autograd view of it: the memo of :func:`copy_to_tp_region_once` may then hold it on ``x``
    without a reference cycle through a view's base (which Python's collector cannot see)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """``g``. Forward: all-reduce (sum) of the ranks' partial outputs; backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTPRegion(torch.autograd.Function):
    """Forward: all-gather along ``dim``; backward: keep this rank's chunk of the gradient along ``dim``."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _ScatterToTPRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk along ``dim``; backward: all-gather the gradient along ``dim``."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather along ``dim``; backward: reduce-scatter along ``dim`` (each rank's gradient is a
    partial sum, as after column-parallel layers)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: reduce-scatter along ``dim`` (sum the partial outputs, keep this rank's chunk);
    backward: all-gather the gradient along ``dim``."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


# ------------------------------------------------------------------------------ public wrappers
def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """``f``: identity forward, all-reduce of the gradient backward."""
    return x if group is None else _CopyToTPRegion.apply(x, group)


def copy_to_tp_region_once(x: torch.Tensor, group) -> torch.Tensor:
    """``f(x)``, one node for every caller that passes the same tensor ``x`` and ``group``.

    The sibling column-parallel layers reading one activation (q/k/v) call this: their partial
    input gradients meet at the one ``f`` node, which autograd sums before its single all-reduce.
    An input all-gathered along the sequence by a reducing region entry (``sequence.py``) gets no
    ``f``: that gather's backward reduce-scatters the partial gradients instead.
    The memo lives on ``x`` (``x._tp_copy``) and dies with it; Dynamo traces it like any attribute
    of an intermediate tensor, so compiled graphs get the same single node. A tensor that refuses
    attributes (some subclasses) gets one ``f`` per caller: the same gradient, one all-reduce each.
    """
    if group is None or getattr(x, "_tp_sequence_gathered", None) is not None:  # sequence.py: the gather's
        return x                                                                  # backward reduces instead
    memo = getattr(x, "_tp_copy", None)
    if memo is not None and memo[0] is group:
        return memo[1]
    fx = _CopyToTPRegion.apply(x, group)
    try:
        x._tp_copy = (group, fx)
    except (AttributeError, TypeError):
        pass
    return fx


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """``g``: sum the partial outputs of the TP ranks forward, identity backward."""
    return x if group is None else _ReduceFromTPRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' last-dim chunks forward; keep this rank's chunk of the gradient backward."""
    return x if group is None else _GatherFromTPRegion.apply(x, group, -1)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's last-dim chunk forward; all-gather the gradient backward."""
    return x if group is None else _ScatterToTPRegion.apply(x, group, -1)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, *, dim: int = 0) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` (its tokens: dim 0 of ``[N, H]``, dim 1 of ``[B, S, H]``) forward;
    all-gather the gradient backward."""
    return x if group is None else _ScatterToTPRegion.apply(x, group, dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, *, dim: int = 0,
                                         replicated_grad: bool = False) -> torch.Tensor:
    """Concatenate the ranks' chunks of ``dim`` forward. Backward: reduce-scatter the gradient (it is a partial
    sum on each rank), or with ``replicated_grad`` keep this rank's chunk (it is the same on every rank)."""
    if group is None:
        return x
    if replicated_grad:
        return _GatherFromTPRegion.apply(x, group, dim)
    return _GatherFromSequenceParallelRegion.apply(x, group, dim)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, *, dim: int = 0) -> torch.Tensor:
    """Sum the ranks' partial outputs and keep this rank's chunk of ``dim`` forward; all-gather the gradient
    backward."""
    return x if group is None else _ReduceScatterToSequenceParallelRegion.apply(x, group, dim)


def gather_along(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The all-gather of ``x`` along ``dim`` as a plain tensor op, outside autograd (a backward that needs
    the gathered input again: ``sequence.py``'s column layers keep only their chunk of it)."""
    return x if group is None else _gather(x, group, dim)


class _CopyToTPRegionMany(torch.autograd.Function):
    """``f`` for several tensors at once. Forward: identity on each; backward: their gradients
    all-reduced, concatenated into one all-reduce per dtype and device."""

    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        ctx.set_materialize_grads(False)
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        out: list[torch.Tensor | None] = list(grads)
        by_dtype: dict[tuple, list[int]] = {}
        for i, g in enumerate(grads):
            if g is not None:
                by_dtype.setdefault((g.dtype, g.device), []).append(i)
        for idx in by_dtype.values():
            if len(idx) == 1:
                out[idx[0]] = _all_reduce(grads[idx[0]], ctx.group)
                continue
            flat = _all_reduce(torch.cat([grads[i].reshape(-1) for i in idx]), ctx.group)
            offset = 0
            for i in idx:
                n = grads[i].numel()
                out[i] = flat[offset:offset + n].view_as(grads[i])
                offset += n
        return (None, *out)


def copy_to_tp_region_many(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """``f`` applied to each of ``tensors`` by one node, so that their gradients are reduced together
    (MoE experts: the hidden states and the routing weights, ``experts.py``)."""
    if group is None or not tensors:
        return list(tensors)
    return list(_CopyToTPRegionMany.apply(group, *tensors))


# The names the MoE code used before the Megatron names; kept for code written against them.
reduce_from_tp = reduce_from_tp_region
