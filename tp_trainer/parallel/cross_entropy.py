"""Cross-entropy over vocabulary-sharded logits (after Megatron's vocab-parallel cross-entropy).

Rank ``r`` holds logits ``z[:, V_r]`` for its vocabulary slice ``V_r``. Each rank computes its
local log-sum-exp ``lse_r = log sum_{v in V_r} exp(z_v)`` and, if it owns the target ``t``, the
target logit ``z_t``; one all-gather of these two ``[tokens]`` vectors gives every rank
``lse = log sum_r exp(lse_r)`` and ``z_t``, and the per-token loss is ``lse - z_t``. Its
gradient is local: ``softmax(z)_v - 1[v = t]`` on each rank's slice, where the global softmax is
the local one scaled by the rank's share of the mass, ``exp(z_v - lse) = softmax_r(z)_v * exp(lse_r - lse)``.
One all-gather of ``2 x tokens`` floats replaces an all-gather of ``[tokens, V]`` logits
(Megatron uses two all-reduces, a MAX then a SUM: one more synchronisation point per step).
Padding columns (vocabulary rounded up to a multiple of ``tp``) are excluded.

Cost on the local ``[tokens, V/tp]`` block: torch's fused softmax kernel (one fresh buffer,
kept for backward) plus two row maxima in forward, one in-place scale in backward. The fused
softmax measured faster than the unfused max / subtract / exp / sum / divide chain (docs/benchmarks.md, "Kernel measurements").
Off CUDA, a 16-bit block is converted to an fp32 copy before the kernel runs, as large as the
result: the rows go through in chunks of at most 16 MiB of that copy (:func:`softmax_fp32`), so
the loss's peak is its saved softmax rather than twice it (CUDA's kernel reads 16-bit directly).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, ForMaskedLMLoss

from .linear_cross_entropy import HeadInput, linear_vocab_parallel_cross_entropy, token_loss_over_tp, uses_fused_path


SOFTMAX_CHUNK_BYTES = 2**24  # the fp32 copy of a 16-bit input the softmax makes off CUDA, per chunk of rows


def softmax_fp32(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, -1, dtype=float32)``, bit for bit; a 16-bit ``x`` off CUDA in chunks of rows (module
    docstring). Compiled graphs take the single call (the compiler plans its own buffers)."""
    rows = max(1, SOFTMAX_CHUNK_BYTES // (4 * max(1, x.shape[-1])))
    if x.dtype == torch.float32 or x.device.type == "cuda" or x.shape[0] <= rows or torch.compiler.is_compiling():
        return torch.softmax(x, dim=-1, dtype=torch.float32)
    out = x.new_empty(x.shape, dtype=torch.float32)
    for start in range(0, x.shape[0], rows):
        torch.softmax(x[start:start + rows], dim=-1, dtype=torch.float32, out=out[start:start + rows])
    return out


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_valid, group):
        # logits: [N, V_local] (any float dtype; the math is fp32), target: [N] (ignored positions
        # already mapped to any id). The caller's logits are left alone.
        n = logits.shape[0]
        local = logits.narrow(-1, 0, vocab_valid)  # padded vocab columns have probability 0
        if vocab_valid > 0:
            softmax = softmax_fp32(local)  # exp(z - lse_r), fused
            # lse_r = max z + log sum exp(z - max z) = max z - log max softmax (max softmax = 1 / sum)
            lse_local = local.amax(dim=-1).float() - softmax.amax(dim=-1).log()
        else:  # a rank whose slice is all padding holds no probability mass
            softmax = logits.new_empty((n, 0), dtype=torch.float32)
            lse_local = logits.new_full((n,), float("-inf"), dtype=torch.float32)
        loss, lse, local_t, owned = token_loss_over_tp(logits, lse_local, target, vocab_start=vocab_start,
                                                       vocab_valid=vocab_valid, group=group)
        ctx.save_for_backward(softmax, (lse_local - lse).exp(), local_t, owned)
        ctx.logits_meta = (logits.shape, logits.dtype)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss_i / d z_iv = (softmax_iv - [v == t_i]) g_i, with softmax_iv = local softmax_iv * share_i.
        # The saved softmax becomes the gradient in place (one pass), as in Megatron, so this node
        # can be backpropagated once.
        if ctx.consumed:
            raise RuntimeError("vocab-parallel cross-entropy: backward ran twice through the same graph; its "
                               "saved softmax is reused in place as the gradient. Recompute the loss instead of "
                               "backward(retain_graph=True).")
        ctx.consumed = True
        softmax, share, local_t, owned = ctx.saved_tensors
        (shape, dtype), vocab_valid = ctx.logits_meta, softmax.shape[-1]
        grad = softmax.mul_((grad_loss * share).unsqueeze(-1))
        if vocab_valid:
            grad.scatter_add_(-1, local_t.unsqueeze(-1), (-(grad_loss * owned)).unsqueeze(-1))
        if vocab_valid < shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, shape[-1] - vocab_valid))
        return grad.to(dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits, target, *, vocab_start: int, vocab_valid: int, group,
                                 ignore_index: int = -100, num_items_in_batch=None,
                                 head_input: HeadInput | None = None) -> torch.Tensor:
    """Token-level cross entropy of ``[N, V_local]`` logits, reduced like HF's ``fixed_cross_entropy``:
    sum / ``num_items_in_batch`` when given, else mean over non-ignored tokens. With the head's
    ``head_input`` (logits straight from :class:`ParallelLMHead`) and enough tokens the head and the loss
    run as one function that keeps no softmax (``linear_cross_entropy.py``)."""
    valid = target != ignore_index
    target = target.masked_fill(~valid, 0)
    if vocab_valid > 0 and uses_fused_path(head_input, logits.shape[0]):  # an all-padding slice: nothing to redo
        per_token = linear_vocab_parallel_cross_entropy(logits, head_input, target, vocab_start=vocab_start,
                                                        vocab_valid=vocab_valid, group=group)
    else:
        per_token = _VocabParallelCE.apply(logits, target, vocab_start, vocab_valid, group)
    total = (per_token * valid).sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / valid.sum()


