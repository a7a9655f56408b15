"""MoE experts in the plan: tensor parallelism inside every expert, the router replicated.

Two storages of the experts of a sparse MoE block are recognised:

* **Fused experts** (transformers 5: ``MixtralExperts``, ``Qwen2MoeExperts``, ``Qwen3MoeExperts``,
  ``OlmoeExperts`` and every class decorated with ``@use_experts_implementation``; also
  undecorated ones such as ``Llama4TextExperts``): one module owning 3-D parameters
  ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj [E, H, I]``, or their
  transposes ``[E, H, 2I]`` / ``[E, I, H]``, or ``up_proj`` (ungated) / ``gate_proj`` + ``up_proj``.
  Style :attr:`Style.EXPERTS`: in every expert the gate and the up halves are each split over
  ``I`` (the fused two-block layout of Phi-3's ``gate_up_proj``, per expert) and ``down_proj`` is
  split along its input ``I``. Each rank computes every expert's partial output from its ``I/tp``
  intermediate units, the routing weights included, and the module's output is summed over TP
  (``g``). Its differentiable inputs (the hidden states and the routing weights) enter with
  ``f`` (identity forward, all-reduce backward): each rank's partial expert outputs give a partial
  gradient to both, and their TP sum is the exact gradient. The router, applied to replicated
  hidden states, therefore gets identical, exact gradients on every rank, and the auxiliary
  load-balancing loss (computed from the replicated router logits) is untouched.
  See :mod:`tp_trainer.parallel.experts` for the forward side.
* **A ModuleList of expert MLPs** (older and remote-code models): every expert is an ordinary
  Megatron MLP, its input projections column-parallel and its output projection row-parallel,
  placed here from one meta-device trace of an expert (so experts the model-level trace never
  called are placed too). Each expert's ``g`` makes its output complete before the routing weight
  multiplies it, so the routing-weight gradient is exact without further communication.

Every experts module whose implementation reads its widths from the weights works on the local
shapes; ``transformers``' experts implementations (``eager``, ``batched_mm``, ``grouped_mm``,
``deepgemm``, ``sonicmoe``) all do, so the configured one is kept. Integer attributes holding the
full intermediate width (``intermediate_dim``, ``expert_dim``, ...) are set to the per-rank width.

Experts that cannot be split this way stay replicated (the plan warns about them) and the plan
says why: expert biases (the down projection's bias would be added once per rank), a
post-expert norm (it needs each expert's full output), unrecognised parameters, shapes that do
not form a gate/up -> down MLP, or an intermediate width that ``tp`` does not divide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from .families import fused_layout, layout_blocks
from .model_info import ModelDims, is_linear, linear_shape
from .plan import Plan, PlanEntry, Style

# Integer attributes of an experts module that hold the full per-expert intermediate width.
INTERMEDIATE_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size", "ffn_dim")

# Column (input) projection names of fused experts -> whether the projection is a fused [gate | up] pair.
_COLUMN_SETS = ((("gate_up_proj",), True), (("gate_proj", "up_proj"), False), (("up_proj",), False))


@dataclass(frozen=True)
class ExpertParam:
    name: str
    dim: int  # the dimension split over TP
    blocks: tuple[tuple[int, int], ...] | None  # fused layout along ``dim`` (None: one contiguous block)


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module is split: per parameter, the dim and its layout."""

    num_experts: int
    intermediate: int  # full per-expert intermediate width I
    transposed: bool
    params: tuple[ExpertParam, ...]
    int_attrs: tuple[str, ...]  # attributes equal to I, set to I / tp

    def describe(self) -> str:
        parts = []
        for p in self.params:
            how = "gate and up halves each split" if p.blocks else "split"
            parts.append(f"{p.name} {how} along dim {p.dim}")
        return "; ".join(parts)


def looks_like_experts(module: nn.Module) -> bool:
    """A module owning 3-D parameters whose class or role says experts (convolutions are not)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    own = list(module.parameters(recurse=False))
    return any(p.dim() == 3 for p in own) and "expert" in type(module).__name__.lower()


def _fused_candidate(module: nn.Module) -> bool:
    """A fused experts module: a 3-D ``down_proj`` of its own, or :func:`looks_like_experts`."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    down = module._parameters.get("down_proj")
    return (down is not None and down.dim() == 3) or looks_like_experts(module)


