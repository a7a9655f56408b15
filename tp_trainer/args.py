"""``TPArgumentsMixin``: the parallel layout as fields of any ``TrainingArguments`` subclass.

``TPTrainingArguments`` is the mixin on ``transformers.TrainingArguments``; ``tp_trainer.trl``'s
``TPSFTConfig``/``TPDPOConfig`` are the same mixin on TRL's configs. Put the mixin first, so that its
``__post_init__`` validates the layout before ``TrainingArguments.__post_init__`` joins the process
group, and decorate the subclass with ``@dataclass``::

    @dataclass
    class MyArguments(TPArgumentsMixin, TrainingArguments): ...

Parsed by ``HfArgumentParser`` from the command line, YAML or JSON like every other field.
Invalid values fail at construction, before a model or a process group is touched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class TPArgumentsMixin:
    """Fields and validation of the dp x tp layout; mix into a ``TrainingArguments`` subclass (first base)."""

    tp_size: int = field(default=1, metadata={
        "help": "Tensor-parallel degree: ranks that share one copy of the model, each holding 1/tp_size of "
                "every split layer. The data-parallel degree is world_size / tp_size."})
    zero_stage: int = field(default=0, metadata={
        "help": "ZeRO stage over the data-parallel group: 0 = plain data parallel, 1 = optimizer states "
                "sharded, 2 = optimizer states and gradients sharded, 3 = parameters too (FSDP2 over the dp group: "
                "each block gathered for its forward and backward)."})
    tp_plan: str | None = field(default=None, metadata={
        "help": "'auto' (default) or a JSON mapping of module patterns to styles that overrides the automatic "
                "plan, e.g. '{\"model.layers.*.mlp.down_proj\": \"rowwise\"}'. Styles: colwise, rowwise, "
                "colwise_gather_output, rowwise_split_input, vocab_embedding, vocab_lm_head, replicated, "
                "replicated_grad_sum (and Hugging Face's names)."})
    tp_config: str | None = field(default=None, metadata={
        "help": "A DeepSpeed-style JSON (tensor_parallel.autotp_size, zero_optimization.stage, "
                "zero_optimization.gather_16bit_weights_on_model_save) read instead of the flags above."})
    gather_16bit_weights_on_model_save: bool | None = field(default=None, metadata={
        "help": "save_model writes 16-bit weights (bf16 unless the model is fp16). Default: when training in bf16/fp16."})
    cpu_kernels: str = field(default="auto", metadata={
        "help": "'auto' (default): CPU runs use tp_trainer's CPU kernels and transports (shared-memory TP "
                "all-reduce, CPU causal attention, token-split 16-bit norms, malloc tuning), "
                "each where it applies; 'off': the stock PyTorch / transformers modules and gloo's collectives. "
                "GPU runs use none of them either way."})
    sequence_parallel: bool = field(default=False, metadata={
        "help": "Sequence parallelism: the activations between the tensor-parallel regions (norms, dropout, "
                "residual adds) split along the sequence over the TP group, all-gathered before attention and MLP "
                "and reduce-scattered after them: about 1/tp_size of their memory per rank, the same losses. "
                "Needs tp_size > 1; replaces the CPU token-split norms."})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if issubclass(cls, TrainingArguments) and mro.index(TrainingArguments) < mro.index(TPArgumentsMixin):
            raise TypeError(f"{cls.__name__}: put TPArgumentsMixin before {TrainingArguments.__name__} (or its "
                            "subclass) in the bases, so that the layout is validated before the process group is "
                            f"joined: class {cls.__name__}(TPArgumentsMixin, ...)")

    def __post_init__(self):
        if isinstance(self.tp_plan, dict):
            self.tp_plan = json.dumps(self.tp_plan)
        if self.tp_config is not None:
            from .tp_config import apply_tp_config
            apply_tp_config(self)
        self.validate_layout()  # before the Trainer's __post_init__ joins the process group
        self._use_cpu_when_launched_without_accelerator()
        super().__post_init__()

    def validate_layout(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size must be an integer >= 1, got {self.tp_size!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % self.tp_size:
            single = ""
            if world == 1 and "RANK" not in os.environ and any(k.startswith("ACCELERATE_") for k in os.environ):
                single = (" accelerate launched a single process: on a machine without GPUs `accelerate launch "
                          "--num_processes N` starts one process unless given --multi_gpu; use `accelerate launch "
                          f"--multi_gpu --num_processes {self.tp_size}` (with --cpu on CPUs) or torchrun "
                          f"--nproc-per-node {self.tp_size}.")
            raise ValueError(
                f"WORLD_SIZE={world} is not divisible by tp_size={self.tp_size}: launch a multiple of "
                f"{self.tp_size} processes or choose a tp_size that divides {world}.{single}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.zero_stage == 3 and getattr(self, "torch_compile", False):
            raise ValueError("zero_stage=3 with --torch_compile is not supported yet (FSDP2's per-block gathers "
                             "and the TP metadata hooks break the graph); compile with zero_stage 1 or 2")
        self.user_tp_plan()  # parse errors surface now
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"sequence_parallel must be true or false, got {self.sequence_parallel!r}")
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("sequence_parallel=True with tp_size=1: there is no TP group to split the sequence over; "
                             "set tp_size > 1 or drop --sequence_parallel")
        from .parallel.kernels import check_cpu_kernels

        check_cpu_kernels(self.cpu_kernels)
        if self.parallel_active and self.fp16:
            raise ValueError("fp16 (loss scaling) is not supported with tp_size > 1 or zero_stage > 0; use --bf16")
        if self.parallel_active and self.deepspeed:
            raise ValueError("--deepspeed and tp_size/zero_stage are two ways of doing the same thing; pick one "
                             "(tp_trainer reads DeepSpeed JSON via --tp_config)")
        if self.tp_size > 1 and getattr(self, "use_liger_kernel", False):
            raise ValueError("use_liger_kernel is not supported with tp_size > 1: Liger's kernels "
                             "replace the modules the planner shards, and its fused cross-entropy reads the whole "
                             "lm_head.weight (a vocabulary shard under TP); set use_liger_kernel=False")
        if self.parallel_active and getattr(self, "train_sampling_strategy", None) == "batch_rebalance":
            raise ValueError("train_sampling_strategy='batch_rebalance' shards by global rank and would feed "
                             "different batches to the ranks of a TP group; use 'random' or 'group_by_length'")

    def _use_cpu_when_launched_without_accelerator(self) -> None:
        """Under torchrun on a machine without CUDA, accelerate only joins the process group when told
        ``use_cpu``; otherwise every rank believes it is process 0 of 1 (each logs and saves, no dp
        sharding). A TP/ZeRO world has no other sensible device there, so choose it and say so."""
        import torch

        launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # torchrun's env, not just WORLD_SIZE
        if (self.parallel_active and not self.use_cpu and launched and int(os.environ.get("WORLD_SIZE", "1")) > 1
                and not torch.cuda.is_available()):
            from transformers.utils import logging

            logging.get_logger(__name__).info("no CUDA device under a distributed launch: using the CPU (gloo)")
            self.use_cpu = True

    @property
    def parallel_active(self) -> bool:
        """True when TPTrainer replaces the Trainer's own data parallelism."""
        return self.tp_size > 1 or self.zero_stage > 0

    def user_tp_plan(self) -> dict[str, str] | None:
        """The ``tp_plan`` override as a dict (``None`` for 'auto'); malformed JSON, a non-object or an
        unknown style is a ValueError naming ``tp_plan``, the value and the expected form."""
        from .planner.validate import parse_tp_plan

        return parse_tp_plan(self.tp_plan, option="tp_plan")


@dataclass
class TPTrainingArguments(TPArgumentsMixin, TrainingArguments):
    """``transformers.TrainingArguments`` plus the parallel layout (:class:`TPArgumentsMixin`)."""
