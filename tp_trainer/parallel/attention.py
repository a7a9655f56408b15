"""Causal self-attention for CPU training: batched GEMMs over causal row blocks.

Every TP rank runs attention on its own heads (no communication here). On CPU, torch's fused
``scaled_dot_product_attention`` kernel works on 64-row query tiles with small GEMMs and
recomputes the probabilities in backward; on training-length sequences it reaches a third of
the machine's matmul rate in fp32 and less in bf16. Written with a few large batched GEMMs:

    rows are (position, query head of the group) pairs, position-major, so the ``g = H / H_kv``
    query heads sharing a key/value head form one matrix Q [S g, d] per (batch, kv head);
    for each block i of ``b`` positions (rows [i b g, (i+1) b g), keys [0, (i+1) b)):
        P_i = softmax(scale Q_i K_{<=i}^T + M_i)         M_i: -inf where key > row's position
        O_i = P_i V_{<=i}
    backward, with D = rowsum(dO * O):
        dV_{<=i} += P_i^T dO_i,   dS_i = P_i * (dO_i V_{<=i}^T - D_i)
        dQ_i = scale dS_i K_{<=i},   dK_{<=i} += scale dS_i^T Q_i

The blocks skip the keys above the diagonal block, ``(n - 1) / 2n`` of the full ``S x S``
product for ``n`` blocks; grouped heads need no ``repeat_kv`` copy and their key/value
gradients are summed inside the GEMM. It saves the probabilities ``P`` (``B H S^2 (n+1)/2n``
elements per layer) instead of recomputing them, so it is only used while they are small
(:data:`MAX_SAVED_PROBS_BYTES`); longer sequences keep torch's kernel. (Measured against torch's kernel: docs/benchmarks.md, "Kernel measurements".)

:func:`use_cpu_attention` installs it through transformers' attention registry: the model
keeps calling its attention interface, which routes here exactly when ``sdpa`` would have
called the fused kernel with ``is_causal=True`` and no mask (no padding or packing, no
dropout, no cache, no soft-capping); every other call goes to ``sdpa`` unchanged. Masks are
built by ``sdpa``'s mask function, so padded or packed batches behave as before. Whether a run
uses it is ``context.kernels.cpu_attention`` (``kernels.py``: CPU runs, not with
``--cpu_kernels off`` or ``TP_TRAINER_CPU_ATTENTION=0``).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys

import torch
import torch.nn as nn


NAME = "tp_trainer_cpu_causal"
BLOCK = 64  # positions per row block (see the module docstring for 32 and 128)
# per layer and rank: the extra activation memory accepted for the speed (torch's kernel saves O(S) per row)
MAX_SAVED_PROBS_BYTES = 64 * 2**20
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes ``t``'s ops in on its device, or ``None`` when autocast is off
    there. ``meta`` tensors (the memory estimate's simulated step) have no autocast."""
    device = t.device.type
    if device == "meta" or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


