"""``TPTrainerMixin``: tensor parallelism and ZeRO-1/2/3 over the dp group for any ``transformers.Trainer`` subclass.

``TPTrainer`` is the mixin on ``Trainer``; ``tp_trainer.trl``'s trainers are the mixin on TRL's. Put it
first in the bases, with arguments that carry the layout (:class:`~.args.TPArgumentsMixin`)::

    class MyTrainer(TPTrainerMixin, SomeTrainer): ...
    MyTrainer(model=model, args=MyArguments(..., tp_size=2, zero_stage=1), ...)

Only overrides live here; each delegates to a module that does the work:

* ``create_accelerator_and_postprocess`` (the hook ``Trainer.__init__`` calls once ``self.model`` is
  set, before it moves or wraps the model; a subclass such as TRL's has prepared the model by then:
  PEFT applied): build the mesh (:mod:`.parallel.context`), plan and shard the model
  (:mod:`.planner`; a model from :func:`tp_trainer.from_pretrained` arrives sharded), bound every
  mesh group's waits by ``--ddp_timeout``, shard the parameters over dp for ``zero_stage=3``
  (:mod:`.zero.fully_sharded`: FSDP2), then build the Trainer's accelerator as a mesh-aware :class:`~.accelerator.TPAccelerator`
  (dp-sharded dataloaders, dp-only metric gathering, no DDP) from the arguments the Trainer chose for it
  (``_build_accelerator_args``);
* ``__init__``: add the preemption and lost-peer callbacks (:mod:`.resilience`);
* ``create_optimizer``: wrap the Trainer's optimizer in :class:`~.zero.ShardedOptimizer` (stages 0-2) or
  :class:`~.zero.FullyShardedOptimizer` (stage 3);
* ``get_tp_size``: the Trainer divides token counts and the loss scale by it;
* ``training_step``: the first step checks that a TP group received identical batches;
* ``_track_num_input_tokens``: the Trainer sums token counts over all ranks, ``tp`` times too many;
* ``tp_prepare_model``: called by the accelerator for every model a subclass prepares besides its own
  (TRL's reference model): a subclass that builds models shards them there (:meth:`tp_shard_like_model`).

With ``tp_size=1`` and ``zero_stage=0`` nothing is overridden: it is the plain ``Trainer`` (subclass).
"""

from __future__ import annotations

import functools
import inspect
import logging as pylogging

import torch.nn as nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .accelerator import TPAccelerator
from .args import TPArgumentsMixin, TPTrainingArguments
from .checks import check_identical_across_tp
from . import checkpoint as ckpt
from .checkpoint import export
from .loading import sharded_state
from .parallel.attention import use_cpu_attention
from .parallel.collectives import bound_waits
from .parallel.context import ParallelContext
from .planner import Plan, apply_tensor_parallel, plan_tensor_parallel
from .resilience import resilience_callbacks
from .zero import ZERO_OPTIMIZERS, FullyShardedOptimizer, ShardedOptimizer, shard_parameters_over_dp

logger = logging.get_logger(__name__)


