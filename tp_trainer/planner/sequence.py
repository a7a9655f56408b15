"""Where sequence parallelism splits a model: a printable plan read from the TP plan and the module structure.

:func:`plan_sequence_parallel` decides (no process group, nothing modified) and checks its decision on
a meta-device twin; :func:`apply_sequence_parallel` installs the hooks of
:mod:`tp_trainer.parallel.sequence` (the math and the communication are there) on a model the TP plan
was applied to. The decisions, with hidden states ``[B, S, H]`` split along ``S`` between them:

* the *stack*: the ModuleList of repeated blocks (``model_info.layer_lists``). Its first block's input
  is split: after the embedding's all-reduce, so position embeddings added to it (GPT-2's ``wpe``) are
  in. The split cannot move into the vocab-parallel embedding (a reduce-scatter instead of its
  all-reduce): Hugging Face models read the embedding output's length for their positions and masks.
* the *exit*: the replicated per-token norm the model calls right after the last block (the final
  norm), whose output is gathered, or the last block's output where there is none (post-norm
  encoders). The LM head and the vocab-parallel loss then see all tokens, as without it.
* per block, the *regions*: the module that calls a group of stream-reading column-parallel layers
  (their parent: attention, MLP, MoE block), or the layer itself where the block calls it directly
  (OPT's ``fc1``); a candidate inside another merges into it. Its input is gathered. In *reduce mode*
  its row-parallel layers reduce-scatter and its column-parallel layers keep only their chunk; that
  needs the gathered input to reach column-parallel layers only. Otherwise (an MoE router or experts,
  a replicated linear, an adapter) the region runs in *replicate mode*: gathered with a replicated
  gradient, TP inside unchanged, its output split again at the region module's output or, where its
  row-parallel layers sit outside it (BERT's ``BertSelfOutput``), at theirs.
* the *local modules*: everything else in the blocks that owns parameters (norms, a linear the block
  calls itself), and the final norm: they see this rank's tokens, so their gradients are partial
  sums over TP (``tp_grad_sum``), as are the biases of reduce-mode row-parallel layers.

Checked before a weight is touched: rank 0's shards of a meta-device twin run one training step with
sequence parallelism on a sequence ``tp`` does not divide, and the autograd graph of that step must
show each reduce-mode region's gathered input reaching column-parallel layers only; a region where
something else reads it is demoted to replicate mode (the reduce-scatter would count that reader's
gradient ``tp`` times). Refused, naming the reason: encoder-decoders, several block stacks or none, a
block without a TP region, a twin whose step fails.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from transformers.utils import logging

from ..parallel.norms import is_per_token_norm
from ..parallel.sequence import (GATHERED_INPUT_NODE, SequenceParallel, gather_input_of, gather_output_of,
                                 scatter_output_of, split_input_of)
from .model_info import call_order, is_linear, layer_lists, meta_inputs
from .plan import Plan, Style
from .validate import PlanError

logger = logging.get_logger(__name__)

READERS = (Style.COLWISE, Style.COLWISE_GATHER)
WRITERS = (Style.ROWWISE, Style.ROWWISE_SPLIT)
REPLICATED = (Style.REPLICATED, Style.REPLICATED_GRAD_SUM)
# the only node allowed to read a reduce-mode region's gathered input (parallel/sequence.py)
COLUMN_NODE = GATHERED_INPUT_NODE


class SequenceParallelError(PlanError):
    """Sequence parallelism cannot split this model; the message says why and what to do."""


@dataclass(frozen=True)
class SequenceRegion:
    entries: tuple[str, ...]   # modules whose input is gathered
    writers: tuple[str, ...]   # row-parallel layers writing the region back to the stream
    reduce: bool               # reduce mode (else replicate mode)
    exits: tuple[str, ...]     # replicate mode: modules whose output is split again
    reason: str


@dataclass
class SequencePlan:
    tp_size: int
    stack: str = ""
    entry: str = ""            # the first block: its input is split
    exit: str = ""             # its output is gathered
    regions: list[SequenceRegion] = field(default_factory=list)
    local_modules: list[str] = field(default_factory=list)  # own parameters see local tokens: grads summed
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.tp_size == 1:
            return "sequence parallel: tp=1, nothing to split"
        reduce = sum(r.reduce for r in self.regions)
        return (f"sequence parallel: {self.stack} split along the sequence from {self.entry} to {self.exit}; "
                f"{len(self.regions)} regions ({reduce} reduce-scatter, {len(self.regions) - reduce} replicate); "
                f"{len(self.local_modules)} modules on local tokens")

    def table(self) -> str:
        """One row per region (layers collapsed to ``*``), then the local modules and the notes."""
        rows: dict[tuple, int] = {}
        for r in self.regions:
            key = (_collapse(", ".join(r.entries)), "reduce-scatter" if r.reduce else "replicate",
                   _collapse(", ".join(r.writers if r.reduce else r.exits)), _collapse(r.reason))
            rows[key] = rows.get(key, 0) + 1
        lines = [self.summary(), f"  split: input of {self.entry}; gathered: output of {self.exit}"]
        for (entry, mode, where, reason), n in rows.items():
            lines.append(f"  region {entry}: {mode}; {'reduce-scatter in' if mode != 'replicate' else 'split after'} "
                         f"{where or '-'}; {reason}" + (f"  [x{n}]" if n > 1 else ""))
        local = sorted({_collapse(n) for n in self.local_modules})
        lines.append(f"  on local tokens (gradients summed over TP): {', '.join(local) or '-'}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _collapse(text: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", text)


# ================================================================================= planning
def plan_sequence_parallel(model: nn.Module, plan: Plan, *, validate: bool = True) -> SequencePlan:
    """The :class:`SequencePlan` of ``model`` for ``plan`` (see the module docstring); ``model`` unsharded."""
    if plan.tp_size == 1:
        return SequencePlan(tp_size=1)
    config = getattr(model, "config", None)
    name = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise SequenceParallelError(
            f"sequence parallelism does not split encoder-decoders ({name}): the decoder's cross-attention reads "
            "the encoder's output, a second stream with its own length. Train it without --sequence_parallel.")
    stacks = layer_lists(model)
    if len(stacks) != 1:
        raise SequenceParallelError(
            f"sequence parallelism needs one stack of repeated blocks; {name} has "
            f"{len(stacks) or 'no'}{': ' + ', '.join(stacks) if stacks else ''}. Train it without --sequence_parallel.")
    stack = stacks[0]
    modules = dict(model.named_modules())
    blocks = [f"{stack}.{i}" for i in range(len(modules[stack]))]
    order = call_order(model) or [n for n, m in modules.items() if _owns_params(m)]
    rank = {n: i for i, n in enumerate(order)}
    seq = SequencePlan(tp_size=plan.tp_size, stack=stack, entry=blocks[0])
    for block in blocks:
        regions, local = _block_regions(block, modules, plan, rank)
        if not regions:
            raise SequenceParallelError(
                f"sequence parallelism: block {block} ({type(modules[block]).__name__}) has no tensor-parallel "
                "region (no column-parallel layer, MoE experts or module of linears in it) whose input could be "
                "gathered. Train it without --sequence_parallel.")
        seq.regions.extend(regions)
        seq.local_modules.extend(local)
    seq.exit = _exit(stack, blocks, modules, plan, order)
    if seq.exit != blocks[-1]:
        seq.local_modules.append(seq.exit)
    if validate:
        _validate(model, plan, seq)
    return seq


def _owns_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _layer_of(name: str) -> str:
    """A PEFT LoRA layer's own name for its ``base_layer`` (the module the block calls)."""
    return name.removesuffix(".base_layer")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_adapter(name: str) -> bool:
    return ".lora_" in name


