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
root holds the shared weight).

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
* :class:`FullyShardedOptimizer` steps the inner optimizer on plain aliases of the local fp32
  shards, adds the TP sums and the global norm, and speaks ``ShardedOptimizer``'s checkpoint
  interface (state pieces addressed by flat range of the local TP tensor).
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers.utils import logging

from ..parallel.collectives import all_reduce
from ..parallel.context import ParallelContext
from ..parallel.grads import counted_square_sum, needs_tp_grad_sum, norm_count_mask, sync_partial_tp_grad
from .optimizer import ELEMENTWISE_OPTIMIZERS

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
    """Input and output embeddings as units of their own, unless tied to each other or inside a block."""
    inside = {id(m) for b in blocks for m in b.modules()}
    emb_in = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb_in is not None and emb_out is not None and emb_in.weight is emb_out.weight:
        return []
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


# ----------------------------------------------------------------------------------------- optimizer
@dataclass
class _Shard:
    """This dp rank's part of one trained parameter."""
    param: nn.Parameter            # the FSDP2 DTensor parameter (local TP shape, Shard(0) over dp)
    rows: tuple[int, int]          # dim-0 rows of the local TP tensor held here
    flat: tuple[int, int]          # the same as a flat range of the local TP tensor
    master: nn.Parameter           # plain fp32 alias of the local shard: what the inner optimizer steps
    count_mask: object             # norm_count_mask restricted to the shard (True, False or a bool tensor)


def _overlap_rows_aligned(spec) -> bool:
    """Whether every segment several TP ranks hold sits at the same local offset on each (so a dp window of
    local rows covers the same full rows on every TP peer); true of every layout ``sharding.py`` builds."""
    where: dict = {}
    for segs in spec.segments:
        offset = 0
        for seg in segs:
            if where.setdefault(seg, offset) != offset:
                return False
            offset += seg[1]
    return True


