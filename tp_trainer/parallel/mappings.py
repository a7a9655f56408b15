"""Autograd-aware collectives of tensor parallelism (Megatron's ``f`` and ``g`` operators).

Each region function takes the TP process group explicitly; with ``group=None`` (tp 1) it
is the identity. The forward/backward pairs are the conjugates of Shoeybi et al. 2019:

====================  ==========================  ==========================
function              forward                     backward
====================  ==========================  ==========================
reduce_from_tp        all-reduce(sum)   (``g``)   identity
gather_from_tp        all-gather along dim -1     keep own chunk of dim -1
scatter_to_tp         keep own chunk of dim -1    all-gather along dim -1
gather_rows_from_tp   all-gather along dim 0      keep own chunk of dim 0
split_rows_to_tp      keep own chunk of dim 0     all-gather along dim 0
====================  ==========================  ==========================

The row pair splits the *tokens* of a replicated activation (``[N, H]``, N = batch x seq):
``norms.py`` uses it to compute a per-token norm on ``N / tp`` tokens per rank. Its backward
assumes what holds for every replicated activation in Megatron-style TP: the gradient arriving
at the gathered output is identical on every rank.

Megatron's ``f`` (identity forward, all-reduce of the input gradient backward) is folded
into the column-parallel linear itself (``layers._ColumnLinear``), which shares one
all-reduce among the layers reading the same input and overlaps it with the weight-gradient
matmul. A column-parallel linear's output stays split over the last dim or goes through
``gather_from_tp``; a row-parallel linear consumes a split input and ends with ``g``.
"""

from __future__ import annotations

import torch

from .collectives import all_gather_rows, all_reduced_copy


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over ``group`` as a new tensor (``x``, an autograd input or gradient, is untouched)."""
    if group is None:
        return x
    return all_reduced_copy(x, group)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (0 or -1)."""
    size, rank = group.size(), group.rank()  # ProcessGroup's own: the size of and the rank in the group
    if x.shape[dim] % size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the TP size {size}")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenation of the ranks' ``x`` along ``dim`` (0 or -1): one dim-0 all-gather into a single
    buffer (no list of tensors); for the last dim, moving the gathered dim to the end is one copy."""
    out = all_gather_rows(x.contiguous(), group)
    if dim == 0:
        return out
    size = group.size()
    return out.view(size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], size * x.shape[-1])


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather along ``dim``; backward: keep this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _SplitToTP(torch.autograd.Function):
    """Forward: keep this rank's chunk along ``dim``; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """``g``: sum the partial outputs of the TP ranks forward, identity backward."""
    return x if group is None else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' last-dim chunks forward; keep this rank's chunk backward."""
    return x if group is None else _GatherFromTP.apply(x, group, -1)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's last-dim chunk forward; all-gather the gradient backward."""
    return x if group is None else _SplitToTP.apply(x, group, -1)


def gather_rows_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' dim-0 chunks forward; keep this rank's chunk of the gradient backward."""
    return x if group is None else _GatherFromTP.apply(x, group, 0)


def split_rows_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's dim-0 chunk forward; all-gather the gradient backward."""
    return x if group is None else _SplitToTP.apply(x, group, 0)
