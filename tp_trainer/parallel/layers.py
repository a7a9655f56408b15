"""Tensor-parallel layers built from existing Hugging Face modules (weights are sliced, never re-initialised).

Shapes, with ``tp`` ranks, input ``x: [..., d_in]``:

* :class:`ColumnParallelLinear`: ``W: [d_out/tp, d_in]`` (or ``[d_in, d_out/tp]`` for GPT-2's
  ``Conv1D``), bias sharded with it. ``y_local = f(x) W_local^T + b_local: [..., d_out/tp]``;
  ``f`` all-reduces the input gradient, once for all the column-parallel layers reading the
  same ``x`` (q/k/v, gate/up: ``mappings.copy_to_tp_region_once``). With ``gather_output`` the
  output is all-gathered.
* :class:`RowParallelLinear`: ``W: [d_out, d_in/tp]``. ``y = g(x_local W_local^T) + b``; ``g``
  all-reduces the partial products, the bias is added once after it. With ``reduce_output = False``
  it returns the partial product and its owner calls :meth:`RowParallelLinear.reduce` once on the sum
  with its own partial (a LoRA adapter, ``parallel/lora.py``).
* :class:`VocabParallelEmbedding`: rows ``[r V/tp, (r+1) V/tp)``; ids outside the range look
  up zeros and ``g`` sums the ranks' partial embeddings.
* Under sequence parallelism (``sequence.py``) a column-parallel layer reading an all-gathered input
  keeps only this rank's chunk of it for backward (the gather's reduce-scatter replaces ``f``), and a
  row-parallel layer's ``g`` becomes a reduce-scatter along the sequence
  (``RowParallelLinear.sequence_parallel``).
* :class:`ParallelLMHead`: a column-parallel linear over the vocabulary. In training mode it
  returns the local logits ``[..., V/tp]`` for :func:`vocab_parallel_cross_entropy`, so full
  logits are never materialised; in eval mode (``evaluate``/``predict``/``generate``) it
  all-gathers and returns ``[..., V]``.

Every sharded parameter carries ``param.tp_spec`` (:class:`~tp_trainer.parallel.sharding.ShardSpec`).
Every layer takes its TP group as ``tp_group``, a :class:`~tp_trainer.parallel.collectives.TPComm`
(the process group and the transport the context chose for it; ``None`` at tp 1), and communicates
only through the wrappers of ``mappings.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear_cross_entropy import HeadInput
from .mappings import copy_to_tp_region_once, gather_from_tp_region, reduce_from_tp_region, scatter_to_tp_region
from .sharding import ShardSpec


def sharded_parameter(full: torch.Tensor, spec: ShardSpec, requires_grad: bool) -> nn.Parameter:
    param = nn.Parameter(spec.shard(full.detach()), requires_grad=requires_grad)
    param.tp_spec = spec
    return param


def _weight_and_layout(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """``(weight, transposed)``; ``transposed`` for GPT-2's ``Conv1D`` (``W: [d_in, d_out]``)."""
    transposed = type(module).__name__ == "Conv1D"
    return module.weight, transposed


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
        """``f(x) W_local^T + b_local``: this rank's output columns. ``f`` is skipped where no input
        gradient is wanted (``no_grad``, an input that does not require it): it would only communicate.
        An input all-gathered along the sequence (``sequence.py``) brings its own linear: it keeps only this
        rank's chunk for backward, and the gather's reduce-scatter takes the place of ``f``."""
        return self._multiply(*self._mapped_input(x))

    def _multiply(self, x: torch.Tensor, gathered) -> torch.Tensor:
        """``x W_local^T + b_local`` of an input already mapped by :meth:`_mapped_input`."""
        if gathered is not None:
            return gathered.linear(x, self.weight, self.bias, transposed=self.transposed)
        if self.transposed:
            y = x @ self.weight
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)

    def _mapped_input(self, x: torch.Tensor):
        """``(f(x), None)``, or ``(x, its Regather)`` for an input all-gathered along the sequence."""
        gathered = getattr(x, "_tp_sequence_gathered", None)
        if gathered is None and self.copy_input and torch.is_grad_enabled() and x.requires_grad:
            x = copy_to_tp_region_once(x, self.tp_group)
        return x, gathered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_forward(x)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y

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

    # False: forward returns the partial product; the owner adds its own partial (a LoRA adapter,
    # parallel/lora.py) and calls reduce() once for both.
    reduce_output = True
    # A sequence.SequenceParallel: g becomes a reduce-scatter along the sequence (sequence parallelism).
    sequence_parallel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            x = scatter_to_tp_region(x, self.tp_group)
        gated = getattr(x, "_tp_gated", None)
        if gated is not None and not self.transposed:  # a lean gated MLP's product: keeps gate and up (glu.py)
            y = gated.project(x, self.weight)
        else:
            y = x @ self.weight if self.transposed else F.linear(x, self.weight)
        return self.reduce(y) if self.reduce_output else y

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """``g(partial) + b``: the sum over the TP ranks of their partial products, the bias added once; under
        sequence parallelism this rank's tokens of the sum (its bias gradient is then a partial sum)."""
        sp = self.sequence_parallel
        y = reduce_from_tp_region(partial, self.tp_group) if sp is None else sp.reduce_scatter(partial)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (local {self.weight.tp_spec.local_size}), out={self.out_features}, "
                f"bias={self.bias is not None}, split_input={self.split_input}"
                + ("" if self.reduce_output else ", reduced by its owner"))


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
        # nn.Embedding's lookup options, which a LoRA embedding adapter (PEFT) reads from its base layer; this
        # layer's own lookup supports none of them (from_module refuses them)
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False

    @classmethod
    def from_module(cls, module: nn.Embedding, spec: ShardSpec, tp_group) -> "VocabParallelEmbedding":
        options = {k: getattr(module, k, d) for k, d in (("max_norm", None), ("scale_grad_by_freq", False),
                                                          ("sparse", False))}
        if any(options.values()):
            raise ValueError(f"a vocab-parallel embedding cannot apply nn.Embedding's {options}: the lookup is split "
                             "over the TP ranks; keep this embedding replicated (tp_plan 'replicated')")
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
            out = reduce_from_tp_region(_zero_rows_(F.embedding(local_ids, self.weight, self.local_padding_idx),
                                                    outside), self.tp_group)
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

    # mark the training logits for the fused head + loss (linear_cross_entropy.py); Kernels.lean_activations
    mark_head_input = True

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
        if self.training and torch.is_grad_enabled() and not self.gather_output:  # gather_output: planner/apply.py
            return self._marked_local_logits(x)
        full = gather_from_tp_region(self.local_forward(x), self.tp_group)
        return full[..., : self.out_features] if full.shape[-1] != self.out_features else full

    def _marked_local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The local logits, marked with what the linear multiplied (``logits._tp_head_input``) so that the
        loss can recompute them in backward instead of keeping a softmax (``linear_cross_entropy.py``)."""
        mapped, gathered = self._mapped_input(x)
        y = self._multiply(mapped, gathered)
        if not self.mark_head_input or self.transposed or self.tp_group is None or torch.compiler.is_compiling():
            return y
        local = gathered._local() if gathered is not None else None
        y._tp_head_input = HeadInput(mapped, self.weight, self.bias, x_local=local, regather=gathered)
        return y
