"""``plan_tensor_parallel(model, tp_size)``: decide, without any process group, how to split every module.

Order of authority, highest first: the user's ``tp_plan``; the model's own Hugging Face plan
(``model._tp_plan`` = ``config.base_model_tp_plan`` + the head's ``_tp_plan``), translated to our
styles; structural rules for everything else; a module none of them shards stays replicated.

The structural rules come from the dataflow of one forward on a meta twin (:mod:`.rules`); when no
meta-device trace can be made (a custom model), from module nesting and call order instead
(:mod:`.heuristic`), and every such entry says so. Both read the family table of fused layouts
(:mod:`.families`) as data, looked up here once per module (:func:`_known_fused`). MoE experts are split inside each expert
(:mod:`.experts`). Head counts are checked and the attentions' per-rank head counts patched in
:mod:`.heads`; parameter counts and warnings about large replicated blocks are in :mod:`.summary`.
Any case the rules cannot handle, and any linear they cannot place, is a ``ValueError`` naming the
module and the fix, raised before a single weight is touched.

A style in the model's HF plan that tp_trainer does not know (or that does not fit its module)
falls back to the structural rules, with a warning in ``plan.warnings``; in the user's plan it
is an error, as are patterns that match nothing and linear styles on non-linear modules. Last,
:func:`~tp_trainer.planner.validate.validate_plan` runs one training step of rank 0's shards on
a meta-device twin: a split that does not fit its neighbours is a ``PlanError`` there.
"""

from __future__ import annotations

import torch.nn as nn

from . import dataflow as dataflow_trace
from ..parallel.lora import is_peft_model
from .experts import plan_experts
from .families import fused_layout
from .heads import (HEAD_ATTRS, KV_ATTRS, KV_WIDTH_ATTRS, WIDTH_ATTRS, _attention_patches, _separate_projection_blocks,
                    check_heads)
from .heuristic import HEURISTIC, _heuristic, _structural_rules
from .hf_plan import hf_plan_of, translate_hf_style
from .lora import plan_lora_model
from .model_info import ModelDims, call_order, is_linear, layer_lists, linear_shape, model_dims
from .plan import Plan, PlanEntry, Style, match_plan
from .rules import _dataflow_rules
from .summary import _own_param_counts, _replication_warnings
from .validate import (PlanError, check_plan_mapping, check_styles_fit_modules, check_user_plan, style_misfit,
                       user_style, validate_plan)

# Imported from here by tests; they live in the modules split out of this one.
from .heads import _is_attention  # noqa: F401
from .rules import _layout_blocks  # noqa: F401

__all__ = ["HEAD_ATTRS", "HEURISTIC", "KV_ATTRS", "KV_WIDTH_ATTRS", "PlanError", "WIDTH_ATTRS", "check_heads",
           "plan_tensor_parallel"]

# PlanError (the model cannot be split as asked) lives in validate.py and is re-exported here.


def plan_tensor_parallel(model: nn.Module, tp_size: int, *, user_plan: dict[str, str] | None = None) -> Plan:
    """Compute the :class:`~tp_trainer.planner.plan.Plan` of ``model`` for ``tp_size`` ranks."""
    if tp_size < 1:
        raise PlanError(f"tp_size must be >= 1, got {tp_size}")
    if user_plan is not None:
        check_plan_mapping(user_plan)  # types and style names, before anything is computed
    dims = model_dims(model)
    plan = Plan(tp_size=tp_size, model_type=dims.model_type, entries={})
    if tp_size == 1:
        plan.notes.append("tp_size=1: nothing is split")
        return plan
    if is_peft_model(model):  # planned unwrapped, the adapters after their base layers (planner/lora.py)
        return plan_lora_model(model, tp_size, user_plan=user_plan, plan_base=plan_tensor_parallel)
    modules = dict(model.named_modules())
    # observed: attention module -> (heads, kv heads, head dim) its forward used
    rule_entries, observed, order = _rule_entries(model, modules, dims, tp_size, plan)
    rule_entries.update(plan_experts(model, modules, dims, tp_size, plan))  # MoE experts: TP inside each expert
    fallbacks: dict[str, str] = {}  # HF pattern -> warning: its style was unknown or misfit, the rules decided
    entries = _resolve(model, modules, order, rule_entries, dims, tp_size, user_plan, fallbacks)
    _demote_grad_sum_after_gathers(entries)
    plan.entries = entries
    if user_plan:
        check_user_plan(user_plan, model, set(entries))
    check_styles_fit_modules(plan, model, modules)
    _check_linears_placed(model, modules, plan)
    plan.patches = _attention_patches(model, modules, plan, dims, tp_size, observed)
    plan.param_counts = _own_param_counts(modules, entries)
    plan.warnings = list(fallbacks.values()) + _replication_warnings(plan, modules)
    validate_plan(model, plan)  # a meta-device training step of rank 0's shards: shape errors raise here
    return plan


