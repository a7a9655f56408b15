"""``apply_tensor_parallel(model, plan, context)``: replace modules by their TP versions, in place.

The only communication is none: every rank slices its shards out of the full weights it
already holds, so ranks must start from identical weights (same seed or same checkpoint).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..parallel.context import ParallelContext
from ..parallel.cross_entropy import install_vocab_parallel_loss
from ..parallel.glu import lean_glu_mlp
from ..parallel.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                               sharded_parameter)
from ..parallel.lora import peft_base_model
from ..parallel.norms import is_per_token_norm, split_norm_over_tokens
from ..parallel.rmsnorm import fuse_rms_norm
from ..parallel.sharding import block_spec, contiguous_spec
from .experts import shard_fused_experts
from .lora import adapt_lora_layers, shard_adapter
from .plan import ADAPTER_STYLES, Plan, PlanEntry, Style
from .sequence import apply_sequence_parallel, plan_sequence_parallel
from .ties import TiedShards

logger = logging.get_logger(__name__)


def _spec_factory(entry: PlanEntry, ctx: ParallelContext, *, pad: bool = False):
    def spec_for(full_shape, dim):
        if entry.blocks:  # the sharded dim of the weight and of the bias carry the same fused blocks
            return block_spec(full_shape, dim, ctx.tp_rank, ctx.tp_size, list(entry.blocks))
        return contiguous_spec(full_shape, dim, ctx.tp_rank, ctx.tp_size, pad_to_multiple=pad)
    return spec_for


def _slice_alibi_hook(ctx: ParallelContext, local_heads: int):
    """Keep this rank's heads of an ALiBi bias ``[batch * heads, 1, keys]`` computed for all heads."""
    def hook(module, args, kwargs):
        alibi = kwargs.get("alibi")
        if alibi is None:
            return None
        heads = local_heads * ctx.tp_size
        batch = alibi.shape[0] // heads
        local = alibi.view(batch, heads, *alibi.shape[1:])[:, ctx.tp_rank * local_heads:(ctx.tp_rank + 1) * local_heads]
        kwargs["alibi"] = local.reshape(batch * local_heads, *alibi.shape[1:])
        return args, kwargs
    return hook


