"""ZeRO-3 over the dp group for TP-sharded models: parameters, gradients and optimizer state at 1/(tp x dp).

Per TP rank the model holds ``P`` local parameter elements (its TP shards plus the replicated
tensors). ZeRO-3 shards every one of those local tensors once more over the dp ranks of its TP
rank, along dim 0 (torch's ``Shard(0)``): with ``n`` rows of ``r`` elements and
``c = ceil(n / dp)``, dp rank ``d`` holds rows ``[d c, min((d + 1) c, n))``, i.e. the flat range
``[d c r, min((d + 1) c, n) r)`` of the local tensor (the last ranks may hold fewer rows, or
none). Per rank, for any training dtype (``b`` bytes per element, AdamW)::

    parameters   4 sum_t c_t r_t  ~ 4 P / dp   fp32 shards: the masters themselves (storage padded to c rows)
    gradients    4 sum_t c_t r_t  ~ 4 P / dp   fp32, reduced in fp32 (one buffer per unit, padded likewise)
    optimizer    8 P / dp                      AdamW's two fp32 states, unpadded
    transient    b x one unit's local numel    the unit gathered for its forward / backward (+ its b-byte
                                               gradients and the 4-byte reduce-scatter buffer in backward)

A *unit* is one decoder (or encoder) block, the input embedding, the output embedding, and the
root (what is left: final norm, position tables...). Blocks are found structurally: the entries
of the outermost ``nn.ModuleList`` s whose entries are all of one class and hold parameters
(``model.layers``, ``transformer.h``, T5's ``encoder.block`` and ``decoder.block``; an MoE block's
expert list sits inside a block and goes with it). The embeddings are
``get_input_embeddings()``/``get_output_embeddings()``, separate units unless tied (then the
root holds the shared weight) or the LM head feeds the fused head + loss (the lean activations' default:
the root holds it, :func:`_embedding_units`).

Communication, on the dp group of the ``(dp, tp)`` mesh (``ParallelContext.mesh["dp"]``):

* forward, per unit: all-gather of its parameters (in the compute dtype), freed after the
  unit's forward (every unit, the root included: nothing stays gathered between calls);
* backward, per unit: the same all-gather again, then a reduce-scatter (mean over dp) of its
  gradients in fp32 into the fp32 gradient shards; micro-batches accumulate into the shards;
* per optimizer step, on the TP group: the gradient shards of parameters whose TP gradients are
  partial (``tp_grad_sum``, or rows several TP ranks hold: ``tp_spec.overlaps``) are summed over
  TP. Both reductions are linear, ``sum_tp mean_dp g = mean_dp sum_tp g``, so this sum runs once
  per step on the 1/dp shards (TP peers of one dp rank hold the same rows), not per micro-batch
  on full local gradients as ZeRO-1/2 do; then one scalar all-reduce over TP and one over dp
  for the global gradient norm.

A 16-bit model keeps fp32 sharded masters and computes in its dtype: the shards are cast to fp32
once, a unit at a time, and gathered as ``param_dtype`` (FSDP2's ``MixedPrecisionPolicy(
param_dtype=bf16, reduce_dtype=fp32)``), so the arithmetic of forward and backward is that of
ZeRO-1/2 (whose 16-bit weights are the fp32 masters rounded the same way) and so is the fp32
reduction. ``model.tp_compute_dtype`` records the dtype the model computes in.

Implementation: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) over ``mesh["dp"]``. It
runs on CPU/gloo as on CUDA/NCCL, overlaps its collectives with compute on CUDA, and is the
ZeRO-3 the ecosystem uses; the TP layers see plain tensors (the gathered local TP shard) in
forward and backward, so nothing in ``parallel/`` changes. What FSDP2 does not know is ours:

* the TP metadata (``tp_spec``, ``tp_grad_sum``) is carried onto the sharded DTensor parameters
  (what the optimizer, checkpoints and export read), put back after ``model.to(...)`` (whose
  ``swap_tensors`` drops a DTensor parameter's attributes) and, by a forward pre-hook that runs
  after FSDP2's own (registered ``prepend=True``), onto the gathered parameters the TP layers use;
* ``fully_sharded_optimizer.FullyShardedOptimizer`` steps the inner optimizer on plain aliases of
  the local fp32 shards, adds the TP sums and the global norm, and speaks ``ShardedOptimizer``'s
  checkpoint interface (state pieces addressed by flat range of the local TP tensor).
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.utils import logging

from ..parallel.context import ParallelContext

logger = logging.get_logger(__name__)

CARRIED_ATTRS = ("tp_spec", "tp_grad_sum")  # what parallel/ and planner/ set on parameters


# ----------------------------------------------------------------------------------------- units
def block_units(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: entries of the outermost ``ModuleList`` s of one class that hold parameters."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if (isinstance(child, nn.ModuleList) and len(child) and len({type(m) for m in child}) == 1
                    and any(True for _ in child.parameters())):
                blocks.extend(child)
            else:
                visit(child)

    visit(model)
    return blocks


def _embedding_units(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Input and output embeddings as units of their own, unless tied to each other or inside a block.

    An LM head that marks its logits for the fused head + loss (``ParallelLMHead.mark_head_input``,
    ``parallel/linear_cross_entropy.py``) stays in the root unit: FSDP2 gathers a unit again for
    backward from hooks on its forward outputs, and the fused loss differentiates the head's weight
    without going through its output (the root's output, the loss, does carry the root's hook)."""
    inside = {id(m) for b in blocks for m in b.modules()}
    emb_in = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb_in is not None and emb_out is not None and emb_in.weight is emb_out.weight:
        return []
    if getattr(emb_out, "mark_head_input", False):
        emb_out = None
    return [m for m in (emb_in, emb_out) if isinstance(m, nn.Module) and id(m) not in inside
            and any(True for _ in m.parameters())]


