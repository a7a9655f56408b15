"""Refuse a plan that cannot work before a single weight is touched.

Two kinds of checks, both run by :func:`~tp_trainer.planner.plan_tensor_parallel`:

* static checks of what a user wrote (:func:`parse_tp_plan`, :func:`check_user_plan`) and of
  every entry against the module it names (:func:`check_styles_fit_modules`): unknown styles,
  patterns that match nothing, a linear split on a norm. Each names the value and the fix.
* :func:`validate_plan`: the plan applied to a twin of the model on the ``meta`` device (no
  memory, no FLOPs) with the real TP layers of rank 0 on a simulated TP group (its collectives
  keep shapes and move nothing), then one forward and backward with ``input_ids [1, 8]`` and
  labels. Only shapes are computed, so every split that disagrees with its neighbours (a
  row-parallel layer fed a full activation, a replicated KV block on an MLP, a head count
  patched wrong) raises there, and becomes a :class:`PlanError` naming the innermost module
  that was running, the shapes it saw and the ``tp_plan`` entry to change.

Rank 0 stands for every rank: a :class:`~tp_trainer.parallel.sharding.ShardSpec` gives every
rank the same local size (padded vocabulary, equal pieces of each fused block), so the shapes
of all ranks are identical.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.utils import logging

from .hf_plan import known_style_names, translate_hf_style
from .model_info import is_linear, meta_copy, meta_inputs, meta_twin
from .plan import ADAPTER_STYLES, Plan, PlanEntry, Style, pattern_to_regex

SEQ_LEN = 8  # tokens of the meta step: enough for every mask / rotary code path, costs nothing on meta
LINEAR_STYLES = (Style.COLWISE, Style.COLWISE_GATHER, Style.ROWWISE, Style.ROWWISE_SPLIT)
logger = logging.get_logger(__name__)
TP_PLAN_EXAMPLE = '{"model.layers.*.mlp.down_proj": "rowwise", "model.layers.*.mlp.*": "replicated"}'


class PlanError(ValueError):
    """The model cannot be split as asked; the message names the module/value and the fix."""


# ----------------------------------------------------------------------------------- user plans
def parse_tp_plan(text, *, option: str = "tp_plan") -> dict[str, str] | None:
    """A user plan from its JSON text (``None`` for empty/``'auto'``), refusing malformed JSON, a
    non-object and unknown styles with a message that names ``option`` and the expected form."""
    if text is None or (isinstance(text, str) and text.strip() in ("", "auto")):
        return None
    if isinstance(text, dict):
        plan = text
    else:
        try:
            plan = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise PlanError(f"{option} must be 'auto' or a JSON object mapping module patterns to styles, e.g. "
                             f"{TP_PLAN_EXAMPLE}; got {text!r}, which is not valid JSON ({err})") from None
    check_plan_mapping(plan, option=option)
    return plan


def check_plan_mapping(plan, *, option: str = "tp_plan") -> None:
    """``plan`` must map pattern strings to style names tp_trainer knows (ours or Hugging Face's)."""
    if not isinstance(plan, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items()):
        raise PlanError(f"{option} must map module patterns (str) to styles (str), e.g. {TP_PLAN_EXAMPLE}; "
                        f"got {plan!r}")
    for pattern, style in plan.items():
        user_style(pattern, style, option=option)


def user_style(pattern: str, style: str, *, option: str = "tp_plan") -> Style:
    """Our :class:`Style` for a user's style name (ours or Hugging Face's); an unknown one is an error
    naming the entry and every supported name."""
    try:
        ours = Style(style)
    except ValueError:
        ours = None
    if ours in ADAPTER_STYLES:
        raise PlanError(f"{option} entry {pattern!r}: {style!r} is given by the planner to LoRA adapters, after "
                        f"their base layer; set the base layer's style instead (the adapters follow it).")
    if ours is not None:
        return ours
    translated = translate_hf_style(style)
    if translated is None:
        raise PlanError(f"{option} entry {pattern!r}: {style!r} is not a tensor-parallel style tp_trainer knows. "
                        f"Supported: {', '.join(known_style_names())}.")
    return translated[0]


def check_user_plan(user_plan: dict[str, str], model: nn.Module, placed: set[str]) -> None:
    """Every pattern of ``user_plan`` must match a module the plan places (one that owns parameters):
    a typo would otherwise be ignored silently. The error suggests the closest module names."""
    modules = dict(model.named_modules())
    for pattern in user_plan:
        regex = pattern_to_regex(pattern)
        matched = [name for name in modules if name and regex.match(name)]
        if any(name in placed for name in matched):
            continue
        owning = [n for n in matched if any(True for _ in modules[n].parameters(recurse=False))]
        if owning:
            raise PlanError(f"tp_plan pattern {pattern!r} matches {owning[0]}, which is never called in a forward "
                            f"pass, so the plan has nothing to split there; remove the entry.")
        if matched:
            kinds = sorted({type(modules[n]).__name__ for n in matched})
            raise PlanError(
                f"tp_plan pattern {pattern!r} matches only modules that own no parameters ({', '.join(kinds)}): "
                f"styles apply to the modules holding the weights, e.g. {pattern + '.*'!r}.")
        raise PlanError(f"tp_plan pattern {pattern!r} matches no module of this {type(model).__name__}"
                        f"{_suggestions(pattern, modules)}. '*' stands for one dotted name component (a layer "
                        f"index); names are the model's named_modules(), e.g. 'model.layers.*.mlp.down_proj'.")


def _suggestions(pattern: str, modules: dict[str, nn.Module]) -> str:
    """``"; closest: a, b"`` from the model's module names with layer indices collapsed to ``*``."""
    candidates = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in modules if name})
    close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.6)
    return f"; closest module names: {', '.join(repr(c) for c in close)}" if close else ""