class FullyShardedOptimizer(torch.optim.Optimizer):
    """ZeRO-3's optimizer: wraps an element-wise torch optimizer over :func:`shard_parameters_over_dp`'s
    parameters; the same interface as :class:`~tp_trainer.zero.ShardedOptimizer` (see the module docstring).

    The inner optimizer steps on plain fp32 tensors aliasing FSDP2's local shards (no DTensor
    dispatch in the step, and the state pieces are ordinary tensors); ``step`` finishes the TP
    gradient sums (unless :meth:`clip_grad_norm` already did) and steps. The next forward gathers
    the updated shards, so there is no write-back.
    """

    stage = 3
    state_replicated_over_dp = False  # every dp rank holds (and saves) its own shard of the state

    def __init__(self, template: torch.optim.Optimizer, context: ParallelContext):
        if not isinstance(template, ELEMENTWISE_OPTIMIZERS):
            raise ValueError(f"zero_stage=3 shards optimizer state element-wise, which {type(template).__name__} "
                             "does not support (it needs whole tensors). Use an element-wise optimizer (e.g. "
                             "--optim adamw_torch).")
        self.context = context
        self.dp_group, self.dp, self.dp_rank = context.dp_group, context.dp_size, context.dp_rank
        groups = [dict(g) for g in template.param_groups]
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        self.shards = {id(p): self._shard(p) for p in self.params}
        master_groups = []
        for g in groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            masters = [self.shards[id(p)].master for p in g["params"] if p.requires_grad]
            master_groups.append({**hyper, "params": [m for m in masters if m.numel()]})
        accepted = inspect.signature(type(template).__init__).parameters
        self.inner = type(template)(master_groups, **{k: v for k, v in template.defaults.items() if k in accepted})
        super().__init__([{"params": []}], dict(template.defaults))
        self.param_groups = self.inner.param_groups  # one list: the LR scheduler edits what the inner uses
        self.state = self.inner.state
        self._synced = False

    def _shard(self, p) -> _Shard:
        shape = tuple(p.shape)
        if not isinstance(p, DTensor):
            raise ValueError(f"a trained parameter of shape {shape} is not sharded over dp: call "
                             "zero.shard_parameters_over_dp(model, context) before building the optimizer")
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != self.dp:
            raise ValueError(f"parameter of shape {shape} is sharded as {p.placements} over {p.device_mesh.size()} "
                             f"ranks, not Shard(0) over dp={self.dp}: shard it with zero.shard_parameters_over_dp")
        if p.dtype != torch.float32:
            raise ValueError(f"parameter of shape {shape} is {p.dtype}: ZeRO-3 steps fp32 shards (the masters); "
                             "shard_parameters_over_dp casts them and computes in the model's 16-bit dtype")
        spec = getattr(p, "tp_spec", None)
        if spec is not None and spec.overlaps and not _overlap_rows_aligned(spec):
            raise NotImplementedError(f"parameter of shape {shape}: rows held by several TP ranks sit at different "
                                      "local offsets, so its TP gradient sum cannot run on dp shards")
        with torch.no_grad():
            local = p.to_local()
        rows = dp_rows(p)
        if local.shape[0] != rows[1] - rows[0]:
            raise RuntimeError(f"FSDP2 shard of a parameter of shape {shape} has {local.shape[0]} rows on dp rank "
                               f"{self.dp_rank}, expected rows {rows} (ceil split of dim 0)")
        row = math.prod(shape[1:])
        mask = norm_count_mask(p, self.context.tp_rank)
        if isinstance(mask, torch.Tensor):
            mask = mask.narrow(0, rows[0], rows[1] - rows[0])
        return _Shard(p, rows, (rows[0] * row, rows[1] * row), nn.Parameter(local), mask)

    def _bind(self) -> None:
        """Re-alias the masters where FSDP2 replaced a local shard tensor (``model.to(...)``, ``load_state_dict``)."""
        for s in self.shards.values():
            with torch.no_grad():
                local = s.param.to_local()
            if s.master.numel() and s.master.data_ptr() != local.data_ptr():
                s.master.data = local

    # ----------------------------------------------------------------------------- gradients
    def finish_grad_sync(self) -> None:
        """Sum the partial TP gradients on the dp shards (see the module docstring); idempotent per step."""
        if self._synced:
            return
        tp_comm = self.context.tp_comm
        for s in self.shards.values():
            grad = s.param.grad
            if grad is None:
                s.master.grad = None
                continue
            local = grad.to_local()
            if tp_comm is not None and needs_tp_grad_sum(s.param) and local.numel():
                self._sum_over_tp(s, local, tp_comm)
            s.master.grad = local if s.master.numel() else None
        self._synced = True

    @staticmethod
    def _sum_over_tp(s: _Shard, local: torch.Tensor, tp_comm) -> None:
        """In place: ``local`` (this shard's gradient rows) summed over the TP peers of this dp rank.

        A replicated parameter: one all-reduce of the shard. Rows held by several TP ranks
        (``tp_spec.overlaps``): the shard is placed in a zero local tensor and summed per full row
        by ``grads.sync_partial_tp_grad``; the peers hold the same local rows, so the window's rows
        receive every holder's contribution. That costs one full tensor of that parameter for the
        call (the key/value projections of replicated KV heads: small).
        """
        spec = getattr(s.param, "tp_spec", None)
        if spec is None or not spec.overlaps:
            all_reduce(local, tp_comm)
            return
        lo, hi = s.rows
        window = local.new_zeros(s.param.shape)
        window.narrow(0, lo, hi - lo).copy_(local)
        sync_partial_tp_grad(s.param, window, tp_comm)
        local.copy_(window.narrow(0, lo, hi - lo))

    # ----------------------------------------------------------------------------- norm, step
    def _grad_pieces(self):
        for s in self.shards.values():
            if s.master.grad is not None:
                yield s.master.grad, s.count_mask

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm of the unsharded model (before clipping); clips when finite.

        Each element is counted once across tp (``grads.norm_count_mask``) and dp (disjoint shards).
        Same formula as ``torch.nn.utils.clip_grad_norm_``: ``g *= min(1, max_norm / (norm + 1e-6))``.
        """
        self.finish_grad_sync()
        total = counted_square_sum(self._grad_pieces(), self.context.device)
        if self.context.tp_comm is not None:
            all_reduce(total, self.context.tp_comm)
        if self.dp_group is not None:
            dist.all_reduce(total, group=self.dp_group)
        norm = total.sqrt()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            grads = [g for g, _ in self._grad_pieces()]
            if grads:
                torch._foreach_mul_(grads, coef)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        self.finish_grad_sync()
        self._bind()
        loss = self.inner.step(closure)
        self._synced = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.shards.values():
            s.param.grad = None
            s.master.grad = None
        self._synced = False

    # ----------------------------------------------------------------------------- state
    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def local_numel(self) -> dict[str, int]:
        """Element counts on this rank: trained parameter shards, fp32 master elements (the same: the shards
        are the masters), optimizer state."""
        shards = sum(s.master.numel() for s in self.shards.values())
        state = sum(t.numel() for st in self.inner.state.values() for t in st.values()
                    if torch.is_tensor(t) and t.dim() > 0)
        return {"params": shards, "master": shards, "optimizer_state": state}

    # ----------------------------------------------------------------------------- checkpoint export/import
    # ShardedOptimizer's topology-independent interface (tp_trainer.checkpoint): state pieces addressed by
    # (parameter, flat range of its *local TP* tensor); a dp shard is one contiguous range.

    def export_state_pieces(self):
        """Yield ``(param, lo, hi, master, state)`` for the shard of every trained parameter this rank holds
        (none for an empty shard); 1-D views, nothing copied."""
        for s in self.shards.values():
            if not s.master.numel():
                continue
            state = {}
            for key, value in self.inner.state.get(s.master, {}).items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}, not a tensor: it cannot "
                                    "be re-partitioned; use a torch optimizer whose state is made of tensors")
                state[key] = value.reshape(-1) if value.dim() > 0 else value
            yield s.param, s.flat[0], s.flat[1], s.master.detach().reshape(-1), state

    @torch.no_grad()
    def import_state_pieces(self, fetch) -> None:
        """Fill shards and optimizer state from ``fetch(param, lo, hi) -> (master or None, state)``.

        ``master`` (1-D fp32) replaces the shard; ``None`` keeps it (the shard is the model's weight,
        already loaded). ``state`` holds 1-D slices and 0-dim tensors as :meth:`export_state_pieces` yields.
        """
        self._bind()
        for s in self.shards.values():
            if not s.master.numel():
                continue
            master, state = fetch(s.param, *s.flat)
            if master is not None:
                s.master.copy_(master.view_as(s.master))
            self.inner.state[s.master] = {k: (v.view_as(s.master) if v.dim() > 0 else v).clone().to(s.master.device)
                                          for k, v in state.items()}

    @torch.no_grad()
    def iter_local_masters(self, params):
        """Yield ``(param, fp32 local TP tensor)`` for ``params`` in the given order: each all-gathered over dp
        (collective: every dp rank must iterate the same sequence); one tensor at a time."""
        for p in params:
            yield p, tp_local_tensor(p)
