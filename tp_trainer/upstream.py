"""Every private (or undocumented) transformers / accelerate / torch internal that tp_trainer relies on, in one table.

tp_trainer overrides underscore methods of ``transformers.Trainer``, replaces the Trainer's
``accelerate.Accelerator`` by a subclass built from the same arguments, reads attributes such as ``GradientState.remainder`` and
calls functions from private modules (``torch.utils._python_dispatch``, ...). None of that is a
stable API: a release may rename a method, add a parameter the Trainer then passes, or move a
value, and an override that no longer matches is silently skipped or called wrongly.
:data:`INTERNALS` names each of them with the signature we rely on, and
``tests/test_upstream.py`` checks every row against the installed versions, so such a release
fails CI with the internal's name instead of changing behaviour.

**The rule: a new use of a private internal of another library is a new row here** (the
benchmark scripts' too, marked ``(benchmark)``). The tests also find, on their own, overrides
of underscore methods of library classes and underscore names imported or read from
``torch``/``transformers``/``accelerate`` modules that have no row.

Rows (:class:`Internal`): ``qualname`` is ``"module:Object.attr"``, importable as written;
``kind`` is one of

* ``override``: we supply a replacement with exactly this signature (a method of a subclass,
  or a function assigned over the original); ``params`` is that signature, compared *exactly*:
  a parameter upstream adds is one the caller may pass and our replacement would not take;
* ``call``: we call it (or import and use it); ``params`` are the parameters we pass, which
  must appear, in this order, in its signature;
* ``patch``: we change another library's object in place (swap ``__class__``, set a private
  attribute, hook a forward); ``params`` as for ``call``;
* ``attribute``: we read (or write) a value by name, or rely on a behaviour; ``params`` is None.

``params`` leave out ``self``. ``source_has`` lists text the object's source must still contain,
for behaviour we mirror or depend on (a file format, an environment variable, how the Trainer
builds a value we take apart).

Instance attributes (``Trainer.gather_function`` is set in ``Trainer.__init__``,
``Accelerator._dataloaders`` too) have no class-level value to import. They are checked in the
*source* of the class and its bases: an assignment ``self.NAME = ...``, ``__setattr__("NAME", ...)``
or a dataclass field of that name. Building the objects instead would be neither cheap nor
clean: a Trainer needs a model and an output directory, and accelerate's ``AcceleratorState``/
``GradientState`` are process-wide singletons that a test must not initialise behind the back of
the tests that follow. Builtins without a Python signature are read from their docstring's first
line (pybind11 writes ``name(arg: type, ...)`` there); ``params=None`` skips the signature check.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

Kind = Literal["override", "call", "patch", "attribute"]


@dataclass(frozen=True)
class Internal:
    qualname: str                       # "module:Object.attr"
    kind: Kind
    params: tuple[str, ...] | None      # see the module docstring; None: no signature check
    used_in: str                        # our file(s), "; "-separated; "(benchmark)" for scripts/
    why: str
    source_has: tuple[str, ...] = ()    # text the object's source must contain


class InstanceAttribute(NamedTuple):
    """What :func:`resolve` returns for an attribute set on instances only (see the module docstring)."""
    owner: type
    name: str


class MissingInternal(LookupError):
    """An internal of the table is gone from the installed library; the message names it."""


# --------------------------------------------------------------------------------------------- the table
TRAINER, ACCEL, ARGS, FSDP = ("tp_trainer/trainer.py", "tp_trainer/accelerator.py", "tp_trainer/args.py",
                              "tp_trainer/app/fsdp_baseline.py")
SAVE, LOAD, LAYOUT = "tp_trainer/checkpoint/save.py", "tp_trainer/checkpoint/load.py", "tp_trainer/checkpoint/layout.py"
ATTN, MEMORY, TRACE = "tp_trainer/parallel/attention.py", "tp_trainer/memory.py", "tp_trainer/memory_trace.py"
FAMILIES, EXPERTS = "tp_trainer/planner/families.py", "tp_trainer/planner/experts.py"
DATAFLOW = "tp_trainer/planner/dataflow.py"
LOADING = "tp_trainer/loading"
TRL_HEAD = "tp_trainer/trl/fused_head.py"
BENCH, BENCH_CKPT = "scripts/bench.py (benchmark)", "scripts/bench_checkpoint.py (benchmark)"
T, TA, TCB, ACC = ("transformers.trainer:Trainer", "transformers.training_args:TrainingArguments",
                   "transformers.trainer_callback", "accelerate.accelerator:Accelerator")
DATALOADER_ARGS = ("device_placement", "split_batches", "rng_types", "dispatch_batches", "even_batches",
                   "use_seedable_sampler", "dataloader_config", "non_blocking", "use_stateful_dataloader")
FUSED = {  # planner/families.py: (owner class, fused linear attribute) read by name
    "gpt2.modeling_gpt2:GPT2Attention": "c_attn", "phi3.modeling_phi3:Phi3Attention": "qkv_proj",
    "phi3.modeling_phi3:Phi3MLP": "gate_up_proj", "gpt_neox.modeling_gpt_neox:GPTNeoXAttention": "query_key_value",
    "bloom.modeling_bloom:BloomAttention": "query_key_value",
    "falcon.modeling_falcon:FalconAttention": "query_key_value",
    "gpt_bigcode.modeling_gpt_bigcode:GPTBigCodeAttention": "c_attn"}

INTERNALS: tuple[Internal, ...] = (
    # ---- transformers.Trainer: overrides (TPTrainer, FSDPBaselineTrainer)
    Internal(f"{T}._track_num_input_tokens", "override", ("inputs",), TRAINER,
             "the Trainer sums token counts over all ranks: tp times too many under TP"),
    Internal(f"{T}._save", "override", ("output_dir", "state_dict"), TRAINER,
             "a TP model's state_dict holds shards: gather and write an HF directory instead"),
    Internal(f"{T}._save_checkpoint", "override", ("model", "trial"), f"{TRAINER}; {SAVE}; {BENCH_CKPT}",
             "sharded atomic checkpoints; checkpoint/save.py repeats its bookkeeping (flos, best checkpoint, "
             "stateful callbacks)", ("store_flos", "_get_output_dir", "best_global_step", "ExportableState",
                                     "stateful_callbacks")),
    Internal(f"{T}._load_from_checkpoint", "override", ("resume_from_checkpoint", "model"), f"{TRAINER}; {BENCH_CKPT}",
             "validates and re-partitions sharded (or, under TP, plain) checkpoints"),
    Internal(f"{T}._load_optimizer_and_scheduler", "override", ("checkpoint",), f"{TRAINER}; {BENCH_CKPT}",
             "re-partitioned optimizer state; NB trainer.py names the parameter checkpoint_dir, which works only "
             "because the Trainer passes it positionally"),
    Internal(f"{T}._load_rng_state", "override", ("checkpoint",), TRAINER,
             "per-rank RNG states of another layout; NB trainer.py names the parameter checkpoint_dir (positional)"),
    Internal(f"{T}._load_best_model", "override", (), TRAINER, "loads a sharded best checkpoint"),
    Internal(f"{T}.save_model", "override", ("output_dir", "_internal_call"), f"{TRAINER}; {FSDP}",
             "gathers TP / FSDP shards; _internal_call is a private parameter the Trainer passes"),
    Internal(f"{T}.get_tp_size", "override", (), TRAINER,
             "undocumented: the Trainer divides its loss scale and dp world size by it"),
    Internal(f"{T}.create_optimizer", "override", ("model",), TRAINER, "wraps the optimizer in ShardedOptimizer"),
    Internal(f"{T}.training_step", "override", ("model", "inputs", "num_items_in_batch"), TRAINER,
             "checks at the first step that a TP group received identical batches"),
    Internal(f"{T}.create_accelerator_and_postprocess", "override", (), TRAINER,
             "TPTrainerMixin shards the model there (Trainer.__init__ calls it once self.model is set, before it "
             "moves or wraps the model) and replaces the accelerator it built by a TPAccelerator",
             ("self.accelerator = Accelerator(**args)", "_build_accelerator_args(", "self.gather_function =")),
    Internal(f"{T}._build_accelerator_args", "override", ("kwargs",), TRAINER,
             "kept: the TPAccelerator is built from the arguments the Trainer chose for its own accelerator"),
    # ---- transformers.Trainer: what we call, read or write
    Internal(f"{T}.__init__", "call", ("model", "args", "optimizers", "optimizer_cls_and_kwargs"), TRAINER,
             "TPTrainer passes model and args positionally and refuses optimizers= (pass optimizer_cls_and_kwargs)"),
    Internal(f"{T}._get_output_dir", "call", ("trial",), SAVE, "the run directory of a checkpoint"),
    Internal(f"{T}._maybe_log_save_evaluate", "attribute", None, "tp_trainer/preemption.py",
             "a step whose control.should_save is set saves whatever save_strategy is, then calls on_save: the "
             "preemption checkpoint", ("if self.control.should_save:", "self._save_checkpoint(model, trial)",
                                      "on_save")),
    Internal(f"{T}.store_flos", "call", (), SAVE, "as Trainer._save_checkpoint does before saving"),
    Internal(f"{T}.hp_search_backend", "attribute", None, SAVE, "store_flos only outside hyper-parameter search"),
    Internal(f"{T}.callback_handler", "attribute", None, SAVE, "its callbacks' ExportableState go into the state"),
    Internal(f"{T}.control", "attribute", None, SAVE, "TrainerControl's ExportableState goes into the state"),
    Internal(f"{T}.accelerator", "attribute", None, f"{TRAINER}; {FSDP}",
             "replaced by a TPAccelerator (create_accelerator_and_postprocess)"),
    Internal(f"{T}.gather_function", "attribute", None, TRAINER,
             "bound to the accelerator's gather_for_metrics; re-bound to the TPAccelerator's dp-only one"),
    Internal(f"{T}._save_rng_state", "attribute", None, f"{LAYOUT}; {LOAD}",
             "the format of the Trainer's rng_state files, read when resuming a plain checkpoint under TP",
             ('"python"', '"numpy"', '"cpu"', "rng_state_", "rng_state.pth")),
    Internal(f"{T}._get_dataloader", "attribute", None, ACCEL,
             "builds worker_init_fn = partial(seed_worker, num_workers=..., rank=...), which TPAccelerator "
             "rebuilds with the dp rank", ("seed_worker", "num_workers=", "rank=")),
    Internal(f"{T}._mixed_mesh_grad_norm", "call", ("model", "max_norm"), BENCH,
             "clips the native-TP peer like the Trainer does; called unbound with self=None"),
    Internal("transformers.trainer_utils:seed_worker", "call", ("worker_id", "num_workers", "rank"), ACCEL,
             "recognised in a dataloader's worker_init_fn and re-bound to the dp rank"),
    Internal("transformers.trainer_utils:PREFIX_CHECKPOINT_DIR", "attribute", None, SAVE, "checkpoint-N names"),
    Internal(f"{TCB}:ExportableState.state", "call", (), SAVE, "stateful callbacks saved with the checkpoint"),
    Internal(f"{TCB}:TrainerState.stateful_callbacks", "attribute", None, SAVE, "written like the Trainer does"),
    Internal(f"{TCB}:TrainerState.best_global_step", "attribute", None, SAVE, "finds the best checkpoint to keep"),
    Internal(f"{TCB}:TrainerState.num_input_tokens_seen", "attribute", None, TRAINER, "divided by tp"),
    Internal("transformers.trainer_pt_utils:safe_globals", "call", (), LOAD,
             "torch.load(weights_only=True) of the Trainer's rng_state files (numpy globals allowed)"),
    # ---- transformers.TrainingArguments
    Internal(f"{TA}.__post_init__", "override", (), ARGS,
             "validates the layout before the TrainingArguments' __post_init__ sets up the devices"),
    Internal(f"{TA}.train_sampling_strategy", "attribute", None, ARGS,
             "'batch_rebalance' shards by global rank: refused under TP (read with getattr: a rename drops the check)"),
    Internal(f"{TA}._setup_devices", "attribute", None, f"{ARGS}; tp_trainer/app/launch.py",
             "use_cpu / ACCELERATE_USE_CPU make a torchrun CPU world one distributed world", ("ACCELERATE_USE_CPU",)),
    # ---- accelerate.Accelerator: TPAccelerator (a subclass the Trainer's mixin builds), FSDPBaselineTrainer (patch)
    Internal(f"{ACC}.__init__", "call", None, ACCEL,
             "TPAccelerator(context, **Trainer._build_accelerator_args(...)): the Trainer's own keyword arguments"),
    Internal(f"{ACC}.prepare_data_loader", "override", ("data_loader", "device_placement", "slice_fn_for_dispatch"),
             ACCEL, "shards over the dp group: a copy of its body with num_processes=dp, process_index=dp_rank"),
    Internal(f"{ACC}.prepare_model", "override", ("model", "device_placement", "evaluation_mode"), f"{ACCEL}; {FSDP}",
             "evaluation_mode=True: mixed precision/compile without DDP (FSDP: a lambda assigned on the instance)"),
    Internal(f"{ACC}.no_sync", "override", ("model",), ACCEL, "no DDP: nothing to hold back"),
    Internal(f"{ACC}.clip_grad_norm_", "override", ("parameters", "max_norm", "norm_type"), ACCEL,
             "global-norm clipping of the sharded gradients"),
    Internal(f"{ACC}.gather_for_metrics", "override", ("input_data", "use_gather_object"), ACCEL,
             "gathers over dp only and drops the last batch's padding"),
    *(Internal(f"{ACC}.{name}", "attribute", None, ACCEL, "passed on to prepare_data_loader as accelerate does")
      for name in DATALOADER_ARGS),
    Internal("accelerate.utils.dataclasses:DataLoaderConfiguration.data_seed", "attribute", None, ACCEL,
             "passed on to prepare_data_loader as accelerate does"),
    Internal(f"{ACC}._dataloaders", "attribute", None, ACCEL, "prepared dataloaders are registered there"),
    Internal(f"{ACC}.gradient_state", "attribute", None, ACCEL, "end of dataloader and remainder of the last batch"),
    Internal(f"{ACC}.scaler", "attribute", None, SAVE, "saved as scaler.pt (read with getattr)"),
    Internal("accelerate.state:GradientState.remainder", "attribute", None, ACCEL,
             "padding samples of the last batch to drop"),
    Internal("accelerate.state:GradientState.end_of_dataloader", "attribute", None, ACCEL, "see remainder"),
    Internal("accelerate.data_loader:prepare_data_loader", "call",
             ("dataloader", "device", "num_processes", "process_index", "split_batches", "put_on_device", "rng_types",
              "dispatch_batches", "even_batches", "slice_fn_for_dispatch", "use_seedable_sampler", "data_seed",
              "non_blocking", "use_stateful_dataloader"), ACCEL, "the dp-sharded dataloader"),
    Internal("accelerate.utils.operations:recursively_apply", "call", ("func", "data"), ACCEL,
             "applies the dp gather / remainder slice to nested outputs"),
    # ---- transformers models: plans, attention, loss
    Internal("transformers.modeling_utils:PreTrainedModel._tp_plan", "attribute", None, "tp_trainer/planner/hf_plan.py",
             "the model's merged HF TP plan (set per instance when the model is built)"),
    Internal("transformers.configuration_utils:PretrainedConfig.base_model_tp_plan", "attribute", None,
             "tp_trainer/planner/hf_plan.py", "merged by hand when _tp_plan is absent"),
    Internal("transformers.configuration_utils:PretrainedConfig._attn_implementation", "patch", None,
             f"{ATTN}; {MEMORY}; tp_trainer/planner/model_info.py; {LOADING}/build.py",
             "set to our registered CPU / estimate kernels (save_pretrained does not write it); a meta twin gets "
             "'eager' instead of a kernel that cannot run on meta"),
    Internal("transformers.modeling_utils:AttentionInterface._global_mapping", "attribute", None, f"{ATTN}; {MEMORY}",
             "registered once: checked before AttentionInterface.register"),
    Internal("transformers.modeling_utils:ALL_ATTENTION_FUNCTIONS", "attribute", None, ATTN,
             "modeling code that names it dispatches through the registry (dispatches_by_registry reads sources)"),
    Internal("transformers.masking_utils:ALL_MASK_ATTENTION_FUNCTIONS", "attribute", None, f"{ATTN}; {MEMORY}",
             "our kernels reuse the 'sdpa' mask function"),
    Internal("transformers.integrations.sdpa_attention:sdpa_attention_forward", "call",
             ("module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"),
             f"{ATTN}; {MEMORY}", "fallback of our CPU kernel; its signature is the one our kernels register"),
    Internal("transformers.masking_utils:find_packed_sequence_indices", "override", ("position_ids",), MEMORY,
             "replaced by 'no packing' while a step is simulated on meta tensors"),
    Internal("transformers.loss.loss_utils:ForCausalLMLoss", "call",
             ("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels"),
             "tp_trainer/parallel/cross_entropy.py",
             "VocabParallelCausalLMLoss takes its signature and falls back to it"),
    Internal("transformers.loss.loss_utils:ForMaskedLMLoss", "call",
             ("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index"),
             "tp_trainer/parallel/cross_entropy.py",
             "VocabParallelMaskedLMLoss takes its signature (no label shift) and falls back to it"),
    Internal("transformers.modeling_utils:PreTrainedModel._loss_function", "attribute", None,
             "tp_trainer/parallel/cross_entropy.py",
             "where the loss_function setter keeps an assigned loss: read to know the model's loss without "
             "the property's warning about an unrecognised loss_type"),
    Internal("transformers.modeling_utils:PreTrainedModel.loss_type", "attribute", None,
             "tp_trainer/parallel/cross_entropy.py", "the LOSS_MAPPING key the loss_function property looks up"),
    Internal("transformers.loss.loss_utils:LOSS_MAPPING", "attribute", None, "tp_trainer/parallel/cross_entropy.py",
             "loss_type -> loss function, as the loss_function property reads it"),
    Internal("transformers.modeling_utils:PreTrainedModel.loss_function", "patch", None,
             f"tp_trainer/parallel/cross_entropy.py; {DATAFLOW}",
             "replaced by the vocab-parallel cross-entropy (assigned through the property's setter; which one "
             "follows the function it returned, ForCausalLMLoss or ForMaskedLMLoss); the dataflow trace "
             "replaces it by a sentinel to see whether the model's forward calls it"),
    Internal("transformers.pytorch_utils:Conv1D.weight", "attribute", None,
             "tp_trainer/parallel/layers.py; tp_trainer/planner/model_info.py",
             "recognised by class name; weight laid out [d_in, d_out]"),
    *(Internal(f"transformers.models.{owner}.{attr}", "attribute", None, FAMILIES, "fused projection layout")
      for owner, attr in FUSED.items()),
    Internal("transformers.models.bloom.modeling_bloom:BloomAttention.forward", "patch", ("alibi",),
             f"{FAMILIES}; tp_trainer/planner/apply.py",
             "a forward pre-hook slices kwargs['alibi'] ([batch * heads, 1, keys]) to the rank's heads"),
    Internal("transformers.models.falcon.modeling_falcon:FalconAttention.forward", "patch", ("alibi",),
             f"{FAMILIES}; tp_trainer/planner/apply.py",
             "ALiBi Falcon: the same hook as Bloom's (families.attention_hooks)"),
    Internal("transformers.integrations.moe:use_experts_implementation", "attribute", None, EXPERTS,
             "fused experts modules carry their weight layout as instance flags, read with getattr",
             ("self.is_concatenated =", "self.is_transposed =", "self.has_bias =", "self.has_post_expert_norm =")),
    # ---- TRL (tp_trainer/trl/: the fused LM head TRL installs, its reference model)
    Internal("trl.trainer.utils:add_fused_lm_head", "patch", None, TRL_HEAD,
             "the model.forward it installs reads lm_head.weight (a vocabulary shard under TP): replaced by the "
             "vocab-parallel one, which mirrors its signature, label shift, config reads and MoE loss",
             ("fused_lm_head=False", "shift_labels", "num_items_in_batch", "final_logit_softcapping", "logit_scale",
              "output_multiplier", "lm_head_multiplier", "logits_scaling", "load_balancing_loss_func",
              'backbone_attr = "base_model"', "mask.sum().clamp(min=1)")),
    Internal("trl.trainer.utils:FusedCausalLMOutput", "call",
             ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask", "aux_loss"),
             TRL_HEAD, "what the vocab-parallel fused head returns"),
    Internal("trl.trainer.sft_trainer:SFTTrainer.__init__", "attribute", None, "tp_trainer/trl/sft.py",
             "installs its fused head last, asking for these outputs (sft.SFT_OUTPUTS)",
             ('outputs=("log_probs", "entropy", "is_top1")',)),
    Internal("trl.trainer.dpo_trainer:DPOTrainer.__init__", "attribute", None, "tp_trainer/trl/dpo.py",
             "installs the fused heads (dpo.DPO_OUTPUTS) and hands its reference model to accelerator.prepare_model, "
             "where TPDPOTrainer shards it",
             ('outputs = ("log_probs", "entropy", "mean_logits", "is_top1")', "add_fused_lm_head(self.ref_model)",
              "self.accelerator.prepare_model(self.ref_model, evaluation_mode=True)")),
    Internal("trl.trainer.dpo_trainer:DPOTrainer.ref_model", "attribute", None, "tp_trainer/trl/dpo.py",
             "the reference model, recognised when it reaches prepare_model"),
    Internal("trl.trainer.dpo_trainer:DPOTrainer.compute_ref_log_probs", "override", ("model", "inputs"),
             "tp_trainer/trl/dpo.py", "precomputed reference log-probs run inside __init__: the head is replaced first"),
    Internal("transformers.models.mixtral.modeling_mixtral:load_balancing_loss_func", "call",
             ("gate_logits", "num_experts", "top_k", "attention_mask"), TRL_HEAD,
             "the MoE load-balancing loss TRL's fused head adds, called as it calls it"),
    # ---- PEFT LoRA (tp_trainer/parallel/lora.py, planner/lora.py, checkpoint/lora.py)
    Internal("peft.tuners.lora.layer:Linear.forward", "attribute", None, "tp_trainer/parallel/lora.py",
             "the adapters' TP placement relies on the LoRA forward adding B(A(drop(x))) * scaling to the base output, "
             "the base and the adapters reading the layer's own input: a pre-hook on the layer gives both f(x), a "
             "forward hook reduces a row-parallel base's partial sum once after the adapters",
             ("result = self.base_layer(x, *args, **kwargs)",
              "result = result + lora_B(lora_A(dropout(x))) * scaling")),
    Internal("peft.tuners.lora.layer:Embedding._embed", "attribute", None, "tp_trainer/parallel/layers.py",
             "an embedding adapter's lookup reads its base layer's nn.Embedding options: VocabParallelEmbedding has them",
             ("padding_idx=base_layer.padding_idx", "max_norm=base_layer.max_norm", "norm_type=base_layer.norm_type",
              "scale_grad_by_freq=base_layer.scale_grad_by_freq", "sparse=base_layer.sparse")),
    Internal("peft.utils.save_and_load:has_valid_embedding_base_layer", "attribute", None, "tp_trainer/checkpoint/lora.py",
             "PEFT saves a targeted embedding's base weight only for an nn.Embedding/nn.Linear base: a meta module of "
             "that type stands in for the TP layer while PEFT selects",
             ("isinstance(layer.base_layer, (torch.nn.Linear, torch.nn.Embedding))",)),
    Internal("peft.peft_model:PeftModel.save_pretrained", "call", ("save_directory", "is_main_process"),
             "tp_trainer/checkpoint/lora.py", "writes the adapter directory from the gathered tensors passed as "
             "state_dict= (a keyword it forwards to get_peft_model_state_dict)", ('state_dict=kwargs.get("state_dict", None)',)),
    # ---- transformers' from_pretrained, mirrored by shard-only loading (tp_trainer/loading)
    Internal("transformers.modeling_utils:_get_dtype", "call",
             ("dtype", "checkpoint_files", "config", "sharded_metadata", "state_dict", "weights_only", "hf_quantizer"),
             f"{LOADING}/build.py", "the dtype from_pretrained settles on ('auto': config.dtype, else the checkpoint's); "
             "passed positionally"),
    Internal("transformers.configuration_utils:PretrainedConfig._experts_implementation", "patch", None,
             f"{LOADING}/build.py", "from_pretrained(experts_implementation=...) sets it on the config; so do we"),
    Internal("transformers.modeling_utils:PreTrainedModel.get_init_context", "call",
             ("dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels", "config"), f"{LOADING}/build.py",
             "the contexts from_pretrained builds the model under (meta device, default dtype, ties deferred); "
             "passed positionally", ('torch.device("meta")', "no_tie_weights")),
    Internal("transformers.modeling_utils:PreTrainedModel._from_config", "call", ("config",), f"{LOADING}/build.py",
             "builds a model class (not an auto class) from its config, as the auto classes' from_config does"),
    Internal("transformers.modeling_utils:PreTrainedModel._get_dtype_plan", "call", ("dtype",), f"{LOADING}/pretrained.py",
             "_keep_in_fp32_modules: the tensors from_pretrained loads in fp32 whatever the dtype"),
    Internal("transformers.modeling_utils:PreTrainedModel.initialize_weights", "call", (), f"{LOADING}/materialize.py",
             "computes the buffers the checkpoint does not hold (rotary inv_freq, embed_scale) as from_pretrained "
             "does; skips tensors flagged _is_hf_initialized"),
    Internal("transformers.initialization:normal_", "attribute", None, f"{LOADING}/materialize.py",
             "init functions skip a tensor flagged _is_hf_initialized: loaded parameters are flagged so that "
             "initialize_weights computes only the buffers", ('getattr(tensor, "_is_hf_initialized", False)',)),
    Internal("transformers.generation.utils:GenerationMixin.adjust_generation_fn", "call",
             ("generation_config", "from_auto_class", "from_pipeline", "pretrained_model_name_or_path", "cache_dir",
              "force_download", "proxies", "local_files_only", "token", "revision", "subfolder", "trust_remote_code"),
             f"{LOADING}/pretrained.py", "reads generation_config.json as from_pretrained does (keywords)"),
    Internal("transformers.conversion_mapping:get_model_conversion_mapping", "call", ("model", "key_mapping"),
             f"{LOADING}/keys.py", "the model's checkpoint renamings and conversions (legacy, MoE experts fusion)"),
    Internal("transformers.core_model_loading:rename_source_key", "call",
             ("source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict"),
             f"{LOADING}/keys.py", "checkpoint key -> model tensor name and the converter pattern it matched"),
    Internal("transformers.core_model_loading:dot_natural_key", "call", ("s",), f"{LOADING}/keys.py",
             "from_pretrained collects a converter's tensors in this key order: the experts' stacking order"),
    Internal("transformers.core_model_loading:WeightTransform.add_tensor", "call",
             ("target_key", "source_key", "source_pattern", "future"), f"{LOADING}/keys.py",
             "feeds a converter callables (its sync-loading path), meta tensors first, then the sources read whole"),
    Internal("transformers.core_model_loading:WeightConverter.convert", "call", ("layer_name", "model", "config"),
             f"{LOADING}/keys.py", "runs a conversion: on meta for the targets and shapes, on real tensors when no "
             "lazy form exists"),
    Internal("transformers.core_model_loading:WeightConverter.operations", "attribute", None, f"{LOADING}/keys.py",
             "MergeModulelist/Concatenate/Transpose chains become lazy expressions (their dim, dim0/dim1, check_dims)"),
    Internal("transformers.core_model_loading:build_glob_alternation", "call", ("globs",), f"{LOADING}/materialize.py",
             "matches _keep_in_fp32_modules patterns to tensor names as from_pretrained does"),
    Internal("transformers.core_model_loading:revert_weight_conversion", "attribute", None, f"{LOADING}/pretrained.py",
             "save_pretrained reverts model._weight_conversions, which from_pretrained sets and so do we",
             ('getattr(model, "_weight_conversions", None)',)),
    # ---- torch
    Internal("torch:_foreach_mul_", "call", None,
             "tp_trainer/zero/optimizer.py; tp_trainer/zero/fully_sharded_optimizer.py", "multi-tensor gradient clipping"),
    Internal("torch.distributed.fsdp._fully_shard._fsdp_state:FSDPState.init", "attribute", None,
             "tp_trainer/zero/fully_sharded.py",
             "ZeRO-3 puts tp_spec/tp_grad_sum on the parameters FSDP2 gathers with a forward pre-hook that must run "
             "after FSDP2's own pre-forward (the unshard), which FSDP2 registers with prepend=True",
             ("self._pre_forward, prepend=True",)),
    Internal("torch.nn.modules.module:Module._apply", "patch", ("fn", "recurse"), "tp_trainer/zero/fully_sharded.py",
             "ZeRO-3 sets the dp-sharded root's _apply (instance attribute) to call the class's and then put tp_spec/"
             "tp_grad_sum back: it converts DTensor parameters with torch.utils.swap_tensors, which swaps __dict__",
             ("swap_tensors",)),
    Internal("torch:_foreach_norm", "call", None, "tp_trainer/parallel/grads.py", "gradient norm, one pass per tensor"),
    Internal("torch:_assert_async", "call", None, "tp_trainer/parallel/layers.py",
             "device-side vocabulary range check, with a message (the aten::_assert_async.msg overload)"),
    Internal("torch:Tensor._base", "attribute", None, MEMORY, "a saved view counts its base once"),
    Internal("torch.nn:Module._forward_hooks", "patch", None, "tp_trainer/parallel/rmsnorm.py",
             "cleared on the probe copy of a norm"),
    Internal("torch.nn:Module._forward_pre_hooks", "patch", None, "tp_trainer/parallel/rmsnorm.py",
             "cleared on the probe copy of a norm"),
    Internal("torch.nn:Module._parameters", "attribute", None, f"{EXPERTS}; {LOADING}/materialize.py",
             "a module's own down_proj, if any; every module's own parameters, tied ones under each name"),
    Internal("torch.nn:Module._buffers", "attribute", None, f"{LOADING}/materialize.py",
             "every module's own buffers, shared ones under each name"),
    Internal("torch.nn.modules.conv:_ConvNd", "attribute", None, EXPERTS, "3-D convolution weights are not experts"),
    Internal("torch.fx.experimental._config:meta_nonzero_assume_all_nonzero", "attribute", None,
             f"tp_trainer/planner/validate.py; {DATAFLOW}",
             "patched on while validating a plan on meta (and tracing its dataflow): MoE routing's nonzero() "
             "gets every token"),
    Internal("torch.nn:Module._non_persistent_buffers_set", "attribute", None,
             f"tp_trainer/parallel/gather.py; tp_trainer/checkpoint/export.py; {SAVE}; {LOAD}",
             "which buffers belong in saved state dicts"),
    Internal("torch._opaque_base:OpaqueBase", "attribute", None, "tp_trainer/parallel/collectives.py",
             "TPComm subclasses it: a custom operator may then take the object (compiled_ops.py)"),
    Internal("torch._library.opaque_object:register_opaque_type", "call", ("typ", "members"),
             "tp_trainer/parallel/compiled_ops.py",
             "compiled TP collectives take the TPComm itself as a reference-type opaque input"),
    Internal("torch._library.opaque_object:MemberType.USE_REAL", "attribute", None,
             "tp_trainer/parallel/compiled_ops.py", "Dynamo reads TPComm.size()/rank() from the real object"),
    Internal("torch.distributed:all_gather_single", "call", ("output_tensor", "input_tensor", "group"),
             "tp_trainer/parallel/collectives.py", "looked up by name (torch 2.13), else all_gather_into_tensor"),
    Internal("torch.distributed:reduce_scatter_single", "call", ("output", "input", "op", "group"),
             "tp_trainer/parallel/collectives.py", "looked up by name (torch 2.13), else reduce_scatter_tensor"),
    Internal("torch.distributed.distributed_c10d:_set_pg_timeout", "call", ("timeout", "group"),
             "tp_trainer/parallel/collectives.py",
             "collectives.bound_waits: --ddp_timeout on the world, TP and DP groups (accelerate's CPU path and "
             "the device mesh's subgroups keep torch's 30-minute default otherwise)"),
    Internal("torch.distributed:ProcessGroup._get_backend", "call", ("device",), "tp_trainer/parallel/collectives.py",
             "collectives.group_timeout_s reads a group's timeout from its backend's options"),
    Internal("torch.distributed:ProcessGroupGloo.Options._timeout", "attribute", None,
             "tp_trainer/parallel/collectives.py",
             "the group's timeout, which bounds the shared-memory transport's waits as it bounds gloo's"),
    Internal("torch.distributed.elastic.rendezvous.dynamic_rendezvous:DynamicRendezvousHandler.next_rendezvous",
             "attribute", None, "tp_trainer/app/launch.py",
             "with a shared rendezvous store every restart gets the first attempt's (and its stale keys: restarted "
             "gloo ranks connect to dead peers, pytorch#135712); launch.launcher_env opts out with this variable",
             ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "self._bootstrap_store_info is None")),
    Internal("torch.utils._python_dispatch:TorchDispatchMode.__torch_dispatch__", "override",
             ("func", "types", "args", "kwargs"), f"{TRACE}; {BENCH}; {DATAFLOW}",
             "LiveTensorBytes follows every storage an op creates; the benchmark counts collective bytes; the "
             "planner's dataflow trace tags every tensor an op makes with its provenance"),
    Internal("torch.utils._pytree:tree_leaves", "call", ("tree",), f"{TRACE}; {DATAFLOW}",
             "the tensors in an op's outputs"),
    Internal("torch.utils._pytree:tree_map", "call", ("func", "tree"), DATAFLOW,
             "an op's arguments with the traced tensors replaced by their feature-index shadows"),
    Internal("torch._ops:OpOverload.overloadpacket", "attribute", None, DATAFLOW,
             "ops are classified by packet (aten.view, aten.split, ...), whatever the overload"),
    Internal("torch._ops:OpOverload._schema", "attribute", None, TRACE, "aliasing outputs are not new storage"),
    Internal("torch._C:FunctionSchema.returns", "attribute", None, TRACE, "see OpOverload._schema"),
    Internal("torch._C:Argument.alias_info", "attribute", None, TRACE, "see OpOverload._schema"),
    Internal("torch.multiprocessing.reductions:StorageWeakRef.cdata", "attribute", None, TRACE,
             "a storage's identity while it lives"),
    Internal("torch.multiprocessing.reductions:StorageWeakRef.expired", "call", (), TRACE, "a storage was freed"),
    Internal("torch.ops:_c10d_functional.all_reduce", "attribute", None, BENCH,
             "collectives are counted by op namespace ('c10d', '_c10d_functional')"),
)


# --------------------------------------------------------------------------------------------- the checks
def resolve(internal: Internal):
    """Import ``internal.qualname`` and return the object (an :class:`InstanceAttribute` for an attribute set on
    instances only); raises :class:`MissingInternal` naming the internal when it is gone."""
    module_name, _, path = internal.qualname.partition(":")
    where = f"{internal.qualname} ({internal.kind}, used in {internal.used_in})"
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever a module that moved raises when imported
        raise MissingInternal(f"{where}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if i == len(parts) - 1 and inspect.isclass(obj) and _set_on_instances(obj, part):
                return InstanceAttribute(obj, part)
            raise MissingInternal(f"{where}: {'.'.join([module_name] + parts[:i + 1])} does not exist") from None
    return obj


def check(internal: Internal) -> list[str]:
    """What no longer holds of ``internal`` in the installed libraries (empty: all is as the table says)."""
    try:
        obj = resolve(internal)
    except MissingInternal as err:
        return [str(err)]
    problems = []
    if internal.params is not None:
        names = _param_names(obj)
        expected = ", ".join(internal.params)
        if names is None:
            problems.append(f"{internal.qualname}: its signature cannot be read (we rely on ({expected}))")
        elif internal.kind == "override" and names != internal.params:
            problems.append(f"{internal.qualname} now has the signature ({', '.join(names)}); "
                            f"{internal.used_in} replaces it with ({expected})")
        elif internal.kind != "override" and not _in_order(internal.params, names):
            problems.append(f"{internal.qualname} now takes ({', '.join(names)}); {internal.used_in} relies on "
                            f"({expected}) in this order")
    if internal.source_has:
        source = _source(obj)
        missing = [text for text in internal.source_has if text not in source]
        if missing:
            problems.append(f"{internal.qualname}: its source no longer contains {missing}, which "
                            f"{internal.used_in} relies on ({internal.why})")
    return problems


def _set_on_instances(cls: type, name: str) -> bool:
    """``name`` is assigned to ``self`` in the source of ``cls`` or a base, or is one of its dataclass fields."""
    if name in getattr(cls, "__dataclass_fields__", {}):
        return True
    assigned = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=(?!=)|__setattr__\(\s*['\"]{re.escape(name)}['\"]")
    for klass in cls.__mro__:
        try:
            if assigned.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):  # builtins and C extensions have no Python source
            continue
    return False


def _param_names(obj) -> tuple[str, ...] | None:
    """Parameter names of a callable without ``self``/``cls``; None when they cannot be read."""
    try:
        names = tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):  # a builtin: pybind11 puts "name(arg: type, ...) -> type" first in its docstring
        match = re.match(r"\s*\w+\((.*?)\)\s*(->|$)", (getattr(obj, "__doc__", None) or ""), re.MULTILINE)
        if match is None:
            return None
        names = tuple(p.split(":")[0].split("=")[0].strip() for p in match.group(1).split(",") if p.strip())
    return names[1:] if names[:1] in (("self",), ("cls",)) else names


def _in_order(wanted: tuple[str, ...], names: tuple[str, ...]) -> bool:
    remaining = iter(names)
    return all(name in remaining for name in wanted)


def _source(obj) -> str:
    if isinstance(obj, InstanceAttribute):
        obj = obj.owner
    if isinstance(obj, property):
        obj = obj.fget
    elif isinstance(obj, functools.cached_property):
        obj = obj.func
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""