# ------------------------------------------------------------------------------- style vs module
def style_misfit(name: str, entry: PlanEntry, module: nn.Module, model: nn.Module) -> str | None:
    """Why ``entry.style`` cannot apply to ``module`` (``None`` when it can). Styles this file does not
    know (added by other planner parts) are not judged here; the meta step still checks them."""
    kind = type(module).__name__
    if entry.style in LINEAR_STYLES and not is_linear(module):
        return (f"{name} is a {kind}, not a linear layer: {entry.style} splits the weight of an nn.Linear / "
                f"Conv1D. Use 'replicated' for it")
    if entry.style == Style.VOCAB_EMBEDDING and not isinstance(module, nn.Embedding):
        return f"{name} is a {kind}, not an nn.Embedding: vocab_embedding splits embedding rows. Use 'replicated'"
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if entry.style == Style.LM_HEAD and module is not out_emb:
        return (f"{name} ({kind}) is not the output embedding: vocab_lm_head pairs the layer with a vocab-parallel "
                f"loss. Use 'colwise' for an ordinary linear")
    if entry.style == Style.COLWISE and module is out_emb:
        return (f"{name} is the output embedding: 'colwise' would hand the loss 1/tp of the logits as if they "
                f"were all of them. Use 'vocab_lm_head' (vocab-parallel loss), 'colwise_gather_output' or 'replicated'")
    if entry.style == Style.HEAD_SHARDED and is_linear(module):
        return f"{name} is a linear layer: head_sharded is for per-head parameters. Use 'colwise' or 'rowwise'"
    return None


