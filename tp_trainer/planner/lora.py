"""Planning a PEFT LoRA model: the base model is planned as if unwrapped, each adapter follows its base layer.

A ``PeftModel`` renames every module (``base_model.model.`` in front, ``.base_layer`` under each
wrapped linear), puts two linears ``lora_A``/``lora_B`` beside each base and hides the Hugging Face
model's ``loss_function``. Planned as it is, the dataflow sees ``lora_B`` between the stream's
readers and writers and keeps everything replicated, no HF ``base_model_tp_plan`` key matches,
and the vocab-parallel loss would be installed on the wrapper instead of the model that calls it.
So :func:`plan_lora_model` plans a meta copy of the inner Hugging Face model with every LoRA layer
replaced by its base layer and every ``modules_to_save`` wrapper by its original module: the base
layers get exactly the styles, fused blocks, patches and reasons of the unwrapped model. The plan
is then lifted to the PEFT names, and every adapter gets a style derived from its base
(:func:`adapter_entries`; the math and the communication are in :mod:`tp_trainer.parallel.lora`):

=======================================  ===============================  ===============================
base style                               ``lora_A``                       ``lora_B``
=======================================  ===============================  ===============================
``colwise`` (blocks included)            ``replicated_grad_sum``          ``adapter_colwise``: output rows
                                                                          split like the base's
``rowwise``                              ``adapter_rowwise``: input       ``replicated_grad_sum`` (applied
                                         columns split like the base's    to partial sums, before ``g``)
``colwise_gather_output``,               ``replicated``                   ``replicated``
``rowwise_split_input``, ``replicated``,
``vocab_embedding``
=======================================  ===============================  ===============================

A ``modules_to_save`` copy gets its original module's entry. Refused, before any weight is touched
(:class:`~tp_trainer.planner.validate.PlanError` naming the module and the fix): DoRA, a LoRA bias
beside a row-parallel base, LoRA on the vocab-parallel LM head, LoRA layer types other than
linear/embedding, PEFT methods other than LoRA, and a ``tp_plan`` entry naming an adapter. The
lifted plan is validated on a meta copy of the PEFT model itself (one training step of rank 0's
shards, adapters included).
"""

from __future__ import annotations

import re

import torch.nn as nn

from ..parallel.lora import (adapt_column_parallel, adapt_row_parallel, adapter_names, lora_layers,
                             peft_base_model, saved_module_wrappers)
from ..parallel.layers import sharded_parameter
from .model_info import meta_copy
from .plan import Plan, PlanEntry, Style
from .summary import _own_param_counts
from .validate import PlanError, validate_plan

_REPLICATED_IO = {Style.COLWISE_GATHER, Style.ROWWISE_SPLIT, Style.REPLICATED, Style.VOCAB_EMBEDDING}
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                  "modules_to_save", "original_module")


def plan_lora_model(model: nn.Module, tp_size: int, *, user_plan: dict[str, str] | None, plan_base) -> Plan:
    """The plan of a PEFT LoRA model (see the module docstring); ``plan_base`` plans the unwrapped copy
    (:func:`~tp_trainer.planner.plan_tensor_parallel`)."""
    _check_peft_type(model)
    prefix, inner = peft_base_model(model)
    layers = {_relative(n, prefix): m for n, m in lora_layers(model).items()}
    saved = {_relative(n, prefix): m for n, m in saved_module_wrappers(model).items()}
    _check_layers(layers, prefix)
    base_plan = plan_base(_unwrapped_copy(inner, layers, saved), tp_size,
                          user_plan=_inner_user_plan(user_plan, prefix))
    entries: dict[str, PlanEntry] = {}
    for name, entry in base_plan.entries.items():
        entries.update(_lifted(name, entry, prefix, layers, saved))
    plan = Plan(tp_size=tp_size, model_type=base_plan.model_type, entries=entries,
                patches={_full(n, prefix): p for n, p in base_plan.patches.items()},
                notes=[n for n in base_plan.notes if not n.startswith("checked: ")],
                warnings=list(base_plan.warnings))
    plan.param_counts = _own_param_counts(dict(model.named_modules()), entries)
    n_adapters = sum(len(adapter_names(m)) for m in layers.values())
    plan.notes.append(f"PEFT LoRA: the base model was planned unwrapped (names under {prefix or 'the model'}); "
                      f"{n_adapters} adapters follow their base layers" +
                      (f"; {len(saved)} modules_to_save copies follow their originals" if saved else ""))
    validate_plan(model, plan)  # a meta step of the PEFT model itself, adapters included
    return plan