class VocabParallelCausalLMLoss:
    """Drop-in for ``model.loss_function`` (signature of HF's ``ForCausalLMLoss``).

    Local logits (training mode of :class:`ParallelLMHead`) take the vocab-parallel path;
    full logits (eval mode, gathered) fall back to HF's own loss.
    """

    shift = True  # labels shifted left by one (next-token prediction)
    fallback = staticmethod(ForCausalLMLoss)

    def __init__(self, lm_head: nn.Module):
        self.lm_head = lm_head

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        head = self.lm_head
        head_input = getattr(logits, "_tp_head_input", None)  # set by the head on the very tensor it returned
        if logits.shape[-1] != head.local_vocab or head.tp_group is None:
            if self.shift:
                return self.fallback(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                     ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
            return self.fallback(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                 ignore_index=ignore_index, **kwargs)
        if not self.shift:
            shift_labels = labels
        elif shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(logits.device)
        return vocab_parallel_cross_entropy(
            logits.reshape(-1, logits.shape[-1]), shift_labels, vocab_start=head.vocab_start,
            vocab_valid=head.vocab_valid, group=head.tp_group, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch, head_input=head_input)


class VocabParallelMaskedLMLoss(VocabParallelCausalLMLoss):
    """Drop-in for HF's ``ForMaskedLMLoss`` (masked-LM heads such as ModernBERT's): no label shift."""

    shift = False
    fallback = staticmethod(ForMaskedLMLoss)


# The model's own loss function -> its vocab-parallel replacement. Losses not listed (a model's own
# function, a classification loss) have none: the planner gathers such a model's logits instead.
_REPLACEMENTS = {ForCausalLMLoss: VocabParallelCausalLMLoss, ForMaskedLMLoss: VocabParallelMaskedLMLoss}


def _own_loss_function(model: nn.Module):
    """The loss function the model would call (its ``loss_function`` property), or ``None``. Read as the
    property does (one assigned through its setter, else ``LOSS_MAPPING[model.loss_type]``, causal LM by
    default) without its warning about an unrecognised ``loss_type`` (GPT-2's class name has none)."""
    assigned = vars(model).get("_loss_function")
    if assigned is not None:
        return assigned
    prop = getattr(type(model), "loss_function", None)
    if isinstance(prop, property) and prop.fget is not None and prop.fget.__qualname__.startswith("PreTrainedModel."):
        return LOSS_MAPPING.get(getattr(model, "loss_type", None) or "ForCausalLM", ForCausalLMLoss)
    try:
        return getattr(model, "loss_function", None)
    except Exception:  # a property that raises
        return None


def vocab_parallel_loss_for(model: nn.Module):
    """The vocab-parallel class replacing ``model.loss_function``, or ``None`` when it has no counterpart."""
    fn = _own_loss_function(model)
    if isinstance(fn, VocabParallelCausalLMLoss):
        return type(fn)
    return _REPLACEMENTS.get(fn)


def loss_function_name(model: nn.Module) -> str:
    fn = _own_loss_function(model)
    return getattr(fn, "__name__", type(fn).__name__)


def install_vocab_parallel_loss(model: nn.Module, lm_head: nn.Module) -> None:
    """Pair a vocab-split LM head with the model's loss.

    * ``model.loss_function`` becomes its vocab-parallel counterpart (causal: labels shifted; masked:
      not), which reads the head's local logits.
    * The head returns local logits only for a training forward that passes ``labels`` (the model's
      own loss consumes them); a training forward without labels gets the gathered logits, so that a
      loss computed outside the model (the Trainer's label smoother or ``compute_loss_func``) sees
      all of them. A forward pre-hook on the model reads ``labels`` and sets ``lm_head.gather_output``.
    """
    cls = vocab_parallel_loss_for(model) or VocabParallelCausalLMLoss
    if hasattr(model, "loss_function"):
        model.loss_function = cls(lm_head)

    def hook(module, args, kwargs):
        lm_head.gather_output = kwargs.get("labels") is None

    lm_head.gather_output = False
    model.register_forward_pre_hook(hook, with_kwargs=True)
