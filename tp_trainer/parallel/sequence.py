"""Sequence parallelism (Korthikanti et al. 2022): between the TP regions, activations are split along the sequence.

Without it, what a block computes outside attention and MLP (norms, dropout, residual adds) runs on
replicated activations: every TP rank holds and computes all ``B x S`` tokens. With it, TP rank
``r`` holds tokens ``[r s, (r+1) s)`` of every sequence, ``s = S_pad / tp`` (``S_pad``: ``S``
rounded up to a multiple of ``tp``; the padding rows are zeros, and are dropped wherever the full
sequence is rebuilt). Hidden states ``[B, S, H]``, the hooks that do it and their autograd pairs
(``mappings.py``):

==========================================  ==========================================  ==========================
where                                       forward                                     backward
==========================================  ==========================================  ==========================
stack entry: first block (pre-hook)         ``x_r = chunk r of pad(x)``: ``[B, s, H]``  all-gather
region entry: attention, MLP (pre-hook)     ``x = all-gather(x_r)[:, :S]``              reduce-scatter (in place
                                                                                        of ``f``'s all-reduce)
row-parallel output (``RowParallelLinear``)  ``y_r = chunk r of sum over ranks of pad(y)``  all-gather (in place
                                                                                        of ``g``'s identity)
stack exit: final norm or last block (post)  ``y = all-gather(y_r)[:, :S]``             keep own chunk
==========================================  ==========================================  ==========================

Per region, ``g``'s all-reduce becomes a reduce-scatter plus an all-gather, the same bytes on a ring,
and so does ``f``'s in backward. What changes is memory: what the norms, dropout and residual
adds keep for backward shrinks ``tp`` times (``tp_trainer/memory.py`` counts it per layer).

**Column-parallel layers keep only their chunk.** A column-parallel layer reading the gathered
input would keep all of ``[B, S, H]`` for its weight gradient. As in Megatron it keeps ``x_r`` and
all-gathers it again in backward, once for all the layers reading one input (q/k/v, gate/up share
the re-gathered tensor, dropped after the last of them). Their input gradients are partial sums,
which the entry's reduce-scatter reduces, so they apply no ``f``: the gathered tensor carries the
:class:`Regather` they read (``_tp_sequence_gathered``). Under ``torch.compile`` the entry takes
the replicate mode below instead (the shared re-gather is Python state a graph cannot hold).

**Replicate mode.** A region whose input something other than column-parallel layers reads (an MoE
router, a replicated linear, an adapter, a layer class this module does not know) cannot take the
reducing pair: its entry gathers with ``replicated_grad`` (backward: keep own chunk; the layers
inside keep ``f``), TP inside it runs as without sequence parallelism, and its exit keeps this
rank's chunk of the output (backward: all-gather).

Parameters that see local tokens (norm weights and biases, row-parallel biases added after the
reduce-scatter) get partial gradients; the caller marks them ``tp_grad_sum`` for ``grads.py``.

Two-dimensional ``[N, H]`` inputs (a block that flattens its tokens before its MLP, as OPT's does)
are gathered and reduce-scattered along dim 0 without unpadding: a per-token region does not care
about token order, and padding rows only ever meet per-token ops whose results at those rows are
dropped (their gradient is zero).

The full length ``S`` of the current forward is recorded at the stack entry and read by the region
hooks and the row-parallel layers, also when activation checkpointing recomputes a block in
backward: a forward of another length between a forward and its backward is refused there
(:meth:`SequenceParallel.full_length`). The dropout masks of the local chunks come from the same
generator state on every TP rank, as the head-split attention dropout of plain TP does.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import (gather_along, gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region,
                       scatter_to_sequence_parallel_region)

SEQ_DIM = 1  # [B, S, H]


class SequenceParallel:
    """The split of one model's stack over ``group`` (a ``TPComm``) and the length of the current forward."""

    def __init__(self, group):
        self.group = group
        self.tp = group.size()
        self.seq_len: int | None = None

    # ------------------------------------------------------------------ lengths
    def padded(self, length: int) -> int:
        return -(-length // self.tp) * self.tp

    def full_length(self, local: int) -> int:
        """``S`` of the current forward, checked against a local chunk of ``local`` tokens."""
        if self.seq_len is None or self.padded(self.seq_len) != local * self.tp:
            raise RuntimeError(
                f"sequence parallelism: a chunk of {local} tokens per rank does not belong to the current forward "
                f"(sequence length {self.seq_len} over tp={self.tp}). With activation checkpointing, run each "
                "forward's backward before the next forward of another sequence length.")
        return self.seq_len

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.padded(x.shape[SEQ_DIM]) - x.shape[SEQ_DIM]
        return F.pad(x, (0, 0, 0, pad)) if pad else x

    # ------------------------------------------------------------------ the four boundaries
    def split(self, x: torch.Tensor) -> torch.Tensor:
        """Stack entry: ``[B, S, H]`` replicated -> this rank's ``[B, s, H]`` (records ``S``)."""
        _check_3d(x, "the input of the first block")
        self.seq_len = x.shape[SEQ_DIM]
        return scatter_to_sequence_parallel_region(self._pad(x), self.group, dim=SEQ_DIM)

    def gather(self, x: torch.Tensor, *, reduce_grad: bool) -> torch.Tensor:
        """Region entry (``reduce_grad``: its backward reduce-scatters partial gradients) or stack exit (keeps
        its chunk of a replicated gradient): this rank's tokens -> all of them."""
        if x.dim() == 2:  # flattened token rows: no unpadding (module docstring)
            return gather_from_sequence_parallel_region(x, self.group, dim=0, replicated_grad=not reduce_grad)
        _check_3d(x, "a sequence-parallel activation")
        length = self.full_length(x.shape[SEQ_DIM])
        full = gather_from_sequence_parallel_region(x, self.group, dim=SEQ_DIM, replicated_grad=not reduce_grad)
        return _unpad(full, length)

    def reduce_scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Row-parallel output: partial sums of all tokens -> this rank's tokens of the sum."""
        if y.dim() == 2:
            return reduce_scatter_to_sequence_parallel_region(y, self.group, dim=0)
        self._check_full(y)
        return reduce_scatter_to_sequence_parallel_region(self._pad(y), self.group, dim=SEQ_DIM)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Replicate-mode region exit: a replicated output -> this rank's tokens."""
        if y.dim() == 2:
            return scatter_to_sequence_parallel_region(y, self.group, dim=0)
        self._check_full(y)
        return scatter_to_sequence_parallel_region(self._pad(y), self.group, dim=SEQ_DIM)

    def regather(self, x: torch.Tensor, length: int | None) -> torch.Tensor:
        """The all-gather of a region entry again, outside autograd (a column layer's backward)."""
        if x.dim() == 2:
            return gather_along(x, self.group, 0)
        return _unpad(gather_along(x, self.group, SEQ_DIM), length)

    def _check_full(self, y: torch.Tensor) -> None:
        _check_3d(y, "a row-parallel or region output")
        if y.shape[SEQ_DIM] != self.seq_len:
            raise RuntimeError(f"sequence parallelism: an output of {y.shape[SEQ_DIM]} tokens in a forward of "
                               f"{self.seq_len}; with activation checkpointing, run each forward's backward before "
                               "the next forward of another sequence length")


def _unpad(full: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of ``full``, contiguous (modeling code views hidden states)."""
    return full if full.shape[SEQ_DIM] == length else full.narrow(SEQ_DIM, 0, length).contiguous()


def _check_3d(x: torch.Tensor, what: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"sequence parallelism splits hidden states [batch, seq, hidden]; {what} has shape "
                         f"{tuple(x.shape)}. Train this model without --sequence_parallel.")


# ---------------------------------------------------------------------- column layers on a gathered input
class Regather:
    """What the column-parallel layers reading one gathered input share: its chunk (held weakly, for the
    forward), the length, and in backward the re-gathered tensor until the last of them is done."""

    def __init__(self, sp: SequenceParallel, x_local: torch.Tensor, length: int | None):
        self.sp, self.length = sp, length
        self._local = weakref.ref(x_local)
        self.users = 0
        self._done = 0
        self._full: torch.Tensor | None = None

    def linear(self, x_full: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
               transposed: bool) -> torch.Tensor:
        """``x_full W^T + b`` (``x_full W + b`` for a transposed ``Conv1D`` weight), keeping only the chunk."""
        x_local = self._local()
        if x_local is None:
            raise RuntimeError("sequence parallelism: the local chunk of a gathered input was freed during forward")
        self.users += 1
        return _GatheredInputLinear.apply(x_full, x_local, weight, bias, self, transposed)

    def full(self, x_local: torch.Tensor) -> torch.Tensor:
        if self._full is None:
            self._full = self.sp.regather(x_local, self.length)
        return self._full

    def release(self) -> None:
        self._done += 1
        if self._done >= self.users:
            self._full, self._done = None, 0


class _GatheredInputLinear(torch.autograd.Function):
    """``y = x W^T + b`` on the gathered ``x``, saving its chunk ``x_r`` instead of ``x``. Backward:
    ``x = all-gather(x_r)`` (shared, :class:`Regather`), ``dW = dy^T x``, ``db = sum dy``, and the
    partial ``dx = dy W`` for the entry's reduce-scatter. Under autocast the forward computes in the
    autocast dtype, and so does the backward (the dtype of ``dy``)."""

    @staticmethod
    def forward(ctx, x_full, x_local, weight, bias, regather, transposed):
        ctx.regather, ctx.transposed, ctx.has_bias = regather, transposed, bias is not None
        ctx.x_dtype = x_full.dtype
        ctx.save_for_backward(x_local, weight)
        if transposed:
            y = x_full @ weight
            return y + bias if bias is not None else y
        return F.linear(x_full, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x_local, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        w = weight.to(dy.dtype)
        dx = dw = db = None
        if need_x:
            dx = (dy @ w.t() if ctx.transposed else dy @ w).to(ctx.x_dtype)
        rows = dy.reshape(-1, dy.shape[-1])
        if need_w:
            x = ctx.regather.full(x_local)
            x = x.reshape(-1, x.shape[-1]).to(dy.dtype)
            dw = (x.t() @ rows if ctx.transposed else rows.t() @ x).to(weight.dtype)
        ctx.regather.release()
        if need_b and ctx.has_bias:
            db = rows.sum(0)
        return dx, None, dw, db, None, None


# the autograd node of a column-parallel layer on a gathered input (torch names a Function's node "<name>Backward")
GATHERED_INPUT_NODE = _GatheredInputLinear.__name__ + "Backward"


# ---------------------------------------------------------------------- hooks
def _hidden(args, kwargs):
    """``(where, tensor)``: the hidden states a block or region is called with (first positional argument,
    else ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states", kwargs["hidden_states"]
    raise ValueError("sequence parallelism: a block or region called without hidden states as its first argument "
                     "or as hidden_states=; train this model without --sequence_parallel")


def _replace(args, kwargs, where, value):
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def _first_tensor(output, fn):
    """``output`` with ``fn`` applied to its hidden states (the tensor itself, or the first of a tuple)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"sequence parallelism: cannot find the hidden states in an output of type {type(output).__name__}")


def split_input_of(module: nn.Module, sp: SequenceParallel):
    """The stack entry: ``module`` (the first block) receives this rank's tokens of its input."""
    def hook(mod, args, kwargs):
        where, x = _hidden(args, kwargs)
        return _replace(args, kwargs, where, sp.split(x))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def gather_input_of(module: nn.Module, sp: SequenceParallel, *, reduce_grad: bool):
    """A region entry: ``module`` receives all the tokens. With ``reduce_grad`` the column-parallel layers
    reading them keep only their chunk and skip ``f`` (module docstring); ``module`` and a sibling called
    on the same input (a parallel attention/MLP block) share one gather while the first one's is alive."""
    def hook(mod, args, kwargs):
        where, x = _hidden(args, kwargs)
        compiling = torch.compiler.is_compiling()
        memo = None if compiling else getattr(x, "_tp_sequence_full", None)
        full = memo[1]() if memo is not None and memo[0] == reduce_grad else None
        if full is None:
            reducing = reduce_grad and not compiling
            full = sp.gather(x, reduce_grad=reducing)
            if reducing:
                full._tp_sequence_gathered = Regather(sp, x, full.shape[SEQ_DIM] if x.dim() == 3 else None)
            if not compiling:
                x._tp_sequence_full = (reduce_grad, weakref.ref(full))
        return _replace(args, kwargs, where, full)
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def scatter_output_of(module: nn.Module, sp: SequenceParallel):
    """A replicate-mode region exit: ``module``'s (replicated) output -> this rank's tokens."""
    def hook(mod, args, output):
        return _first_tensor(output, sp.scatter)
    return module.register_forward_hook(hook)


def gather_output_of(module: nn.Module, sp: SequenceParallel):
    """The stack exit: ``module``'s output (this rank's tokens) -> all of them, replicated."""
    def hook(mod, args, output):
        return _first_tensor(output, lambda y: sp.gather(y, reduce_grad=False))
    return module.register_forward_hook(hook)
