"""TRL's fused LM head on a vocabulary-split head: per-token log-probabilities and metrics without full logits.

TRL's SFT and DPO trainers patch ``model.forward`` (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` it runs the backbone and multiplies the hidden states by ``lm_head.weight``
itself, returning a ``FusedCausalLMOutput`` (per token: ``log_probs``, ``entropy``, ``is_top1``,
``mean_logits``, ``log_sum_sq_probs``, ``label_mask``; and ``loss``). Under TP that weight is this
rank's slice of the vocabulary, so its softmax would be normalised over ``V/tp`` tokens: losses and
metrics silently wrong. :func:`install_vocab_parallel_fused_head` replaces that forward, for a model
whose output embedding is a :class:`~tp_trainer.parallel.layers.ParallelLMHead`, by the same
computation on the vocabulary slices::

    h   = backbone(x).last_hidden_state[:, :-1]     [B, T-1, H], replicated (labels shifted left)
    z_r = lm_head.local_forward(h)                  [B, T-1, V/tp]; f on h: dL/dh all-reduced over TP
    z_r = softcap * tanh(scale * z_r / softcap) / temperature    element-wise, as TRL transforms full logits
    stats = vocab_parallel_token_stats(z_r, labels)              one all-gather of [k, B (T-1)] floats
    loss  = -sum(log p) / (num_items_in_batch or the number of labels)    (+ MoE load-balancing loss)

(``tp_trainer/parallel/vocab_stats.py`` states the reductions.) Every position is scored and the
ignored ones (label -100) zeroed afterwards, as TRL does off Triton devices. A forward without
``fused_lm_head`` is the previous forward, unchanged (generation and the full-logit paths, which
``ParallelLMHead`` serves with gathered logits).
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn as nn

from ..parallel.layers import ParallelLMHead
from ..parallel.vocab_stats import vocab_parallel_token_stats

FUSED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def logit_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` the logits get before the softmax, read from the text config as TRL 1.16's
    ``add_fused_lm_head`` reads it (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``,
    ``logits_scaling``; ``final_logit_softcapping``)."""
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return 1.0 if scale is None else scale, getattr(config, "final_logit_softcapping", None)


def vocab_parallel_lm_head(model: nn.Module) -> ParallelLMHead | None:
    """The model's output embedding when it is split over the vocabulary of a TP group, else ``None``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, ParallelLMHead) and head.tp_group is not None else None


def install_vocab_parallel_fused_head(model: nn.Module, *, outputs: tuple[str, ...] = (),
                                      temperature: float = 1.0) -> bool:
    """Replace ``model.forward``'s ``fused_lm_head=True`` path by its vocab-parallel version (module docstring).

    ``model`` is the causal LM itself (a PEFT model's base model). Returns False, changing nothing, when
    its head is not vocabulary-split (TRL's own path is right then); installing twice is a no-op.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    head = vocab_parallel_lm_head(model)
    if head is None or getattr(model, "tp_fused_lm_head", False):
        return False
    unknown = set(outputs) - set(FUSED_OUTPUTS) - {"log_probs"}
    if unknown:
        raise ValueError(f"unknown fused LM head outputs {sorted(unknown)}; choose from {FUSED_OUTPUTS}")
    previous = model.forward
    text_config = model.config.get_text_config()
    scale, softcap = logit_transform(text_config)

    # the signature of the model's forward: generate validates its keyword arguments against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone = self.base_model(*args, **kwargs)
        if shift_labels is None:
            hidden, labels = backbone.last_hidden_state[:, :-1], labels[:, 1:]
        else:
            hidden, labels = backbone.last_hidden_state, shift_labels
        lm_head = self.get_output_embeddings()
        mask = labels != -100
        logits = lm_head.local_forward(hidden)
        logits = _transform(logits, scale, softcap, temperature)
        stats = vocab_parallel_token_stats(
            logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), vocab_start=lm_head.vocab_start,
            vocab_valid=lm_head.vocab_valid, vocab_size=lm_head.out_features, group=lm_head.tp_group, outputs=outputs)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (
            None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in stats)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(backbone, text_config, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(forward, model)
    model.tp_fused_lm_head = True
    return True


def _transform(logits: torch.Tensor, scale: float, softcap: float | None, temperature: float) -> torch.Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature if temperature != 1.0 else logits


def _load_balancing_loss(backbone_outputs, text_config, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss TRL's fused head adds (Mixtral's, which the MoE families share); the
    router is replicated under TP, so its logits are whole on every rank."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(backbone_outputs.router_logits, text_config.num_experts,
                                    text_config.num_experts_per_tok, attention_mask)


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM whose forward TRL patches: a PEFT model's base model, else the model."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model
