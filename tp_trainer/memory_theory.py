"""Activation memory per transformer layer in closed form (Korthikanti et al. 2022), with and without sequence parallelism.

For a micro-batch of ``b`` sequences of ``s`` tokens, hidden size ``h``, ``a`` attention heads and
``t`` TP ranks, with 16-bit activations, the paper counts what one GPT layer keeps for backward
(LayerNorm, fused QKV, a ``4h`` GELU MLP, 1-byte dropout masks, softmax attention):

    without sequence parallelism:  s b h (10 + 24/t + 5 a s / (h t))  bytes
    with it:                        s b h (34 + 5 a s / h) / t           bytes

The ``10 s b h`` a rank keeps whole without it are the two LayerNorm inputs (``2 x 2``), the inputs
of the QKV and first MLP projections (``2 + 2``) and the two dropout masks (``1 + 1``); the ``24 s b
h / t`` split ones are Q, K, V (``6``), the attention output (``2``) and the GELU's input and output
(``8 + 8``); ``5 a s^2 b / t`` is the softmax output, its dropout mask and the dropout's output.
Flash / memory-efficient attention (SDPA) keeps no ``s x s`` tensor: the ``5 a s / h`` term goes,
and it keeps an fp32 log-sum-exp per head and token (``4 s b a / t``) beside the output it returns.
:func:`gpt_layer_bytes` is this count, plus the LayerNorms' per-token statistics (mean and
``1/std``: ``2 x 2 x stat_bytes`` per token, fp32 on CUDA, 16-bit on CPU) and a dropout mask size
(``mask_bytes``: 1 for CUDA's bool masks, 2 on CPU, where the mask has the activations' dtype). A
Hugging Face GPT-2 trained with ``use_cache`` on (its config's default; ``activation_checkpointing``
turns it off) also puts K and V into a KV cache: copies of the fused QKV output's views that the
attention then reads and keeps, ``4 s b h / t`` more (``kv_cache``).

**Llama-shaped layers** (RMSNorm, SwiGLU MLP of width ``I``, grouped-query attention with ``k`` KV
heads of size ``d``, rotary embeddings, no dropout) counted the same way, from the tensors Hugging
Face's modeling code and SDPA keep (:func:`llama_layer_bytes`; measured equal on live ranks by
tests/test_estimate.py):

* each RMSNorm (two per layer) computes in fp32: it keeps ``x`` in fp32 (``4 h``), ``1/rms`` (``4``)
  and the normalised ``x`` in 16-bit for its weight's gradient (``2 h``): ``6 h + 4`` per token;
  tp_trainer's lean RMSNorm (``lean``, the default: ``parallel/rmsnorm.py``) keeps its 16-bit input and
  ``1/rms``: ``2 h + 4``;
* attention: the q/k/v input (``2 h``), Q after the rotary embedding (``2 h / t``), K and V at the
  KV heads (``4 k d / t``; SDPA's ``enable_gqa`` repeats nothing; a KV cache holds these same
  tensors, the rotary embedding made them new ones anyway), the output (``2 h / t``: the
  flash kernel's output, whose memory is the o_proj input too) and the log-sum-exp (``4 a / t``);
* MLP: its input (``2 h``), the gate and up outputs, SiLU's output and the product that ``down_proj``
  reads (``4 x 2 I / t``); the lean gated MLP (``parallel/glu.py``, at tp > 1) only the gate and up
  outputs (``2 x 2 I / t``).

    without sequence parallelism:  s b (16 h + 8) + s b (4 h + 4 k d + 4 a + 8 I) / t
    with it:                        s b (20 h + 4 k d + 4 a + 8 I + 8) / t
    lean, without / with it:        s b (8 h + 8) + s b (4 h + 4 k d + 4 a + 4 I) / t,   s b (12 h + 4 k d + 4 a + 4 I + 8) / t

With sequence parallelism the column-parallel layers keep their chunk of the input (and all-gather
it again in backward), so nothing of ``s b h`` stays whole. With activation checkpointing a layer
keeps only its input between forward and backward: ``2 s b h`` bytes, ``/ t`` with sequence
parallelism (:func:`checkpointed_layer_bytes`); one layer's activations exist again while it is
recomputed. These are the per-layer activations only; the simulated estimate (:mod:`tp_trainer.memory`)
counts the whole step (embeddings, logits, loss, gradients, optimizer buffers) and any family.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2")  # RMSNorm + SwiGLU + GQA + rotary
GPT_SHAPED = ("gpt2",)  # LayerNorm + fused QKV + 4h GELU MLP + dropout


@dataclass(frozen=True)
class LayerShape:
    family: str   # "gpt" or "llama"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config) -> "LayerShape":
        """The shape of one layer of ``config``; a family with no closed form here is a ValueError."""
        kind = getattr(config, "model_type", None)
        if kind in GPT_SHAPED:
            h, a = config.n_embd, config.n_head
            inner = getattr(config, "n_inner", None) or 4 * h
            return cls("gpt", h, a, a, h // a, inner)
        if kind in LLAMA_SHAPED:
            h, a = config.hidden_size, config.num_attention_heads
            d = getattr(config, "head_dim", None) or h // a
            return cls("llama", h, a, getattr(config, "num_key_value_heads", None) or a, d, config.intermediate_size)
        raise ValueError(f"no closed-form activation count for model_type {kind!r} (the closed forms cover "
                         f"{', '.join(GPT_SHAPED + LLAMA_SHAPED)}); the simulated estimate (tp-trainer estimate) "
                         "covers every family")


def gpt_layer_bytes(*, seq: int, batch: int, hidden: int, heads: int, tp: int, sequence_parallel: bool,
                    flash: bool = True, mask_bytes: int = 1, stat_bytes: int = 4, intermediate: int | None = None,
                    kv_cache: bool = False) -> int:
    """Korthikanti et al.'s count for one GPT layer (module docstring), 16-bit activations."""
    s, b, h, a, t = seq, batch, hidden, heads, tp
    inner = intermediate if intermediate is not None else 4 * h
    # kept whole without sequence parallelism: LN inputs, QKV and MLP inputs, dropout masks, LN statistics
    replicated = s * b * (4 * h + 2 * h + 2 * h + 2 * mask_bytes * h + 2 * 2 * stat_bytes)
    # split over TP: Q, K, V, attention output, GELU input and output (8 s b h at inner = 4h)
    split = s * b * (6 * h + 2 * h + 2 * 2 * inner + (4 * h if kv_cache else 0))
    split += 4 * s * b * a if flash else 5 * a * s * s * b  # log-sum-exp, or softmax + its dropout mask + output
    return (replicated + split) // t if sequence_parallel else replicated + split // t