def fused_experts_layout(module: nn.Module, tp: int) -> ExpertsLayout | str:
    """The :class:`ExpertsLayout` of a fused experts module, or why it cannot be split over ``tp`` ranks."""
    params = dict(module.named_parameters(recurse=False))
    if any(True for child in module.children() for _ in child.parameters()) or getattr(
            module, "has_post_expert_norm", False):
        return "it applies a parameterised module (a post-expert norm) to each expert's full output"
    biases = sorted(n for n in params if "bias" in n)
    if biases or getattr(module, "has_bias", False):
        return (f"expert biases ({', '.join(biases) or 'has_bias'}): the down projection's bias would be added "
                "once per rank; splitting biased experts is not implemented")
    down = params.get("down_proj")
    cols, fused = next(((c, f) for c, f in _COLUMN_SETS if all(n in params for n in c)), ((), False))
    if down is None or not cols:
        return (f"parameters {sorted(params)} are not gate_up_proj/up_proj + down_proj; "
                "tp_trainer knows no layout for them")
    extra = sorted(set(params) - set(cols) - {"down_proj"})
    if extra:
        return f"unrecognised parameters {extra} beside the expert projections"
    tensors = [params[n] for n in cols] + [down]
    if any(t.dim() != 3 for t in tensors) or len({t.shape[0] for t in tensors}) != 1:
        return "expert projections are not 3-D [experts, ., .] tensors with one expert count"
    flag = getattr(module, "is_transposed", None)
    fits = [t for t in (False, True) if (flag is None or bool(flag) == t) and _fits(tensors[:-1], down, fused, t)]
    if not fits:
        return (f"shapes {[tuple(t.shape) for t in tensors]} do not form a gate/up -> down MLP per expert "
                "([E, out, in] or [E, in, out])")
    if len(fits) > 1:
        return "cannot tell [E, out, in] from [E, in, out] (square projections) without an is_transposed flag"
    transposed = fits[0]
    inter = down.shape[1] if transposed else down.shape[2]
    if inter % tp:
        return f"intermediate width {inter} is not divisible by tp_size={tp}"
    col_dim, down_dim = (2, 1) if transposed else (1, 2)
    # HF's concatenated [gate | up]: each half split; interleaved [g0 u0 g1 u1 ...]: a contiguous
    # split keeps (gate, up) pairs together (I % tp == 0 makes every rank's piece even).
    concatenated = getattr(module, "is_concatenated", True)
    layout = tuple(ExpertParam(n, col_dim, ((inter, 1), (inter, 1)) if fused and concatenated else None)
                   for n in cols) + (ExpertParam("down_proj", down_dim, None),)
    attrs = tuple(a for a in INTERMEDIATE_ATTRS
                  if isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)
                  and getattr(module, a) == inter)
    return ExpertsLayout(down.shape[0], inter, transposed, layout, attrs)


def _fits(cols, down, fused: bool, transposed: bool) -> bool:
    hidden, inter = (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])
    out = 2 * inter if fused else inter
    for c in cols:
        c_in, c_out = (c.shape[1], c.shape[2]) if transposed else (c.shape[2], c.shape[1])
        if c_in != hidden or c_out != out:
            return False
    return True


def experts_entry(layout: ExpertsLayout, tp: int) -> PlanEntry:
    shape = "[E, H, 2I]/[E, I, H]" if layout.transposed else "[E, 2I, H]/[E, H, I]"
    blocks = next((p.blocks for p in layout.params if p.blocks), None)
    reason = (f"MoE experts {shape}, I={layout.intermediate}: {layout.describe()} (I/tp={layout.intermediate // tp} "
              "per expert per rank); f on the hidden states and routing weights, g on the output")
    return PlanEntry(Style.EXPERTS, "rule", reason, blocks)


