"""Structural rules from the dataflow of one forward on a meta twin (:mod:`.dataflow`), not from module
names or nesting.

* the input embedding (and every embedding sharing its weight, as T5's encoder and decoder
  ``embed_tokens``) is split over the vocabulary; so is the output embedding. It trains with a
  vocab-parallel cross-entropy (never skipped, unlike DeepSpeed AutoTP) where the model's loss goes
  through a ``loss_function`` we can replace (causal or masked LM); where the forward computes its
  cross-entropy inline (BERT, T5, BART) or adds a bias to the logits outside the layer (BART's
  ``final_logits_bias``), its vocabulary-split logits are gathered instead;
* linears are grouped into regions by "reads the output of": the ones reading the residual stream
  are column-parallel, the ones reading the region's outputs whose output is added back into the
  stream (directly, after a norm, or inside a post-norm as BERT's ``LayerNorm(dense(x) + input)``)
  are row-parallel. Fused projections are split head-aligned, by family where it is known
  (:mod:`.families`), else from how the forward consumes the output (pieces, heads), else by name;
  regions nothing writes back from (task heads, poolers, routers, an MLM transform) stay replicated;
* parameters applied to a region's split activations: per-head ones (attention sinks, T5's relative
  position bias, a per-head norm) are split by head; per-feature ones (Qwen3's ``q_norm``) stay
  replicated with their gradients summed over TP; one spanning a whole projection (OLMo-2's
  ``q_norm``) makes the region gather its column outputs and split them again before the row.

A region the rules cannot place (a linear between the column- and the row-parallel ones that writes
nothing, e.g. a low-rank pair; no linear reading the stream) takes the module-order heuristic
(:mod:`.heuristic`), said so in its entries' reasons. The head counts each attention's forward used
are returned with the entries: they, not the config's, are checked against ``tp`` (:mod:`.heads`).
"""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from .dataflow import Dataflow, Layout
from .families import layout_blocks
from .heads import _check_divisible, _check_observed_heads, _is_attention, _separate_projection_blocks
from .heuristic import _structural_rules
from .model_info import ModelDims, is_linear, linear_shape
from .plan import Plan, PlanEntry, Style
from .validate import PlanError


def _short(names) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def _dataflow_rules(model, modules, names, flow: Dataflow, order, rank_of, dims: ModelDims, tp: int, plan: Plan,
                    known_fused: dict[str, tuple[str, str]]):
    """Rule entries from the traced dataflow (:mod:`.dataflow`), and the head counts each attention's forward
    used: ``{module: (heads, kv heads, head dim)}``.

    Linears are grouped into *regions* by "reads the output of": a region's linears that read the
    residual stream are column-parallel, those that read the region's outputs and write back into the
    stream row-parallel. Linears in a region without a writer (task heads, poolers, routers, an MLM
    transform) stay replicated. A region the rules cannot place (a linear between the column- and the
    row-parallel ones that writes nothing, e.g. a low-rank pair) takes the module-order heuristic.
    ``known_fused``: the fused layout the family table gives each linear (see :func:`~.planner._known_fused`)."""
    entries = _embedding_entries(model, modules, names, flow)
    out_name = flow.output_embedding
    lin = {n: f for n, f in flow.linears.items() if n in modules and n != out_name}
    observed: dict[str, tuple[int, int, int]] = {}
    heuristic = None
    for members in _regions(lin):
        members.sort(key=lambda n: rank_of.get(n, len(rank_of)))
        rows = [n for n in members if lin[n].role == "inner" and lin[n].writes_stream]
        cols = [n for n in members if lin[n].role == "reader"]
        if not rows:
            for n in members:
                entries[n] = PlanEntry(Style.REPLICATED, "rule", _unsplit_reason(lin[n]))
            continue
        odd = [n for n in members if n not in rows and n not in cols]
        if odd or not cols:
            why = (f" [module-order heuristic: the dataflow puts {_short(odd)} between the stream's readers and "
                   f"writers without writing it]" if odd else " [module-order heuristic: no linear reads the stream]")
            if heuristic is None:
                try:
                    heuristic = _structural_rules(model, modules, names, order, rank_of, dims, tp, plan, known_fused)
                except PlanError as err:  # the heuristic cannot place something either: keep the region whole
                    heuristic = {}
                    why += f"; the heuristic fails too ({err})"
            for n in members:
                rule = heuristic.get(n) or PlanEntry(Style.REPLICATED, "rule", "no rule shards it")
                entries[n] = PlanEntry(rule.style, rule.source, rule.reason + why, rule.blocks, rule.dim)
            continue
        _place_region(model, modules, flow, cols, rows, dims, tp, entries, observed, known_fused)
    return entries, observed


