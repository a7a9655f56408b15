"""The fused RMSNorm (parallel/rmsnorm.py) against Hugging Face's own modules.

Forward: the same op sequence, so bit-identical. Backward: the closed-form gradient instead of
autograd's five ops, which rounds differently: relative 1e-6 in fp32 (measured ~1e-7), 1e-2 in
bf16 (measured ~3e-4; one bf16 rounding is 4e-3); a wrong formula is off by O(1).
"""

import copy

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

from tp_trainer.parallel.rmsnorm import fuse_rms_norm

RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _grads(module, x, upstream):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y.float() * upstream).sum().backward()
    return y, x.grad, module.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_llama_rmsnorm_matches_hugging_face(dtype):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
    fused = copy.deepcopy(ref)
    assert fuse_rms_norm(fused)
    x, upstream = torch.randn(3, 7, 32).to(dtype) * 2, torch.randn(3, 7, 32)
    y_ref, dx_ref, dw_ref = _grads(ref, x, upstream)
    y, dx, dw = _grads(fused, x, upstream)
    assert torch.equal(y, y_ref)
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        assert got.dtype == want.dtype
        assert (got - want).abs().max() <= RTOL[dtype] * want.abs().max()
    assert fuse_rms_norm(copy.deepcopy(fused)) and "weight" in fused.state_dict()  # copies stay usable


def test_other_formulas_keep_their_own_forward():
    assert not fuse_rms_norm(GemmaRMSNorm(32))  # (1 + w) * x
    assert not fuse_rms_norm(Olmo2RMSNorm(32))  # (w * x).to(dtype): differs in 16-bit
    assert not fuse_rms_norm(torch.nn.LayerNorm(32))


def test_tp1_fuses_every_llama_rmsnorm_and_keeps_the_loss():
    """At tp=1 (ZeRO-only runs, the benchmark's single process) ``apply_tensor_parallel`` shards
    nothing but still gives the RMSNorms their fused backward, so a ``single / 2`` ideal has the
    same kernels as the TP layouts. The loss is bit-identical (same forward ops); the gradients
    round differently: relative 1e-7 per norm (the module test above), 1e-5 after flowing back
    through the layers, while a wrong formula is off by O(1)."""
    from tests.models import tiny_model
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel

    ref, model = tiny_model("llama"), tiny_model("llama")
    apply_tensor_parallel(model, plan_tensor_parallel(model, 1), ParallelContext())
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(hasattr(m, "tp_rms_eps") for m in norms)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = [m(input_ids=ids, labels=ids).loss for m in (ref, model)]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)
