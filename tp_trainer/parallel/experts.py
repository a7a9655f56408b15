"""Tensor parallelism inside every expert of a fused MoE experts module (transformers 5's 3-D weights).

With ``tp`` ranks and per-expert intermediate width ``I``, rank ``r`` keeps, of every expert ``e``:

* ``gate_up_proj[e]``: rows ``[r I/tp, (r+1) I/tp)`` of the gate half and the same rows of the up
  half, laid ``[gate_r | up_r]`` (``block_spec`` with two blocks), so the implementation's
  ``chunk(2, dim=-1)`` still separates gate from up; transposed ``[E, H, 2I]`` weights likewise on dim 2;
* ``down_proj[e]``: input columns ``[r I/tp, (r+1) I/tp)`` (dim 2 of ``[E, H, I]``, dim 1 of ``[E, I, H]``).

Rank ``r``'s experts then compute, for every token and every chosen expert, the part of the
expert's output that comes from its ``I/tp`` intermediate units, already multiplied by the
routing weight (the multiplication is linear): the sum over ranks is the exact output. Around
the module (forward hooks, so parameter names and the module's own forward are unchanged):

* ``f`` on every differentiable floating-point input (the hidden states and the routing
  weights): identity forward; backward, the ranks' partial gradients are summed over TP, one
  all-reduce per dtype for all of them (``mappings.copy_to_tp_region_many``);
* ``g`` (``mappings.reduce_from_tp_region``) on the output: the partial outputs summed forward, identity backward.

The parameters are ``sharded_parameter``\\ s carrying their :class:`~tp_trainer.parallel.sharding.ShardSpec`
(a non-zero shard dim of a 3-D tensor), so gathering (``gather.iter_full_state``), ``save_model``,
checkpoints, ZeRO and the global gradient norm treat them like any other shard.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import sharded_parameter
from .mappings import copy_to_tp_region_many, reduce_from_tp_region
from .sharding import block_spec, contiguous_spec


def _needs_f(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _experts_pre_hook(group):
    def hook(module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        slots = [("a", i) for i, a in enumerate(args) if _needs_f(a)]
        slots += [("k", k) for k, v in kwargs.items() if _needs_f(v)]
        if not slots:
            return None
        args = list(args)
        values = [args[i] if where == "a" else kwargs[i] for where, i in slots]
        for (where, i), v in zip(slots, copy_to_tp_region_many(values, group)):
            if where == "a":
                args[i] = v
            else:
                kwargs[i] = v
        return tuple(args), kwargs
    return hook


def _experts_post_hook(group, name: str):
    def hook(module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{name}: a tensor-parallel experts module must return one tensor (the sum of the "
                            f"weighted expert outputs), got {type(output).__name__}; plan it as 'replicated'")
        return reduce_from_tp_region(output, group)
    return hook


def shard_experts(module: nn.Module, layout, context, *, name: str = "experts") -> nn.Module:
    """Shard ``module`` in place following ``layout`` (a :class:`tp_trainer.planner.experts.ExpertsLayout`)
    on ``context.tp_comm`` and hook ``f``/``g`` around its forward; returns ``module``."""
    rank, tp = context.tp_rank, context.tp_size
    for ep in layout.params:
        p = getattr(module, ep.name)
        shape = tuple(p.shape)
        spec = (block_spec(shape, ep.dim, rank, tp, list(ep.blocks)) if ep.blocks
                else contiguous_spec(shape, ep.dim, rank, tp))
        setattr(module, ep.name, sharded_parameter(p, spec, p.requires_grad))
    for attr in layout.int_attrs:
        setattr(module, attr, layout.intermediate // tp)
    module.register_forward_pre_hook(_experts_pre_hook(context.tp_comm), with_kwargs=True)
    module.register_forward_hook(_experts_post_hook(context.tp_comm, name), with_kwargs=True)
    module.tp_experts_layout = layout
    return module
