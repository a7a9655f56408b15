"""``TPTrainer``: ``transformers.Trainer`` with tensor parallelism and ZeRO-1/2 over the dp group.

Only the overrides live here; each delegates to a module that does the work:

* ``__init__``: build the mesh (:mod:`.parallel.context`), plan and shard the model
  (:mod:`.planner`) before the Trainer wraps anything, then make the accelerator mesh-aware
  (:mod:`.accelerator`: dp-sharded dataloaders, dp-only metric gathering, no DDP);
* ``create_optimizer``: wrap the Trainer's optimizer in :class:`~.zero.ShardedOptimizer`;
* ``get_tp_size``: the Trainer divides token counts and the loss scale by it;
* ``training_step``: the first step checks that a TP group received identical batches;
* ``_track_num_input_tokens``: the Trainer sums token counts over all ranks, ``tp`` times too many.

With ``tp_size=1`` and ``zero_stage=0`` nothing is overridden: it is the plain ``Trainer``.
"""

from __future__ import annotations

import logging as pylogging

from transformers import Trainer
from transformers.utils import logging

from .accelerator import TPAccelerator
from .args import TPTrainingArguments
from .checks import check_identical_across_tp
from . import checkpoint as ckpt
from .checkpoint import export
from .parallel.attention import use_cpu_attention
from .parallel.context import ParallelContext
from .planner import apply_tensor_parallel, plan_tensor_parallel
from .zero import ShardedOptimizer

logger = logging.get_logger(__name__)


class TPTrainer(Trainer):
    def __init__(self, model=None, args: TPTrainingArguments | None = None, *pos, **kwargs):
        if args is None:
            args = TPTrainingArguments(output_dir="tmp_trainer")
        self.tp_context: ParallelContext | None = None
        self.tp_plan = None
        self._tp_batch_checked = False
        self._cpu_attention = False
        active = getattr(args, "parallel_active", False)
        if active:
            if model is None:
                raise ValueError("TPTrainer with tp_size > 1 or zero_stage > 0 needs a model instance: model_init "
                                 "would build an unsharded model after the plan is made")
            if kwargs.get("optimizers", (None, None))[0] is not None:
                raise ValueError("TPTrainer shards the optimizer itself: pass optimizer_cls_and_kwargs=(cls, kwargs) "
                                 "instead of a built optimizer")
            context = ParallelContext.from_environment(args.tp_size, use_cpu=args.use_cpu,
                                                       cpu_kernels=args.cpu_kernels)
            plan = plan_tensor_parallel(model, context.tp_size, user_plan=args.user_tp_plan())
            self._full_param_count = sum(p.numel() for p in model.parameters())
            apply_tensor_parallel(model, plan, context)
            self._cpu_attention = context.kernels.cpu_attention and use_cpu_attention(model)
            self.tp_context, self.tp_plan = context, plan
        super().__init__(model, args, *pos, **kwargs)
        if active and self.args.world_size != self.tp_context.world_size:
            raise RuntimeError(
                f"accelerate sees world_size={self.args.world_size} but the launch has {self.tp_context.world_size} "
                "ranks: every rank would log, save and read data as if alone. Pass --use_cpu on a machine "
                "without GPUs, or launch with torchrun / accelerate launch --multi_gpu.")
        if active:
            TPAccelerator.adopt(self.accelerator, self.tp_context)
            # Trainer.__init__ bound the world-wide gather before the accelerator knew the mesh
            self.gather_function = self.accelerator.gather_for_metrics
            pylogging.getLogger("tp_trainer").setLevel(logging.get_verbosity())
            if self.args.should_log:
                if logger.isEnabledFor(pylogging.INFO):
                    logger.info(self.startup_summary())  # it carries the plan's warnings
                else:
                    for warning in self.tp_plan.warnings:
                        logger.warning(warning)

    def startup_summary(self) -> str:
        ctx, args = self.tp_context, self.args
        local = sum(p.numel() for p in self.model.parameters())
        gbs = args.per_device_train_batch_size * ctx.dp_size * args.gradient_accumulation_steps
        modules = list(self.model.modules())
        fused = sum(1 for m in modules if hasattr(m, "tp_rms_eps"))
        split = sum(1 for m in modules if getattr(m, "tp_token_split", False))
        kernels = (f"; {fused} replicated RMSNorms fused" if fused else "") + (
            f"; {split} replicated norms split over tokens" if split else "") + (
            "; causal attention by CPU row blocks" if self._cpu_attention else "")
        # ZeRO shards over dp: at dp=1 it only adds its buckets (their cost: docs/benchmarks.md)
        idle_zero = " (dp=1: nothing to shard, zero_stage=0 is leaner)" if args.zero_stage and ctx.dp_size == 1 else ""
        dtype = next(self.model.parameters()).dtype
        return (f"{ctx.describe()}\n"
                f"  {ctx.kernels.describe(dtype)}\n"
                f"  plan: {self.tp_plan.summary()}{kernels}\n"
                f"  zero_stage={args.zero_stage}{idle_zero}; "
                f"global batch = {args.per_device_train_batch_size} per device x dp {ctx.dp_size} x grad accum "
                f"{args.gradient_accumulation_steps} = {gbs}\n"
                f"  parameters on this rank: {local:,} of {self._full_param_count:,} "
                f"({local / max(1, self._full_param_count):.1%})"
                + "".join(f"\n  WARNING: {w}" for w in self.tp_plan.warnings))

    @property
    def tp_active(self) -> bool:
        return self.tp_context is not None

    def get_tp_size(self) -> int:
        return self.tp_context.tp_size if self.tp_active else super().get_tp_size()

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.tp_active and not isinstance(optimizer, ShardedOptimizer):
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
