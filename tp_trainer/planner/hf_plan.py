"""Hugging Face's own TP plans, read from the model and translated to our styles.

``model._tp_plan`` (transformers >= 5) already merges ``config.base_model_tp_plan`` under the
base-model prefix with the head's ``_tp_plan``; for older objects we merge them here.
"""

from __future__ import annotations

import torch.nn as nn

from .plan import ADAPTER_STYLES, Style

# HF style -> (our style, note). Styles absent here are unknown: a model's own plan falls back to the
# structural rules for that module (with a warning), a user's plan is refused (planner.py).
_HF_STYLES: dict[str, tuple[Style, str]] = {
    "colwise": (Style.COLWISE, ""),
    "colwise_rep": (Style.COLWISE_GATHER, ""),
    "colwise_gather_output": (Style.COLWISE_GATHER, ""),
    "rowwise": (Style.ROWWISE, ""),
    "rowwise_rep": (Style.ROWWISE_SPLIT, ""),
    "rowwise_split_input": (Style.ROWWISE_SPLIT, ""),
    "embedding_rowwise": (Style.VOCAB_EMBEDDING, ""),
    "packed_colwise": (Style.COLWISE, "packed halves split separately"),
    "replicated_with_grad_allreduce": (Style.REPLICATED_GRAD_SUM, ""),
    "replicate": (Style.REPLICATED, ""),
    "replicated": (Style.REPLICATED, ""),
}


def translate_hf_style(hf_style: str) -> tuple[Style, str] | None:
    """``(our style, note)`` for a Hugging Face style name, ``None`` when tp_trainer does not know it
    (transformers keeps adding styles; the caller decides whether that is an error or a fallback)."""
    return _HF_STYLES.get(hf_style)


def known_style_names() -> list[str]:
    """Every style name a plan may use: ours, then Hugging Face's that we translate."""
    return [s.value for s in Style if s not in ADAPTER_STYLES] + sorted(set(_HF_STYLES) - {s.value for s in Style})


def hf_plan_of(model: nn.Module) -> dict[str, str]:
    """Full-name patterns -> HF style for ``model`` (empty when the model declares none)."""
    plan = getattr(model, "_tp_plan", None)
    if plan is not None:  # transformers >= 5 merged it at post_init (an empty dict means: no plan)
        return dict(plan)
    merged: dict[str, str] = {}
    base_prefix = getattr(model, "base_model_prefix", "")
    base_plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}
    has_base = base_prefix and hasattr(model, base_prefix)
    for key, style in base_plan.items():
        merged[f"{base_prefix}.{key}" if has_base else key] = style
    merged.update(getattr(type(model), "_tp_plan", None) or {})
    return merged
