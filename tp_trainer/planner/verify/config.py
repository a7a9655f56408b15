"""The truncated model the check runs: the same widths and heads, 2 layers, a ~1024-token vocabulary.

:func:`truncate_config` copies the model's config and shrinks what does not decide the plan:

- layers: 2 (one per layer type when the config mixes them, e.g. sliding and full attention);
  per-layer lists keep the entries of the kept layers, index lists are renumbered, and
  ``first_k_dense_replace`` becomes 1 so that a dense and a MoE block are both checked;
- vocabulary: about 1024 with the same remainder modulo ``tp`` (so the vocab-parallel embedding
  and LM head are padded exactly when the full model's are); token ids beyond it wrap around;
- dropout off, and a GPU-only attention implementation replaced by ``sdpa``.

Widths and head counts are kept: they decide the plan. :func:`plan_differences` compares the
plans of the full and the truncated model per layer pattern (layer indices as ``*``), so that a
plan that changes with the depth is reported rather than silently left unchecked. Nothing here
runs a model: :func:`meta_model` builds one on the meta device for planning.
"""

from __future__ import annotations

import copy
import re

VOCAB = 1024         # vocabulary of the truncated model (about; the remainder modulo tp is kept)
LAYERS = 2

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers",
                    "num_encoder_layers", "encoder_layers")


def _sub_configs(cfg):
    from transformers import PretrainedConfig

    return [(k, v) for k, v in vars(cfg).items() if isinstance(v, PretrainedConfig)]


def _pick_layers(types, n: int, layers: int) -> list[int]:
    """Indices of the layers to keep: the first layer of every distinct type, then the first ones."""
    picks: list[int] = []
    if isinstance(types, (list, tuple)) and len(types) == n:
        seen = set()
        for i, t in enumerate(types):
            key = repr(t)
            if key not in seen:
                seen.add(key)
                picks.append(i)
    for i in range(n):
        if len(picks) >= layers:
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks)


def truncate_config(config, tp_size: int, *, layers: int = LAYERS, vocab: int = VOCAB):
    """``(truncated copy, notes)``: ``config`` with ``layers`` layers, a ~``vocab`` vocabulary, no dropout.

    Widths and head counts are untouched. Per-layer lists (``layer_types``, ``no_rope_layers``, any
    list named ``*layer*`` as long as the layer count) keep the entries of the kept layers, index
    lists (``mlp_only_layers``) are renumbered, ``first_k_dense_replace`` becomes 1 so that both
    dense and MoE blocks are checked. Token ids beyond the new vocabulary wrap around it."""
    cfg = copy.deepcopy(config)
    notes: list[str] = []
    _truncate(cfg, tp_size, layers, vocab, notes, prefix="")
    return cfg, notes


def _truncate(cfg, tp: int, layers: int, vocab: int, notes: list[str], prefix: str) -> None:
    """Truncate ``cfg`` in place, then its sub-configs (a multimodal model's text config), noting each change."""
    attrs = vars(cfg)  # live: the setattr calls below show in it
    n = _truncate_layers(cfg, attrs, layers, notes, prefix)
    _keep_one_dense_block(cfg, attrs, n, layers, notes, prefix)
    _truncate_vocab(cfg, attrs, tp, vocab, notes, prefix)
    _disable_dropout(cfg, attrs, notes, prefix)
    if getattr(cfg, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        notes.append(f"{prefix}attention {cfg._attn_implementation} -> sdpa (CPU)")
        cfg._attn_implementation = "sdpa"
    for key, sub in _sub_configs(cfg):
        _truncate(sub, tp, layers, vocab, notes, prefix=f"{prefix}{key}: ")


def _truncate_layers(cfg, attrs: dict, layers: int, notes: list[str], prefix: str) -> int:
    """Keep ``layers`` layers (one of each type first); returns the original layer count (0: none found)."""
    counts = {k: attrs[k] for k in LAYER_COUNT_KEYS if isinstance(attrs.get(k), int) and not isinstance(attrs[k], bool)}
    n = max(counts.values(), default=0)
    if n <= layers:
        return n
    picks = _pick_layers(attrs.get("layer_types"), n, layers)
    kept = len(picks)
    for key, value in counts.items():
        if value > kept:
            setattr(cfg, key, kept)
    for key, value in list(attrs.items()):
        if "layer" not in key or not isinstance(value, (list, tuple)):
            continue
        if len(value) == n:
            setattr(cfg, key, type(value)(value[i] for i in picks))
        elif value and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in value):
            setattr(cfg, key, type(value)(picks.index(i) for i in value if i in picks))
    types = attrs.get("layer_types")
    which = f" (layers {picks}: one of each type {sorted(set(map(str, types)))})" if (
        isinstance(types, (list, tuple)) and len(set(map(repr, types))) > 1) else ""
    notes.append(f"{prefix}{kept} of {n} layers{which}")
    return n


