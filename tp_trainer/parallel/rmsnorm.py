"""One autograd function for the Llama-style RMSNorms: less kept for backward, fewer passes in it.

Hugging Face's ``LlamaRMSNorm`` and its copies are written as five tensor ops, and autograd
differentiates each one: it keeps the fp32 copy of ``x`` (``4 h`` bytes per token), ``1/rms`` and
the 16-bit normalised ``x`` (``2 h``), and ``pow``'s backward alone allocates and multiplies three
``[N, H]`` temporaries. Written as one function with the closed-form gradient

    forward:  r = rsqrt(mean(x^2) + eps)   (per row, fp32),   xn = x r,   y = w * xn.to(dtype(x))
    backward: xn = x r (recomputed from the kept x),   dw = sum over rows of dy * xn.to(dtype(x))
              gx = (dy * w) in fp32,      dx = r (gx - xn mean(gx xn))

it keeps only its input ``x`` in its own dtype (``2 h`` bytes per token in 16-bit) and ``r`` (4
bytes), a third of what autograd keeps, and makes 7 passes over ``[N, H]`` in backward instead of
about 12 (``Kernels.lean_activations``, on every device). (Measured: docs/benchmarks.md, "Kernel
measurements" and "Sequence parallelism".)

No communication; the forward is the same op sequence as Hugging Face's, so outputs are
bit-identical; gradients differ by rounding (relative 1e-7 in fp32). A module is only fused
after :func:`fuse_rms_norm` has checked, on a copy with random weights, that its own forward
gives bit-identical outputs to this one: Gemma's ``(1 + w)``, norms with biases or other
formulas keep their own forward. Only the forward method is swapped; parameters and
``state_dict`` are untouched.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r, weight)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, r, weight = ctx.saved_tensors
        xn = x.to(torch.float32) * r  # as in forward, bit for bit
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xn.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0)
        dx = None
        if ctx.needs_input_grad[0]:
            gx = (dy * weight).to(torch.float32)
            dx = (gx - xn * (gx * xn).mean(-1, keepdim=True)).mul_(r).to(x.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``, statistics in fp32 (Llama's RMSNorm)."""
    return _RMSNorm.apply(x, weight, eps)


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.tp_rms_eps)


def fuse_rms_norm(module: nn.Module) -> bool:
    """Give ``module`` the fused forward/backward if its own forward is Llama's RMSNorm; returns
    whether it did. Checked by running a copy with random weights on a random input (fp32 and
    the module's dtype) against :func:`rms_norm`: only bit-identical outputs qualify."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, nn.Parameter) or weight.dim() != 1
            or not isinstance(eps, float) or list(module.children())
            or [n for n, _ in module.named_parameters()] != ["weight"]):
        return False
    probe = copy.deepcopy(module)
    if weight.is_meta:  # a meta model (the memory estimate): check the formula on a CPU copy
        probe = probe.to_empty(device="cpu")
    probe._forward_hooks.clear()
    probe._forward_pre_hooks.clear()
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(weight.shape, generator=g).to(probe.weight))
        for dtype in {torch.float32, torch.bfloat16, weight.dtype}:  # a cast in another place shows in 16-bit
            x = (torch.randn(4, weight.shape[0], generator=g) * 3).to(device=probe.weight.device, dtype=dtype)
            try:
                same = torch.equal(probe(x), rms_norm(x, probe.weight, eps))
            except Exception:  # a forward with other arguments or shapes: not Llama's
                return False
            if not same:
                return False
    module.tp_rms_eps = eps
    module.forward = types.MethodType(_fused_forward, module)
    return True
