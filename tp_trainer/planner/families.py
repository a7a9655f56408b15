"""Model-family knowledge the structural rules cannot infer: the memory layout of fused projections.

A fused projection packs several logical outputs into one linear. Splitting its output rows
contiguously would hand rank 0 all of ``q`` and rank 1 ``k`` and ``v``; the layouts below say
how to split it so that every rank gets whole heads of each part ("head-aligned").

Layouts (output dim of the fused weight, ``H`` query heads, ``K`` key/value heads, ``d`` head dim):

* ``qkv_blocks``: ``[q: H d | k: K d | v: K d]`` (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``): each block split by heads.
* ``head_interleaved``: ``[h0: q k v | h1: q k v | ...]`` (GPT-NeoX, BLOOM, Falcon MHA): a contiguous split is head-aligned.
* ``kv_group_interleaved``: ``[g0: q.. k v | g1: ...]`` (Falcon new decoder architecture): contiguous split by KV group.
* ``multi_query``: ``[q: H d | k: d | v: d]`` (Falcon-7B): q split, the single k/v head replicated.
* ``two_blocks``: ``[gate: I | up: I]`` (Phi-3 ``gate_up_proj``): each half split.
"""

from __future__ import annotations

from .model_info import ModelDims

# (owning module class, linear attribute) -> layout
FUSED_LAYOUTS: dict[tuple[str, str], str] = {
    ("GPT2Attention", "c_attn"): "qkv_blocks",
    ("Phi3Attention", "qkv_proj"): "qkv_blocks",
    ("Phi3MLP", "gate_up_proj"): "two_blocks",
    ("GPTNeoXAttention", "query_key_value"): "head_interleaved",
    ("BloomAttention", "query_key_value"): "head_interleaved",
}

# Attribute-name fallbacks for models not listed above (documented in the plan's reason).
NAME_LAYOUTS: dict[str, str] = {"qkv": "qkv_blocks", "gate_up": "two_blocks"}


def fused_layout(owner_cls: str, attr: str, owner=None, config=None) -> tuple[str, str] | None:
    """``(layout, how_known)`` for a fused projection, or ``None`` if it is not fused."""
    if owner_cls == "FalconAttention" and attr == "query_key_value":
        if getattr(config, "new_decoder_architecture", False):
            return "kv_group_interleaved", "family"
        if getattr(config, "multi_query", False):
            return "multi_query", "family"
        return "head_interleaved", "family"
    if owner_cls == "GPTBigCodeAttention" and attr == "c_attn":
        return ("multi_query" if getattr(config, "multi_query", False) else "head_interleaved"), "family"
    if (owner_cls, attr) in FUSED_LAYOUTS:
        return FUSED_LAYOUTS[(owner_cls, attr)], "family"
    for fragment, layout in NAME_LAYOUTS.items():
        if fragment in attr.lower():
            return layout, "name"
    return None


def kv_replicas(dims: ModelDims, tp: int) -> int:
    """How many TP ranks share one key/value head (1 when ``tp`` divides the KV heads)."""
    return 1 if dims.kv_heads % tp == 0 else tp // dims.kv_heads


def layout_blocks(layout: str, out_features: int, dims: ModelDims, tp: int) -> tuple[tuple[int, int], ...] | None:
    """Blocks ``((size, replicas), ...)`` for :func:`~tp_trainer.parallel.sharding.block_spec`;
    ``None`` means a contiguous split is already head-aligned."""
    d, H, K = dims.head_dim, dims.heads, dims.kv_heads
    if layout == "qkv_blocks":
        r = kv_replicas(dims, tp)
        return ((H * d, 1), (K * d, r), (K * d, r))
    if layout == "multi_query":
        return ((H * d, 1), (d, tp), (d, tp))
    if layout == "two_blocks":
        return ((out_features // 2, 1), (out_features // 2, 1))
    if layout in ("head_interleaved", "kv_group_interleaved"):
        return None
    raise ValueError(f"unknown fused layout {layout!r}")


# Attention modules that receive a per-head tensor computed for all heads outside them (ALiBi
# biases of shape ``[batch * heads, 1, keys]``): each rank keeps the rows of its own heads.
def attention_hooks(owner_cls: str, config) -> tuple[str, ...]:
    if owner_cls == "BloomAttention" or (owner_cls == "FalconAttention" and getattr(config, "alibi", False)):
        return ("slice_alibi",)
    return ()
