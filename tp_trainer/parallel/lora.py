"""LoRA adapters (PEFT) beside tensor-parallel base layers: where the adapters' collectives go.

A PEFT LoRA layer computes ``y = base(x) + s B(A(drop(x)))`` with ``A: [r, d_in]``,
``B: [d_out, r]`` and ``s = alpha / r`` (peft's own forward, kept as it is: merging, disabling and
switching adapters keep working). The base layer is sharded as it would be without the adapter;
the adapter's weights are plain ``nn.Linear`` weights, sliced like the base, and need **no
collective of their own** in forward or backward:

* **Column-parallel base** (``y_r = f(x) W_r^T``, rank ``r`` holds output rows ``W_r``): ``A``
  replicated, ``B_r`` = the same output rows of ``B`` (the base's fused blocks included), so
  ``y_r = f(x) W_r^T + s B_r A drop(f(x))``. Forward: ``h = A drop(x)`` ``[tokens, r]`` is computed
  redundantly on every rank. Backward: rank ``r`` gets ``dh_r = s B_r^T dy_r``, its share of
  ``dh = sum_r dh_r``; hence

  - ``dA = sum_r dh_r^T drop(x)``: each rank holds a partial sum, added over TP with the other
    partial gradients (``param.tp_grad_sum``, ``r x d_in`` elements per optimizer step);
  - ``dx`` through the adapter, ``drop'(A^T dh_r)``, is partial too: a forward pre-hook on the
    LoRA layer replaces its input by ``f(x)`` from ``copy_to_tp_region_once`` (the node its q/k/v or
    gate/up siblings share) and the base skips its own ``f`` (``copy_input = False``), so one
    all-reduce sums the base's and the adapter's parts, also when PEFT casts the adapter's input to
    the adapter's dtype (fp32 adapters on a 16-bit base) (:func:`adapt_column_parallel`);
  - ``dB_r = s dy_r^T h`` is exact (``h`` is replicated).

* **Row-parallel base** (``y = g(x_r W_r^T) + b``, rank ``r`` holds input columns ``W_r``): ``A_r``
  = the same input columns of ``A``, ``B`` replicated, and ``B`` is applied to ``A``'s *partial*
  output before the base's ``g``: ``y = g(x_r W_r^T + s B A_r drop(x_r)) + b``, which equals the
  unsharded ``x W^T + s B A x + b`` because ``B`` is linear. The base returns its partial product
  (``RowParallelLinear.reduce_output = False``) and a forward hook on the LoRA layer reduces the
  sum once (:func:`adapt_row_parallel`), so the base's one all-reduce carries the adapter's share.
  Backward: ``g`` is the identity, ``dy`` is full on every rank, so ``dA_r = s (B^T dy)^T
  drop(x_r)`` is exact; ``dB = s dy^T sum_r A_r drop(x_r)`` is a partial sum on each rank
  (``tp_grad_sum``, ``d_out x r`` per optimizer step). The alternative, all-reducing ``A``'s
  output ``[tokens, r]`` before a replicated ``B``, costs one more collective per layer and
  micro-batch on the forward's critical path. A LoRA bias on ``B`` cannot go before ``g``
  (it would be added ``tp`` times); the planner refuses it there.

* **Replicated input and output** (a gathered column-parallel layer, a row-parallel layer that
  splits a replicated input, a replicated linear, the vocab-parallel input embedding): the
  adapter runs whole on every rank, with identical gradients; nothing to change.

Dropout: ``drop(x)`` of a replicated ``x`` draws the same mask on every TP rank (they share their
RNG state), as any replicated dropout must. On the split input ``x_r`` of a row-parallel base,
:class:`SlicedInputDropout` draws the mask of the *full* input ``[..., d_in]`` and keeps this rank's
columns: every rank consumes the same random numbers (their RNG states stay equal), the ranks'
columns get independent masks, and on the CPU the masks are those of the unsharded model (torch's
CPU dropout is ``x * bernoulli(1 - p) / (1 - p)`` over the input's elements in order).

The helpers that recognise PEFT's modules (:func:`lora_layers`, :func:`saved_module_wrappers`,
:func:`peft_base_model`) read peft's classes only when peft is already imported: a model cannot
hold peft modules otherwise, and peft stays an optional dependency.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .layers import ColumnParallelLinear, RowParallelLinear
from .mappings import copy_to_tp_region_once


def _peft_classes():
    """``(LoraLayer, ModulesToSaveWrapper, PeftModel)`` of the imported peft, or ``None`` without it."""
    if "peft" not in sys.modules:
        return None
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    return LoraLayer, ModulesToSaveWrapper, PeftModel


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the PEFT LoRA layers (a ``base_layer`` plus ``lora_A``/``lora_B``) of ``model``."""
    classes = _peft_classes()
    if classes is None:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, classes[0])}


