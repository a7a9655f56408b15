"""Per-token statistics of vocabulary-sharded logits: target log-probability, entropy, top-1, ...

What TRL's trainers log and optimise per token (the log-probability of the label, the entropy of the
next-token distribution, whether the label is the most likely token, the mean logit,
``log sum_v p_v^2``), computed where each rank ``r`` holds only the logits ``z[:, V_r]`` of its
vocabulary slice (``vocab_valid`` real columns starting at ``vocab_start``; padding columns after
them are excluded). Full logits are never built.

Each rank reduces its slice to partial sums of an online log-sum-exp, per token (``t``: the target)::

    m_r = max_{v in V_r} z_v            s_r = sum_v e^{z_v - m_r}          z_t (its owner; 0 elsewhere)
    x_r = sum_v e^{z_v - m_r} z_v       q_r = sum_v e^{2 (z_v - m_r)}      a_r = sum_v z_v
    b_r = max_{v in V_r, v < t} z_v     (``-inf`` when empty)

**Communication:** one all-gather of these ``[k, tokens]`` fp32 rows over the TP group (``k`` = 3 plus
one per optional statistic). Every rank then combines the same values in the same order, so all
ranks hold bit-identical results::

    M = max_r m_r        S = sum_r s_r e^{m_r - M}        log Z = M + log S
    log p_t        = z_t - log Z
    entropy        = log Z - (sum_r x_r e^{m_r - M}) / S
    log sum p^2    = log(sum_r q_r e^{2 (m_r - M)}) - 2 log S
    mean logit     = sum_r a_r / V
    is_top1        = z_t >= M  and  z_t > max_r b_r       (torch.argmax's first maximum, as TRL counts it)

**Backward** (local, no communication; the column-parallel layer that produced ``z`` all-reduces
the input gradient in its ``f``), with ``p_v = e^{z_v - log Z}``::

    d log p_t / d z_v = 1[v = t] - p_v          d entropy / d z_v = -p_v (log p_v + entropy)

Shapes: ``logits [N, V/tp]`` (any float dtype; the math is fp32), ``target [N]`` (every entry a
vocabulary id: map ignored positions to any id and mask the results). With ``group=None`` (tp 1) the
local slice is the whole vocabulary and nothing is communicated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .collectives import all_gather_rows

OPTIONAL = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class TokenStats(NamedTuple):
    """Per-token results, ``[N]`` each; the optional ones are ``None`` unless asked for."""
    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def _local_rows(z: torch.Tensor, local_t: torch.Tensor, owned: torch.Tensor, outputs: tuple[str, ...]) -> torch.Tensor:
    """The partial sums of this rank's slice ``z [N, V_r]`` (fp32), stacked ``[k, N]`` in a fixed order.
    ``local_t`` is the target's index in the slice, unclamped (negative: owned by an earlier rank)."""
    n, width = z.shape
    if width == 0:  # a rank whose slice is all padding holds no probability mass
        empty = z.new_full((n,), float("-inf"))
        rows = {"m": empty, "s": z.new_zeros(n), "zt": z.new_zeros(n), "entropy": z.new_zeros(n),
                "log_sum_sq_probs": z.new_zeros(n), "mean_logits": z.new_zeros(n), "is_top1": empty}
    else:
        m = z.amax(dim=-1)
        e = torch.exp(z - m.unsqueeze(-1))
        zt = z.gather(-1, local_t.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        rows = {"m": m, "s": e.sum(dim=-1), "zt": zt}
        if "entropy" in outputs:
            rows["entropy"] = (e * z).sum(dim=-1)
        if "log_sum_sq_probs" in outputs:
            rows["log_sum_sq_probs"] = (e * e).sum(dim=-1)
        if "mean_logits" in outputs:
            rows["mean_logits"] = z.sum(dim=-1)
        if "is_top1" in outputs:  # the largest logit at a global index below the target
            before = torch.arange(width, device=z.device) < local_t.unsqueeze(-1)
            rows["is_top1"] = z.masked_fill(~before, float("-inf")).amax(dim=-1)
    return torch.stack([rows["m"], rows["s"], rows["zt"], *(rows[name] for name in outputs)])


class _VocabParallelTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_valid, vocab_size, group, outputs):
        ctx.set_materialize_grads(False)  # entropy is often a metric only: no zero gradient to add
        z = logits.narrow(-1, 0, vocab_valid).float()
        local_t = target - vocab_start
        owned = (local_t >= 0) & (local_t < vocab_valid)
        rows = _local_rows(z, local_t, owned, outputs)
        k, n = rows.shape
        gathered = rows.unsqueeze(0) if group is None else all_gather_rows(rows, group).view(-1, k, n)
        big_m = gathered[:, 0].amax(dim=0)
        weight = torch.exp(gathered[:, 0] - big_m)  # e^{m_r - M}; 0 for an all-padding rank
        big_s = (gathered[:, 1] * weight).sum(dim=0)
        log_z = big_m + big_s.log()
        target_logit = gathered[:, 2].sum(dim=0)  # exactly one rank owns each target
        log_probs = target_logit - log_z
        row = 3
        entropy = log_sum_sq = mean = top1 = None
        if "entropy" in outputs:
            entropy = log_z - (gathered[:, row] * weight).sum(dim=0) / big_s
            row += 1
        if "log_sum_sq_probs" in outputs:
            log_sum_sq = (gathered[:, row] * weight * weight).sum(dim=0).log() - 2 * big_s.log()
            row += 1
        if "mean_logits" in outputs:
            mean = gathered[:, row].sum(dim=0) / vocab_size
            row += 1
        if "is_top1" in outputs:
            top1 = (target_logit >= big_m) & (target_logit > gathered[:, row].amax(dim=0))
        ctx.save_for_backward(logits, local_t.clamp(0, max(vocab_valid - 1, 0)), owned, log_z,
                              log_z if entropy is None else entropy)
        ctx.vocab_valid, ctx.has_entropy = vocab_valid, entropy is not None
        ctx.mark_non_differentiable(*(t for t in (log_sum_sq, mean, top1) if t is not None))
        return log_probs, entropy, log_sum_sq, mean, top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        logits, local_t, owned, log_z, entropy = ctx.saved_tensors
        vocab_valid = ctx.vocab_valid
        if grad_entropy is not None and not ctx.has_entropy:
            grad_entropy = None
        none = (None,) * 6
        if grad_log_probs is None and grad_entropy is None:
            return (None, *none)
        if vocab_valid == 0:  # padding columns only: no probability mass, no gradient
            return (torch.zeros_like(logits), *none)
        log_p = logits.narrow(-1, 0, vocab_valid).float() - log_z.unsqueeze(-1)
        p = log_p.exp()
        grad = torch.zeros_like(p)
        if grad_entropy is not None:
            grad -= grad_entropy.float().unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))
        if grad_log_probs is not None:
            g = grad_log_probs.float()
            grad -= g.unsqueeze(-1) * p
            grad.scatter_add_(-1, local_t.unsqueeze(-1), (g * owned).unsqueeze(-1))
        if vocab_valid < logits.shape[-1]:
            grad = torch.nn.functional.pad(grad, (0, logits.shape[-1] - vocab_valid))
        return (grad.to(logits.dtype), *none)


def vocab_parallel_token_stats(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int, vocab_valid: int,
                               vocab_size: int, group, outputs: tuple[str, ...] = ()) -> TokenStats:
    """:class:`TokenStats` of ``logits [N, V_local]`` for ``target [N]``; see the module docstring.

    ``outputs`` names the optional statistics wanted (:data:`OPTIONAL`); ``log_probs`` is always
    computed and, with ``entropy``, differentiable. ``vocab_size`` is the full vocabulary (the mean's
    divisor).
    """
    unknown = set(outputs) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"unknown token statistics {sorted(unknown)}; choose from {OPTIONAL}")
    outputs = tuple(name for name in OPTIONAL if name in outputs)
    return TokenStats(*_VocabParallelTokenStats.apply(logits, target, vocab_start, vocab_valid, vocab_size, group,
                                                      outputs))
