"""What the planner needs to know about a Hugging Face model: sizes, blocks and call order.

Everything here reads the model; nothing modifies it. The call order comes from one forward
pass of a twin of the model built on the ``meta`` device (no memory, no FLOPs), which is how
the structural rules tell an output projection (called last in its sub-block) from an input
projection without a list of module names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    model_type: str


def _first(cfg, names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def model_dims(model: nn.Module) -> ModelDims:
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    hidden = _first(cfg, ["hidden_size", "n_embd", "d_model"])
    heads = _first(cfg, ["num_attention_heads", "n_head", "num_heads"])
    if hidden is None or heads is None:
        raise ValueError(f"config {type(cfg).__name__} has no hidden size / head count the planner recognises; "
                         "pass an explicit tp_plan")
    kv = _first(cfg, ["num_key_value_heads", "num_kv_heads", "n_head_kv"])
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1  # Falcon-7B style multi-query attention
    kv = kv or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    vocab = model.get_input_embeddings().weight.shape[0]
    return ModelDims(hidden, heads, kv, head_dim, vocab, getattr(cfg, "model_type", type(model).__name__))


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules(remove_duplicate=False)}


def meta_twin(model: nn.Module) -> nn.Module:
    """A fresh ``type(model)`` built on the ``meta`` device from a deep copy of its config (no memory).

    The twin uses eager attention whatever the model is configured with: the kernel never changes a
    shape, flash kernels and registered custom ones cannot run on ``meta``, and the ``sdpa`` mask
    code asks a padding mask for a Python bool (``.item()``) when a model builds one itself (BART's
    decoder), which ``meta`` tensors cannot answer."""
    config = copy.deepcopy(model.config)
    if getattr(config, "_attn_implementation", None) != "eager":
        config._attn_implementation = "eager"
    if hasattr(config, "_experts_implementation"):  # MoE: grouped_mm has no fp32 meta kernel, eager needs nonzero()
        config._experts_implementation = "batched_mm"
    with torch.device("meta"):
        return type(model)(config)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are empty ``meta`` tensors (ties kept): a
    twin that keeps what was changed after construction (swapped modules), at no memory cost."""
    memo: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def meta_inputs(model: nn.Module, seq_len: int, *, labels: bool) -> dict:
    """Keyword arguments of one meta-device forward of ``model``: ``input_ids [1, seq_len]`` (zeros), the
    decoder's ids for an encoder-decoder, and with ``labels`` the labels its head expects: the ids for a
    language-model head, else shaped after the logits of a forward without them (``[1]`` for a
    sequence classifier, float for a regression head, ``[1, seq_len]`` for token-level heads), which
    then runs under ``no_grad`` (on ``meta`` it costs no memory)."""
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    kwargs = {"input_ids": ids}
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if not labels:
        if encoder_decoder:
            kwargs["decoder_input_ids"] = ids
        return kwargs
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:  # a language-model head: one label per token, no need to look at its logits
        kwargs["labels"] = ids
        return kwargs
    try:
        with torch.no_grad():
            out = model(**meta_inputs(model, seq_len, labels=False))
    except Exception:  # a forward that needs its labels: the same ids serve (what tp_trainer always passed)
        kwargs["labels"] = ids
        return kwargs
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        logits = out[0]
    if logits is not None and logits.dim() == 2:  # one prediction per sequence
        if logits.shape[-1] == 1:
            kwargs["labels"] = torch.zeros(1, dtype=logits.dtype, device="meta")  # regression
        else:
            kwargs["labels"] = torch.zeros(1, dtype=torch.long, device="meta")
    else:  # decoder-only models shift ids into labels; encoder-decoders build the decoder's ids from them
        kwargs["labels"] = ids
    return kwargs


def call_order(model: nn.Module) -> list[str] | None:
    """Names of parameter-owning modules in first-call order of a forward on a meta twin.

    Returns ``None`` when the twin cannot be built or run (custom models); callers then fall
    back to registration order.
    """
    try:
        twin = meta_twin(model)
        order, handles = record_first_calls(dict(twin.named_modules()))
        try:
            with torch.no_grad():
                twin(**meta_inputs(twin, 4, labels=False))
        finally:
            for h in handles:
                h.remove()
        return order
    except Exception as err:  # a custom model we cannot twin: fall back, say so once
        logger.info(f"tp_trainer planner: meta-device trace failed ({type(err).__name__}: {err}); "
                    "using module registration order")
        return None


def record_first_calls(modules: dict[str, nn.Module]) -> tuple[list[str], list]:
    """Hooks that append each parameter-owning module's name to ``order`` at its first call:
    ``(order, hook handles)``; the caller runs the forward, then removes the handles."""
    order: list[str] = []
    seen: set[str] = set()

    def first_call(name):
        def hook(module, args):
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    handles = [mod.register_forward_pre_hook(first_call(name)) for name, mod in modules.items()
               if any(True for _ in mod.parameters(recurse=False))]
    return order, handles


def layer_lists(model: nn.Module) -> list[str]:
    """Names of the ModuleLists holding the repeated transformer blocks (the longest ones)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    longest = max(len(m) for _, m in lists)
    return [n for n, m in lists if len(m) == longest and len({type(c) for c in m}) == 1]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features
