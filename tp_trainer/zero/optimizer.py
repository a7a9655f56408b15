"""Data parallelism over the dp group with ZeRO stage 0, 1 or 2, fp32 master weights, for TP-sharded models.

Per TP rank the model holds ``P`` local parameter elements (its shards plus the replicated
tensors). With ``dp`` data-parallel replicas:

========  ======================  =======================  ==================================
stage     optimizer state/rank    gradient buffer/rank     communication per optimizer step
========  ======================  =======================  ==================================
0         ``P`` (fp32 master)     ``P``                    bucketed all-reduce(grads) over dp
1         ``P / dp``              ``P`` (+ ``P/dp`` fp32)  reduce-scatter(grads) + all-gather(params)
2         ``P / dp``              ``P / dp`` fp32 + 1 bucket  reduce-scatter per micro-batch, in backward
========  ======================  =======================  ==================================

Stage 1/2 lay the local parameters end to end in buckets (reverse registration order, i.e.
roughly the order in which backward produces gradients); each bucket is padded to a multiple
of ``dp`` and dp rank ``d`` owns the ``d``-th contiguous slice of every bucket, as flat fp32
master weights. The wrapped optimizer (the one the Trainer built: AdamW by default) steps
only on those slices, so it must be element-wise (Adam, AdamW, SGD, ...).

Gradients are averaged over dp (the convention of DDP and of the Trainer's loss scaling),
after the TP-partial gradients (:mod:`tp_trainer.parallel.grads`) are summed over TP. The
gradient norm counts every element of the unsharded model exactly once across the world.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel.collectives import all_gather_flat, all_reduce, free_now, reduce_scatter_flat
from ..parallel.context import ParallelContext
from ..parallel.grads import counted_square_sum, needs_tp_grad_sum, norm_count_mask, sync_partial_tp_grad
from .buckets import bucket_runs, zero_bucket_params

ELEMENTWISE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad,
                          torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam)


@dataclass
class _Piece:
    """The part of one parameter that this dp rank owns inside one bucket."""
    param: nn.Parameter
    param_range: tuple[int, int]   # flat range inside the parameter
    shard_range: tuple[int, int]   # flat range inside this rank's bucket shard
    master: nn.Parameter           # fp32 view of the shard


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    padded: int
    master: torch.Tensor = None        # [padded / dp] fp32
    grad: torch.Tensor = None          # [padded / dp] fp32
    pieces: list[_Piece] = field(default_factory=list)
    ready: set = field(default_factory=set)


class MasterOptimizer(torch.optim.Optimizer):
    """What ZeRO's optimizer wrappers share: an inner optimizer of the template's class over fp32 master tensors.

    The wrapper's ``param_groups`` and ``state`` *are* the inner optimizer's (one list: the LR scheduler edits
    what the inner uses); ``state_dict``/``load_state_dict`` are the inner one's.
    """

    def _adopt_inner(self, template: torch.optim.Optimizer, master_groups: list[dict]) -> None:
        accepted = inspect.signature(type(template).__init__).parameters
        ctor_kwargs = {k: v for k, v in template.defaults.items() if k in accepted}
        self.inner = type(template)(master_groups, **ctor_kwargs)
        torch.optim.Optimizer.__init__(self, [{"params": []}], dict(template.defaults))
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def _state_numel(self) -> int:
        """Elements of the inner optimizer's tensor state (0-dim entries such as Adam's ``step`` excluded)."""
        return sum(t.numel() for s in self.inner.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def _clip_to_global_norm(self, total: torch.Tensor, grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global norm from this rank's partial square sum ``total`` (summed over the TP group, on its fast
        transport: shared memory on one CPU host, then over the dp group: every rank ends with the same total);
        ``grads`` scaled as ``torch.nn.utils.clip_grad_norm_`` does, ``g *= min(1, max_norm / (norm + 1e-6))``,
        when ``max_norm`` is finite. Returns the norm before clipping."""
        if self.context.tp_comm is not None:
            all_reduce(total, self.context.tp_comm)
        if self.dp_group is not None:
            dist.all_reduce(total, group=self.dp_group)
        norm = total.sqrt()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for dtype in {g.dtype for g in grads}:  # one multi-tensor call per dtype
                torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(dtype))
        return norm


