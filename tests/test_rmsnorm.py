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