def _keep_one_dense_block(cfg, attrs: dict, n: int, layers: int, notes: list[str], prefix: str) -> None:
    """``first_k_dense_replace`` -> 1 where the kept layers would all be dense: one dense and one MoE block."""
    dense = attrs.get("first_k_dense_replace")
    if isinstance(dense, int) and dense >= 1 and min(n, layers) > 1 and dense >= min(n, layers):
        cfg.first_k_dense_replace = 1
        notes.append(f"{prefix}first_k_dense_replace {dense} -> 1 (a dense and a MoE block)")


def _truncate_vocab(cfg, attrs: dict, tp: int, vocab: int, notes: list[str], prefix: str) -> None:
    """Shrink ``vocab_size`` to ~``vocab`` with its remainder modulo ``tp`` unchanged; wrap the token ids into it."""
    v = attrs.get("vocab_size")
    if not (isinstance(v, int) and v > vocab):
        return
    new = max(1, vocab // tp) * tp + v % tp  # same padding of the vocab-parallel layers as the full model
    cfg.vocab_size = new
    wrapped = _wrap_token_ids(cfg, attrs, new)
    notes.append(f"{prefix}vocabulary {v} -> {new} (same remainder modulo tp={tp}; the embedding and LM head "
                 f"are split over it the same way)" + (f"; {', '.join(wrapped)} wrapped into it" if wrapped else ""))


def _wrap_token_ids(cfg, attrs: dict, vocab_size: int) -> list[str]:
    """Take every ``*_token_id(s)`` at or beyond ``vocab_size`` modulo it; returns the keys changed."""
    wrapped = []
    for key, value in list(attrs.items()):
        if not key.endswith(("_token_id", "_token_ids")):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= vocab_size:
            setattr(cfg, key, value % vocab_size)
            wrapped.append(key)
        elif isinstance(value, (list, tuple)) and any(isinstance(i, int) and i >= vocab_size for i in value):
            setattr(cfg, key, type(value)(i % vocab_size if isinstance(i, int) else i for i in value))
            wrapped.append(key)
    return wrapped


def _disable_dropout(cfg, attrs: dict, notes: list[str], prefix: str) -> None:
    zeroed = [k for k, val in attrs.items()
              if ("dropout" in k or "pdrop" in k) and isinstance(val, float) and val > 0]
    for key in zeroed:
        setattr(cfg, key, 0.0)
    if zeroed:
        notes.append(f"{prefix}dropout off ({', '.join(zeroed)})")


def meta_model(config):
    """``AutoModelForCausalLM`` of ``config`` on the meta device (no memory): what the planner plans."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def collapsed_entries(plan) -> dict[str, str]:
    """Pattern (layer indices as ``*``) -> style and layout, for comparing plans of different depths."""
    out = {}
    for name, e in plan.entries.items():
        out.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), f"{e.style}{e.describe_layout()}")
    for name, patch in plan.patches.items():
        out.setdefault("patch " + re.sub(r"\.\d+(?=\.|$)", ".*", name), repr((patch.attrs, patch.config, patch.hooks)))
    return out


def plan_differences(full_plan, truncated_plan, limit: int = 4) -> list[str]:
    """The patterns planned differently in the two plans, one line each (at most ``limit``, then a count)."""
    a, b = collapsed_entries(full_plan), collapsed_entries(truncated_plan)
    diffs = [f"{k}: {a.get(k, 'absent')} in the full model, {b.get(k, 'absent')} in the truncated one"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])