HOOKS = {"slice_alibi": _slice_alibi_hook}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_tensor_parallel(model: nn.Module, plan: Plan, context: ParallelContext, *,
                          split_norms: bool | None = None, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` in place following ``plan`` on ``context.tp_comm``; returns ``model``.

    The kernels come from ``context.kernels`` (``parallel/kernels.py``): with ``lean_activations`` the
    replicated RMSNorms get the lean fused function (``parallel/rmsnorm.py``), also at tp=1, where nothing
    is sharded, and the split gated MLPs the lean down projection (``parallel/glu.py``); the replicated per-token norms run on ``1/tp`` of the tokens per rank
    (``parallel/norms.py``) where ``token_split_norms`` and the norms are 16-bit
    (``Kernels.splits_norms``). ``split_norms`` overrides the dtype rule (tests, plan validation);
    without the shared-memory transport the norms are never split.

    ``sequence_parallel``: activations between the TP regions split along the sequence
    (``planner/sequence.py``, planned and checked on meta before a weight is touched); it takes the
    place of the token-split norms.
    """
    if plan.tp_size != context.tp_size:
        raise ValueError(f"plan was made for tp_size={plan.tp_size} but the context has tp_size={context.tp_size}")
    modules = dict(model.named_modules())
    kernels = context.kernels
    if kernels.lean_activations:
        _keep_swapped_forwards(model)
    if context.tp_size == 1:  # nothing to shard; the lean norms save memory of their own (ZeRO-only runs)
        if kernels.lean_activations:
            _fuse_rms_norms(modules, [name for name, mod in modules.items() if is_per_token_norm(mod)])
        return model
    seq_plan = plan_sequence_parallel(model, plan) if sequence_parallel else None
    group = context.tp_comm
    root = peft_base_model(model)[1]  # a PEFT model's inner HF model holds the embeddings and calls the loss
    emb_in = root.get_input_embeddings()
    emb_in = getattr(emb_in, "base_layer", emb_in)  # LoRA on the embedding: its base is the one split
    emb_out = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    new_embedding = None
    lm_head = head_module = None
    ties = TiedShards()  # tied parameters (embeddings, an MLM head's bias) keep one shard object
    for name, entry in plan.entries.items():
        mod = modules[name]
        style = entry.style
        if style == Style.VOCAB_EMBEDDING:
            spec = contiguous_spec(tuple(mod.weight.shape), 0, context.tp_rank, context.tp_size, pad_to_multiple=True)
            new = VocabParallelEmbedding.from_module(mod, spec, group)
            if mod is emb_in:
                new_embedding = (mod, new)
        elif style == Style.LM_HEAD:
            new = ParallelLMHead.from_module(mod, _spec_factory(entry, context, pad=True), group)
            new.mark_head_input = kernels.lean_activations
            if new_embedding is not None and mod.weight is new_embedding[0].weight:
                new.weight = new_embedding[1].weight  # tied: one shard object serves both
            lm_head, head_module = new, mod
        elif style == Style.COLWISE_GATHER and mod is emb_out:  # vocabulary split, logits always gathered
            new = ParallelLMHead.from_module(mod, _spec_factory(entry, context, pad=True), group, gather_output=True)
        elif style in (Style.COLWISE, Style.COLWISE_GATHER):
            if style == Style.COLWISE_GATHER and entry.blocks:
                raise ValueError(f"{name}: colwise_gather_output cannot gather a fused layout")
            new = ColumnParallelLinear.from_module(mod, _spec_factory(entry, context), group,
                                                   gather_output=style == Style.COLWISE_GATHER)
        elif style in (Style.ROWWISE, Style.ROWWISE_SPLIT):
            new = RowParallelLinear.from_module(mod, _spec_factory(entry, context), group,
                                                split_input=style == Style.ROWWISE_SPLIT)
        elif style == Style.HEAD_SHARDED:
            spec_for = _spec_factory(entry, context)
            for pname, p in list(mod.named_parameters(recurse=False)):
                shard = sharded_parameter(p, spec_for(tuple(p.shape), entry.dim), p.requires_grad)
                setattr(mod, pname, shard)
                ties.adopt_parameter(p, shard, mod, pname)
            continue
        elif style == Style.EXPERTS:  # MoE experts: TP inside every expert, f/g hooked around the module
            shard_fused_experts(mod, context, name=name)
            continue
        elif style == Style.REPLICATED_GRAD_SUM:
            for p in mod.parameters(recurse=False):
                p.tp_grad_sum = True
            continue
        elif style in ADAPTER_STYLES:  # LoRA A/B sliced like their base layer (planner/lora.py)
            shard_adapter(mod, entry, _spec_factory(entry, context))
            continue
        else:
            continue
        ties.adopt(mod, new)
        _set_module(model, name, new)
    ties.repoint(model)
    adapt_lora_layers(model, plan, group)  # LoRA adapters: their f / g shared with the base layers
    # An LM head tied to an embedding the plan did not list (or listed after it) stays tied.
    # (not a PEFT modules_to_save copy of the head: that one is trained apart from the embedding)
    if (lm_head is not None and new_embedding is not None and lm_head.weight is not new_embedding[1].weight
            and head_module is emb_out):
        if getattr(root.config, "tie_word_embeddings", False):
            lm_head.weight = new_embedding[1].weight
    for name, patch in plan.patches.items():
        mod = model.get_submodule(name)
        for attr, value in patch.attrs.items():
            setattr(mod, attr, value)
        if patch.config:
            cfg = copy.copy(mod.config)
            for key, value in patch.config.items():
                setattr(cfg, key, value)
            mod.config = cfg
        for hook in patch.hooks:
            local_heads = plan_local_heads(model, plan)
            mod.register_forward_pre_hook(HOOKS[hook](context, local_heads), with_kwargs=True)
    if lm_head is not None:  # the model's loss_function -> vocab-parallel (causal or masked, cross_entropy.py)
        install_vocab_parallel_loss(root, lm_head)
    replicated_norms = _replicated_token_norms(plan, modules)
    if kernels.lean_activations:
        _fuse_rms_norms(modules, replicated_norms)
        lean = [name for name, mod in model.named_modules() if lean_glu_mlp(mod)]
        logger.debug(f"{len(lean)} gated MLPs given the lean down projection (parallel/glu.py): {lean}")
    if kernels.token_split_norms and seq_plan is None:  # cheap all-gathers: split the replicated norms' tokens
        if split_norms is None:
            split_norms = kernels.splits_norms(_norms_dtype([modules[name] for name in replicated_norms], model))
        split = replicated_norms if split_norms else []
        for name in split:
            split_norm_over_tokens(modules[name], group, context.tp_size)
        logger.debug(f"{len(split)} replicated norms computed on 1/{context.tp_size} of the tokens per rank: {split}")
    if seq_plan is not None:
        apply_sequence_parallel(model, seq_plan, context)
    model.tp_plan_applied = plan
    return model


_LINEAR_STYLES = {Style.COLWISE, Style.COLWISE_GATHER, Style.ROWWISE, Style.ROWWISE_SPLIT}


def _keep_swapped_forwards(model: nn.Module) -> None:
    """Turn off transformers' hub kernels (``PreTrainedModel.use_kernels``, on by default for ``from_pretrained``
    models where the ``kernels`` package is installed, as transformers 5 requires) on ``model`` and every model in it.

    With them on, every ``train()`` / ``eval()`` re-kernelizes: each module that declares a kernel layer name
    (``LlamaRMSNorm`` and its copies) gets its class ``forward`` back, which would silently undo the lean
    modules' swapped forwards (the Trainer calls ``train()`` at every step). Turning them off first restores
    the torch forwards once (``reset_kernels``), before the lean ones are installed. Not on the ``meta``
    device (a plan's validation twin, the estimator), which kernelize refuses: there ``train()`` could not
    re-kernelize either."""
    turned_off = [module for module in model.modules()
                  if isinstance(module, PreTrainedModel) and module.use_kernels
                  and not getattr(next(module.parameters(), None), "is_meta", False)]
    for module in turned_off:
        module.use_kernels = False  # the property's setter resets the kernelized forwards
    if turned_off:
        logger.debug(f"hub kernels turned off on {[type(m).__name__ for m in turned_off]}: train()/eval() "
                     "would undo the lean modules")


def _fuse_rms_norms(modules: dict, names: list[str]) -> None:
    """Give the named (replicated, per-token) norms the lean RMSNorm function where it reproduces them."""
    fused = [name for name in names if fuse_rms_norm(modules[name])]
    logger.debug(f"{len(fused)} replicated RMSNorms given the lean function (parallel/rmsnorm.py): {fused}")


def _replicated_token_norms(plan: Plan, modules: dict) -> list[str]:
    """Replicated per-token norms of the residual stream: not beside a sharded linear (a norm next to
    q/k/v, e.g. OLMo-2's full-width q/k norms, sees per-head data, not the replicated stream)."""
    parents_of_linears = {name.removesuffix(".base_layer").rpartition(".")[0]  # a LoRA base: its layer's parent
                          for name, e in plan.entries.items() if e.style in _LINEAR_STYLES}
    return [name for name, e in plan.entries.items()
            if e.style == Style.REPLICATED and name.rpartition(".")[0] not in parents_of_linears
            and is_per_token_norm(modules[name])]


def _norms_dtype(norms: list[nn.Module], model: nn.Module) -> torch.dtype:
    """The dtype the norms' parameters share (the model's first parameter's for parameter-free norms);
    fp32 when they mix dtypes or there are none, so that only uniformly 16-bit norms are split."""
    params = [p for norm in norms for p in norm.parameters()] or list(model.parameters())[:1]
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def plan_local_heads(model: nn.Module, plan: Plan) -> int:
    from .model_info import model_dims
    return model_dims(model).heads // plan.tp_size
