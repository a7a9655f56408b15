"""Gated MLPs (``down(act(gate(x)) * up(x))``: Llama, Mistral, Qwen, Gemma, ...) that keep half of what autograd keeps.

Autograd keeps, per token of a rank's ``I/tp`` columns, the gate output (``act``'s input), ``act``'s
output and the up output (the product's inputs) and the product (``down``'s input): ``4 x 2 I/tp``
bytes in 16-bit. The elementwise part is cheap to redo, so the product and the down projection run
as one function that keeps only the gate and up outputs (``2 x 2 I/tp``) and recomputes the rest:

    forward:  p = act(g) * u,   y_r = p W_r^T            (W_r: down's ``[h, I/tp]`` columns; y_r partial)
    backward: a = act(g), p = a * u (recomputed),   dW_r = dy^T p,   dp = dy W_r,
              du = dp * a,   dg = act'(g) (dp * u)  (torch's backward op of ``act``: SiLU, GELU, tanh-GELU)

The MLP's forward computes ``p`` without a graph and marks it (``p._tp_gated``, :class:`GatedProduct`); it
then calls ``down_proj`` as a module (its hooks run, its errors name it), whose forward multiplies a
marked input through this function. The row-parallel ``down`` then sums ``y_r`` over TP as before (its
all-reduce, or the reduce-scatter under sequence parallelism): no communication changes. The forward is
the module's own arithmetic, so outputs are bit-identical; gradients differ by rounding. :func:`lean_glu_mlp` installs it only on
a module whose children are the column-parallel ``gate_proj``/``up_proj`` and row-parallel
``down_proj`` and whose own forward, run on small random stand-ins for those children, gives exactly
``down(act(gate(x)) * up(x))`` with ``act`` equal to SiLU or a GELU (anything else, a fused ``gate_up_proj``, LoRA-wrapped projections,
extra terms, keeps its forward). Only the forward method is swapped.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ColumnParallelLinear, RowParallelLinear


# The activations this module differentiates itself (torch's own forward and backward ops, which torch.compile
# traces like any other): name -> (forward, backward(grad_out, input)).
ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu": (lambda x: F.gelu(x), lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="none")),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh")),
}


class _GatedDownProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, activation, product):
        # product: act(gate) * up as the MLP's forward computed it (no graph); recomputed in backward
        ctx.save_for_backward(gate, up, weight)
        ctx.activation = activation
        return F.linear(product, weight)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_w = ctx.needs_input_grad[:3]
        act, act_backward = ACTIVATIONS[ctx.activation]
        a = act(gate)
        dp = dy @ weight.to(dy.dtype)
        dw = None
        if need_w:
            product = (a * up).reshape(-1, up.shape[-1]).to(dy.dtype)
            dw = (dy.reshape(-1, dy.shape[-1]).t() @ product).to(weight.dtype)
        d_up = (dp * a).to(up.dtype) if need_up else None
        d_gate = act_backward((dp * up).to(gate.dtype), gate) if need_gate else None
        return d_gate, d_up, dw, None, None


class GatedProduct:
    """What the lean MLP forward attaches to its product ``p = act(g) * u`` (``p._tp_gated``), computed without
    a graph: the down projection (``RowParallelLinear.forward``) calls :meth:`project` to multiply ``p``,
    differentiating through ``g`` and ``u`` instead."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, activation: str):
        self.gate, self.up, self.activation = gate, up, activation

    def project(self, product: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``product @ weight.T``, keeping only gate and up for backward (module docstring)."""
        return _GatedDownProjection.apply(self.gate, self.up, weight, self.activation, product)


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not torch.is_grad_enabled():  # nothing is kept for backward: as written
        return self.down_proj(ACTIVATIONS[self.tp_activation][0](gate) * up)
    with torch.no_grad():
        product = ACTIVATIONS[self.tp_activation][0](gate) * up
    product._tp_gated = GatedProduct(gate, up, self.tp_activation)
    return self.down_proj(product)  # a module call: its hooks run and its errors name it


def _activation_name(act_fn) -> str | None:
    """The :data:`ACTIVATIONS` entry whose forward equals ``act_fn`` bit for bit on random inputs (fp32, bf16)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(64, generator=g) * 4 for _ in range(2)]
    xs[1] = xs[1].to(torch.bfloat16)
    for name, (forward, _) in ACTIVATIONS.items():
        try:
            if all(torch.equal(act_fn(x), forward(x)) for x in xs):
                return name
        except Exception:
            return None
    return None


def _computes_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module``'s own forward is ``down(act(gate(x)) * up(x))``: run on a shallow copy whose three
    projections are small random ``nn.Linear`` layers (the weights do not matter, the arithmetic does)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    width, inner = 8, 12
    probe = copy.copy(module)
    probe._modules = dict(module._modules)
    probe._forward_hooks, probe._forward_pre_hooks = {}, {}
    layers = {}
    for name, shape in (("gate_proj", (inner, width)), ("up_proj", (inner, width)), ("down_proj", (width, inner))):
        layer = torch.nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=False)  # no draw from the global RNG
        with torch.no_grad():
            layer.weight.copy_(torch.randn(shape, generator=g))
        probe._modules[name] = layers[name] = layer
    x = torch.randn(2, 3, width, generator=g)
    try:
        with torch.no_grad():
            got = probe(x)
            want = layers["down_proj"](module.act_fn(layers["gate_proj"](x)) * layers["up_proj"](x))
    except Exception:  # other arguments, other children: not this MLP
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)


def lean_glu_mlp(module: nn.Module) -> bool:
    """Give ``module`` the lean gated forward if it is a TP-split gated MLP (module docstring); returns whether it did."""
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if not (type(gate) is ColumnParallelLinear and type(up) is ColumnParallelLinear
            and type(down) is RowParallelLinear and callable(getattr(module, "act_fn", None))):
        return False
    if (gate.gather_output or up.gather_output or gate.transposed or up.transposed or down.transposed
            or down.split_input or not down.reduce_output):
        return False
    activation = _activation_name(module.act_fn)
    if activation is None or not _computes_gated_mlp(module):
        return False
    module.tp_activation = activation
    module.forward = types.MethodType(_lean_forward, module)
    return True