def check_styles_fit_modules(plan: Plan, model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Every entry's style must fit its module's type (a PlanError naming the entry that set it)."""
    for name, entry in plan.entries.items():
        why = style_misfit(name, entry, modules[name], model)
        if why is not None:
            raise PlanError(f"cannot use {entry.style} on {name} ({entry.source}: {entry.reason}): {why} "
                            f"(or remove the entry that sets it).")


# ---------------------------------------------------------------------------------- meta step
def validate_plan(model: nn.Module, plan: Plan) -> bool:
    """Run one training step of rank 0's shards on a meta twin of ``model``; ``True`` when it ran.

    Raises :class:`PlanError` when the sharded step fails but the unsharded one runs (the plan is at
    fault). When no twin can be made, or a meta step of the unsharded model fails too
    (data-dependent code, custom models), the plan is not validated and ``plan.notes`` says why;
    returns ``False``.
    """
    if plan.tp_size == 1:
        return True
    twin, make_twin, problem = _first_twin(model)
    if twin is None:
        return _not_validated(plan, problem)
    _apply_to_twin(twin, plan)
    failure = _meta_step(twin)
    if failure is None:
        plan.notes.append(f"checked: one training step (input_ids [1, {SEQ_LEN}]) of rank 0's shards ran on a "
                          f"meta-device {'twin' if make_twin is meta_twin else 'copy of the model'}")
        return True
    reference = _meta_step(make_twin(model))
    if reference is not None:
        return _not_validated(plan, "a meta-device training step of the unsharded model fails too "
                              f"({reference.error_text()})")
    raise PlanError(describe_failure(failure, plan))


def _not_validated(plan: Plan, why: str) -> bool:
    """Say in the plan (printed by ``tp-trainer plan``) and in the log (TPTrainer) that it was not checked."""
    note = f"plan NOT validated by a meta-device step: {why}; shape errors would show in step 1"
    plan.notes.append(note)
    logger.warning(f"tp_trainer planner: {note}")
    return False


def _first_twin(model: nn.Module):
    """``(twin, how to make another, problem)``: a twin built from the config when it has the model's
    modules (cheap, like the call-order trace), else a meta copy of the model itself (it was changed
    after construction); ``(None, None, why)`` when neither can be made."""
    problems = []
    try:
        twin = meta_twin(model)
        differs = _structure_differences(model, twin)
        if not differs:
            return twin, meta_twin, ""
        problems.append(f"its modules differ from a fresh build of its config ({differs})")
    except Exception as err:  # a custom model we cannot rebuild from its config
        problems.append(f"it cannot be rebuilt from its config ({type(err).__name__}: {err})")
    try:
        return meta_copy(model), meta_copy, ""
    except Exception as err:  # attributes deepcopy refuses (locks, handles)
        problems.append(f"it cannot be copied to the meta device ({type(err).__name__}: {err})")
    return None, None, "; ".join(problems)


def _structure_differences(model: nn.Module, twin: nn.Module, limit: int = 3) -> str:
    """Modules of ``model`` missing from ``twin`` or of another type (a model changed after construction)."""
    twin_types = {name: type(m) for name, m in twin.named_modules()}
    diffs = [name for name, m in model.named_modules() if twin_types.get(name) is not type(m)]
    return ", ".join(diffs[:limit]) + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def _apply_to_twin(twin: nn.Module, plan: Plan) -> None:
    """Shard ``twin`` as rank 0 on a simulated group; a failure names the entry being applied."""
    from ..parallel.collectives import simulated_group
    from ..parallel.context import ParallelContext
    from .apply import apply_tensor_parallel

    context = ParallelContext(tp_size=plan.tp_size, tp_rank=0, tp_group=simulated_group(plan.tp_size, 0))
    try:
        apply_tensor_parallel(twin, plan, context, split_norms=False)
    except Exception as err:
        name = _entry_in_traceback(err, plan)
        where = f" at {name} ({_describe_entry(plan, name)})" if name else ""
        raise PlanError(f"the plan cannot be applied{where}: {type(err).__name__}: {err}. Fix: change the tp_plan "
                        f"entry for {_pattern(name) if name else 'that module'}.") from None


def _entry_in_traceback(err: BaseException, plan: Plan) -> str | None:
    """The innermost frame's local ``name`` that is a plan entry or patch (the module being applied)."""
    found, tb = None, err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_locals.get("name")
        if isinstance(name, str) and (name in plan.entries or name in plan.patches):
            found = name
        tb = tb.tb_next
    return found


@dataclass
class StepFailure:
    """Where a meta step failed: the phase, the innermost module running and what it saw."""

    phase: str  # "forward" or "backward"
    error: BaseException
    module: str | None = None
    module_type: str = ""
    inputs: list[tuple[int, ...]] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    stack: list[str] = field(default_factory=list)  # enclosing modules, outermost first

    def error_text(self) -> str:
        return f"{type(self.error).__name__} in {self.phase}: {self.error}"


class _Tracker:
    """Forward hooks keep the stack of modules running (innermost last); each module's output gets a
    gradient hook, so in backward ``backward`` names the innermost module whose gradient arrived last."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.stack: list[tuple[str, tuple, dict]] = []
        self.backward: str | None = None
        self.handles = []
        for name, mod in self.modules.items():
            self.handles.append(mod.register_forward_pre_hook(self._enter(name), with_kwargs=True, prepend=True))
            self.handles.append(mod.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        def hook(module, args, kwargs):
            self.stack.append((name, args, kwargs))
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            while self.stack and self.stack.pop()[0] != name:
                pass
            for t in _tensors(output):
                if t.requires_grad and not hasattr(t, "_tp_validate_owner"):
                    t._tp_validate_owner = name
                    t.register_hook(self._reached(name))
        return hook

    def _reached(self, name):
        def hook(grad):
            self.backward = name
        return hook

    def failure(self, phase: str, err: BaseException) -> StepFailure:
        if phase == "forward" and self.stack:
            name, args, kwargs = self.stack[-1]
            inputs = [tuple(t.shape) for t in _tensors((args, kwargs))]
        else:
            name, inputs = self.backward, []
        stack = [n for n, _, _ in self.stack[:-1]] if phase == "forward" else []
        mod = self.modules.get(name) if name is not None else None
        return StepFailure(phase, err, name, type(mod).__name__ if mod is not None else "", inputs,
                           _param_shapes(mod) if mod is not None else [], stack)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tensors(value, depth: int = 0):
    """Tensors in ``value`` and in its tuples/lists/dicts (two levels), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 2 and isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif depth < 2 and hasattr(value, "to_tuple"):  # ModelOutput
        yield from _tensors(value.to_tuple(), depth + 1)


def _param_shapes(module: nn.Module) -> list[str]:
    """``"weight [32, 96] (rank 0's shard of [64, 96], dim 1)"`` for each own parameter."""
    out = []
    for pname, p in module.named_parameters(recurse=False):
        spec = getattr(p, "tp_spec", None)
        shard = f" (rank 0's shard of {list(spec.full_shape)}, dim {spec.dim})" if spec is not None else ""
        out.append(f"{pname} {list(p.shape)}{shard}")
    return out


def _meta_step(model: nn.Module) -> StepFailure | None:
    """One forward (with labels) and backward of ``model`` on meta; the failure, or ``None``. The labels
    take the shape the model's head asks for (``model_info.meta_inputs``: one per sequence for a
    classifier), and an encoder-decoder builds its decoder's ids from them."""
    tracker = _Tracker(model)
    phase = "forward"
    try:
        model.train()
        with _meta_data_dependent_ops():
            out = model(**meta_inputs(model, SEQ_LEN, labels=True))
        loss = getattr(out, "loss", None)
        if loss is None:
            loss = next(_tensors(out)).float().sum()
        phase = "backward"
        loss.backward()
    except Exception as err:
        return tracker.failure(phase, err)
    finally:
        tracker.remove()
    return None


def _meta_data_dependent_ops():
    """Let ``nonzero``/``where(cond)`` run on meta as if every element were non-zero (MoE routing picks
    its tokens that way: on meta every expert gets every token, which has the shapes of a real step).
    A private torch switch: without it, such models are simply not validated (noted in the plan)."""
    import contextlib

    try:
        from torch.fx.experimental import _config
        return _config.patch(meta_nonzero_assume_all_nonzero=True)
    except (ImportError, AttributeError, TypeError):
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ messages
def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _describe_entry(plan: Plan, name: str) -> str:
    entry = plan.entries.get(name)
    if entry is None:
        return "patched head counts" if name in plan.patches else "not in the plan: unsplit"
    return f"{entry.style}{entry.describe_layout()}, {entry.source}: {entry.reason}"


def _neighbourhood(plan: Plan, failure: StepFailure) -> tuple[str | None, list[str]]:
    """The planned module nearest the failure and the planned modules of its sub-block (its siblings,
    or the children of the innermost unplanned module), split ones first."""
    chain = failure.stack + ([failure.module] if failure.module else [])
    anchor = next((n for n in reversed(chain) if n in plan.entries), None)
    group = anchor.rsplit(".", 1)[0] if anchor and "." in anchor else (failure.module or "")
    members = [n for n in plan.entries if n.startswith(group + ".") or not group]
    members.sort(key=lambda n: plan.entries[n].style in (Style.REPLICATED, Style.REPLICATED_GRAD_SUM))
    return anchor, members[:8]


def describe_failure(failure: StepFailure, plan: Plan) -> str:
    """The :class:`PlanError` text: what raised, where, with which shapes, and the entry to change."""
    where = failure.module if failure.module else "the model"
    lines = [f"the tensor-parallel plan does not fit this {plan.model_type} model at tp_size={plan.tp_size}: one "
             f"training step of rank 0's shards on a meta-device copy (input_ids [1, {SEQ_LEN}]) fails in the "
             f"{failure.phase} of {where}" + (f" ({failure.module_type})" if failure.module_type else "")
             + f" with {type(failure.error).__name__}: {_first_line(failure.error)}"]
    if failure.module:
        seen = f"inputs {', '.join(str(list(s)) for s in failure.inputs)}" if failure.inputs else ""
        params = "; ".join(failure.params)
        lines.append(f"  {failure.module}: {_describe_entry(plan, failure.module)}"
                     + (f"; {seen}" if seen else "") + (f"; {params}" if params else ""))
    anchor, members = _neighbourhood(plan, failure)
    for name in members:
        if name != failure.module:
            lines.append(f"  {name}: {_describe_entry(plan, name)}")
    lines.append("Fix: " + _fix(plan, anchor, members))
    return "\n".join(lines)


def _fix(plan: Plan, anchor: str | None, members: list[str]) -> str:
    """The user entries near the failure are the likely culprits; without any, the automatic plan is."""
    user = [n for n in ([anchor] if anchor else []) + members if n in plan.entries and plan.entries[n].source == "user"]
    if user:
        reasons = sorted({plan.entries[n].reason for n in user})
        return (f"change the tp_plan entry that sets {_pattern(user[0])} ({'; '.join(reasons)}): its split does not "
                f"match the layers it connects to (column-parallel layers feed row-parallel ones within a sub-block).")
    group = _pattern(anchor.rsplit(".", 1)[0]) + ".*" if anchor and "." in anchor else "<module>"
    return (f"the automatic plan is inconsistent here (please report it as a tp_trainer bug); work around it by "
            f"keeping the sub-block whole, tp_plan={{'{group}': 'replicated'}}, or by explicit styles for the "
            f"modules listed above.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)