# ----------------------------------------------------------------------------------------- sharding
def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The one floating dtype of ``model``'s parameters; a mix is refused (one ``param_dtype`` per unit)."""
    dtypes: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point():
            dtypes.setdefault(p.dtype, name)
    if len(dtypes) > 1:
        listed = ", ".join(f"{str(d).removeprefix('torch.')} (e.g. {n})" for d, n in dtypes.items())
        raise ValueError(f"zero_stage=3 needs one parameter dtype, this model mixes {listed}: cast it to one dtype "
                         "(model.to(torch.bfloat16)) before training, or use zero_stage 1 or 2")
    return next(iter(dtypes), torch.float32)


def _to_fp32_masters(module: nn.Module, device: torch.device) -> None:
    """In place, parameters of ``module`` not yet sharded: on ``device``, floating ones in fp32 (the masters);
    ``meta`` ones stay there (shard-only loading fills the shards later). ``.data`` keeps each Parameter
    object, so its attributes and ties survive."""
    for p in module.parameters():
        if isinstance(p, DTensor):
            continue
        dtype = torch.float32 if p.is_floating_point() else p.dtype
        target = p.device if p.device.type == "meta" else device
        if p.device != target or p.dtype != dtype:
            p.data = p.data.to(device=target, dtype=dtype)
    for sub in module.modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.device != device and buf.device.type != "meta":
                setattr(sub, name, buf.to(device))