def _check_peft_type(model: nn.Module) -> None:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for adapter, config in configs.items():
        kind = str(getattr(config, "peft_type", "LORA")).rsplit(".", 1)[-1]
        if kind != "LORA":
            raise PlanError(f"adapter {adapter!r} is a PEFT {kind} adapter: under tensor parallelism tp_trainer "
                            f"supports LoRA adapters only. Use LoraConfig, or tp_size=1.")


def _check_layers(layers: dict[str, nn.Module], prefix: str) -> None:
    for name, layer in layers.items():
        full = _full(name, prefix)
        kind = type(layer).__name__
        if kind not in ("Linear", "Embedding"):
            raise PlanError(f"{full} is a PEFT LoRA {kind} layer: under tensor parallelism tp_trainer supports LoRA on "
                            f"linear and embedding layers. Remove {name.rsplit('.', 1)[-1]!r} from target_modules.")
        dora = [a for a, on in getattr(layer, "use_dora", {}).items() if on] or list(getattr(layer, "lora_variant", {}))
        if dora:
            raise PlanError(f"{full}: adapter {dora[0]!r} is a LoRA variant (DoRA: use_dora=True), whose magnitude "
                            f"needs the norm of every full weight row; tp_trainer shards plain LoRA only. Set "
                            f"use_dora=False, or train with tp_size=1.")


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name


def _full(name: str, prefix: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (name or prefix)


def _unwrapped_copy(inner: nn.Module, layers: dict, saved: dict) -> nn.Module:
    """A meta copy of ``inner`` with each LoRA layer replaced by its base layer and each ``modules_to_save``
    wrapper by its original module: the module tree of the model before ``get_peft_model``."""
    twin = meta_copy(inner)
    for name in sorted(list(layers) + list(saved), key=lambda n: -n.count(".")):
        wrapper = twin.get_submodule(name)
        original = wrapper.base_layer if name in layers else wrapper.original_module
        parent_name, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, attr, original)
    return twin


def _inner_user_plan(user_plan: dict[str, str] | None, prefix: str) -> dict[str, str] | None:
    """The user's plan in the unwrapped model's names: the PEFT prefix and ``.base_layer`` dropped; an
    entry for an adapter is refused (adapters follow their base layer)."""
    if not user_plan:
        return user_plan
    out = {}
    for pattern, style in user_plan.items():
        parts = pattern.split(".")
        named = [p for p in parts if p in _ADAPTER_PARTS]
        if named:
            raise PlanError(f"tp_plan entry {pattern!r} names a PEFT {named[0]} module: adapters and modules_to_save "
                            f"copies take the style of the module they wrap; give that module the style instead "
                            f"(e.g. {'.'.join(parts[:parts.index(named[0])])!r}).")
        inner = _relative(pattern, prefix)
        out[re.sub(r"\.base_layer(?=\.|$)", "", inner)] = style
    return out


def _lifted(name: str, entry: PlanEntry, prefix: str, layers: dict, saved: dict) -> dict[str, PlanEntry]:
    """The entries of the PEFT model for the unwrapped model's entry ``name``."""
    if name in layers:
        base = f"{_full(name, prefix)}.base_layer"
        out = {base: PlanEntry(entry.style, entry.source, entry.reason + " (LoRA base layer)", entry.blocks,
                               entry.dim)}
        out.update(adapter_entries(_full(name, prefix), layers[name], entry))
        return out
    for wrapper, module in saved.items():
        if name == wrapper or name.startswith(wrapper + "."):
            rest = name[len(wrapper):]
            copies = ["original_module"] + [f"modules_to_save.{a}" for a in module.modules_to_save]
            return {f"{_full(wrapper, prefix)}.{c}{rest}": PlanEntry(
                entry.style, entry.source, entry.reason + (" (modules_to_save: the trainable copy)" if c != copies[0]
                                                           else " (modules_to_save: the frozen original)"),
                entry.blocks, entry.dim) for c in copies}
    return {_full(name, prefix): entry}