class ShardedOptimizer(MasterOptimizer):
    """Wraps an element-wise torch optimizer; see the module docstring.

    ``step`` finishes the gradient reduction (unless :meth:`clip_grad_norm` already did),
    steps the inner optimizer on the fp32 master shards and writes the result back into the
    model parameters (all-gather over dp for stage 1/2).
    """

    def __init__(self, template: torch.optim.Optimizer, context: ParallelContext, *, stage: int,
                 bucket_numel: int = 2**24):
        if stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {stage}")
        if stage > 0 and not isinstance(template, ELEMENTWISE_OPTIMIZERS):
            raise ValueError(
                f"zero_stage={stage} shards optimizer state element-wise, which {type(template).__name__} does not "
                f"support (it needs whole tensors). Use an element-wise optimizer (e.g. --optim adamw_torch) or zero_stage=0.")
        self.context, self.stage, self.bucket_numel = context, stage, bucket_numel
        self.dp_group, self.dp, self.dp_rank = context.dp_group, context.dp_size, context.dp_rank
        groups = [dict(g) for g in template.param_groups]
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        self._count_masks = {id(p): norm_count_mask(p, context.tp_rank) for p in self.params}
        if stage == 0:
            masters = self._build_stage0()
        else:
            masters = self._build_buckets(bucket_numel)
        master_groups = []
        for i, g in enumerate(groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            master_groups.append({**hyper, "params": [m for p, m in masters if group_of[id(p)] == i]})
        self._adopt_inner(template, master_groups)
        self._synced = False
        self._hooks = []
        if stage == 2:
            self._register_reduce_hooks()

    # ----------------------------------------------------------------------------- layout
    def _build_stage0(self):
        self.master_of = {}
        masters = []
        for p in self.params:
            m = p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())
            self.master_of[id(p)] = m
            masters.append((p, m))
        return masters

    def _build_buckets(self, bucket_numel: int):
        """The ZeRO-1/2 buckets: ``buckets.zero_bucket_params``' layout (reverse registration order, each run
        padded to a multiple of dp), the one ``tp-trainer estimate`` simulates."""
        self.buckets: list[_Bucket] = []
        for params, padded in zero_bucket_params(self.params, self.dp, bucket_numel):
            ends = list(itertools.accumulate(p.numel() for p in params))
            self.buckets.append(self._new_bucket(params, [0] + ends[:-1], ends[-1], padded))
        masters = []
        for b in self.buckets:
            masters.extend((piece.param, piece.master) for piece in b.pieces)
        return masters

    def _new_bucket(self, params, offsets, numel, padded) -> _Bucket:
        shard = padded // self.dp
        lo, hi = self.dp_rank * shard, (self.dp_rank + 1) * shard
        b = _Bucket(list(params), list(offsets), numel, padded)
        b.master = torch.zeros(shard, dtype=torch.float32, device=params[0].device)
        b.grad = torch.zeros_like(b.master)
        for p, off in zip(params, offsets):
            a, e = max(lo, off), min(hi, off + p.numel())
            if a >= e:
                continue
            view = b.master[a - lo:e - lo]
            view.copy_(p.detach().reshape(-1)[a - off:e - off])
            master = nn.Parameter(view)
            master.grad = b.grad[a - lo:e - lo]
            b.pieces.append(_Piece(p, (a - off, e - off), (a - lo, e - lo), master))
        return b

    # ----------------------------------------------------------------------------- gradients
    def _flat_grads(self, b: _Bucket) -> torch.Tensor:
        flat = torch.zeros(b.padded, dtype=torch.float32, device=b.master.device)
        for p, off in zip(b.params, b.offsets):
            if p.grad is not None:
                flat[off:off + p.numel()].copy_(p.grad.reshape(-1))
        return flat

    def _reduce_scatter_into(self, b: _Bucket, flat: torch.Tensor) -> None:
        if self.dp_group is None:
            b.grad.add_(flat)
            return
        out = torch.empty_like(b.grad)
        reduce_scatter_flat(out, flat, self.dp_group, op=dist.ReduceOp.AVG)
        b.grad.add_(out)
        free_now(flat, out)  # collectives.free_now: gloo may hold both past the call

    def _register_reduce_hooks(self) -> None:
        owner = {id(p): b for b in self.buckets for p in b.params}

        def hook(p):
            if needs_tp_grad_sum(p):
                sync_partial_tp_grad(p, p.grad, self.context.tp_comm)
            b = owner[id(p)]
            b.ready.add(id(p))
            if len(b.ready) == len(b.params):
                self._reduce_bucket_now(b)

        for p in self.params:
            self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _reduce_bucket_now(self, b: _Bucket) -> None:
        """Stage 2: reduce-scatter this micro-batch's bucket and free the full gradients."""
        self._reduce_scatter_into(b, self._flat_grads(b))
        for p in b.params:
            p.grad = None
        b.ready.clear()

    def finish_grad_sync(self) -> None:
        """Reduce the accumulated gradients over TP (partial ones) and dp; idempotent per step."""
        if self._synced:
            return
        tp_comm = self.context.tp_comm
        if self.stage == 2:
            for b in self.buckets:  # buckets a backward did not complete (unused parameters)
                if b.ready:
                    self._reduce_bucket_now(b)
        else:
            for p in self.params:
                if p.grad is not None and needs_tp_grad_sum(p):
                    sync_partial_tp_grad(p, p.grad, tp_comm)
            if self.stage == 1:
                for b in self.buckets:
                    self._reduce_scatter_into(b, self._flat_grads(b))
            else:
                self._all_reduce_stage0()
        self._synced = True

    def _all_reduce_stage0(self) -> None:
        """Average the gradients over dp, one fp32 bucket of at most ``bucket_numel`` elements (or one
        larger tensor) at a time: the transient is one bucket, not a second copy of every gradient,
        and it is freed before the fp32 master gradients are made (``tp_trainer.memory`` counts it so)."""
        params = [p for p in self.params if p.grad is not None]
        if self.dp_group is not None:
            for run in bucket_runs([p.numel() for p in params], self.bucket_numel):
                self._all_reduce_bucket([params[i] for i in run])
        for p in params:
            m = self.master_of[id(p)]
            if m is not p:
                m.grad = p.grad.float()

    def _all_reduce_bucket(self, bucket: list) -> None:
        """dp mean of ``bucket``'s gradients through one flat fp32 buffer, which dies with this call. Each
        gradient is copied (and converted) into its slice: a ``cat`` of ``.float()`` copies would hold a
        second fp32 bucket of temporaries (bf16: +4 bytes per element at the peak)."""
        flat = torch.empty(sum(p.numel() for p in bucket), dtype=torch.float32, device=bucket[0].grad.device)
        views = flat.split([p.numel() for p in bucket])
        for p, view in zip(bucket, views):
            view.copy_(p.grad.reshape(-1))
        dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self.dp_group)
        for p, view in zip(bucket, views):
            p.grad.copy_(view.view_as(p.grad))
        free_now(flat)  # before the fp32 master gradients are made (collectives.free_now: gloo may hold it)

    # ----------------------------------------------------------------------------- norm, step
    def _master_pieces(self):
        """``(master_grad, count_mask)`` for every master tensor this rank holds."""
        if self.stage == 0:
            for p in self.params:
                m = self.master_of[id(p)]
                if m.grad is not None:
                    yield m.grad, self._count_masks[id(p)]
            return
        for b in self.buckets:
            for piece in b.pieces:
                mask = self._count_masks[id(piece.param)]
                if isinstance(mask, torch.Tensor):
                    mask = mask.reshape(-1)[piece.param_range[0]:piece.param_range[1]]
                yield piece.master.grad, mask

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm of the unsharded model (before clipping); clips when finite.

        Same formula as ``torch.nn.utils.clip_grad_norm_``: ``g *= min(1, max_norm / (norm + 1e-6))``.
        """
        self.finish_grad_sync()
        device = self.context.device
        if self.stage > 0 or self.dp_rank == 0:  # stage 0 holds identical grads on every dp rank
            total = counted_square_sum(self._master_pieces(), device)
        else:
            total = torch.zeros((), dtype=torch.float32, device=device)
        return self._clip_to_global_norm(total, [grad for grad, _ in self._master_pieces()], max_norm)

    @torch.no_grad()
    def step(self, closure=None):
        self.finish_grad_sync()
        loss = self.inner.step(closure)
        self._write_back()
        self._after_step()
        return loss

    def _write_back(self) -> None:
        if self.stage == 0:
            for p in self.params:
                m = self.master_of[id(p)]
                if m is not p:
                    p.data.copy_(m.data)
            return
        for b in self.buckets:
            if self.dp_group is None:
                full = b.master
            else:
                dtype = b.params[0].dtype if all(p.dtype == b.params[0].dtype for p in b.params) else torch.float32
                full = torch.empty(b.padded, dtype=dtype, device=b.master.device)
                all_gather_flat(full, b.master.to(dtype), self.dp_group)
            for p, off in zip(b.params, b.offsets):
                p.data.copy_(full[off:off + p.numel()].view_as(p))
            if full is not b.master:
                free_now(full)

    def _after_step(self) -> None:
        self._synced = False
        if self.stage > 0:
            for b in self.buckets:
                b.grad.zero_()
        else:
            for p in self.params:
                m = self.master_of[id(p)]
                if m is not p:
                    m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        if self.stage > 0:
            for b in self.buckets:
                b.grad.zero_()
                b.ready.clear()
        self._synced = False

    # ----------------------------------------------------------------------------- state
    def local_numel(self) -> dict[str, int]:
        """Element counts on this rank: model parameters, fp32 master elements, optimizer state."""
        master = sum(m.numel() for g in self.inner.param_groups for m in g["params"])
        return {"params": sum(p.numel() for p in self.params), "master": master,
                "optimizer_state": self._state_numel()}

    # ----------------------------------------------------------------------------- checkpoint export/import
    # Topology-independent optimizer state (used by tp_trainer.checkpoint): every piece of state is
    # addressed by (parameter, flat range inside that parameter's *local* TP tensor). Together with
    # the parameter's ShardSpec this places it in the full Hugging Face tensor, so a checkpoint can
    # be re-partitioned for any other tp size, dp size or ZeRO stage.

    @property
    def state_replicated_over_dp(self) -> bool:
        """Stage 0 keeps the whole optimizer state on every dp rank (one dp rank need save it)."""
        return self.stage == 0

    def export_state_pieces(self):
        """Yield ``(param, lo, hi, master, state)`` for every piece of state this rank holds.

        ``master`` is the fp32 master slice (1-D, ``hi - lo`` elements) of ``param``'s flat local
        tensor, ``state`` maps the inner optimizer's keys to 1-D slices of the same range (0-dim
        tensors such as Adam's ``step`` as they are). Nothing is copied.
        """
        if self.stage == 0:
            for p in self.params:
                m = self.master_of[id(p)]
                yield p, 0, p.numel(), m.detach().reshape(-1), self._flat_state(self.inner.state.get(m, {}))
            return
        for b in self.buckets:
            for piece in b.pieces:
                lo, hi = piece.param_range
                state = self._flat_state(self.inner.state.get(piece.master, {}))
                yield piece.param, lo, hi, piece.master.detach(), state

    @staticmethod
    def _flat_state(state: dict) -> dict:
        out = {}
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} is a {type(value).__name__}, not a tensor: it cannot be "
                                "re-partitioned; use a torch optimizer whose state is made of tensors")
            out[key] = value.reshape(-1) if value.dim() > 0 else value
        return out

    @torch.no_grad()
    def import_state_pieces(self, fetch) -> None:
        """Fill masters and optimizer state from ``fetch(param, lo, hi) -> (master or None, state)``.

        ``master`` (1-D fp32, ``hi - lo`` elements) replaces the master slice; ``None`` re-copies it
        from the (already loaded) model parameter. ``state`` holds 1-D slices and 0-dim tensors as
        :meth:`export_state_pieces` produces them.
        """
        if self.stage == 0:
            for p in self.params:
                m = self.master_of[id(p)]
                master, state = fetch(p, 0, p.numel())
                if m is not p:
                    m.data.copy_((master if master is not None else p.detach().float()).view_as(m))
                elif master is not None:
                    p.data.copy_(master.view_as(p))
                self.inner.state[m] = {k: (v.view_as(m) if v.dim() > 0 else v).clone().to(m.device)
                                       for k, v in state.items()}
            return
        for b in self.buckets:
            for piece in b.pieces:
                lo, hi = piece.param_range
                master, state = fetch(piece.param, lo, hi)
                src = master if master is not None else piece.param.detach().reshape(-1)[lo:hi]
                piece.master.data.copy_(src)
                self.inner.state[piece.master] = {k: v.clone().to(piece.master.device) for k, v in state.items()}

    @torch.no_grad()
    def iter_local_masters(self, params):
        """Yield ``(param, fp32 local tensor)`` for ``params`` in the given order (collective over dp).

        Stage 1/2 all-gather one bucket's master shards at a time (every dp rank must iterate the
        same sequence); stage 0 returns the master itself.
        """
        owner = {id(p): (b, off) for b in getattr(self, "buckets", []) for p, off in zip(b.params, b.offsets)}
        cached = (None, None)
        for p in params:
            if self.stage == 0 or id(p) not in owner:  # stage 0, or a frozen parameter (no master)
                yield p, getattr(self, "master_of", {}).get(id(p), p).detach().view_as(p)
                continue
            b, off = owner[id(p)]
            if cached[0] is not b:
                if self.dp_group is None:
                    full = b.master
                else:
                    full = torch.empty(b.padded, dtype=torch.float32, device=b.master.device)
                    all_gather_flat(full, b.master, self.dp_group)
                cached = (b, full)
            yield p, cached[1][off:off + p.numel()].view_as(p)
