"""The vocab-parallel LM head and its cross-entropy as one function: nothing of size ``[tokens, V/tp]`` is kept.

Rank ``r`` holds the head's rows ``W_r: [V/tp, h]`` (and bias ``b_r``). Between forward and backward
:func:`~tp_trainer.parallel.cross_entropy.vocab_parallel_cross_entropy` keeps an fp32 softmax of the
local logits ``z_r = x W_r^T + b_r``, ``4 V/tp`` bytes per token: at long sequences the largest
per-token cost after the layers' activations. This function keeps only what the head's linear
keeps anyway (its input ``x``: under sequence parallelism this rank's chunk of it) and two fp32
numbers per token, and recomputes ``z_r`` in backward, one block of ``R`` tokens at a time:

    forward  (from the head's logits, block by block in fp32):
             lse_r = log sum_{v in V_r} exp(z_v);   one all-gather of (lse_r, z_t) over TP
             lse = log sum_r exp(lse_r);            loss = lse - z_t
    backward (block by block):
             z = x_B W_r^T + b_r;   G = (exp(z - lse) - 1[v = t]) g            (fp32, [R, V/tp])
             dx_B = G W_r (a partial sum over TP: the head's input mapping all-reduces it, or under
             sequence parallelism reduce-scatters it);  dW_r += G^T x_B;  db_r += sum_B G

Communication: the forward's one all-gather of ``2 x tokens`` floats (as the unfused loss); in
backward nothing beyond the head's own input mapping, and under sequence parallelism the all-gather of
the head's input that its linear would have done anyway (:class:`~tp_trainer.parallel.sequence.Regather`).
Cost: one more ``[tokens, h] x [h, V/tp]`` product (the recomputed logits).

Memory: the blocks are at least ``h`` tokens (``R = max(h, 16 MiB / (4 V/tp))``), so the fp32
accumulator of ``dW_r`` (``4 V/tp h`` bytes, used when there is more than one block) is no larger
than one block's logits, and the function is used only when there is more than one block
(``rows_per_block``): below that the unfused loss keeps no more, and runs one product less.

The head (:class:`~tp_trainer.parallel.layers.ParallelLMHead`) still computes its logits in forward
(the model's forward returns them; the loss's statistics read them) and marks them with
:class:`HeadInput`; the loss takes this path only for those exact logits, so a model that transforms
its logits before the loss (a soft cap, a scale) gets the unfused loss through the head's own linear.
So do compiled graphs (the mark is Python state on a tensor) and ``TP_TRAINER_LEAN_ACTIVATIONS=0``
(``ParallelLMHead.mark_head_input``). Under ZeRO-3 such a head stays in FSDP2's root unit
(``zero/fully_sharded.py``): the unit's hooks on the head's output never fire here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .collectives import all_gather_rows

BLOCK_BYTES = 2**24  # at least this much fp32 logits per block of tokens


@dataclass
class HeadInput:
    """What the head multiplied to produce its local logits, attached to them as ``logits._tp_head_input``.

    ``x`` is the input as the linear saw it (its autograd graph ends in the head's input mapping, which
    turns the partial ``dx`` into the full one); under sequence parallelism ``regather`` re-gathers it in
    backward from this rank's chunk ``x_local`` (the function then keeps the chunk, not ``x``)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    x_local: torch.Tensor | None = None
    regather: object | None = None


def token_loss_over_tp(logits, lse_local, target, *, vocab_start: int, vocab_valid: int, group):
    """``(loss, lse, local_t, owned)`` per token from this rank's ``lse_local`` and its logits' target column:
    one all-gather of ``(lse_r, z_t)`` over TP, ``lse = log sum_r exp(lse_r)``, ``loss = lse - z_t``
    (``local_t``: the target's column in this rank's slice, 0 where another rank owns it; ``owned``)."""
    n = logits.shape[0]
    local_t = target - vocab_start
    owned = (local_t >= 0) & (local_t < vocab_valid)
    local_t = local_t.masked_fill(~owned, 0)
    target_logit = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).float().masked_fill(~owned, 0.0)
    gathered = all_gather_rows(torch.stack([lse_local, target_logit]), group).view(-1, 2, n)
    lse = torch.logsumexp(gathered[:, 0], dim=0)
    return lse - gathered[:, 1].sum(dim=0), lse, local_t, owned  # exactly one rank owns each target


