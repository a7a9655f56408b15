"""Reassemble full tensors from TP shards (for saving, exporting and tests).

``gather_full(local, spec, tp_group)`` all-gathers the ``tp`` local tensors (equal shapes by
construction) and places each rank's segments at their offsets in the full tensor. The state
dict is produced one tensor at a time (a generator), so a rank never holds more than its
shards plus one full tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .sharding import ShardSpec


def gather_full(local: torch.Tensor, spec: ShardSpec | None, tp_group) -> torch.Tensor:
    if spec is None or tp_group is None:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(spec.tp_size)]
    dist.all_gather(parts, local, group=tp_group)
    return spec.unshard(parts)


def iter_full_state(model: nn.Module, tp_group, *, dtype: torch.dtype | None = None, grads: bool = False):
    """Yield ``(name, full_tensor)`` for every parameter (or its gradient) and persistent buffer.

    Every TP rank must iterate (the gathers are collectives); tied parameters appear once,
    under their first name, as in ``model.named_parameters()``.
    """
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.detach()
        if tensor is None:
            continue
        full = gather_full(tensor, getattr(param, "tp_spec", None), tp_group)
        yield name, full.to(dtype) if dtype is not None and full.is_floating_point() else full
    if grads:
        return
    persistent = {n for n, _ in persistent_buffers(model)}
    for name, buf in model.named_buffers():
        if name in persistent:
            yield name, buf.to(dtype) if dtype is not None and buf.is_floating_point() else buf


def persistent_buffers(model: nn.Module):
    """``(full name, buffer)`` of the buffers a state dict holds (not those registered ``persistent=False``)."""
    for mod_name, mod in model.named_modules():
        for b_name, buf in mod.named_buffers(recurse=False):
            if b_name not in mod._non_persistent_buffers_set and buf is not None:
                yield (f"{mod_name}.{b_name}" if mod_name else b_name), buf
