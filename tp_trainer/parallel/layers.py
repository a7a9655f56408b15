"""Tensor-parallel layers built from existing Hugging Face modules (weights are sliced, never re-initialised).

Shapes, with ``tp`` ranks, input ``x: [..., d_in]``:

* :class:`ColumnParallelLinear`: ``W: [d_out/tp, d_in]`` (or ``[d_in, d_out/tp]`` for GPT-2's
  ``Conv1D``), bias sharded with it. ``y_local = f(x) W_local^T + b_local: [..., d_out/tp]``;
  ``f`` all-reduces the input gradient, once for all the column-parallel layers reading the
  same ``x`` (q/k/v, gate/up) and overlapped with the weight-gradient matmul (:class:`_ColumnLinear`).
  With ``gather_output`` the output is all-gathered.
* :class:`RowParallelLinear`: ``W: [d_out, d_in/tp]``. ``y = g(x_local W_local^T) + b``; ``g``
  all-reduces the partial products, the bias is added once after it.
* :class:`VocabParallelEmbedding`: rows ``[r V/tp, (r+1) V/tp)``; ids outside the range look
  up zeros and ``g`` sums the ranks' partial embeddings.
* :class:`ParallelLMHead`: a column-parallel linear over the vocabulary. In training mode it
  returns the local logits ``[..., V/tp]`` for :func:`vocab_parallel_cross_entropy`, so full
  logits are never materialised; in eval mode (``evaluate``/``predict``/``generate``) it
  all-gathers and returns ``[..., V]``.

Every sharded parameter carries ``param.tp_spec`` (:class:`~tp_trainer.parallel.sharding.ShardSpec`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .collectives import all_reduced_copy, start_all_reduced_copy
from .mappings import gather_from_tp, reduce_from_tp, scatter_to_tp
from .sharding import ShardSpec


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes ``t``'s ops in on its device, or ``None`` when autocast is off
    there. ``meta`` tensors (the memory estimate's simulated step) have no autocast."""
    device = t.device.type
    if device == "meta" or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def sharded_parameter(full: torch.Tensor, spec: ShardSpec, requires_grad: bool) -> nn.Parameter:
    param = nn.Parameter(spec.shard(full.detach()), requires_grad=requires_grad)
    param.tp_spec = spec
    return param