def _regions(lin: dict) -> list[list[str]]:
    """The linears grouped by "reads the output of" (union-find over ``reads_linears`` of inner linears),
    in first-seen order."""
    parent = {n: n for n in lin}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n, f in lin.items():
        if f.role == "inner":
            for c in f.reads_linears:
                if c in lin:
                    parent[find(c)] = find(n)
    regions: dict[str, list[str]] = defaultdict(list)
    for n in lin:
        regions[find(n)].append(n)
    return list(regions.values())


def _unsplit_reason(f) -> str:
    if f.role == "reader":
        return ("reads the residual stream, but no linear reading its output writes back to it (a task head, "
                "pooler or router): replicated")
    if f.role == "inner":
        return f"reads {_short(f.reads_linears)}'s output and nothing it feeds writes the residual stream: replicated"
    return "its input comes neither from the residual stream nor from another linear alone: replicated"


def _embedding_entries(model, modules, names, flow: Dataflow) -> dict[str, PlanEntry]:
    """The input embedding, every embedding sharing its weight (T5's encoder/decoder ``embed_tokens``), the
    output embedding (its loss decides whether its logits stay split), and modules holding one of their
    parameters as their own (BERT's ``cls.predictions.bias`` is the decoder's bias)."""
    entries: dict[str, PlanEntry] = {}
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb_in is not None:
        in_name = names[id(emb_in)]
        entries[in_name] = PlanEntry(Style.VOCAB_EMBEDDING, "rule", "input embedding: vocabulary rows split")
        for n, m in modules.items():
            if m is not emb_in and isinstance(m, nn.Embedding) and m.weight is getattr(emb_in, "weight", None):
                entries[n] = PlanEntry(Style.VOCAB_EMBEDDING, "rule", f"shares the weight of the input embedding "
                                       f"{in_name} (tied): vocabulary rows split, one shard object for both")
    if emb_out is not None and is_linear(emb_out) and flow.output_embedding is not None:
        entries[flow.output_embedding] = _output_embedding_entry(model, emb_in, emb_out, flow)
    held = {id(p): f"{n}.{pn}" for n in entries for pn, p in modules[n].named_parameters(recurse=False)}
    for n, m in modules.items():
        if n in entries:
            continue
        for pn, p in m.named_parameters(recurse=False):
            if id(p) in held:
                entries[n] = PlanEntry(Style.REPLICATED, "rule", f"its {pn} is {held[id(p)]} (tied): sharded with it, "
                                       f"one shard object")
                break
    return entries


