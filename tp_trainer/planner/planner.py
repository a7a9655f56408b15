"""``plan_tensor_parallel(model, tp_size)``: decide, without any process group, how to split every module.

Order of authority, highest first: the user's ``tp_plan``; the model's own Hugging Face plan
(``model._tp_plan`` = ``config.base_model_tp_plan`` + the head's ``_tp_plan``), translated to our
styles; structural rules for everything else:

* the input embedding is split over the vocabulary; so is the output embedding (``lm_head``),
  which trains with a vocab-parallel cross-entropy (never skipped, unlike DeepSpeed AutoTP);
* inside each repeated block, every module that owns linears (an attention, an MLP, or the
  block itself as in OPT) is a *sub-block*: the linear called last whose output has the
  residual width writes into the residual stream and is row-parallel; the others are
  column-parallel, fused ones split head-aligned (:mod:`.families`);
* parameterised modules called between a sub-block's first column-parallel linear and its
  row-parallel linear (Qwen3's ``q_norm``/``k_norm``) see split activations: they stay
  replicated and their gradients are summed over TP; all others are plainly replicated.

Head counts are checked here: ``tp`` must divide the query heads; key/value heads are split
when ``tp`` divides them and replicated on ``tp / K`` ranks each when ``K`` divides ``tp``.
Any other case, and any linear the rules cannot place, is a ``ValueError`` naming the module
and the fix, raised before a single weight is touched.

A style in the model's HF plan that tp_trainer does not know (or that does not fit its module)
falls back to the structural rules, with a warning in ``plan.warnings``; in the user's plan it
is an error, as are patterns that match nothing and linear styles on non-linear modules. Last,
:func:`~tp_trainer.planner.validate.validate_plan` runs one training step of rank 0's shards on
a meta-device twin: a split that does not fit its neighbours is a ``PlanError`` there.
"""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from .experts import plan_experts
from .families import attention_hooks, fused_layout, kv_replicas, layout_blocks
from .hf_plan import hf_plan_of, translate_hf_style
from .model_info import ModelDims, call_order, is_linear, layer_lists, linear_shape, model_dims
from .plan import AttentionPatch, Plan, PlanEntry, Style, match_plan, pattern_to_regex
from .validate import (PlanError, check_plan_mapping, check_styles_fit_modules, check_user_plan, style_misfit,
                       user_style, validate_plan)

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "num_kv")
WIDTH_ATTRS = ("split_size", "embed_dim", "hidden_size", "all_head_size", "inner_dim", "attention_dim")
KV_WIDTH_ATTRS = ("kv_dim",)


# PlanError (the model cannot be split as asked) lives in validate.py and is re-exported here.