def _weight_and_layout(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """``(weight, transposed)``; ``transposed`` for GPT-2's ``Conv1D`` (``W: [d_in, d_out]``)."""
    transposed = type(module).__name__ == "Conv1D"
    return module.weight, transposed


class _InputGradSum:
    """The column-parallel consumers of one replicated input ``x`` and the sum of their input gradients.

    q/k/v (and gate/up) read one normed activation; each contributes a partial ``dL/dx`` (its
    own output columns) and the TP ranks' sum of all of them is the true gradient. The sum is
    taken locally first and all-reduced once, by the consumer whose backward runs last; the
    earlier ones add theirs to ``partial`` and return no gradient for ``x``. That all-reduce is
    overlapped with the last consumer's weight-gradient matmul (see :class:`_ColumnLinear`).

    ``consumers`` counts the forward calls; ``seen`` the backward calls of the current pass. If
    a consumer's output gets no gradient, its backward never runs: the hook on ``x`` (called
    once ``x``'s gradient is complete) then all-reduces what was collected.
    """

    __slots__ = ("group", "consumers", "seen", "partial")

    def __init__(self, group):
        self.group, self.consumers, self.seen, self.partial = group, 0, 0, None

    def add_product(self, dy: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Adds this consumer's partial input gradient ``dy @ w`` (cast to ``x``'s ``dtype``); returns
        the full local sum if it was the last consumer.

        After the first consumer the product accumulates into the running sum inside the matmul
        (``addmm_``, beta 1): no product-sized temporary and no separate add pass over it.
        """
        self.seen += 1
        if self.partial is not None and self.partial.dtype == dy.dtype == w.dtype:
            total = self.partial
            total.view(-1, total.shape[-1]).addmm_(dy.reshape(-1, dy.shape[-1]), w)
        else:  # first consumer, or autocast (products in the autocast dtype, the sum in x's dtype)
            dx = (dy @ w).to(dtype)
            total = dx if self.partial is None else self.partial.add_(dx)
        if self.seen < self.consumers:
            self.partial = total
            return None
        self.partial, self.seen = None, 0
        return total

    def hook(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        if self.partial is None:
            return None
        partial, self.partial, self.seen = self.partial, None, 0
        if grad is None:
            raise RuntimeError(
                "tensor parallelism: a column-parallel layer's output received no gradient while other "
                "layers reading the same input did, and nothing else consumes that input; its gradient "
                "cannot be completed. Use every output of q/k/v (gate/up) in the loss, or plan the "
                "unused layer as 'replicated'.")
        return grad + all_reduced_copy(partial, self.group)


def _input_grad_sum(x: torch.Tensor, group) -> _InputGradSum:
    """The :class:`_InputGradSum` of ``x``, memoised on ``x`` for the same group and version of
    ``x`` (an in-place change of ``x`` starts a new sum); it dies with ``x``."""
    key = (group, x._version)
    memo = getattr(x, "_tp_grad_sum", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    state = _InputGradSum(group)
    try:
        x._tp_grad_sum = (key, state)
    except (AttributeError, TypeError):  # tensor subclasses that refuse attributes: no sharing
        pass
    x.register_hook(state.hook)
    return state


class _CopyToTP(torch.autograd.Function):
    """Megatron's ``f`` on its own: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduced_copy(grad, ctx.group), None


def _copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """``f(x)``, one node for all the column-parallel layers reading ``x`` (memoised on ``x``), so that
    autograd sums their input gradients before the one all-reduce. The compiled form of
    :class:`_ColumnLinear`'s sharing: Dynamo traces an attribute memo on a tensor, not
    :class:`_InputGradSum`'s counters and hook, and Inductor fuses the sum into the matmuls."""
    memo = getattr(x, "_tp_copy", None)
    if memo is not None and memo[0] is group:
        return memo[1]
    fx = _CopyToTP.apply(x, group)
    x._tp_copy = (group, fx)
    return fx


class _ColumnLinear(torch.autograd.Function):
    """``y = x W^T + b`` (``x W + b`` for ``Conv1D``) with Megatron's ``f`` folded in and overlapped:

    forward:  y = x W_local^T + b_local                           (no communication)
    backward: dx_partial = dy W_local; start all-reduce(sum over the consumers of x of dx_partial)
              dW_local = dy^T x, db_local = sum(dy)               (while the all-reduce is in flight)
              dx = wait()

    The all-reduce and the weight-gradient matmul are independent, so the matmul hides the
    transfer where another engine moves the bytes: NCCL's stream, gloo's I/O thread (measured
    on the benchmark model over gloo, in-process A/B against a separate ``f`` node: fp32 step
    677 -> 654 ms, bf16 426 -> 414 ms). The shared-memory transport reduces at once instead
    (``collectives.start_all_reduced_copy`` says why). Under autocast it computes in the
    autocast dtype like ``F.linear`` and reduces the input gradient in ``x``'s dtype, as the
    cast's backward would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, transposed, grad_sum):
        dtype = autocast_dtype(x)
        if dtype is not None:
            xc, wc = x.to(dtype), weight.to(dtype)
            bc = bias.to(dtype) if bias is not None else None
        else:
            xc, wc, bc = x, weight, bias
        ctx.save_for_backward(xc, wc)
        ctx.transposed, ctx.grad_sum, ctx.x_dtype, ctx.has_bias = transposed, grad_sum, x.dtype, bias is not None
        grad_sum.consumers += 1
        if transposed:
            y = xc @ wc
            return y + bc if bc is not None else y
        return F.linear(xc, wc, bc)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        pending = None
        if ctx.needs_input_grad[0]:
            total = ctx.grad_sum.add_product(dy, w.t() if ctx.transposed else w, ctx.x_dtype)
            if total is not None:
                pending = start_all_reduced_copy(total, ctx.grad_sum.group)
        dw = db = None
        if ctx.needs_input_grad[1]:
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            dw = x2.t() @ dy2 if ctx.transposed else dy2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        dx = pending.wait() if pending is not None else None
        return dx, dw, db, None, None


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp_group, *, transposed: bool,
                 gather_output: bool = False, copy_input: bool = True, full_out_features: int):
        super().__init__()
        self.weight, self.bias, self.tp_group = weight, bias, tp_group
        self.transposed, self.gather_output, self.copy_input = transposed, gather_output, copy_input
        self.in_features = weight.shape[0] if transposed else weight.shape[1]
        self.out_features = full_out_features

    @classmethod
    def from_module(cls, module: nn.Module, spec_for, tp_group, **kwargs) -> "ColumnParallelLinear":
        """``spec_for(full_shape, dim)`` builds the ShardSpec of the output dimension."""
        weight, transposed = _weight_and_layout(module)
        out_dim = 1 if transposed else 0
        w = sharded_parameter(weight, spec_for(tuple(weight.shape), out_dim), weight.requires_grad)
        b = None
        if getattr(module, "bias", None) is not None:
            b = sharded_parameter(module.bias, spec_for(tuple(module.bias.shape), 0), module.bias.requires_grad)
        return cls(w, b, tp_group, transposed=transposed, full_out_features=weight.shape[out_dim], **kwargs)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input and self.tp_group is not None and torch.is_grad_enabled() and x.requires_grad:
            if torch.compiler.is_compiling():
                x = _copy_to_tp(x, self.tp_group)
            else:
                return _ColumnLinear.apply(x, self.weight, self.bias, self.transposed,
                                           _input_grad_sum(x, self.tp_group))
        if self.transposed:  # no input gradient needed: no communication at all
            y = x @ self.weight
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.tp_spec.local_size}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp_group, *, transposed: bool,
                 split_input: bool = False, full_in_features: int):
        super().__init__()
        self.weight, self.bias, self.tp_group = weight, bias, tp_group
        self.transposed, self.split_input = transposed, split_input
        self.in_features = full_in_features
        self.out_features = weight.shape[1] if transposed else weight.shape[0]

    @classmethod
    def from_module(cls, module: nn.Module, spec_for, tp_group, **kwargs) -> "RowParallelLinear":
        weight, transposed = _weight_and_layout(module)
        in_dim = 0 if transposed else 1
        w = sharded_parameter(weight, spec_for(tuple(weight.shape), in_dim), weight.requires_grad)
        bias = getattr(module, "bias", None)
        return cls(w, bias, tp_group, transposed=transposed, full_in_features=weight.shape[in_dim], **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            x = scatter_to_tp(x, self.tp_group)
        y = x @ self.weight if self.transposed else F.linear(x, self.weight)
        y = reduce_from_tp(y, self.tp_group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.tp_spec.local_size}), out={self.out_features}, "
                f"bias={self.bias is not None}, split_input={self.split_input}")


def _zero_rows_(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place: ``out[rows] = 0`` for a boolean ``rows`` over ``out``'s leading dims; returns ``out``.

    In place is safe on a lookup's output (its backward needs only the ids). On CPU through
    ``index_fill_`` on the flat rows: a broadcast ``masked_fill_`` over ``[N, H]`` is not
    vectorised there (benchmark's ``[1024, 512]`` bf16 block, one core: 252 us against 82 us,
    and the same again in backward). ``index_fill_`` needs the row indices (``nonzero``, a host
    synchronisation on accelerators, a data-dependent shape under ``torch.compile``), so elsewhere
    it stays ``masked_fill_``.
    """
    if out.device.type != "cpu" or torch.compiler.is_compiling():
        return out.masked_fill_(rows.unsqueeze(-1), 0.0)
    flat = out.view(-1, out.shape[-1])
    flat.index_fill_(0, rows.reshape(-1).nonzero().squeeze(1), 0.0)
    return out


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter, tp_group, *, num_embeddings: int, padding_idx: int | None,
                 embed_scale=None):
        super().__init__()
        self.weight, self.tp_group = weight, tp_group
        self.num_embeddings, self.embedding_dim = num_embeddings, weight.shape[1]
        spec: ShardSpec = weight.tp_spec
        segs = spec.local_segments
        self.vocab_start = segs[0][0] if segs else spec.local_size * spec.tp_rank
        self.vocab_end = self.vocab_start + sum(n for _, n in segs)
        self.padding_idx = padding_idx
        self.local_padding_idx = (padding_idx - self.vocab_start
                                  if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end else None)
        self.embed_scale = embed_scale  # Gemma3-style scaled embeddings keep their scale

    @classmethod
    def from_module(cls, module: nn.Embedding, spec: ShardSpec, tp_group) -> "VocabParallelEmbedding":
        w = sharded_parameter(module.weight, spec, module.weight.requires_grad)
        scale = getattr(module, "embed_scale", None)
        return cls(w, tp_group, num_embeddings=module.weight.shape[0], padding_idx=module.padding_idx,
                   embed_scale=scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            out = F.embedding(ids, self.weight, self.local_padding_idx)
        else:
            self._check_ids(ids)
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = reduce_from_tp(_zero_rows_(F.embedding(local_ids, self.weight, self.local_padding_idx), outside),
                                 self.tp_group)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype) if torch.is_tensor(self.embed_scale) else out * self.embed_scale
        return out

    def _check_ids(self, ids: torch.Tensor) -> None:
        """Refuse ids outside ``[0, num_embeddings)`` as ``nn.Embedding`` does. Without the check a
        sharded lookup maps them to zero vectors on every rank (each rank masks ids it does not
        own), silently, e.g. when a tokenizer's vocabulary outgrew the model's. On CPU the check
        raises here; on accelerators it is a device-side assert (no host synchronisation), and
        so it is in compiled graphs."""
        bad = (ids < 0) | (ids >= self.num_embeddings)
        if ids.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: no graph break on CPU either
            torch._assert_async(~bad.any(), "token id out of range of the vocabulary")
        elif bool(bad.any()):
            first = int(ids[bad][0])
            raise IndexError(f"token id {first} is out of range for this model's vocabulary of {self.num_embeddings} "
                             "(ids must be in [0, vocab_size)); check that the tokenizer matches the model, or "
                             "resize the embeddings with model.resize_token_embeddings before training")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local rows [{self.vocab_start}, {self.vocab_end})"


class ParallelLMHead(ColumnParallelLinear):
    """Column-parallel over the (padded) vocabulary; see the module docstring for the two modes."""

    @property
    def vocab_start(self) -> int:
        segs = self.weight.tp_spec.local_segments
        return segs[0][0] if segs else self.weight.tp_spec.local_size * self.weight.tp_spec.tp_rank

    @property
    def vocab_valid(self) -> int:
        """Real (non-padding) vocabulary rows on this rank."""
        return sum(n for _, n in self.weight.tp_spec.local_segments)

    @property
    def local_vocab(self) -> int:
        return self.weight.tp_spec.local_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x)
        if self.training and torch.is_grad_enabled():
            return y
        full = gather_from_tp(y, self.tp_group)
        return full[..., : self.out_features] if full.shape[-1] != self.out_features else full
