"""Gradients that need a tensor-parallel reduction, and the true global gradient norm.

After a backward pass under Megatron's f/g operators:

* a sharded parameter holds the exact gradient of its shard;
* a replicated parameter applied to replicated activations (norms, position tables) holds
  the full gradient, identical on every TP rank;
* a replicated parameter applied to *split* activations (``param.tp_grad_sum``, e.g. Qwen3's
  ``q_norm``) and rows held by several ranks (``param.tp_spec.overlaps``: replicated KV heads)
  hold partial sums: :func:`sync_partial_tp_grads` all-reduces them over TP.

:func:`norm_count_mask` selects the elements each rank counts in the global norm so that every
distinct gradient element is counted exactly once across the TP group (a shard on its owner,
a replicated element on TP rank 0, a shared KV row on its lowest holder); summing
:func:`counted_square_sum` over the world gives the squared norm of the unsharded gradient.
"""

from __future__ import annotations

import torch

from .collectives import all_reduce


def needs_tp_grad_sum(param: torch.Tensor) -> bool:
    spec = getattr(param, "tp_spec", None)
    return bool(getattr(param, "tp_grad_sum", False)) or (spec is not None and spec.overlaps)


def sync_partial_tp_grad(param: torch.Tensor, grad: torch.Tensor, tp_group) -> None:
    """In place: ``grad`` becomes the sum over TP ranks of the partial gradients of ``param``;
    ``tp_group``: the context's ``tp_comm`` (its transport) or a process group (its backend)."""
    if tp_group is None:
        return
    spec = getattr(param, "tp_spec", None)
    if spec is not None and spec.overlaps:
        full = grad.new_zeros(spec.full_shape)
        spec.scatter_add_into(full, grad)
        all_reduce(full, tp_group)
        held = spec.take(full)
        grad.narrow(spec.dim, 0, held.shape[spec.dim]).copy_(held)
    else:
        all_reduce(grad, tp_group)


def sync_partial_tp_grads(params, tp_group) -> None:
    for p in params:
        if p.grad is not None and needs_tp_grad_sum(p):
            sync_partial_tp_grad(p, p.grad, tp_group)


def norm_count_mask(param: torch.Tensor, tp_rank: int):
    """Which local elements this rank counts in the global norm so the TP group counts each once.

    ``True``: all of them (a shard); ``False``: none (a replicated tensor on a TP rank other
    than 0); a bool tensor of the local shape: the rows not already held by a lower TP rank.
    """
    spec = getattr(param, "tp_spec", None)
    if spec is None:
        return tp_rank == 0
    if not spec.overlaps:
        return True
    earlier = {seg for r in range(spec.tp_rank) for seg in spec.segments[r]}
    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    offset = 0
    for seg in spec.local_segments:
        if seg not in earlier:
            mask.narrow(spec.dim, offset, seg[1]).fill_(True)
        offset += seg[1]
    return mask


def counted_square_sum(pieces, device) -> torch.Tensor:
    """``sum(grad^2)`` in fp32 over the elements of ``(grad, mask)`` pieces selected by their
    :func:`norm_count_mask` value.

    Whole fp32 gradients (almost all of them) go through ``torch._foreach_norm``, what
    ``torch.nn.utils.clip_grad_norm_`` uses: one read pass per tensor and no temporary, where
    ``grad.pow(2).sum()`` writes and re-reads a gradient-sized temporary (measured: docs/benchmarks.md,
    "Kernel measurements"). Each norm is squared back; the relative error that adds is ~1e-7.
    """
    whole, total = [], torch.zeros((), dtype=torch.float32, device=device)
    for grad, mask in pieces:
        if mask is True and grad.dtype == torch.float32:
            whole.append(grad)
        elif mask is True:
            total += grad.float().square().sum()
        elif mask is not False:
            total += grad.float().masked_select(mask).square().sum()
    if whole:
        total += torch.stack(torch._foreach_norm(whole)).square().sum()
    return total