def adapter_entries(layer_name: str, layer: nn.Module, base: PlanEntry) -> dict[str, PlanEntry]:
    """The entries of the adapters of the LoRA layer ``layer_name`` around a base planned as ``base``."""
    style = base.style
    out: dict[str, PlanEntry] = {}
    embedding = not list(layer.lora_A.keys())
    parts = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    for adapter in adapter_names(layer):
        a_name, b_name = (f"{layer_name}.{parts[0]}", f"{layer_name}.{parts[1]}") if embedding else (
            f"{layer_name}.lora_A.{adapter}", f"{layer_name}.lora_B.{adapter}")
        if style == Style.COLWISE:
            out[a_name] = PlanEntry(Style.REPLICATED_GRAD_SUM, "lora", "LoRA A beside a column-parallel base: "
                                    "replicated, reads the base's f(x); its gradient is a partial sum over the ranks' "
                                    "B rows: summed over TP")
            out[b_name] = PlanEntry(Style.ADAPTER_COLWISE, "lora", "LoRA B beside a column-parallel base: output rows "
                                    "split like the base's, no collective of its own", base.blocks)
        elif style == Style.ROWWISE:
            if getattr(layer, "lora_bias", {}).get(adapter):
                raise PlanError(f"{layer_name}: adapter {adapter!r} has a LoRA bias (lora_bias=True) beside a "
                                f"row-parallel base, where its output is a partial sum reduced once over TP: the bias "
                                f"would be added tp times. Set lora_bias=False, or keep this layer whole with "
                                f"tp_plan={{'{_pattern(layer_name)}': 'replicated'}}.")
            out[a_name] = PlanEntry(Style.ADAPTER_ROWWISE, "lora", "LoRA A beside a row-parallel base: input columns "
                                    "split like the base's; its output is a partial sum", base.blocks)
            out[b_name] = PlanEntry(Style.REPLICATED_GRAD_SUM, "lora", "LoRA B beside a row-parallel base: replicated, "
                                    "applied to A's partial sums before the base's all-reduce; gradient summed over TP")
        elif style in _REPLICATED_IO:
            why = f"LoRA adapter beside a {style} base (replicated input and output): whole on every rank"
            out[a_name] = PlanEntry(Style.REPLICATED, "lora", why)
            out[b_name] = PlanEntry(Style.REPLICATED, "lora", why)
        elif style == Style.LM_HEAD:
            raise PlanError(f"{layer_name}: LoRA on the vocab-parallel LM head is not supported (its local logits "
                            f"go to the vocab-parallel loss, and the adapter's would have to follow the vocabulary "
                            f"split and the eval-time gather). Remove it from target_modules, or pass "
                            f"tp_plan={{'{_pattern(layer_name)}': 'colwise_gather_output'}} (logits gathered, "
                            f"the adapter whole on every rank).")
        else:
            raise PlanError(f"{layer_name}: LoRA beside a base planned {style} is not supported; remove it from "
                            f"target_modules, or pass tp_plan={{'{_pattern(layer_name)}': 'replicated'}}.")
    return out


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


# ----------------------------------------------------------------------------------------- apply
def shard_adapter(module: nn.Module, entry: PlanEntry, spec_for) -> None:
    """Slice an adapter's own parameters as ``entry`` says (``adapter_colwise``: dim 0 of ``B``'s weight and
    bias; ``adapter_rowwise``: dim 1 of ``A``'s weight); ``spec_for(full_shape, dim)`` gives the ShardSpec."""
    dim = 0 if entry.style == Style.ADAPTER_COLWISE else 1
    for pname, p in list(module.named_parameters(recurse=False)):
        if p.dim() <= dim:
            raise PlanError(f"{entry.style} cannot split {pname} {list(p.shape)} of {type(module).__name__} "
                            f"along dim {dim}")
        setattr(module, pname, sharded_parameter(p, spec_for(tuple(p.shape), dim), p.requires_grad))


def adapt_lora_layers(model: nn.Module, plan: Plan, tp_group) -> list[str]:
    """Place the adapters' communication next to their (already sharded) base layers; returns the LoRA layers
    changed. Column-parallel base: the adapters read the base's ``f(x)``; row-parallel base: one all-reduce
    after the adapters (``parallel/lora.py``)."""
    changed = []
    for name, layer in lora_layers(model).items():
        entry = plan.entries.get(f"{name}.base_layer")
        if entry is None:
            continue
        if entry.style == Style.COLWISE:
            adapt_column_parallel(layer, tp_group)
        elif entry.style == Style.ROWWISE:
            adapt_row_parallel(layer)
        else:
            continue
        changed.append(name)
    return changed