def _rule_entries(model, modules, dims: ModelDims, tp: int, plan: Plan):
    """``(entries, observed head counts, call order)`` of the structural rules: from the dataflow trace,
    else from the module-order heuristic (noted in ``plan.notes``). The config's head counts are checked
    against ``tp`` wherever the trace saw no attention use them."""
    names = {id(m): n for n, m in model.named_modules()}
    known_fused = _known_fused(model, modules)
    flow = dataflow_trace.trace_dataflow(model)
    if flow is not None:
        order = flow.order
        rank_of = {n: i for i, n in enumerate(order)}
        entries, observed = _dataflow_rules(model, modules, names, flow, order, rank_of, dims, tp, plan, known_fused)
        if not observed:  # no attention seen in the trace: the config's head counts are all there is
            check_heads(dims, tp)
        return entries, observed, order
    check_heads(dims, tp)
    order = call_order(model)
    if order is None:
        order = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        plan.notes.append("call order taken from module registration (meta-device trace unavailable)")
    rank_of = {n: i for i, n in enumerate(order)}
    entries = {n: _heuristic(e) for n, e in
               _structural_rules(model, modules, names, order, rank_of, dims, tp, plan, known_fused).items()}
    plan.notes.append(f"structure from the module-order heuristic (module nesting and call order), not from the "
                      f"dataflow: {dataflow_trace.last_failure}")
    return entries, {}, order


def _known_fused(model, modules) -> dict[str, tuple[str, str]]:
    """``{module: (fused layout, "family" or "name")}`` for every module the family table (or its attribute
    name) says is a fused projection, looked up once with its owner's class and the model's config: the
    rules (:mod:`.rules`, :mod:`.heuristic`) read it as data and consult no table themselves."""
    known = {}
    for name in modules:
        if not name:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = modules[owner_name] if owner_name else model
        layout = fused_layout(type(owner).__name__, attr, owner, model.config)
        if layout is not None:
            known[name] = layout
    return known


def _resolve(model, modules, order, rule_entries: dict[str, PlanEntry], dims: ModelDims, tp: int,
             user_plan: dict[str, str] | None, fallbacks: dict[str, str]) -> dict[str, PlanEntry]:
    """Every module's entry, in call order, by the order of authority: the user's plan, else the model's
    HF plan, else the structural rule, else replicated; ``fallbacks`` collects the HF plan's entries the
    rules overrode (:func:`_from_hf`)."""
    hf = hf_plan_of(model)
    fused_owners = {n.rsplit(".", 1)[0] for n, e in rule_entries.items() if "fused" in e.reason}
    called = set(order)
    entries: dict[str, PlanEntry] = {}
    for name in order + [n for n in rule_entries if n not in called]:
        if name in entries or name not in modules:
            continue
        rule = rule_entries.get(name)
        entry = rule
        hit = match_plan(hf, name) if hf else None
        if hit is not None:
            entry = _from_hf(name, hit, rule, modules, model, dims, tp, fused_owners, fallbacks)
        if user_plan:
            uhit = match_plan(user_plan, name)
            if uhit is not None:
                style = user_style(*uhit)
                # a fused layout describes the dim the rule splits: it carries over only to the same style
                same = rule is not None and style == rule.style
                entry = PlanEntry(style, "user", f"user plan {uhit[0]!r}: {uhit[1]}", rule.blocks if same else None,
                                  rule.dim if same else 0)
        if entry is None:
            entry = PlanEntry(Style.REPLICATED, "rule", "no rule shards it (norm, bias-only or position table)")
        entries[name] = entry
    return entries