def check_heads(dims: ModelDims, tp: int) -> None:
    if dims.heads % tp:
        raise PlanError(
            f"tp_size={tp} does not divide num_attention_heads={dims.heads} of this {dims.model_type} model: "
            f"every TP rank must hold whole attention heads. Use a tp_size that divides {dims.heads}.")
    if dims.kv_heads % tp and tp % dims.kv_heads:
        raise PlanError(
            f"tp_size={tp} and num_key_value_heads={dims.kv_heads} do not divide one another: key/value heads "
            f"can be split (tp divides them) or replicated (they divide tp), not both. "
            f"Use a tp_size that divides or is a multiple of {dims.kv_heads}.")


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
    check_heads(dims, tp_size)

    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    order = call_order(model)
    if order is None:
        order = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        plan.notes.append("call order taken from module registration (meta-device trace unavailable)")
    rank_of = {n: i for i, n in enumerate(order)}

    rule_entries = _structural_rules(model, modules, names, order, rank_of, dims, tp_size, plan)
    rule_entries.update(plan_experts(model, modules, dims, tp_size, plan))  # MoE experts: TP inside each expert
    hf = hf_plan_of(model)
    fallbacks: dict[str, str] = {}  # HF pattern -> warning: its style was unknown or misfit, the rules decided
    fused_owners = {n.rsplit(".", 1)[0] for n, e in rule_entries.items() if "fused" in e.reason}
    entries: dict[str, PlanEntry] = {}
    for name in order + [n for n in rule_entries if n not in rank_of]:
        if name in entries or name not in modules:
            continue
        rule = rule_entries.get(name)
        entry = rule
        hit = match_plan(hf, name) if hf else None
        if hit is not None:
            entry = _from_hf(name, hit, rule, modules, model, dims, tp_size, fused_owners, fallbacks)
        if user_plan:
            uhit = match_plan(user_plan, name)
            if uhit is not None:
                style = user_style(*uhit)
                # a fused layout describes the dim the rule splits: it carries over only to the same style
                blocks = rule.blocks if rule is not None and style == rule.style else None
                entry = PlanEntry(style, "user", f"user plan {uhit[0]!r}: {uhit[1]}", blocks)
        if entry is None:
            entry = PlanEntry(Style.REPLICATED, "rule", "no rule shards it (norm, bias-only or position table)")
        entries[name] = entry
    _demote_grad_sum_after_gathers(entries)
    plan.entries = entries
    if user_plan:
        check_user_plan(user_plan, model, set(entries))
    check_styles_fit_modules(plan, model, modules)
    _check_linears_placed(model, modules, plan)
    plan.patches = _attention_patches(model, modules, plan, dims, tp_size)
    plan.param_counts = _own_param_counts(modules, entries)
    plan.warnings = list(fallbacks.values()) + _replication_warnings(plan, modules)
    validate_plan(model, plan)  # a meta-device training step of rank 0's shards: shape errors raise here
    return plan


def _own_param_counts(modules: dict[str, nn.Module], names) -> dict[str, int]:
    """Elements of each module's own parameters; a tensor shared by two modules (tied embeddings) counts once."""
    seen: set[int] = set()
    counts = {}
    for name in names:
        n = 0
        for p in modules[name].parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        counts[name] = n
    return counts


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
                         "logits gathered only in eval/generate")
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


def _separate_projection_blocks(out_features: int, owner: nn.Module, dims: ModelDims, tp: int):
    """A separate k/v projection with fewer KV heads than ranks gets replicated heads.

    Only inside an attention module: an MLP (or any other sub-block) whose width happens to equal
    ``kv_heads * head_dim`` (1 KV head of 128 next to an intermediate size of 128) is split plainly;
    replicating it would give its row-parallel partner a full-width input."""
    if (_is_attention(owner) and dims.kv_heads != dims.heads and out_features == dims.kv_heads * dims.head_dim
            and kv_replicas(dims, tp) > 1):
        return ((out_features, kv_replicas(dims, tp)),)
    return None


def _structural_rules(model, modules, names, order, rank_of, dims: ModelDims, tp: int, plan: Plan):
    entries: dict[str, PlanEntry] = {}
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb_in is not None:
        entries[names[id(emb_in)]] = PlanEntry(Style.VOCAB_EMBEDDING, "rule", "input embedding: vocabulary rows split")
    if emb_out is not None and is_linear(emb_out):
        tied = emb_in is not None and emb_out.weight is emb_in.weight
        entries[names[id(emb_out)]] = PlanEntry(
            Style.LM_HEAD, "rule", "output embedding: vocabulary split, vocab-parallel cross-entropy"
            + (" (weight tied to the input embedding: same shards)" if tied else ""))

    for list_name in layer_lists(model):
        prefix = list_name + "."
        owners: dict[str, list[str]] = defaultdict(list)  # sub-block -> its linears
        for name, mod in modules.items():
            if name.startswith(prefix) and is_linear(mod) and name in rank_of:
                owners[name.rsplit(".", 1)[0]].append(name)
        for owner, linears in owners.items():
            linears.sort(key=lambda n: rank_of[n])
            _place_sub_block(owner, linears, modules, order, rank_of, dims, tp, entries, model.config)
    return entries


