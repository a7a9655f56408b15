"""An ``accelerate.Accelerator`` that knows the dp x tp mesh (the Trainer talks to it for data and metrics).

accelerate's own TP path refuses CPU (``MULTI_CPU``) and would wrap our model in DDP over the
whole world, averaging different TP shards together. This subclass changes the following and
delegates everything else:

* dataloaders are sharded over the **dp group** (``num_processes=dp``, ``process_index=dp_rank``),
  so the ``tp`` ranks of a TP group receive identical batches (iterable datasets are read by
  every rank and sharded by dp rank: no cross-group dispatching);
* ``gather_for_metrics`` gathers over the dp group only and drops the padding samples of the
  last batch, so ``evaluate``/``predict`` see every sample exactly once;
* ``prepare_model`` applies mixed precision/compile but never wraps in DDP: gradients are
  reduced by :class:`~tp_trainer.zero.ShardedOptimizer` over the dp group (a hook of the trainer
  sees every model first: it shards a reference model the trainer built itself);
* ``no_sync`` is a no-op for the same reason, and ``clip_grad_norm_`` delegates to the
  optimizer's global-norm clipping.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import recursively_apply
from transformers.trainer_utils import seed_worker

from .parallel.context import ParallelContext


class TPAccelerator(Accelerator):
    """Built by ``TPTrainerMixin`` from the arguments the Trainer chose for its accelerator, plus the mesh.

    ``model_hook(model) -> model`` runs at the start of :meth:`prepare_model` (the trainer shards a
    model of its own there, e.g. TRL's reference model, before mixed precision wraps its forward).
    """

    tp_optimizer = None

    def __init__(self, tp_context: ParallelContext, *, model_hook=None, **accelerator_args):
        super().__init__(**accelerator_args)
        self.tp_context = tp_context
        self.model_hook = model_hook

    def prepare_data_loader(self, data_loader, device_placement=None, slice_fn_for_dispatch=None):
        ctx = self.tp_context
        if device_placement is None:
            device_placement = self.device_placement
        # Workers of the ranks of one TP group must draw the same random numbers (collators).
        init_fn = data_loader.worker_init_fn
        if isinstance(init_fn, functools.partial) and init_fn.func is seed_worker:
            data_loader.worker_init_fn = functools.partial(seed_worker, num_workers=init_fn.keywords.get("num_workers"),
                                                           rank=ctx.dp_rank)
        is_iterable = isinstance(data_loader.dataset, torch.utils.data.IterableDataset)
        prepared = prepare_data_loader(
            data_loader,
            self.device,
            num_processes=ctx.dp_size,
            process_index=ctx.dp_rank,
            split_batches=self.split_batches,
            put_on_device=device_placement,
            rng_types=self.rng_types.copy(),
            dispatch_batches=False if is_iterable else self.dispatch_batches,
            even_batches=self.even_batches,
            slice_fn_for_dispatch=slice_fn_for_dispatch,
            use_seedable_sampler=self.use_seedable_sampler,
            data_seed=self.dataloader_config.data_seed,
            non_blocking=self.non_blocking,
            use_stateful_dataloader=self.use_stateful_dataloader,
        )
        self._dataloaders.append(prepared)
        return prepared

    def prepare_model(self, model, device_placement=None, evaluation_mode: bool = False):
        if self.model_hook is not None:
            model = self.model_hook(model)
        return super().prepare_model(model, device_placement=device_placement, evaluation_mode=True)

    @contextlib.contextmanager
    def no_sync(self, model):
        yield

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        if self.tp_optimizer is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type)
        if norm_type != 2:
            raise ValueError(f"tp_trainer clips by the global L2 norm; norm_type={norm_type} is not supported")
        return self.tp_optimizer.clip_grad_norm(float(max_norm))

    def gather_for_metrics(self, input_data, use_gather_object: bool = False):
        data = gather_over_dp(input_data, self.tp_context)
        state = self.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            # per-sample tensors lose the last batch's padding; a scalar (a sum TRL gathers at dp=1) has no
            # samples to drop: accelerate returns it untruncated too
            return recursively_apply(lambda t: t[: state.remainder] if t.dim() else t, data)
        return data


def gather_over_dp(data, context: ParallelContext):
    """Concatenate tensors (dim 0) over the dp group, in dp-rank order (= dataloader shard order)."""
    if context.dp_group is None:
        return data

    def _gather(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if t.dim() == 0:
            t = t[None]
        out = [torch.empty_like(t) for _ in range(context.dp_size)]
        dist.all_gather(out, t, group=context.dp_group)
        return torch.cat(out, dim=0)

    return recursively_apply(_gather, data)