def _from_hf(name, hit, rule: PlanEntry | None, modules, model, dims, tp, fused_owners: set[str],
             fallbacks: dict[str, str]) -> PlanEntry | None:
    """The entry the model's own HF plan gives ``name``; a style we do not know, or one that does not fit
    the module's type, falls back to the structural ``rule`` with a warning (never a guessed split)."""
    pattern, hf_style = hit
    module = modules[name]
    translated = translate_hf_style(hf_style)
    misfit = None if translated is None else style_misfit(name, PlanEntry(translated[0], "hf-plan", ""), module, model)
    if translated is None or misfit is not None:
        used = f"{rule.style}{rule.describe_layout()} ({rule.reason})" if rule is not None else "replicated"
        problem = (f"its style {hf_style!r} is not one tp_trainer knows" if translated is None
                   else f"its style {hf_style!r} does not fit: {misfit}")
        fallbacks.setdefault(pattern, f"the model's HF tp_plan entry {pattern!r}: {problem}; the structural rules "
                                      f"decided instead: {used}.")
        return rule
    style, note = translated
    blocks = rule.blocks if rule is not None else None
    reason = f"HF plan {pattern!r}: {hf_style}" + (f" ({note})" if note else "")
    if style == Style.COLWISE_GATHER and rule is not None and rule.style == Style.LM_HEAD:
        return PlanEntry(Style.LM_HEAD, "hf-plan", reason + "; trained with vocab-parallel cross-entropy, "
                         "logits gathered only in eval/generate and when no labels are passed")
    # Phi-3's plan replicates fused activations (gather after qkv/gate_up, split before o/down): the
    # head-aligned split of the fused layout keeps them sharded, with half the traffic.
    if style == Style.COLWISE_GATHER and rule is not None and rule.style == Style.COLWISE and "fused" in rule.reason:
        return PlanEntry(Style.COLWISE, "hf-plan", reason + "; upgraded to a head-aligned colwise split "
                         "(no gather)" , rule.blocks)
    if style == Style.ROWWISE_SPLIT and rule is not None and rule.style == Style.ROWWISE and name.rsplit(".", 1)[0] in fused_owners:
        return PlanEntry(Style.ROWWISE, "hf-plan", reason + "; input already split by the upgraded colwise",
                         rule.blocks)
    if style == Style.COLWISE and blocks is None and is_linear(module):
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        blocks = _separate_projection_blocks(linear_shape(module)[1], owner, dims, tp)
    return PlanEntry(style, "hf-plan", reason, blocks)


def _demote_grad_sum_after_gathers(entries: dict[str, PlanEntry]) -> None:
    """A norm the rules put in a parallel region sees replicated activations when the plan that won
    (HF's or the user's) gathers that sub-block's column outputs: its gradient is then already full."""
    gathered = {n.rsplit(".", 1)[0] for n, e in entries.items() if e.style == Style.COLWISE_GATHER}
    for name, e in entries.items():
        if e.style == Style.REPLICATED_GRAD_SUM and e.source == "rule" and name.rsplit(".", 1)[0] in gathered:
            entries[name] = PlanEntry(Style.REPLICATED, "rule", "its sub-block's projections are gathered: "
                                      "activations replicated")


def _check_linears_placed(model, modules, plan: Plan):
    """Every linear inside a block must be sharded or replicated on purpose."""
    for list_name in layer_lists(model):
        for name, mod in modules.items():
            if name.startswith(list_name + ".") and is_linear(mod) and name not in plan.entries:
                raise PlanError(f"the planner cannot place {name} ({type(mod).__name__}): it is never called in a "
                                f"forward pass. Pass tp_plan={{'{name}': 'replicated'}} (or a style).")