def _place_sub_block(owner, linears, modules, order, rank_of, dims, tp, entries, config):
    owner_mod = modules[owner]
    if len(linears) < 2:
        for n in linears:
            entries[n] = PlanEntry(Style.REPLICATED, "rule", "only linear of its sub-block (no column/row pair)")
        return
    residual = [n for n in linears if linear_shape(modules[n])[1] == dims.hidden]
    if not residual:
        raise PlanError(f"cannot place the linears of {owner} ({', '.join(linears)}): none writes the residual "
                        f"width {dims.hidden}. Pass tp_plan={{'{owner}.<name>': 'colwise'|'rowwise'|'replicated'}}.")
    row = residual[-1]
    if rank_of[row] != max(rank_of[n] for n in linears):
        raise PlanError(f"cannot place the linears of {owner}: {row} writes the residual stream but is not the "
                        f"last one called. Pass an explicit tp_plan for {owner}.*")
    in_row = linear_shape(modules[row])[0]
    if in_row % tp:
        raise PlanError(f"{row}: input width {in_row} not divisible by tp_size={tp}")
    entries[row] = PlanEntry(Style.ROWWISE, "rule", "called last in its sub-block, writes the residual stream")
    cols = [n for n in linears if n != row]
    widths = {linear_shape(modules[n])[1] for n in cols}
    region = [name for name in order[min(rank_of[n] for n in cols) + 1: rank_of[row]]
              if name.startswith(owner + ".") and not is_linear(modules[name])]
    # A norm over a whole projection (OLMo-2's q_norm over all heads) needs the full activation:
    # the sub-block then gathers after its column layers and splits again before the row layer.
    full_width = [name for name in region if any(p.dim() == 1 and p.shape[0] in widths and p.shape[0] != dims.head_dim
                                                 for p in modules[name].parameters(recurse=False))]
    if full_width:
        for n in cols:
            entries[n] = PlanEntry(Style.COLWISE_GATHER, "rule", f"{full_width[0].rsplit('.', 1)[1]} normalises the "
                                   "whole projection: output gathered")
        entries[row] = PlanEntry(Style.ROWWISE_SPLIT, "rule", "input replicated by the gathered projections: split")
        for name in region:
            entries[name] = PlanEntry(Style.REPLICATED, "rule", "applied to gathered (replicated) activations")
        return
    for n in cols:
        attr = n.rsplit(".", 1)[1]
        out = linear_shape(modules[n])[1]
        fused = fused_layout(type(owner_mod).__name__, attr, owner_mod, config)
        if fused is not None:
            layout, how = fused
            blocks = layout_blocks(layout, out, dims, tp)
            reason = (f"feeds {row.rsplit('.', 1)[1]}; fused {layout} layout "
                      f"({'known family' if how == 'family' else 'from its name'}), split head-aligned")
        else:
            if (_is_attention(owner_mod) and out != dims.hidden
                    and out == (dims.heads + 2 * dims.kv_heads) * dims.head_dim):
                raise PlanError(f"{n} ({type(owner_mod).__name__}.{attr}) looks like a fused q/k/v projection "
                                f"({dims.heads}+2x{dims.kv_heads} heads of {dims.head_dim}) of unknown layout; "
                                f"splitting it contiguously would mix heads. Pass tp_plan={{'{n}': 'colwise_gather_output', "
                                f"'{row}': 'rowwise_split_input'}} or add its layout to tp_trainer/planner/families.py")
            blocks = _separate_projection_blocks(out, owner_mod, dims, tp)
            reason = f"feeds {row.rsplit('.', 1)[1]}: output split" + (" (KV heads replicated)" if blocks else "")
        _check_divisible(n, out, blocks, tp)
        entries[n] = PlanEntry(Style.COLWISE, "rule", reason, blocks)
    for name in region:  # parameterised modules that see this sub-block's split activations
        if name in entries:
            continue
        params = list(modules[name].parameters(recurse=False))
        per_head = [p for p in params if p.dim() >= 2 and p.shape[0] in (dims.heads, dims.kv_heads)]
        if per_head and len(per_head) == len(params):
            heads = per_head[0].shape[0]
            replicas = 1 if heads % tp == 0 else tp // heads
            entries[name] = PlanEntry(Style.HEAD_SHARDED, "rule", "per-head parameters applied to split heads: "
                                      "split by head", ((heads, replicas),) if replicas > 1 else None)
        else:
            entries[name] = PlanEntry(Style.REPLICATED_GRAD_SUM, "rule",
                                      "applied to split activations inside the parallel region: grads summed over TP")


