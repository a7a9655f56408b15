"""ZeRO-3's optimizer: an element-wise torch optimizer stepping the fp32 dp shards of ``fully_sharded``'s parameters.

After backward each trained parameter ``p`` (an FSDP2 DTensor, ``Shard(0)`` over dp of its local TP
tensor) holds its fp32 shard and, in ``p.grad``, the mean over dp of its gradient rows
(``fully_sharded`` module docstring). Per optimizer step:

* gradients: the shards of parameters whose TP gradients are partial are summed over the TP group
  (``sum_tp mean_dp g = mean_dp sum_tp g``; the TP peers of a dp rank hold the same rows), once per
  step after all micro-batches;
* norm: ``sum g^2`` over this rank's shards, each element counted once across TP
  (``grads.norm_count_mask`` restricted to the shard's rows) and across dp (disjoint shards), then one
  scalar all-reduce over TP and one over dp; clipping scales the shards in place;
* step: the inner optimizer (the one the Trainer built, re-made over the shards) updates plain fp32
  tensors aliasing FSDP2's local shards: no DTensor dispatch in the step, no copy, no write-back
  (the next forward gathers the updated shards).

The checkpoint interface is ``ShardedOptimizer``'s: a dp shard is the contiguous flat range
``[lo r, hi r)`` of the local TP tensor (rows ``[lo, hi)`` of ``r`` elements; none for an empty shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from ..parallel.collectives import all_reduce
from ..parallel.context import ParallelContext
from ..parallel.grads import counted_square_sum, needs_tp_grad_sum, norm_count_mask, sync_partial_tp_grad
from .fully_sharded import dp_rows, tp_local_tensor
from .optimizer import ELEMENTWISE_OPTIMIZERS, MasterOptimizer


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


class FullyShardedOptimizer(MasterOptimizer):
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
        self._adopt_inner(template, master_groups)
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
        return self._clip_to_global_norm(total, [g for g, _ in self._grad_pieces()], max_norm)

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
    def local_numel(self) -> dict[str, int]:
        """Element counts on this rank: trained parameter shards, fp32 master elements (the same: the shards
        are the masters), optimizer state."""
        shards = sum(s.master.numel() for s in self.shards.values())
        return {"params": shards, "master": shards, "optimizer_state": self._state_numel()}

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