def saved_module_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: wrapper}`` of PEFT's ``modules_to_save`` wrappers (``original_module``, a trainable copy per
    adapter)."""
    classes = _peft_classes()
    if classes is None:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, classes[1])}


def is_peft_model(model: nn.Module) -> bool:
    """A ``PeftModel``, or a model holding PEFT LoRA layers or ``modules_to_save`` wrappers."""
    classes = _peft_classes()
    if classes is None:
        return False
    return isinstance(model, classes[2]) or any(isinstance(m, classes[:2]) for m in model.modules())


def peft_base_model(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the Hugging Face model inside a PEFT model: the one whose forward computes the
    loss and whose modules the planner knows (``base_model.model`` of a ``PeftModel``; the model itself when
    adapters were injected into it directly)."""
    classes = _peft_classes()
    if classes is not None and isinstance(model, classes[2]):
        inner = model.get_base_model()
        for name, mod in model.named_modules():
            if mod is inner:
                return name, inner
    return "", model


def adapter_names(layer: nn.Module) -> list[str]:
    """The adapters a LoRA layer holds (``lora_A``'s keys; ``lora_embedding_A``'s for an embedding)."""
    return list(layer.lora_A.keys()) + list(getattr(layer, "lora_embedding_A", {}).keys())


def adapt_column_parallel(layer: nn.Module, tp_group) -> None:
    """Feed a LoRA layer around a column-parallel base ``f(x)`` once, for the base and its adapters: their
    partial input gradients meet at one all-reduce (see the module docstring). Like the base's own ``f``,
    skipped where no input gradient is wanted."""
    base = layer.base_layer
    if not isinstance(base, ColumnParallelLinear):
        raise TypeError(f"adapt_column_parallel expects a ColumnParallelLinear base layer, got {type(base).__name__}")
    base.copy_input = False

    def shared_f(module, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        elif "x" in kwargs:
            x, rest = kwargs.pop("x"), ()
        else:
            raise TypeError(f"{type(module).__name__}.forward called without its input x")
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            x = copy_to_tp_region_once(x, tp_group)
        return (x, *rest), kwargs

    layer.register_forward_pre_hook(shared_f, with_kwargs=True)


class SlicedInputDropout(nn.Module):
    """Dropout of this rank's columns ``segments`` of an input split over TP, with the mask of the full
    ``[..., full_width]`` input (see the module docstring)."""

    def __init__(self, p: float, segments: tuple[tuple[int, int], ...], full_width: int):
        super().__init__()
        self.p, self.segments, self.full_width = p, tuple(segments), full_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        noise = x.new_empty(*x.shape[:-1], self.full_width).bernoulli_(1 - self.p)
        mine = torch.cat([noise.narrow(-1, start, n) for start, n in self.segments], dim=-1)
        return x * mine.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, columns {list(self.segments)} of {self.full_width}"


def adapt_row_parallel(layer: nn.Module) -> None:
    """Make a LoRA layer around a row-parallel base reduce once, after its adapters: the base returns its
    partial product, peft adds the adapters' partial ``s B A_r drop(x_r)``, and a forward hook on the layer
    applies the base's ``g`` and bias to the sum (see the module docstring). A dropout on the adapters' split
    input becomes a :class:`SlicedInputDropout` over the base's input columns."""
    base = layer.base_layer
    if not isinstance(base, RowParallelLinear):
        raise TypeError(f"adapt_row_parallel expects a RowParallelLinear base layer, got {type(base).__name__}")
    spec = base.weight.tp_spec
    for adapter, dropout in list(layer.lora_dropout.items()):
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            sliced = SlicedInputDropout(dropout.p, spec.local_segments, spec.full_shape[spec.dim])
            layer.lora_dropout[adapter] = sliced.train(dropout.training)
    base.reduce_output = False

    def reduce(module, args, output):
        return base.reduce(output)

    layer.register_forward_hook(reduce)