@functools.lru_cache(maxsize=64)
def _block_mask(start: int, end: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``M_i``: rows of positions ``[start, end)`` (each repeated for the ``groups`` heads) x keys ``[0, end)``."""
    position = torch.arange(start, end, device=device).repeat_interleave(groups)
    mask = torch.zeros(position.numel(), end, dtype=dtype, device=device)
    return mask.masked_fill_(torch.arange(end, device=device)[None, :] > position[:, None], float("-inf"))


def _blocks(seq: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, seq)) for start in range(0, seq, block)]


class _BlockCausalAttention(torch.autograd.Function):
    """``q [B, H, S, d]``, ``k [B, Hk, S, d]``, ``v [B, Hk, S, dv]`` -> ``[B, S, H, dv]`` (HF's interface layout)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, block):
        batch, heads, seq, dim = q.shape
        kv_heads, dv = k.shape[1], v.shape[-1]
        g = heads // kv_heads
        # [B * Hk, S * g, d], row = position * g + head within the group
        qp = q.reshape(batch, kv_heads, g, seq, dim).transpose(2, 3).reshape(batch * kv_heads, seq * g, dim)
        kf = k.reshape(batch * kv_heads, seq, dim)
        vf = v.reshape(batch * kv_heads, seq, dv)
        probs, outs = [], []
        for start, end in _blocks(seq, block):
            scores = torch.baddbmm(_block_mask(start, end, g, q.dtype, q.device), qp[:, start * g:end * g],
                                   kf[:, :end].transpose(1, 2), alpha=scale)
            p = torch.softmax(scores, dim=-1)
            del scores
            probs.append(p)
            outs.append(torch.bmm(p, vf[:, :end]))
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(qp, kf, vf, out, *probs)
        ctx.scale, ctx.block, ctx.q_shape = scale, block, q.shape
        return out.view(batch, kv_heads, seq, g, dv).transpose(1, 2).reshape(batch, seq, heads, dv)

    @staticmethod
    def backward(ctx, grad_out):
        qp, kf, vf, out, *probs = ctx.saved_tensors
        batch, heads, seq, dim = ctx.q_shape
        kv_heads, dv = kf.shape[0] // batch, vf.shape[-1]
        g = heads // kv_heads
        dout = grad_out.reshape(batch, seq, kv_heads, g, dv).transpose(1, 2).reshape(batch * kv_heads, seq * g, dv)
        delta = (dout * out).sum(-1, keepdim=True)
        dq_blocks = []
        dk = torch.zeros_like(kf)
        dvf = torch.zeros_like(vf)
        # each block's products go to fresh tensors, then add into the key prefix: in-place
        # baddbmm_ on a prefix view (strided batch) runs per matrix in torch's CPU fallback, 3x slower
        for (start, end), p in zip(_blocks(seq, ctx.block), probs):
            rows = slice(start * g, end * g)
            dvf[:, :end] += torch.bmm(p.transpose(1, 2), dout[:, rows])
            ds = torch.bmm(dout[:, rows], vf[:, :end].transpose(1, 2)).sub_(delta[:, rows]).mul_(p)
            dq_blocks.append(torch.bmm(ds, kf[:, :end]))
            dk[:, :end] += torch.bmm(ds.transpose(1, 2), qp[:, rows])
        dq = torch.cat(dq_blocks, dim=1).mul_(ctx.scale)
        dk.mul_(ctx.scale)
        dq = dq.view(batch, kv_heads, seq, g, dim).transpose(2, 3).reshape(batch, heads, seq, dim)
        return dq, dk.view(batch, kv_heads, seq, dim), dvf.view(batch, kv_heads, seq, dv), None, None


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           block: int = BLOCK) -> torch.Tensor:
    """``softmax(scale q k^T + causal) v`` with grouped key/value heads, returned as ``[B, S, H, dv]``."""
    return _BlockCausalAttention.apply(q, k, v, scale, block)


def saved_probs_bytes(batch: int, heads: int, seq: int, element_size: int, block: int = BLOCK) -> int:
    """Bytes of ``P`` one layer saves: the lower block triangle of ``B H S x S``."""
    return sum(batch * heads * (end - start) * end for start, end in _blocks(seq, block)) * element_size


def handles(module: nn.Module, query, key, value, attention_mask, dropout: float, is_causal, kwargs) -> bool:
    """True when ``sdpa`` would call the fused kernel with ``is_causal=True`` and nothing else, on CPU,
    and the saved probabilities stay under :data:`MAX_SAVED_PROBS_BYTES`. ``meta`` tensors count as
    CPU: ``tp_trainer.memory`` simulates a CPU training step on them."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, seq, _ = query.shape
    same_dtype = query.dtype == key.dtype == value.dtype or autocast_dtype(query) is not None
    return (query.device.type in ("cpu", "meta") and same_dtype and attention_mask is None and causal and dropout == 0.0
            and seq > 1 and key.shape[2] == seq and heads % key.shape[1] == 0
            and not kwargs.get("output_attentions", False)
            and all(kwargs.get(name) is None for name in _UNSUPPORTED_KWARGS)
            and saved_probs_bytes(batch, heads, seq, query.element_size()) <= MAX_SAVED_PROBS_BYTES)


def attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-interface signature: this kernel where :func:`handles`, else ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not handles(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    dtype = autocast_dtype(query)
    if dtype is not None:  # like sdpa under autocast: all three in the autocast dtype
        with torch.autocast(query.device.type, enabled=False):
            return block_causal_attention(query.to(dtype), key.to(dtype), value.to(dtype), scale), None
    return block_causal_attention(query, key, value, scale), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@functools.lru_cache(maxsize=None)
def _modeling_source(module_name: str) -> str:
    try:
        return inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return ""


def dispatches_by_registry(model: nn.Module) -> bool:
    """Whether renaming the attention implementation only changes which registry function runs.

    True when the model's transformers modeling code looks its attention up in
    ``ALL_ATTENTION_FUNCTIONS`` and never names ``"sdpa"``: code that does (Falcon, Gemma-4)
    switches to other paths when the name is not ``sdpa``, so those models keep ``sdpa``.
    """
    sources = [_modeling_source(name) for name in {type(m).__module__ for m in model.modules()}
               if name.startswith("transformers.models.")]
    return (any("ALL_ATTENTION_FUNCTIONS" in src for src in sources)
            and not any(re.search(r"""["']sdpa["']""", src) for src in sources))


def use_cpu_attention(model: nn.Module, device: torch.device | str | None = None) -> bool:
    """Route ``model``'s ``sdpa`` attention through :func:`attention_forward`; returns whether it switched.

    Called for runs whose kernels include it (``context.kernels.cpu_attention``). Only models whose
    config selects ``sdpa`` (transformers' default) and whose modeling code reaches attention
    through the registry without naming ``"sdpa"`` itself (:func:`dispatches_by_registry`). The
    switch is the configs' private ``_attn_implementation`` (every config object of the model, the
    copies the planner gives patched modules included), which ``save_pretrained`` does not write,
    so saved configs are unchanged. On other devices than the CPU the kernel is not called
    (:func:`handles`): ``sdpa`` runs as before; a ``device`` other than the CPU switches nothing.
    """
    from transformers import PretrainedConfig

    if device is not None and torch.device(device).type != "cpu":
        return False
    candidates = [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
    configs = {id(c): c for c in candidates if isinstance(c, PretrainedConfig)}
    sdpa = [c for c in configs.values() if getattr(c, "_attn_implementation", None) == "sdpa"]
    if not sdpa or not dispatches_by_registry(model):
        return False
    _register()
    for config in sdpa:
        config._attn_implementation = NAME
    return True