def _block_regions(block: str, modules: dict, plan: Plan, rank: dict) -> tuple[list[SequenceRegion], list[str]]:
    """The regions of one block and its local modules."""
    inside = {n: e for n, e in plan.entries.items() if n.startswith(block + ".")}
    readers = [n for n, e in inside.items() if e.style in READERS]
    writers = [n for n, e in inside.items() if e.style in WRITERS]
    experts = [n for n, e in inside.items() if e.style == Style.EXPERTS]
    linears = [n for n, e in inside.items() if e.style in REPLICATED and is_linear(modules[n]) and not _is_adapter(n)]

    def owner(name: str) -> str:  # the module whose input the reader takes
        layer = _layer_of(name)
        parent = layer.rpartition(".")[0]
        return layer if parent == block else parent

    candidates = {owner(n) for n in readers + experts}
    candidates |= {owner(n) for n in linears if owner(n) != _layer_of(n)}  # a module of replicated linears
    entries = sorted((c for c in candidates if not any(c != o and _under(c, o) for o in candidates)),
                     key=lambda n: _first_call(n, rank))
    outside: dict[str, list[str]] = {e: [] for e in entries}
    for w in writers:
        if not any(_under(w, e) for e in entries):
            before = [e for e in entries if _first_call(e, rank) <= rank.get(w, -1)] or entries
            outside[before[-1]].append(w)
    regions = []
    for e in entries:
        contents = [n for n in inside if _under(n, e)]
        own_writers = tuple([n for n in contents if n in writers] + outside[e])
        blockers = ([f"MoE experts {n}" for n in contents if n in experts]
                    + [f"replicated linear {n}" for n in contents if n in linears])
        has_readers = any(n in readers for n in contents)
        if not has_readers:
            blockers.append("no column-parallel layer reads its input")
        reduce = not blockers
        exits = () if reduce else (tuple(_layer_of(w) for w in outside[e]) or (e,))
        reason = ("its input is read by column-parallel layers only" if reduce
                  else "replicate mode: " + "; ".join(blockers))
        regions.append(SequenceRegion((e,), own_writers, reduce, exits, reason))
    excluded = entries + [_layer_of(w) for ws in outside.values() for w in ws]
    local = [n for n, m in modules.items() if _under(n, block) and _owns_params(m)
             and not any(_under(n, x) for x in excluded)]
    return regions, local