def _output_embedding_entry(model, emb_in, emb_out, flow: Dataflow) -> PlanEntry:
    """Vocab-parallel LM head with the vocab-parallel loss where the model's loss goes through a
    ``loss_function`` we can replace; a vocabulary-split head whose logits are gathered otherwise."""
    from ..parallel.cross_entropy import VocabParallelMaskedLMLoss, loss_function_name, vocab_parallel_loss_for

    tie = (" (weight tied to the input embedding: same shards)"
           if emb_in is not None and emb_out.weight is getattr(emb_in, "weight", None) else "")
    name = flow.output_embedding
    biases = sorted(p for p, use in flow.param_uses.items()
                    if use.linears == frozenset({name}) and not p.startswith(name + "."))
    split = "output embedding: vocabulary split"
    if biases:
        return PlanEntry(Style.COLWISE_GATHER, "rule", f"{split}; {', '.join(biases)} is added to its logits outside "
                         f"it, so the logits are gathered to meet all of it{tie}")
    if flow.loss == "inline":
        return PlanEntry(Style.COLWISE_GATHER, "rule", f"{split}; the model computes its cross-entropy inline from the "
                         f"full logits (not through loss_function), so they are gathered{tie}")
    if flow.loss == "loss_function":
        cls = vocab_parallel_loss_for(model)
        if cls is None:
            return PlanEntry(Style.COLWISE_GATHER, "rule", f"{split}; the model's loss_function "
                             f"({loss_function_name(model)}) has no vocab-parallel counterpart: logits gathered{tie}")
        masked = " without label shift" if issubclass(cls, VocabParallelMaskedLMLoss) else ""
        return PlanEntry(Style.LM_HEAD, "rule", f"{split}; the model's loss_function ({loss_function_name(model)}) "
                         f"becomes the vocab-parallel cross-entropy{masked}; logits gathered only in eval and when no "
                         f"labels are passed{tie}")
    return PlanEntry(Style.LM_HEAD, "rule", f"{split}, vocab-parallel cross-entropy (the traced forward computed no "
                     f"loss){tie}")


