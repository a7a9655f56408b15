"""The module-order heuristic: structural rules from module nesting and call order, without a dataflow.

Used when no meta-device trace of the forward can be made (a custom model, :mod:`.dataflow`), and
for a region the dataflow rules cannot place (:func:`~.rules._dataflow_rules`). Per sub-block (the
modules owning a layer's linears, inside ``layer_lists(model)``):

* the linear called last whose output has the residual width is row-parallel (input split,
  output all-reduced); the others are column-parallel (output split), head-aligned where the family
  table or the attribute name (``qkv``, ``gate_up``) says they are fused (:mod:`.families`);
* modules called between them see split activations: per-head parameters (first dimension a head
  count) are split by head, the others stay replicated with their gradients summed over TP; a norm
  over a whole projection (OLMo-2's ``q_norm``) makes the sub-block gather its column outputs and
  split them again before the row-parallel linear;
* a sub-block with a single linear has no column/row pair and stays replicated.

The input and output embeddings are split over the vocabulary. A sub-block whose linears cannot be
placed this way (none writes the residual width, or the one that does is not called last) is a
:class:`PlanError` naming the ``tp_plan`` that fixes it. Every entry it decides says so in its reason:
:data:`HEURISTIC` when there is no dataflow at all, why the dataflow could not place a region otherwise.
"""

from __future__ import annotations

from collections import defaultdict

from .families import layout_blocks
from .heads import _check_divisible, _is_attention, _separate_projection_blocks
from .model_info import ModelDims, is_linear, layer_lists, linear_shape
from .plan import Plan, PlanEntry, Style
from .validate import PlanError

HEURISTIC = " [module-order heuristic: no dataflow]"


def _heuristic(entry: PlanEntry) -> PlanEntry:
    """A structural-rule entry decided by module nesting and call order, said so in its reason."""
    return PlanEntry(entry.style, entry.source, entry.reason + HEURISTIC, entry.blocks, entry.dim)


def _structural_rules(model, modules, names, order, rank_of, dims: ModelDims, tp: int, plan: Plan,
                      known_fused: dict[str, tuple[str, str]]):
    """Rule entries from module nesting and call order (``order``, ``rank_of``: the modules in call order).

    ``known_fused``: the fused layout the family table gives each linear (see :func:`~.planner._known_fused`)."""
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
            _place_sub_block(owner, linears, modules, order, rank_of, dims, tp, entries, known_fused)
    return entries


def _place_sub_block(owner, linears, modules, order, rank_of, dims, tp, entries, known_fused):
    """Row-parallel the last linear writing the residual width, column-parallel the others, and the
    modules called between them; a single linear stays replicated."""
    if len(linears) < 2:
        for n in linears:
            entries[n] = PlanEntry(Style.REPLICATED, "rule", "only linear of its sub-block (no column/row pair)")
        return
    row = _row_linear(owner, linears, modules, rank_of, dims, tp)
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
        entries[n] = _column_entry(n, row, modules[owner], modules, dims, tp, known_fused.get(n))
    _place_sub_block_params(region, modules, dims, tp, entries)


def _row_linear(owner, linears, modules, rank_of, dims, tp) -> str:
    """The sub-block's row-parallel linear: the last one writing the residual width, called last."""
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
    return row


def _column_entry(n, row, owner_mod, modules, dims, tp, fused) -> PlanEntry:
    """A column-parallel linear feeding ``row``: head-aligned blocks for a known fused layout; an unknown
    fused q/k/v (its width says so) is refused rather than split contiguously."""
    attr = n.rsplit(".", 1)[1]
    out = linear_shape(modules[n])[1]
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
    return PlanEntry(Style.COLWISE, "rule", reason, blocks)


def _place_sub_block_params(region, modules, dims, tp, entries) -> None:
    """Parameterised modules called between the column and row linears see the split activations."""
    for name in region:
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
