"""Attention heads: how head counts constrain a split, and the per-rank counts patched into attentions.

Head counts come from what the forward does with the weights (a projection viewed as ``[heads, d]``,
:mod:`.dataflow`), not from config fields it ignores; the config's counts (:class:`ModelDims`) decide
only where no trace saw the attention. With ``H`` query heads and ``K`` key/value heads:

* ``tp`` must divide ``H``: every rank holds whole query heads;
* key/value heads are split when ``tp`` divides ``K`` and replicated on ``tp / K`` ranks each when
  ``K`` divides ``tp`` (a separate k/v projection then carries one replicated block,
  :func:`_separate_projection_blocks`); any other ``tp`` is a :class:`PlanError`;
* every column split must give each rank whole blocks (:func:`_check_divisible`).

An attention whose projections are split computes ``H / tp`` heads of ``d`` on each rank, so the
integers its forward reads (``num_heads``, ``split_size``, ``num_key_value_groups``, the config's
``num_attention_heads``, ...) are patched to their per-rank values (:func:`_attention_patches`);
families that receive a per-head tensor computed outside the attention (ALiBi) get a hook as well.
"""

from __future__ import annotations

import torch.nn as nn

from .families import attention_hooks, kv_replicas
from .model_info import ModelDims
from .plan import AttentionPatch, Plan, Style
from .validate import PlanError

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "num_kv")
WIDTH_ATTRS = ("split_size", "embed_dim", "hidden_size", "all_head_size", "inner_dim", "attention_dim")
KV_WIDTH_ATTRS = ("kv_dim",)


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


def _check_observed_heads(q: int, kv: int, head_dim: int, where: str, tp: int, model_type: str) -> None:
    """The head counts the forward uses (not the config's) must split over ``tp``."""
    seen = f" ({where.rsplit('.', 1)[0]} computes {q} heads of {head_dim})"
    if q % tp:
        raise PlanError(
            f"tp_size={tp} does not divide num_attention_heads={q} of this {model_type} model{seen}: every TP rank "
            f"must hold whole attention heads. Use a tp_size that divides {q}.")
    if kv % tp and tp % kv:
        raise PlanError(
            f"tp_size={tp} and num_key_value_heads={kv} do not divide one another{seen}: key/value heads "
            f"can be split (tp divides them) or replicated (they divide tp), not both. "
            f"Use a tp_size that divides or is a multiple of {kv}.")


def _is_attention(module: nn.Module) -> bool:
    """Attention modules are the ones whose widths are counted in heads."""
    return "attention" in type(module).__name__.lower() or hasattr(module, "head_dim")


def _separate_projection_blocks(out_features: int, owner: nn.Module, dims: ModelDims, tp: int):
    """A separate k/v projection with fewer KV heads than ranks gets replicated heads.

    Only inside an attention module: an MLP (or any other sub-block) whose width happens to equal
    ``kv_heads * head_dim`` (1 KV head of 128 next to an intermediate size of 128) is split plainly;
    replicating it would give its row-parallel partner a full-width input."""
    if (_is_attention(owner) and dims.kv_heads != dims.heads and out_features == dims.kv_heads * dims.head_dim
            and kv_replicas(dims, tp) > 1):
        return ((out_features, kv_replicas(dims, tp)),)
    return None


def _check_divisible(name, out, blocks, tp):
    if blocks is None:
        if out % tp:
            raise PlanError(f"{name}: output width {out} not divisible by tp_size={tp}")
        return
    for size, replicas in blocks:
        if size % (tp // replicas):
            raise PlanError(f"{name}: fused block of width {size} cannot be split into {tp // replicas} parts")


def _attention_patches(model, modules, plan: Plan, dims: ModelDims, tp: int,
                       observed: dict[str, tuple[int, int, int]] | None = None) -> dict[str, AttentionPatch]:
    """Head counts and split widths of modules that own head-split projections, as per-rank values.

    ``observed``: the head counts each attention's forward used (:func:`~.rules._dataflow_rules`); modules
    not in it fall back to the config's counts when they look like attentions."""
    observed = observed or {}
    owners = {n.rsplit(".", 1)[0] for n, e in plan.entries.items() if e.style == Style.COLWISE}
    patches = {}
    for owner in sorted(owners):
        mod = modules[owner]
        if owner in observed:
            heads, kv_heads, head_dim = observed[owner]
        elif _is_attention(mod):
            heads, kv_heads, head_dim = dims.heads, dims.kv_heads, dims.head_dim
        else:
            continue  # an MLP: its widths are not per-head
        attrs = _per_rank_attrs(mod, heads, kv_heads, head_dim, tp)
        config = _per_rank_config(model, mod, heads, kv_heads, tp, observed=owner in observed)
        hooks = attention_hooks(type(mod).__name__, model.config)
        if attrs or config or hooks:
            patches[owner] = AttentionPatch(attrs=attrs, config=config, hooks=hooks)
    return patches


def _per_rank_attrs(mod: nn.Module, heads: int, kv_heads: int, head_dim: int, tp: int) -> dict[str, int]:
    """The module's own integer attributes that count its heads or their widths, at their per-rank values.
    Only known names with the full count's value are changed: other integers keep their values."""
    local_h = heads // tp
    local_kv = max(kv_heads // tp, 1)
    attrs = {}
    for attr, value in vars(mod).items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if attr in HEAD_ATTRS and value == heads:
            attrs[attr] = local_h
        elif attr in KV_ATTRS and value == kv_heads:
            attrs[attr] = local_kv
        elif attr == "num_key_value_groups":
            attrs[attr] = local_h // local_kv
        elif attr in WIDTH_ATTRS and value == heads * head_dim:
            attrs[attr] = value // tp
        elif attr in KV_WIDTH_ATTRS and value == kv_heads * head_dim and kv_heads % tp == 0:
            attrs[attr] = value // tp
    return attrs


def _per_rank_config(model, mod: nn.Module, heads: int, kv_heads: int, tp: int, *, observed: bool) -> dict[str, int]:
    """Head counts for a private copy of the model's config, for attentions that read them from
    ``self.config``. With ``observed`` (the trace saw the counts the forward uses) a config count is
    changed only when it is the one the forward uses."""
    config = {}
    cfg = getattr(mod, "config", None)
    if cfg is not None and (cfg is model.config or cfg is getattr(model.config, "text_config", None)):
        for key, full, local in (("num_attention_heads", heads, heads // tp),
                                 ("num_key_value_heads", kv_heads, max(kv_heads // tp, 1))):
            if getattr(cfg, key, None) is not None and (not observed or getattr(cfg, key) == full):
                config[key] = local
    return config
