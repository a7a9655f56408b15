"""Cross-entropy over vocabulary-sharded logits (Megatron's vocab-parallel cross-entropy).

Rank ``r`` holds logits ``z[:, V_r]`` for its vocabulary slice ``V_r``. With ``m = max_v z_v``
(all-reduce MAX), ``S = sum_v exp(z_v - m)`` (all-reduce SUM of the local sums) and the target
logit ``z_t`` (all-reduce SUM; only the owner contributes), the per-token loss is
``log S - (z_t - m)``. Its gradient is local: ``softmax(z)_v - 1[v = t]`` on each rank's slice.
Three all-reduces of ``[tokens]`` floats replace an all-gather of ``[tokens, V]`` logits.
Padding columns (vocabulary rounded up to a multiple of ``tp``) are excluded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers.loss.loss_utils import ForCausalLMLoss

from .collectives import all_reduce


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_valid, group):
        # logits: [N, V_local] float32, target: [N] (ignored positions already mapped to any id)
        # One pass writes the shifted copy (the caller's logits are left alone); padded vocab rows
        # (vocab_valid < V_local on the last rank) become -inf, i.e. probability 0.
        padded = vocab_valid < logits.shape[-1]
        if vocab_valid > 0:
            local_max = logits.narrow(-1, 0, vocab_valid).max(dim=-1).values
        else:
            local_max = logits.new_full(logits.shape[:-1], float("-inf"))
        all_reduce(local_max, group, op=dist.ReduceOp.MAX)
        logits = logits - local_max.unsqueeze(-1)
        if padded:
            logits[:, vocab_valid:] = float("-inf")
        local_t = target - vocab_start
        owned = (local_t >= 0) & (local_t < vocab_valid)
        local_t = local_t.masked_fill(~owned, 0)
        target_logit = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        stacked = torch.stack([sum_exp, target_logit])
        all_reduce(stacked, group)  # one collective for both sums
        sum_exp, target_logit = stacked[0], stacked[1]
        loss = sum_exp.log() - target_logit
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local_t, owned)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss_i / d logit_ij = (softmax_ij - [j == t_i]) * g_i, written as softmax * g (one pass
        # over [N, V_local]) minus g_i at each owned target
        softmax, local_t, owned = ctx.saved_tensors
        grad = softmax * grad_loss.unsqueeze(-1)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= owned.to(grad.dtype) * grad_loss
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, *, vocab_start: int, vocab_valid: int, group,
                                 ignore_index: int = -100, num_items_in_batch=None) -> torch.Tensor:
    """Token-level cross entropy of ``[N, V_local]`` logits, reduced like HF's ``fixed_cross_entropy``:
    sum / ``num_items_in_batch`` when given, else mean over non-ignored tokens."""
    valid = target != ignore_index
    per_token = _VocabParallelCE.apply(logits.float(), target.masked_fill(~valid, 0), vocab_start, vocab_valid, group)
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

    def __init__(self, lm_head: nn.Module):
        self.lm_head = lm_head

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        head = self.lm_head
        if logits.shape[-1] != head.local_vocab or head.tp_group is None:
            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(logits.device)
        return vocab_parallel_cross_entropy(
            logits.reshape(-1, logits.shape[-1]), shift_labels, vocab_start=head.vocab_start,
            vocab_valid=head.vocab_valid, group=head.tp_group, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch)