def rows_per_block(hidden: int, local_vocab: int) -> int:
    """Tokens per block of the recomputation (module docstring)."""
    return max(hidden, BLOCK_BYTES // (4 * max(1, local_vocab)))


def uses_fused_path(head_input: HeadInput | None, tokens: int) -> bool:
    """Whether ``tokens`` logits marked with ``head_input`` are worth the fused path: more than one block (the head
    marks nothing in compiled graphs)."""
    if head_input is None:
        return False
    return tokens > rows_per_block(head_input.weight.shape[1], head_input.weight.shape[0])


class _LinearVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, logits, target, head_input, vocab_start, vocab_valid, group):
        # x, weight, bias: the head's inputs (autograd routes their gradients); logits: x W^T + b as the head
        # computed them, [N, V_local], read for the statistics and not kept; target: [N], ignored positions
        # already mapped to any id.
        n, width = logits.shape
        rows = rows_per_block(weight.shape[1], width)
        lse_local = logits.new_full((n,), float("-inf"), dtype=torch.float32)
        if vocab_valid > 0:
            for start in range(0, n, rows):
                z = logits[start:start + rows, :vocab_valid].to(torch.float32, copy=True)  # a block, changed in place
                top = z.amax(dim=-1)
                lse_local[start:start + rows] = top + z.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1).log_()
        loss, lse, local_t, owned = token_loss_over_tp(logits, lse_local, target, vocab_start=vocab_start,
                                                       vocab_valid=vocab_valid, group=group)
        kept = x if head_input.regather is None else head_input.x_local
        ctx.save_for_backward(kept, weight, bias, lse, local_t, owned)
        ctx.regather, ctx.x_shape, ctx.dtype = head_input.regather, x.shape, logits.dtype
        ctx.vocab_valid, ctx.rows = vocab_valid, rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        kept, weight, bias, lse, local_t, owned = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.regather is not None:  # the head's linear would have re-gathered its input here; it will not run
            x = ctx.regather.full(kept)
            ctx.regather.release()
        else:
            x = kept
        dtype, valid, rows = ctx.dtype, ctx.vocab_valid, ctx.rows
        x = x.reshape(-1, x.shape[-1])
        n, h = x.shape
        w = weight[:valid].to(dtype)
        b = bias[:valid].to(dtype) if bias is not None else None
        dx = x.new_empty((n, h), dtype=dtype) if need_x else None
        blocks = range(0, n, rows)
        # one block: dW in a single product; several: an fp32 accumulator (the products of 16-bit blocks in fp32)
        single = len(blocks) == 1
        dw = None if single or not need_w else torch.zeros((valid, h), dtype=torch.float32, device=x.device)
        db = torch.zeros(valid, dtype=torch.float32, device=x.device) if need_b and b is not None else None
        g = grad_loss.float()
        for start in blocks:
            stop = min(start + rows, n)
            xb = x[start:stop].to(dtype)
            gb = g[start:stop]
            grad = F.linear(xb, w, b).float().sub_(lse[start:stop].unsqueeze(-1)).exp_().mul_(gb.unsqueeze(-1))
            grad.scatter_add_(-1, local_t[start:stop].unsqueeze(-1), (-(gb * owned[start:stop])).unsqueeze(-1))
            if db is not None:
                db += grad.sum(0)
            grad = grad.to(dtype)
            if dx is not None:
                torch.mm(grad, w, out=dx[start:stop])
            if need_w:
                if single:
                    dw = grad.t() @ xb
                elif dtype == torch.float32:
                    dw.addmm_(grad.t(), xb)
                else:
                    dw += (grad.t() @ xb).float()
        if dw is not None:
            dw = _padded(dw.to(weight.dtype), weight.shape[0])
        if db is not None:
            db = _padded(db.to(bias.dtype), bias.shape[0])
        if dx is not None:
            dx = dx.to(kept.dtype).view(ctx.x_shape)
        return dx, dw, db, None, None, None, None, None, None


def _padded(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """``grad`` with zero rows appended up to ``rows`` (the head's padding rows get no gradient)."""
    return grad if grad.shape[0] == rows else F.pad(grad, (0, 0) * (grad.dim() - 1) + (0, rows - grad.shape[0]))


def linear_vocab_parallel_cross_entropy(logits, head_input: HeadInput, target, *, vocab_start: int,
                                        vocab_valid: int, group) -> torch.Tensor:
    """Per-token loss ``[N]`` of the head's ``[N, V_local]`` logits, gradients to the head's input and
    weights without a kept softmax (module docstring)."""
    return _LinearVocabParallelCE.apply(head_input.x, head_input.weight, head_input.bias, logits.detach(), target,
                                        head_input, vocab_start, vocab_valid, group)