def _place_region(model, modules, flow: Dataflow, cols, rows, dims: ModelDims, tp: int, entries, observed,
                  known_fused: dict[str, tuple[str, str]]) -> None:
    """Column-parallel readers, row-parallel writers, and the modules applied to the region's split activations."""
    layouts = {c: flow.layout(c) for c in cols}
    heads = [(h, size // h, c) for c in cols if layouts[c] is not None and layouts[c].blocks
             for size, h in layouts[c].blocks if h]
    heads += [(lay.groups, lay.head_dim or linear_shape(modules[c])[1] // lay.groups, c)
              for c, lay in layouts.items() if lay is not None and lay.groups]
    region_heads = _region_heads(heads, cols, rows, modules, dims, tp)
    for r in rows:
        in_row = linear_shape(modules[r])[0]
        if in_row % tp:
            raise PlanError(f"{r}: input width {in_row} not divisible by tp_size={tp}")
        entries[r] = PlanEntry(Style.ROWWISE, "rule", f"reads {_short(cols)}'s outputs and writes the residual stream "
                               "(dataflow): input split")
    for c in cols:
        owner_name = c.rsplit(".", 1)[0] if "." in c else ""
        owner = modules[owner_name] if owner_name else model
        entries[c] = _column_entry(c, owner, rows, layouts[c], known_fused.get(c), region_heads, flow, modules,
                                   dims, tp)
        if region_heads is not None and (layouts[c] is not None and any(h for h, _, w in heads if w == c)):
            prev = observed.get(owner_name)
            observed[owner_name] = region_heads if prev is None else (
                max(prev[0], region_heads[0]), min(prev[1], region_heads[1]), prev[2])
    _place_region_params(modules, flow, cols, rows, dims, tp, entries, region_heads)


def _region_heads(heads, cols, rows, modules, dims: ModelDims, tp: int) -> tuple[int, int, int] | None:
    """``(query heads, kv heads, head dim)`` the region's forward computes, checked against ``tp``; ``None``
    when not every reader's output is consumed as heads (``heads``: ``(count, head dim, linear)`` seen)."""
    # Trusted only when every reader's output is consumed as heads: OLMo-2 normalises q and k over the whole
    # projection before splitting heads, so only v shows them (its KV heads): the config's counts decide there.
    if not heads or {c for _, _, c in heads} != set(cols):
        return None
    q, head_dim, where = max(heads)
    kv = min(h for h, _, _ in heads)
    in_row = linear_shape(modules[rows[0]])[0]
    if len(rows) == 1 and in_row % q == 0:  # the attention's output, all heads side by side
        head_dim = in_row // q
    _check_observed_heads(q, kv, head_dim, where, tp, dims.model_type)
    return (q, kv, head_dim)


def _column_entry(c, owner, rows, layout: Layout | None, fused, region_heads, flow: Dataflow, modules,
                  dims: ModelDims, tp: int) -> PlanEntry:
    """A column-parallel reader, split head-aligned by the first that knows its layout: the family table,
    the traced layout (groups, fused pieces, heads), the attribute name, else contiguously."""
    row_names = _short(rows)
    out = linear_shape(modules[c])[1]
    if fused is not None and fused[1] == "family":
        blocks = layout_blocks(fused[0], out, dims, tp)
        reason = f"feeds {row_names}; fused {fused[0]} layout (known family), split head-aligned"
    elif layout is not None and layout.groups is not None:
        blocks = _layout_blocks(c, layout, out, tp, region_heads)
        reason = (f"reads the residual stream, feeds {row_names}: output read as {layout.describe()} (dataflow), "
                  + ("each group replicated" if blocks else "a contiguous split keeps them whole"))
    elif layout is not None and layout.fused:
        blocks = _layout_blocks(c, layout, out, tp, region_heads)
        reason = (f"feeds {row_names}; fused output, consumed as {layout.describe()} (dataflow), "
                  f"split head-aligned")
    elif fused is not None:
        blocks = layout_blocks(fused[0], out, dims, tp)
        reason = f"feeds {row_names}; fused {fused[0]} layout (from its name), split head-aligned"
    elif layout is not None:
        blocks = _layout_blocks(c, layout, out, tp, region_heads)
        reason = f"reads the residual stream, feeds {row_names}: output split" + (
            " (KV heads replicated)" if blocks else "")
    else:  # the trace lost this output's layout (an op mixing it with unknown values)
        _refuse_unknown_fused(c, owner, rows, out, flow, dims)
        blocks = _separate_projection_blocks(out, owner, dims, tp)
        reason = f"reads the residual stream, feeds {row_names}: output split" + (
            " (KV heads replicated)" if blocks else "")
    _check_divisible(c, out, blocks, tp)
    return PlanEntry(Style.COLWISE, "rule", reason, blocks)


def _refuse_unknown_fused(c, owner, rows, out: int, flow: Dataflow, dims: ModelDims) -> None:
    """A reader whose traced layout was lost must not be a fused projection: a contiguous split would mix
    its pieces. Its width (that of q+k+v) or its forward (taking separate pieces) says so."""
    attr = c.rsplit(".", 1)[-1]
    if (_is_attention(owner) and out != dims.hidden
            and out == (dims.heads + 2 * dims.kv_heads) * dims.head_dim):
        raise PlanError(f"{c} ({type(owner).__name__}.{attr}) looks like a fused q/k/v projection "
                        f"({dims.heads}+2x{dims.kv_heads} heads of {dims.head_dim}) of unknown layout; "
                        f"splitting it contiguously would mix heads. Pass tp_plan={{'{c}': "
                        f"'colwise_gather_output', '{rows[0]}': 'rowwise_split_input'}} or add its layout "
                        f"to tp_trainer/planner/families.py")
    if flow.split_apart(c):
        raise PlanError(f"{c} ({type(owner).__name__}.{attr}): its forward consumes separate pieces of its "
                        f"output (a fused projection) that tp_trainer cannot align to heads; a plain column "
                        f"split would mix them. Pass tp_plan={{'{c}': 'colwise_gather_output', "
                        f"'{rows[0]}': 'rowwise_split_input'}} or add its layout to "
                        f"tp_trainer/planner/families.py")


def _place_region_params(modules, flow: Dataflow, cols, rows, dims, tp, entries, region_heads) -> None:
    """Parameters applied to the region's split activations: per-head ones (attention sinks, T5's relative
    position bias, Cohere's per-head norm) are split by head, per-feature ones (Qwen3's ``q_norm``) stay
    replicated with their gradients summed over TP; one spanning a whole projection (OLMo-2's ``q_norm``
    over all heads) makes the region gather its column outputs and split them again before the row."""
    used = _params_applied_to(cols, flow, modules)
    widths = {linear_shape(modules[c])[1] for c in cols}
    head_dim = region_heads[2] if region_heads else dims.head_dim
    counts = {region_heads[0], region_heads[1]} if region_heads else {dims.heads, dims.kv_heads}
    full_width = [m for m, uses in used.items() if m not in entries and any(
        use.per_feature and modules[m]._parameters[pn].dim() == 1 and modules[m]._parameters[pn].shape[0] in widths
        and modules[m]._parameters[pn].shape[0] != head_dim for pn, use in uses)]
    if full_width:
        norm = full_width[0].rsplit(".", 1)[-1]
        for c in cols:
            entries[c] = PlanEntry(Style.COLWISE_GATHER, "rule", f"{norm} normalises the whole projection: output "
                                   "gathered (dataflow)")
        for r in rows:
            entries[r] = PlanEntry(Style.ROWWISE_SPLIT, "rule", "input replicated by the gathered projections: split")
        for m in used:
            if m not in entries:
                entries[m] = PlanEntry(Style.REPLICATED, "rule", "applied to gathered (replicated) activations")
        return
    for m, uses in used.items():
        if m in entries:
            continue
        mod = modules[m]
        dim = 1 if isinstance(mod, nn.Embedding) else 0  # an embedding table's rows are looked up: heads are columns
        params = dict(mod.named_parameters(recurse=False))
        per_head = len(uses) == len(params) and all(
            not use.per_feature and params[pn].dim() > dim and params[pn].shape[dim] in counts for pn, use in uses)
        if per_head:
            heads = {params[pn].shape[dim] for pn, _ in uses}
            if len(heads) == 1:
                h = heads.pop()
                if h % tp and tp % h:
                    raise PlanError(f"{m}: per-head parameters of {h} heads cannot be split over tp_size={tp}")
                replicas = 1 if h % tp == 0 else tp // h
                what = "embedding table, heads in its columns" if dim else "parameters"
                entries[m] = PlanEntry(Style.HEAD_SHARDED, "rule", f"per-head {what} applied to split heads "
                                       f"(dataflow): split by head", ((h, replicas),) if replicas > 1 else None, dim)
                continue
        entries[m] = PlanEntry(Style.REPLICATED_GRAD_SUM, "rule", "applied to split activations inside the parallel "
                               "region (dataflow): grads summed over TP")


def _params_applied_to(cols, flow: Dataflow, modules) -> dict[str, list[tuple[str, object]]]:
    """``{module: [(parameter name, its traced use)]}`` of the non-linear modules whose own parameters the
    forward applies to the outputs of the linears ``cols``."""
    used: dict[str, list[tuple[str, object]]] = defaultdict(list)
    col_set = set(cols)
    for full, use in flow.param_uses.items():
        if not use.linears & col_set:
            continue
        mod_name, _, pname = full.rpartition(".")
        mod = modules.get(mod_name)
        if mod is None or pname not in mod._parameters or is_linear(mod):
            continue
        used[mod_name].append((pname, use))
    return used


def _layout_blocks(name: str, layout: Layout, width: int, tp: int, region_heads=None):
    """ShardSpec blocks ``((size, replicas), ...)`` of a traced :class:`Layout` (``None``: contiguous).

    An interleaved layout with fewer groups than ranks is replicated group-wise only when its groups are
    the region's key/value heads (StableLM's k_proj with partial rotary: ``[rot | pass]`` per head);
    a fused layout whose groups hold query heads cannot be."""
    if layout.groups is not None:
        if layout.groups % tp and tp % layout.groups == 0 and region_heads and layout.groups < region_heads[0]:
            return ((width, tp // layout.groups),)
        if layout.groups % tp:
            raise PlanError(f"{name}: its output interleaves {layout.groups} groups of heads (as its forward reads "
                            f"it); tp_size={tp} must divide {layout.groups} so that every rank holds whole groups")
        return None
    blocks = []
    for size, heads in layout.blocks:
        if not heads or heads % tp == 0:
            blocks.append((size, 1))
        elif tp % heads == 0:
            blocks.append((size, tp // heads))
        else:
            raise PlanError(f"tp_size={tp} and the {heads} heads of {name} ({size} features) do not divide one "
                            f"another: heads can be split (tp divides them) or replicated (they divide tp), not both")
    if len(blocks) == 1 and blocks[0][1] == 1:
        return None
    return tuple(blocks)