def llama_layer_bytes(*, seq: int, batch: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                      intermediate: int, tp: int, sequence_parallel: bool, lean: bool = False) -> int:
    """The count for one Llama-shaped layer with SDPA attention (module docstring), 16-bit activations;
    ``lean``: tp_trainer's lean RMSNorm, and at tp > 1 its lean gated MLP (``Kernels.lean_activations``)."""
    s, b, h, t = seq, batch, hidden, tp
    norm = (2 * h + 4) if lean else (6 * h + 4)
    mlp = 4 * intermediate if lean and tp > 1 else 8 * intermediate
    replicated = s * b * (2 * norm + 2 * h + 2 * h)  # two norms, the q/k/v input, the MLP input
    split = s * b * (2 * h + 4 * kv_heads * head_dim + 2 * h + 4 * heads + mlp)
    return (replicated + split) // t if sequence_parallel else replicated + split // t


def checkpointed_layer_bytes(*, seq: int, batch: int, hidden: int, tp: int, sequence_parallel: bool) -> int:
    """What a checkpointed layer keeps between forward and backward: its 16-bit input."""
    kept = 2 * seq * batch * hidden
    return kept // tp if sequence_parallel else kept


def layer_activation_bytes(config, *, seq: int, batch: int, tp: int, sequence_parallel: bool,
                           device: str = "cuda", lean: bool = True) -> int:
    """The closed-form activation bytes of one layer of ``config`` (GPT- or Llama-shaped), 16-bit, flash /
    SDPA attention; ``device`` sets what differs between CUDA and CPU kernels (dropout masks, LayerNorm
    statistics); ``lean``: ``Kernels.lean_activations`` (on unless turned off), which changes Llama's count.
    """
    shape = LayerShape.of(config)
    common = dict(seq=seq, batch=batch, hidden=shape.hidden, heads=shape.heads, tp=tp,
                  sequence_parallel=sequence_parallel)
    if shape.family == "gpt":
        cpu = device == "cpu"
        drop = getattr(config, "resid_pdrop", 0.0) > 0
        return gpt_layer_bytes(**common, intermediate=shape.intermediate, mask_bytes=(2 if cpu else 1) if drop else 0,
                               stat_bytes=2 if cpu else 4, kv_cache=bool(getattr(config, "use_cache", True)))
    return llama_layer_bytes(**common, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                             intermediate=shape.intermediate, lean=lean)