def _structure(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes: two models with equal structures take the same plan."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


class TPTrainerMixin:
    """TP + ZeRO for the ``Trainer`` subclass it is mixed into (first base); see the module docstring."""

    tp_context: ParallelContext | None = None
    tp_plan: Plan | None = None
    _tp_batch_checked = False
    _cpu_attention = False
    _full_param_count = 0
    _tp_structure: list | None = None

    def __init__(self, *args, **kwargs):
        self._tp_check_init_arguments(args, kwargs)
        super().__init__(*args, **kwargs)
        if self.tp_active:
            for callback in resilience_callbacks():  # preemption checkpoint; a lost peer named
                self.add_callback(callback)
            pylogging.getLogger("tp_trainer").setLevel(logging.get_verbosity())
            if self.args.should_log:
                if logger.isEnabledFor(pylogging.INFO):
                    logger.info(self.startup_summary())  # it carries the plan's warnings
                else:
                    for warning in self.tp_plan.warnings:
                        logger.warning(warning)

    def _tp_check_init_arguments(self, args: tuple, kwargs: dict) -> None:
        """Refusals that need the constructor's arguments, before any work (``Trainer``'s signature or a subclass's)."""
        try:  # by name, whatever the subclass's positional order (TRL's DPOTrainer takes ref_model second)
            bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = {}
        if not isinstance(bound.get("args"), TrainingArguments):  # a (*args, **kwargs) signature
            bound = {**bound, "args": kwargs.get("args")}
        bound = {**kwargs, **bound}
        training_args = bound["args"]
        if training_args is None:
            return  # the Trainer (or the subclass) builds default arguments: no layout, the plain Trainer
        if not isinstance(training_args, TPArgumentsMixin):
            raise TypeError(
                f"{type(self).__name__} got args of type {type(training_args).__name__}, which has no tp_size / "
                "zero_stage: pass arguments with TPArgumentsMixin (TPTrainingArguments, tp_trainer.trl's "
                "TPSFTConfig/TPDPOConfig, or your own @dataclass class X(TPArgumentsMixin, YourArguments))")
        if not training_args.parallel_active:
            return
        if bound.get("model") is None and bound.get("model_init") is not None:
            raise ValueError(f"{type(self).__name__} with tp_size > 1 or zero_stage > 0 needs a model instance: "
                             "model_init would build an unsharded model after the plan is made")
        if (bound.get("optimizers") or (None, None))[0] is not None:
            raise ValueError(f"{type(self).__name__} shards the optimizer itself: pass "
                             "optimizer_cls_and_kwargs=(cls, kwargs) instead of a built optimizer")

    # ------------------------------------------------------------------ mesh, plan, shard; the accelerator
    def create_accelerator_and_postprocess(self) -> None:
        if getattr(self.args, "parallel_active", False) and self.tp_context is None:
            self._tp_setup()  # self.model is set, nothing has moved or wrapped it yet
        super().create_accelerator_and_postprocess()
        if self.tp_active:
            self._tp_install_accelerator()

    def _build_accelerator_args(self, **kwargs) -> dict:
        accelerator_args = super()._build_accelerator_args(**kwargs)
        self._tp_accelerator_args = accelerator_args  # the TPAccelerator is built from the same arguments
        return accelerator_args

    def _tp_setup(self) -> None:
        if self.model is None:
            raise ValueError(f"{type(self).__name__} with tp_size > 1 or zero_stage > 0 needs a model instance: "
                             "model_init would build an unsharded model after the plan is made")
        args = self.args
        loaded = sharded_state(self.model, tp_size=args.tp_size, use_cpu=args.use_cpu, cpu_kernels=args.cpu_kernels,
                               sequence_parallel=args.sequence_parallel, zero_stage=args.zero_stage)
        if loaded is not None:  # built by tp_trainer.from_pretrained: planned and sharded while loading
            self.tp_context, self.tp_plan = loaded.context, loaded.plan
            self._full_param_count, self._tp_structure = loaded.full_parameters, loaded.structure
            self.model.tp_trainer_plan = loaded.plan
            self._cpu_attention = self.tp_context.kernels.cpu_attention and use_cpu_attention(self.model)
        else:
            self.tp_context = ParallelContext.from_environment(args.tp_size, use_cpu=args.use_cpu,
                                                               cpu_kernels=args.cpu_kernels)
            self._full_param_count = sum(p.numel() for p in self.model.parameters())
            self._tp_structure = _structure(self.model)
            self.tp_plan = self.tp_shard(self.model)
        ctx = self.tp_context  # a dead or stopped peer fails every collective (and shm wait) within --ddp_timeout
        bound_waits(args.ddp_timeout_delta, ctx.world_group, ctx.tp_group, ctx.dp_group)
        if args.zero_stage == 3 and not (loaded is not None and loaded.zero_stage == 3):  # loaded: sharded already
            shard_parameters_over_dp(self.model, self.tp_context)  # the trained model only: a TRL reference stays whole

    def tp_shard(self, model: nn.Module, plan: Plan | None = None) -> Plan:
        """Shard ``model`` in place with ``plan`` (default: planned for it); returns the plan applied."""
        ctx = self.tp_context
        if plan is None:
            plan = plan_tensor_parallel(model, ctx.tp_size, user_plan=self.args.user_tp_plan())
        apply_tensor_parallel(model, plan, ctx, sequence_parallel=self.args.sequence_parallel)
        model.tp_trainer_plan = plan  # what tp_is_sharded reads
        cpu_attention = ctx.kernels.cpu_attention and use_cpu_attention(model)
        if model is self.model:
            self._cpu_attention = cpu_attention
        return plan

    @staticmethod
    def tp_is_sharded(model: nn.Module) -> bool:
        """Whether ``model`` was sharded already (by :meth:`tp_shard`, or its parameters carry a ``tp_spec``)."""
        return getattr(model, "tp_trainer_plan", None) is not None or any(hasattr(p, "tp_spec") for p in model.parameters())

    def tp_shard_like_model(self, model: nn.Module) -> Plan:
        """Shard another model (a reference model) like the trained one: with its plan when both have the same
        parameters (names and shapes), planned on its own otherwise."""
        same = self._tp_structure is not None and _structure(model) == self._tp_structure
        return self.tp_shard(model, self.tp_plan if same else None)

    def tp_prepare_model(self, model: nn.Module) -> nn.Module:
        """Called by the accelerator's ``prepare_model`` before it prepares ``model``; the model being trained
        passes unchanged. A subclass that builds models of its own shards them here."""
        return model

    def _tp_install_accelerator(self) -> None:
        ctx = self.tp_context
        accelerator = TPAccelerator(ctx, model_hook=self.tp_prepare_model, **self._tp_accelerator_args)
        if accelerator.num_processes != ctx.world_size:
            raise RuntimeError(
                f"accelerate sees world_size={accelerator.num_processes} but the launch has {ctx.world_size} "
                "ranks: every rank would log, save and read data as if alone. Pass --use_cpu on a machine "
                "without GPUs, or launch with torchrun / accelerate launch --multi_gpu.")
        self.accelerator = accelerator
        # as Trainer.create_accelerator_and_postprocess binds it, on the dp-only gather
        self.gather_function = accelerator.gather_for_metrics
        if "use_gather_object" in inspect.signature(self.gather_function).parameters:
            self.gather_function = functools.partial(self.gather_function,
                                                     use_gather_object=self.args.eval_use_gather_object)

    def startup_summary(self) -> str:
        ctx, args = self.tp_context, self.args
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.model.parameters())
        gbs = args.per_device_train_batch_size * ctx.dp_size * args.gradient_accumulation_steps
        modules = list(self.model.modules())
        fused = sum(1 for m in modules if hasattr(m, "tp_rms_eps"))
        lean_mlps = sum(1 for m in modules if hasattr(m, "tp_activation"))
        split = sum(1 for m in modules if getattr(m, "tp_token_split", False))
        kernels = (f"; {fused} replicated RMSNorms fused" if fused else "") + (
            f"; {lean_mlps} gated MLPs lean" if lean_mlps else "") + (
            f"; {split} replicated norms split over tokens" if split else "") + (
            "; causal attention by CPU row blocks" if self._cpu_attention else "")
        # ZeRO shards over dp: at dp=1 it only adds its buckets (their cost: docs/benchmarks.md)
        idle_zero = " (dp=1: nothing to shard, zero_stage=0 is leaner)" if args.zero_stage and ctx.dp_size == 1 else ""
        dtype = export.model_dtype(self.model)
        return (f"{ctx.describe()}\n"
                f"  {ctx.kernels.describe(dtype)}\n"
                f"  plan: {self.tp_plan.summary()}{kernels}\n"
                f"  zero_stage={args.zero_stage}{idle_zero}; "
                f"global batch = {args.per_device_train_batch_size} per device x dp {ctx.dp_size} x grad accum "
                f"{args.gradient_accumulation_steps} = {gbs}\n"
                f"  parameters on this rank: {local:,} of {self._full_param_count:,} "
                f"({local / max(1, self._full_param_count):.1%})"
                + (f"\n  {seq.summary()}" if (seq := getattr(self.model, "tp_sequence_plan", None)) else "")
                + "".join(f"\n  WARNING: {w}" for w in self.tp_plan.warnings))

    @property
    def tp_active(self) -> bool:
        return self.tp_context is not None

    # ------------------------------------------------------------------ training
    def get_tp_size(self) -> int:
        return self.tp_context.tp_size if self.tp_active else super().get_tp_size()

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.tp_active and not isinstance(optimizer, ZERO_OPTIMIZERS):
            if self.args.zero_stage == 3:
                self.optimizer = FullyShardedOptimizer(optimizer, self.tp_context)
            else:
                self.optimizer = ShardedOptimizer(optimizer, self.tp_context, stage=self.args.zero_stage)
            self.accelerator.tp_optimizer = self.optimizer
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.tp_active and not self._tp_batch_checked:
            check_identical_across_tp(inputs, self.tp_context.tp_group, device=self.args.device)
            self._tp_batch_checked = True
        return super().training_step(model, inputs, num_items_in_batch)

    def _track_num_input_tokens(self, inputs):
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        if self.tp_active:
            # every rank of a TP group saw the same tokens: the world-wide sum counts them tp times
            self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.get_tp_size()

    # ==================================================================== checkpoints (begin)
    # Owned by the checkpoint work (tp_trainer.checkpoint, its export module included). With tp_size=1 and
    # zero_stage=0 the Trainer writes its own format untouched; sharded checkpoints (they carry a
    # tp_checkpoint.json) are read by any layout, including that plain one.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.tp_active:
            return super().save_model(output_dir, _internal_call)
        export.save_model(self.model, output_dir or self.args.output_dir, context=self.tp_context,
                          dtype=export.resolve_save_dtype(self.args, self.model), optimizer=self.optimizer,
                          processing_class=self.processing_class, training_args=self.args,
                          is_main=self.args.should_save)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.tp_active:
            return super()._save(output_dir, state_dict)
        self.save_model(output_dir)  # a TP model's own state_dict holds shards: gather instead

    def _save_checkpoint(self, model, trial) -> None:
        if not self.tp_active:
            return super()._save_checkpoint(model, trial)
        ckpt.save_training_checkpoint(self, trial)

    def _checkpoint_reader(self, path: str | None, *, validate: bool):
        """Reader of a sharded checkpoint (any layout) or, under TP, of a plain Trainer one; None: the Trainer's way.

        ``validate`` checks files and model compatibility on every rank before anything is loaded.
        """
        if ckpt.is_sharded_checkpoint(path):
            return ckpt.CheckpointReader.open(path, model=self.model if validate else None,
                                                    ctx=self.tp_context if validate else None, check_files=validate)
        if self.tp_active and path is not None:
            return ckpt.open_trainer_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                                      ctx=self.tp_context)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        reader = self._checkpoint_reader(resume_from_checkpoint, validate=True)
        if reader is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        ckpt.load_model_weights(reader, self.model)  # validated above: nothing was modified before

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        reader = self._checkpoint_reader(checkpoint, validate=False)
        if reader is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        ckpt.load_optimizer_state(reader, self.model, self.optimizer)
        ckpt.load_scheduler(checkpoint, self.lr_scheduler)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (self.tp_active or ckpt.is_sharded_checkpoint(checkpoint)):
            return super()._load_rng_state(checkpoint)
        tp = self.tp_context.tp_size if self.tp_active else 1
        ckpt.restore_rng_state(checkpoint, tp=tp, dp=self.args.world_size // tp,
                                     rank=self.args.process_index)

    def _load_best_model(self) -> None:
        reader = self._checkpoint_reader(self.state.best_model_checkpoint, validate=True)
        if reader is None:
            return super()._load_best_model()
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        ckpt.load_model_weights(reader, self.model)
        ckpt.refresh_master_weights(self.optimizer)  # ZeRO's fp32 masters follow the loaded weights
    # ==================================================================== checkpoints (end)


class TPTrainer(TPTrainerMixin, Trainer):
    """``transformers.Trainer`` with tensor parallelism and ZeRO-1/2 (:class:`TPTrainerMixin`)."""

    def __init__(self, model=None, args: TPTrainingArguments | None = None, *pos, **kwargs):
        super().__init__(model, TPTrainingArguments(output_dir="tmp_trainer") if args is None else args, *pos, **kwargs)