def _first_call(module: str, rank: dict) -> int:
    """The call rank of ``module``: its own, or the first of the parameter-owning modules under it."""
    if module in rank:
        return rank[module]
    inner = [r for n, r in rank.items() if n.startswith(module + ".")]
    return min(inner) if inner else -1


def _exit(stack: str, blocks: list[str], modules: dict, plan: Plan, order: list[str]) -> str:
    """The final norm (the first parameter-owning module called after the stack, when it is a replicated
    per-token norm), else the last block."""
    in_stack = [i for i, n in enumerate(order) if n.startswith(stack + ".")]
    after = [n for n in order[max(in_stack) + 1:] if not n.startswith(stack + ".")] if in_stack else []
    if after and after[0] in modules and is_per_token_norm(modules[after[0]]):
        entry = plan.entries.get(after[0])
        if entry is None or entry.style == Style.REPLICATED:
            return after[0]
    return blocks[-1]


# ================================================================================= applying
def apply_sequence_parallel(model: nn.Module, seq: SequencePlan, context) -> SequenceParallel | None:
    """Install ``seq`` on ``model`` (already sharded by its TP plan on ``context``); returns the
    :class:`~tp_trainer.parallel.sequence.SequenceParallel` it runs on (``None`` at tp 1)."""
    if seq.tp_size != context.tp_size:
        raise ValueError(f"sequence plan made for tp_size={seq.tp_size} but the context has tp_size={context.tp_size}")
    if seq.tp_size == 1:
        return None
    sp = _install(model, seq, SequenceParallel(context.tp_comm))
    model.tp_sequence_parallel = sp
    model.tp_sequence_plan = seq
    logger.debug(seq.table())
    return sp


def _install(model: nn.Module, seq: SequencePlan, sp: SequenceParallel, trace: dict | None = None) -> SequenceParallel:
    modules = dict(model.named_modules())
    split_input_of(modules[seq.entry], sp)
    gather_output_of(modules[seq.exit], sp)
    for region in seq.regions:
        for name in region.entries:
            gather_input_of(modules[name], sp, reduce_grad=region.reduce)
            if trace is not None:
                trace[id(modules[name])] = region
        if region.reduce:
            for name in region.writers:
                row = modules[name]
                if not hasattr(row, "sequence_parallel"):
                    raise TypeError(f"sequence parallelism: {name} ({type(row).__name__}) is planned row-parallel "
                                    "but is not a RowParallelLinear; it cannot reduce-scatter")
                row.sequence_parallel = sp
                if row.bias is not None:  # added after the reduce-scatter: to this rank's tokens
                    row.bias.tp_grad_sum = True
        else:
            for name in region.exits:
                scatter_output_of(modules[name], sp)
    for name in seq.local_modules:
        for p in modules[name].parameters(recurse=False):
            if getattr(p, "tp_spec", None) is not None:
                raise ValueError(f"sequence parallelism: {name} holds a sharded parameter but sees local tokens")
            p.tp_grad_sum = True
    return sp


