"""Per-token norms of the replicated residual stream, computed on ``1/tp`` of the tokens per rank.

Without sequence parallelism every TP rank normalises all ``N = batch x seq`` tokens of the
replicated hidden states (decoder-layer norms and the final norm): work that does not shrink
with ``tp``. A per-token norm (RMSNorm, LayerNorm: statistics over the last dim only) is
row-independent, so rank ``r`` can normalise rows ``[r N/tp, (r+1) N/tp)`` and all-gather:

    forward:  y = gather_rows(norm(split_rows(x)))           one all-gather of [N, H]
    backward: dx = gather_rows(norm'(own rows of dy))         one all-gather of [N, H]
              dw = sum over ranks of the partial weight grads (``tp_grad_sum``, summed with the
                   other TP-partial gradients by ``grads.py``)

with ``split_rows`` / ``gather_rows`` the token pair of ``mappings.py``
(``scatter_to_sequence_parallel_region``, ``gather_from_sequence_parallel_region(replicated_grad=True)``).

The output and the gradient are those of the unsplit norm (the same per-row kernels; the weight
gradient sums its rows in two partial sums). It trades one all-gather each way for half the
norm work, so it is only worth it where an all-gather is cheap next to the norm: it is applied
to 16-bit norms when the TP group has the shared-memory transport (gloo ranks on one host,
``shm.py``; the rule and its measurement: ``kernels.Kernels.splits_norms``), not on NCCL, where
Megatron-style sequence parallelism would be the way.

The norm modules are not replaced, only hooked: parameter names, ``state_dict`` and saved
checkpoints are unchanged. A token count that ``tp`` does not divide (a single token in
``generate``, an odd batch x seq) is padded with zero rows.

Sequence parallelism (``sequence.py``) does this job and more: there the norms already see ``1/tp``
of the tokens (and so do dropout and the residual adds, with no all-gather after each norm), so
``apply_tensor_parallel(..., sequence_parallel=True)`` splits no norm here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region


def is_per_token_norm(module: nn.Module) -> bool:
    """A norm whose statistics are over the last dim only: ``nn.LayerNorm`` over one dim, or an
    ``*RMSNorm``/``*LayerNorm`` class whose parameters are 1-D (HF's RMSNorm variants)."""
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or name.endswith("LayerNorm")):
        return False
    params = list(module.parameters(recurse=False))
    return all(p.dim() == 1 for p in params) and not list(module.children())


def split_norm_over_tokens(module: nn.Module, group, tp_size: int) -> None:
    """Hook ``module`` (a per-token norm of a replicated activation) to run on ``1/tp`` of the tokens.

    A token count that ``tp`` does not divide is padded with zero rows (a norm maps them to
    finite values, their output is dropped, so they get zero gradient and add nothing to the
    weight gradient): every call is split, and the weight gradient is always a partial sum.
    """
    pending: list[tuple[torch.Size, int]] = []

    def split(mod, args):
        x = args[0]
        rows = x.reshape(-1, x.shape[-1])
        pad = -rows.shape[0] % tp_size
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        pending.append((x.shape, pad))
        return (scatter_to_sequence_parallel_region(rows, group), *args[1:])

    def gather(mod, args, output):
        shape, pad = pending.pop()
        full = gather_from_sequence_parallel_region(output, group, replicated_grad=True)
        if pad:
            full = full[:full.shape[0] - pad]
        return full.view(*shape[:-1], output.shape[-1])

    for p in module.parameters(recurse=False):
        p.tp_grad_sum = True
    module.register_forward_pre_hook(split)
    module.register_forward_hook(gather)
    module.tp_token_split = True
