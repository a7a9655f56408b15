"""The CPU causal attention (parallel/attention.py) against an fp64 reference and against ``sdpa`` in models.

Tolerances: fp32 results are compared relative to the largest magnitude at 1e-5 (measured
~6e-7, the same as torch's own fused kernel against fp64); bf16 at 3e-2 (measured 8e-3 to
1.5e-2 for both kernels: one bf16 rounding is 4e-3 and P, dS are rounded once each). A wrong
mask, scale or head grouping is off by O(1).
"""

import json
import math
import os

import pytest
import torch

from models import tiny_model
from tp_trainer.parallel import attention
from tp_trainer.parallel.attention import block_causal_attention, saved_probs_bytes, use_cpu_attention

RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
CPU = torch.device("cpu")
CPU_KERNEL = pytest.mark.cpu_only(reason="the CPU attention kernel (parallel/attention.py) serves CPU devices only")


def reference(q, k, v, scale):
    """fp64 softmax(scale q k^T + causal) v with each kv head shared by H / H_kv query heads, as [B, S, H, dv]."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    seq = q.shape[2]
    scores = scale * q @ k.transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _output_and_grads(fn, q, k, v, upstream):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    (out.double() * upstream).sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


@CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,seq,block,dv", [
    (4, 4, 64, 64, 16),   # one block, no grouping
    (4, 2, 100, 16, 16),  # 7 blocks, the last one partial; pairs of query heads share a kv head
    (4, 1, 37, 8, 16),    # multi-query
    (2, 2, 50, 64, 24),   # value head dim != query head dim
])
def test_kernel_matches_fp64_reference(dtype, heads, kv_heads, seq, block, dv):
    torch.manual_seed(0)
    q = torch.randn(2, heads, seq, 16).to(dtype)
    k = torch.randn(2, kv_heads, seq, 16).to(dtype)
    v = torch.randn(2, kv_heads, seq, dv).to(dtype)
    upstream = torch.randn(2, seq, heads, dv, dtype=torch.float64)
    scale = 0.3
    got = _output_and_grads(lambda q, k, v: block_causal_attention(q, k, v, scale, block), q, k, v, upstream)
    want = _output_and_grads(lambda q, k, v: reference(q, k, v, scale), q, k, v, upstream)
    for g, w, name in zip(got, want, ("out", "dq", "dk", "dv")):
        assert g.dtype == dtype and g.shape == w.shape, name
        err = (g.double() - w).abs().max() / w.abs().max()
        assert err <= RTOL[dtype], f"{name}: relative error {err:.2e}"


@CPU_KERNEL
def test_saved_probabilities_are_the_lower_block_triangle():
    # blocks of 64 over 100 positions: rows [0, 64) see 64 keys, rows [64, 100) see 100
    assert saved_probs_bytes(batch=2, heads=3, seq=100, element_size=4, block=64) == 2 * 3 * (64 * 64 + 36 * 100) * 4
    q = torch.randn(2, 3, 100, 8, requires_grad=True)
    kv = torch.randn(2, 3, 100, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block_causal_attention(q, kv, kv, 0.5, 64)
    probs = [t for t in saved if t.shape[-1] in (64, 100) and t.shape[1] in (64, 36)]
    assert sum(t.numel() * t.element_size() for t in probs) == saved_probs_bytes(2, 3, 100, 4, 64)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = attention._BlockCausalAttention.apply
    monkeypatch.setattr(attention._BlockCausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _loss_and_grads(model, **batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@CPU_KERNEL
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_bigcode"])
def test_model_uses_the_kernel_and_matches_sdpa(family, monkeypatch):
    ref = tiny_model(family)
    model = tiny_model(family)
    assert use_cpu_attention(model, CPU)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, input_ids=ids, labels=ids)
    assert len(calls) == model.config.num_hidden_layers
    ref_loss, ref_grads = _loss_and_grads(ref, input_ids=ids, labels=ids)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, want in ref_grads.items():
        assert (grads[name] - want).abs().max() <= 1e-5 * want.abs().max(), name


@CPU_KERNEL
def test_padded_batches_and_generation_go_to_sdpa_unchanged(monkeypatch):
    ref, model = tiny_model("llama"), tiny_model("llama")
    use_cpu_attention(model, CPU)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: sdpa's mask function builds a mask, so sdpa runs
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
    assert not calls
    with torch.no_grad():  # the prompt (no mask) takes the kernel; each new token (q_len 1 vs cache) goes to sdpa
        out = model.generate(ids[1:], max_new_tokens=4, do_sample=False)
        want = ref.generate(ids[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, want) and len(calls) == model.config.num_hidden_layers


@CPU_KERNEL
def test_large_probabilities_go_to_sdpa(monkeypatch):
    model = tiny_model("llama")
    use_cpu_attention(model, CPU)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 96, (2, 24))
    # 2 sequences x 4 heads x 24 x 24 fp32 probabilities are 18 KiB per layer: over a 16 KiB cap
    monkeypatch.setattr(attention, "MAX_SAVED_PROBS_BYTES", 16 * 1024)
    model(input_ids=ids)
    assert not calls
    monkeypatch.setattr(attention, "MAX_SAVED_PROBS_BYTES", 32 * 1024)
    model(input_ids=ids)
    assert len(calls) == model.config.num_hidden_layers


def test_which_models_switch(tmp_path):
    assert not use_cpu_attention(tiny_model("llama"), torch.device("cuda", 0))
    assert not use_cpu_attention(tiny_model("falcon"), CPU)  # its modeling code branches on the name "sdpa"
    assert not use_cpu_attention(tiny_model("gemma2"), CPU)  # eager attention: left as chosen
    # whether a run uses it at all is the context's decision (parallel/kernels.py, tests/test_kernels.py)
    model = tiny_model("llama")
    assert use_cpu_attention(model, CPU)
    model.save_pretrained(tmp_path)  # the switch is runtime state, never written to a checkpoint
    saved = json.loads((tmp_path / "config.json").read_text())
    assert attention.NAME not in json.dumps(saved) and os.path.exists(tmp_path / "model.safetensors")


@CPU_KERNEL
def test_attention_dropout_goes_to_sdpa(monkeypatch):
    model = tiny_model("llama", attention_dropout=0.1)
    use_cpu_attention(model, CPU)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 96, (2, 12))
    model.train()(input_ids=ids)  # dropout 0.1 is passed in training: only sdpa implements it
    assert not calls
    model.eval()(input_ids=ids)  # HF passes dropout 0.0 in eval
    assert len(calls) == model.config.num_hidden_layers


@CPU_KERNEL
def test_autocast_runs_the_kernel_in_the_autocast_dtype(monkeypatch):
    ref, model = tiny_model("llama"), tiny_model("llama")
    use_cpu_attention(model, CPU)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Trainer's --bf16 does to fp32 weights
        loss, grads = _loss_and_grads(model, input_ids=ids, labels=ids)
        ref_loss, ref_grads = _loss_and_grads(ref, input_ids=ids, labels=ids)
    assert len(calls) == model.config.num_hidden_layers
    assert abs(loss - ref_loss) <= RTOL[torch.bfloat16] * abs(ref_loss)
    for name, want in ref_grads.items():
        assert grads[name].dtype == torch.float32
        # two kernels' bf16 roundings through 2 layers: measured 9e-3 of the largest gradient
        assert (grads[name] - want).abs().max() <= RTOL[torch.bfloat16] * want.abs().max(), name
