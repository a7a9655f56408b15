"""Tiny configurations of every model family the planner must support (built, never downloaded)."""

from __future__ import annotations

import torch
import transformers as T

# Every config: hidden 64, 4 query heads of 16, 2 layers; vocab 96 (divisible by 2 and 4).
FAMILIES = {
    "llama": lambda: T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96),
    "mistral": lambda: T.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96, head_dim=16),
    "qwen2": lambda: T.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96),
    "qwen3": lambda: T.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=96),
    "gemma": lambda: T.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=96),
    "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=96),
    "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
                               word_embed_proj_dim=64, max_position_embeddings=64),
    "falcon": lambda: T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96),
    "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=96),
    "phi3": lambda: T.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=96, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2),
}

# Families with no code of their own in tp_trainer: the general rules must handle them (fused MQA
# c_attn, full-width q/k norms, per-head norm weights, parallel residuals, GQA).
MORE_FAMILIES = {
    "gptj": lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=96, rotary_dim=8, bos_token_id=0,
                                 eos_token_id=0),
    "stablelm": lambda: T.StableLmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96),
    "olmo2": lambda: T.Olmo2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96),
    "granite": lambda: T.GraniteConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96),
    "cohere": lambda: T.CohereConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=96, use_qk_norm=True),
    "starcoder2": lambda: T.Starcoder2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=96),
    "gemma2": lambda: T.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=96),
    "phi": lambda: T.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=96),
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=96, multi_query=True,
                                              bos_token_id=0, eos_token_id=0),
}
ALL_FAMILIES = {**FAMILIES, **MORE_FAMILIES}


def tiny_model(family: str, *, seed: int = 0, dtype=torch.float32, **overrides):
    cfg = ALL_FAMILIES[family]()
    for key, value in list(vars(cfg).items()):  # parity tests compare exact forwards: no dropout
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(cfg, key, 0.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


# Multi-query attention (1 KV head) with separate k/v projections: at tp=2 and tp=4 the single KV
# head is replicated on every rank, and only k_proj/v_proj may carry that replicated block.
MORE_FAMILIES["llama_mqa"] = lambda: T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=96)
ALL_FAMILIES["llama_mqa"] = MORE_FAMILIES["llama_mqa"]

# MoE decoders (transformers 5 fused 3-D experts): 4 experts, top-2, the load-balancing loss in the loss
# (output_router_logits with a non-zero coefficient). Built by tests/test_moe.py, not by tiny_model.
_MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.05,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE_FAMILIES = {
    "mixtral": lambda: T.MixtralConfig(intermediate_size=48, num_local_experts=4, head_dim=16, **_MOE),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                          shared_expert_intermediate_size=64, **_MOE),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4, head_dim=16,
                                          **_MOE),
    "olmoe": lambda: T.OlmoeConfig(intermediate_size=48, num_experts=4, **_MOE),
}


# Encoders, encoder-decoders and heads other than a causal LM (tests/test_encoders.py): hidden 64, 4 heads
# of 16, 2 layers, vocab 96, dropout 0. name -> (config, model class).
_ENC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=96,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
ENCODERS = {
    "bert_mlm": (lambda: T.BertConfig(**_ENC), "BertForMaskedLM"),
    "bert_seq_cls": (lambda: T.BertConfig(**_ENC, num_labels=3), "BertForSequenceClassification"),
    "bert_token_cls": (lambda: T.BertConfig(**_ENC, num_labels=5), "BertForTokenClassification"),
    "roberta_mlm": (lambda: T.RobertaConfig(**_ENC, pad_token_id=1), "RobertaForMaskedLM"),
    "distilbert_mlm": (lambda: T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=96,
                                                  dropout=0.0, attention_dropout=0.0, max_position_embeddings=64),
                       "DistilBertForMaskedLM"),
    "t5": (lambda: T.T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=96,
                              dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           "T5ForConditionalGeneration"),
    "bart": (lambda: T.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=96,
                                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                  max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, forced_eos_token_id=None),
             "BartForConditionalGeneration"),
    # fused Wqkv ([q | k | v] viewed [3, heads, d]) and a fused Wi chunked into (input, gate) in forward, whose
    # name says nothing: the dataflow finds both layouts; its masked-LM loss goes through loss_function
    "modernbert_mlm": (lambda: T.ModernBertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=96, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                                  mask_token_id=3, attention_dropout=0.0, mlp_dropout=0.0,
                                                  embedding_dropout=0.0),
                       "ModernBertForMaskedLM"),
    # attention sinks: a 1-D parameter of one logit per head, split with the heads
    "gpt_oss": (lambda: T.GptOssConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=96,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"]),
                "GptOssForCausalLM"),
}


def tiny_encoder(name: str, *, seed: int = 0, dtype=torch.float32):
    config, cls = ENCODERS[name]
    cfg = config()
    torch.manual_seed(seed)
    return getattr(T, cls)(cfg).to(dtype)


class FusedMLP(torch.nn.Module):
    """A custom MLP: one projection packs [a | b], chunked in forward; nothing in its names says so."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.w_in = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.w_out = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(torch.nn.functional.silu(a) * b)


def fused_mlp_llama(seed: int = 0):
    """The tiny llama with every MLP replaced by :class:`FusedMLP` (a model changed after construction)."""
    model = tiny_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.mlp = FusedMLP(64, 96)
    return model