def _carried(model: nn.Module) -> dict[nn.Module, list[tuple[str, dict]]]:
    """``module -> [(parameter name, {attribute: value})]`` for the TP metadata on ``model``'s parameters."""
    out: dict[nn.Module, list[tuple[str, dict]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            attrs = {a: getattr(p, a) for a in CARRIED_ATTRS if hasattr(p, a)}
            if attrs:
                out.setdefault(module, []).append((name, attrs))
    return out


def _tag(module: nn.Module, entries: list[tuple[str, dict]]) -> None:
    for name, attrs in entries:
        p = getattr(module, name)
        for attr, value in attrs.items():
            if getattr(p, attr, None) is not value:
                setattr(p, attr, value)


def _tag_hook(entries):
    def hook(module, args):
        _tag(module, entries)  # the parameters FSDP2's pre-forward (prepend=True, so earlier) just gathered
    return hook


def _apply_keeping_tp_metadata(self, *args, **kwargs):
    """``nn.Module._apply`` (``model.to(...)``, as the Trainer and accelerate call it) converts each DTensor
    parameter through ``torch.utils.swap_tensors``, which swaps the Python objects' ``__dict__`` too: the
    parameter keeps its identity but loses ``tp_spec``/``tp_grad_sum``. Put them back after the conversion."""
    out = type(self)._apply(self, *args, **kwargs)
    for module, entries in self.tp_carried_metadata.items():
        _tag(module, entries)
    return out


def is_dp_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard_parameters_over_dp` (its parameters are dp shards)."""
    return isinstance(model, FSDPModule)


def shard_parameters_over_dp(model: nn.Module, context: ParallelContext) -> nn.Module:
    """ZeRO-3: shard ``model`` (already TP-sharded, or tp=1) over ``context``'s dp group, in place.

    Call it on every rank after ``apply_tensor_parallel`` and before the optimizer is built (the
    optimizer must see the sharded parameters). One unit at a time: its parameters are moved to
    the context's device and cast to fp32 (16-bit models), then sharded; so the transient is one
    unit. Returns ``model`` (now an FSDP2 module; ``model.tp_compute_dtype`` its compute dtype).
    """
    if context.mesh is None:
        raise ValueError("zero_stage=3 shards parameters over the dp group of a distributed run, and this "
                         "ParallelContext has no mesh (a single process): launch with torchrun, or use zero_stage=0")
    if is_dp_sharded(model):
        raise ValueError(f"{type(model).__name__} is already sharded over dp (shard_parameters_over_dp was called)")
    compute = compute_dtype_of(model)
    mp = (MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != torch.float32
          else MixedPrecisionPolicy())
    carried = _carried(model)
    mesh = context.mesh["dp"]
    blocks = block_units(model)
    for unit in blocks + _embedding_units(model, blocks):
        _to_fp32_masters(unit, context.device)
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    _to_fp32_masters(model, context.device)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.set_reshard_after_forward(True)  # the root too (FSDP2 keeps it gathered by default): nothing stays gathered
    for module, entries in carried.items():
        _tag(module, entries)  # the sharded DTensor parameters
        module.register_forward_pre_hook(_tag_hook(entries))
    model.tp_carried_metadata = carried
    model._apply = types.MethodType(_apply_keeping_tp_metadata, model)  # this instance only (upstream.py)
    model.tp_compute_dtype = compute
    logger.info(f"zero_stage=3: {len(blocks)} blocks + embeddings + root sharded over dp={context.dp_size} "
                f"(fp32 shards, compute in {str(compute).removeprefix('torch.')})")
    return model


def dp_rows(param: DTensor) -> tuple[int, int]:
    """``[lo, hi)``: the dim-0 rows of the local TP tensor this dp rank's shard of ``param`` holds."""
    mesh = param.device_mesh
    size, rank = mesh.size(), mesh.get_local_rank()
    n = param.shape[0]
    chunk = math.ceil(n / size)
    lo = min(n, rank * chunk)
    hi = min(n, lo + chunk)
    return lo, hi


def tp_local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole local TP tensor of ``param``: all-gathered over dp for a dp-sharded (DTensor) parameter
    (collective: every dp rank must call it for the same parameters in the same order), else itself."""
    if isinstance(param, DTensor):
        with torch.no_grad():
            return param.full_tensor()
    return param.detach()


@torch.no_grad()
def copy_into_param_(param: torch.Tensor, local: torch.Tensor) -> None:
    """Write the local TP tensor ``local`` into ``param``: the dp shard's rows for a dp-sharded parameter."""
    if isinstance(param, DTensor):
        lo, hi = dp_rows(param)
        param.to_local().copy_(local.narrow(0, lo, hi - lo))
    else:
        param.data.copy_(local)