# ================================================================================= checking on meta
def _validate(model: nn.Module, plan: Plan, seq: SequencePlan) -> None:
    """One meta training step of the twin with ``seq`` (module docstring); demotes regions whose gathered
    input reaches something other than column-parallel layers, refuses a twin that fails."""
    from .validate import _first_twin

    twin, make_twin, problem = _first_twin(model)
    if twin is None:
        seq.notes.append(f"NOT checked on a meta-device twin ({problem})")
        logger.warning(f"tp_trainer: sequence parallel plan not checked on meta: {problem}")
        return
    readers = _meta_step(twin, plan, seq)
    demoted = [r for r in seq.regions if r.reduce and readers.get(r.entries, set()) - {COLUMN_NODE}]
    if not demoted:
        seq.notes.append(f"checked: one training step of rank 0's shards on a sequence of {_check_length(seq)} tokens "
                         "ran on a meta-device twin; reduce-mode inputs reach column-parallel layers only")
        return
    for i, r in enumerate(seq.regions):
        if r in demoted:
            others = sorted(readers[r.entries] - {COLUMN_NODE})
            exits = tuple(w.removesuffix(".base_layer") for w in r.writers
                          if not any(_under(w, e) for e in r.entries)) or r.entries
            seq.regions[i] = replace(r, reduce=False, exits=exits,
                                     reason=f"replicate mode: its input is also read by {', '.join(others)}")
    _meta_step(make_twin(model), plan, seq)
    seq.notes.append(f"checked: one training step on a meta-device twin; {len(demoted)} regions whose input "
                     "something besides column-parallel layers reads run in replicate mode")


def _check_length(seq: SequencePlan) -> int:
    return 2 * seq.tp_size + 1  # tp does not divide it: the padding path runs


def _meta_step(twin: nn.Module, plan: Plan, seq: SequencePlan) -> dict[tuple, set[str]]:
    """Shard ``twin`` as rank 0 on a simulated group, install ``seq``, run one training step on meta;
    returns, per reduce-mode region, the autograd nodes that read its gathered input."""
    from ..parallel.context import ParallelContext
    from ..parallel.simulated import simulated_group
    from .apply import apply_tensor_parallel
    from .validate import _meta_data_dependent_ops, _Tracker

    context = ParallelContext(tp_size=plan.tp_size, tp_rank=0, tp_group=simulated_group(plan.tp_size, 0))
    apply_tensor_parallel(twin, plan, context, split_norms=False)
    trace: dict = {}
    sp = _install(twin, seq, SequenceParallel(context.tp_comm), trace)
    gathered: dict = {}  # grad_fn of a gathered input -> its region's entries

    def record(module, args, kwargs):
        region = trace.get(id(module))
        if region is not None and region.reduce:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.grad_fn is not None:
                gathered[x.grad_fn] = region.entries
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in twin.modules() if id(m) in trace]
    tracker = _Tracker(twin)
    phase = "forward"
    try:
        twin.train()
        with _meta_data_dependent_ops():
            out = twin(**_batch_of_two(meta_inputs(twin, _check_length(seq), labels=True)))
        loss = getattr(out, "loss", None)
        if loss is None:
            loss = (out[0] if isinstance(out, tuple) else out.logits).float().sum()
        readers = _readers(loss, gathered)
        phase = "backward"
        loss.backward()
    except Exception as err:
        failure = tracker.failure(phase, err)
        raise SequenceParallelError(
            f"sequence parallelism cannot split {getattr(twin.config, 'model_type', type(twin).__name__)}: one training "
            f"step of a meta-device twin (input_ids [2, {_check_length(seq)}]) failed in {phase} at "
            f"{failure.module or 'the model'} ({failure.module_type}, inputs {failure.inputs}): "
            f"{type(err).__name__}: {err}. Train it without --sequence_parallel.") from None
    finally:
        tracker.remove()
        for h in hooks:
            h.remove()
    del sp
    return readers


def _batch_of_two(inputs: dict) -> dict:
    """``meta_inputs`` for a batch of 2 (a batch of 1 hides strides that only a real batch has)."""
    return {k: v.expand(2, *v.shape[1:]).contiguous() if v.dim() and v.shape[0] == 1 else v
            for k, v in inputs.items()}


def _readers(loss: torch.Tensor, gathered: dict) -> dict[tuple, set[str]]:
    """Per region, the type names of the autograd nodes whose inputs include a gathered tensor's node."""
    readers: dict[tuple, set[str]] = {entries: set() for entries in gathered.values()}
    seen, queue = set(), deque([loss.grad_fn])
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child in gathered:
                readers[gathered[child]].add(type(node).__name__)
            queue.append(child)
    return readers