def plan_experts(model: nn.Module, modules: dict[str, nn.Module], dims: ModelDims, tp: int,
                 plan: Plan) -> dict[str, PlanEntry]:
    """Rule entries for the MoE experts of ``model`` (fused modules and the linears of ModuleList
    experts); a note on ``plan`` for every experts module left replicated, with the reason."""
    entries: dict[str, PlanEntry] = {}
    refused: dict[str, str] = {}
    for name, mod in modules.items():
        if _fused_candidate(mod):
            layout = fused_experts_layout(mod, tp)
            if isinstance(layout, ExpertsLayout):
                entries[name] = experts_entry(layout, tp)
            else:
                refused.setdefault(re.sub(r"\.\d+\.", ".*.", name), layout)
        elif _is_expert_list(name, mod):
            placed = _place_expert_list(name, mod, dims, tp)
            if isinstance(placed, str):
                refused.setdefault(re.sub(r"\.\d+\.", ".*.", name), placed)
            else:
                entries.update(placed)
    for pattern, reason in refused.items():
        plan.notes.append(f"{pattern}: MoE experts left replicated: {reason}")
    return entries


# ----------------------------------------------------------------------------- ModuleList experts
def _is_expert_list(name: str, mod: nn.Module) -> bool:
    return (isinstance(mod, nn.ModuleList) and len(mod) > 1 and "expert" in name.rsplit(".", 1)[-1].lower()
            and len({type(e) for e in mod}) == 1
            and sum(1 for m in mod[0].modules() if is_linear(m)) >= 2)


def expert_call_order(expert: nn.Module, hidden: int) -> list[str] | None:
    """Relative names of ``expert``'s linears in call order, from one forward on ``meta`` copies of its
    tensors (``torch.func.functional_call``: nothing is copied or computed); ``None`` if it fails."""
    linears = {n: m for n, m in expert.named_modules() if is_linear(m)}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, m in linears.items()]
    try:
        tensors = {n: torch.empty_like(t, device="meta") for n, t in
                   list(expert.named_parameters()) + list(expert.named_buffers())}
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        with torch.no_grad():
            torch.func.functional_call(expert, tensors, (torch.zeros(2, hidden, dtype=dtype, device="meta"),))
    except Exception:  # an expert whose forward wants more than the hidden states
        return None
    finally:
        for h in handles:
            h.remove()
    return order


def _place_expert_list(name: str, experts: nn.ModuleList, dims: ModelDims, tp: int) -> dict[str, PlanEntry] | str:
    order = expert_call_order(experts[0], dims.hidden)
    if not order:
        return "the forward of one expert could not be traced on the meta device (it needs more than the hidden states)"
    first = experts[0]
    shapes = {n: linear_shape(first.get_submodule(n)) for n in order}
    row = order[-1]
    if shapes[row][1] != dims.hidden:
        return f"the last projection called in an expert ({row}) does not write the hidden width {dims.hidden}"
    if shapes[row][0] % tp:
        return f"expert {row} input width {shapes[row][0]} is not divisible by tp_size={tp}"
    placed: dict[str, PlanEntry] = {}
    for col in order[:-1]:
        attr = col.rsplit(".", 1)[-1]
        owner = first.get_submodule(col.rsplit(".", 1)[0]) if "." in col else first
        fused = fused_layout(type(owner).__name__, attr, owner, None)
        out = shapes[col][1]
        blocks = layout_blocks(fused[0], out, dims, tp) if fused and fused[0] == "two_blocks" else None
        if fused and fused[0] != "two_blocks":
            return f"expert projection {col} looks fused ({fused[0]}), not an MLP input projection"
        if any(size % (tp // r) for size, r in (blocks or ((out, 1),))):
            return f"expert {col} output width {out} cannot be split over tp_size={tp}"
        placed[col] = PlanEntry(Style.COLWISE, "rule", f"MoE expert (ModuleList): feeds {row}: output split"
                                + (", fused gate/up halves each split" if blocks else ""), blocks)
    placed[row] = PlanEntry(Style.ROWWISE, "rule", "MoE expert (ModuleList): writes the expert's output, summed over "
                            "TP before the routing weight multiplies it")
    entries = {}
    for i in range(len(experts)):
        for rel, entry in placed.items():
            entries[f"{name}.{i}.{rel}"] = entry
    return entries


def shard_fused_experts(module: nn.Module, context, *, name: str) -> nn.Module:
    """Apply :attr:`Style.EXPERTS` to ``module`` in place (see :mod:`tp_trainer.parallel.experts`)."""
    from ..parallel.experts import shard_experts

    layout = fused_experts_layout(module, context.tp_size)
    if isinstance(layout, str):
        raise ValueError(f"{name} ({type(module).__name__}) cannot use {Style.EXPERTS}: {layout}. "
                         f"Plan it as 'replicated'.")
    return shard_experts(module, layout, context, name=name)