def _is_attention(module: nn.Module) -> bool:
    """Attention modules are the ones whose widths are counted in heads."""
    return "attention" in type(module).__name__.lower() or hasattr(module, "head_dim")


def _demote_grad_sum_after_gathers(entries: dict[str, PlanEntry]) -> None:
    """A norm the rules put in a parallel region sees replicated activations when the plan that won
    (HF's or the user's) gathers that sub-block's column outputs: its gradient is then already full."""
    gathered = {n.rsplit(".", 1)[0] for n, e in entries.items() if e.style == Style.COLWISE_GATHER}
    for name, e in entries.items():
        if e.style == Style.REPLICATED_GRAD_SUM and e.source == "rule" and name.rsplit(".", 1)[0] in gathered:
            entries[name] = PlanEntry(Style.REPLICATED, "rule", "its sub-block's projections are gathered: "
                                      "activations replicated")


def _check_divisible(name, out, blocks, tp):
    if blocks is None:
        if out % tp:
            raise PlanError(f"{name}: output width {out} not divisible by tp_size={tp}")
        return
    for size, replicas in blocks:
        if size % (tp // replicas):
            raise PlanError(f"{name}: fused block of width {size} cannot be split into {tp // replicas} parts")


def _check_linears_placed(model, modules, plan: Plan):
    """Every linear inside a block must be sharded or replicated on purpose."""
    for list_name in layer_lists(model):
        for name, mod in modules.items():
            if name.startswith(list_name + ".") and is_linear(mod) and name not in plan.entries:
                raise PlanError(f"the planner cannot place {name} ({type(mod).__name__}): it is never called in a "
                                f"forward pass. Pass tp_plan={{'{name}': 'replicated'}} (or a style).")


def _attention_patches(model, modules, plan: Plan, dims: ModelDims, tp: int) -> dict[str, AttentionPatch]:
    """Head counts and split widths of modules that own head-split projections, as per-rank values."""
    local_h = dims.heads // tp
    local_kv = max(dims.kv_heads // tp, 1)
    owners = {n.rsplit(".", 1)[0] for n, e in plan.entries.items() if e.style == Style.COLWISE}
    patches = {}
    for owner in sorted(owners):
        mod = modules[owner]
        if not _is_attention(mod):
            continue  # an MLP: its widths are not per-head
        attrs = {}
        for attr, value in vars(mod).items():
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if attr in HEAD_ATTRS and value == dims.heads:
                attrs[attr] = local_h
            elif attr in KV_ATTRS and value == dims.kv_heads:
                attrs[attr] = local_kv
            elif attr == "num_key_value_groups":
                attrs[attr] = local_h // local_kv
            elif attr in WIDTH_ATTRS and value == dims.heads * dims.head_dim:
                attrs[attr] = value // tp
            elif attr in KV_WIDTH_ATTRS and value == dims.kv_heads * dims.head_dim and dims.kv_heads % tp == 0:
                attrs[attr] = value // tp
        config = {}
        cfg = getattr(mod, "config", None)
        if cfg is not None and (cfg is model.config or cfg is getattr(model.config, "text_config", None)):
            for key, local in (("num_attention_heads", local_h), ("num_key_value_heads", local_kv)):
                if getattr(cfg, key, None) is not None:
                    config[key] = local
        hooks = attention_hooks(type(mod).__name__, model.config)
        if attrs or config or hooks:
            patches[owner] = AttentionPatch(attrs=attrs, config=config, hooks=hooks)
    return patches
