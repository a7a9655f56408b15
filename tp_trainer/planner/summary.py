"""What the plan holds, counted once: each module's own parameter elements, and the warnings about
large replicated blocks.

A parameter shared by two modules (tied embeddings, an MLM head's bias held by its parent too) counts
once, with a sharded holder when it has one, so that :meth:`~.plan.Plan.sharded_fraction` is the
fraction of the model's elements each rank holds a ``1/tp`` share of. A replicated block above
``REPLICATED_WARN_FRACTION`` of the parameters (layers collapsed to ``*``) is named in
``plan.warnings`` with why it is replicated and what to do about it: per-rank memory is then well
above ``1/tp`` of the model.
"""

from __future__ import annotations

import torch.nn as nn

from .model_info import is_linear
from .plan import SHARDED_STYLES, Plan, PlanEntry, pattern_to_regex

def _own_param_counts(modules: dict[str, nn.Module], entries: dict[str, PlanEntry]) -> dict[str, int]:
    """Elements of each module's own parameters; a tensor shared by two modules (tied embeddings, an MLM
    head's bias held by its parent too) counts once, with a sharded holder when it has one."""
    seen: set[int] = set()
    counts = {}
    sharded = [n for n, e in entries.items() if e.style in SHARDED_STYLES]
    for name in sharded + [n for n in entries if n not in sharded]:
        n = 0
        for p in modules[name].parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        counts[name] = n
    return {name: counts[name] for name in entries}


def _is_experts(module: nn.Module) -> bool:
    """MoE experts: transformers 5's fused ``[experts, out, in]`` parameters or a ModuleList of expert MLPs."""
    if "expert" in type(module).__name__.lower():
        return True
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def _replication_warnings(plan: Plan, modules: dict[str, nn.Module]) -> list[str]:
    """Every replicated block above ``REPLICATED_WARN_FRACTION`` of the parameters, named with the fix."""
    warnings = []
    for pattern, fraction, reason in plan.replicated_blocks():
        members = [n for n in plan.param_counts if pattern_to_regex(pattern).match(n)]
        if any(_is_experts(modules[n]) for n in members):
            warnings.append(
                f"MoE experts {pattern} are replicated on every rank ({fraction:.0%} of the parameters): "
                f"tp_trainer cannot split this expert layout (the plan's note says why), so each rank holds "
                f"all of them and their gradients. Expect per-rank memory well above 1/tp of the model.")
        elif any(is_linear(modules[n]) for n in members):
            warnings.append(
                f"{pattern} is replicated on every rank ({fraction:.0%} of the parameters; {reason}). To shard it, "
                f"pass tp_plan={{'{pattern}': 'colwise'|'rowwise'}}.")
        else:
            kind = type(modules[members[0]]).__name__
            warnings.append(
                f"{pattern} ({kind}) is replicated on every rank ({fraction:.0%} of the parameters; {reason}): "
                f"tp_trainer has no split for it, so every rank holds it whole.")
    return warnings
