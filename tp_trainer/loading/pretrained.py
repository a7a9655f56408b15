"""``from_pretrained(path, tp_size=N)``: a tensor-parallel model whose ranks read only their own shards.

In order, on every rank (no rank waits for another, nothing is communicated):

1. read the safetensors headers (:mod:`.files`) and build the model on ``meta`` as
   ``from_pretrained`` builds it (:mod:`.build`);
2. map checkpoint keys to model tensors with transformers' renaming and conversion rules, settle
   ties the checkpoint holds both sides of (:mod:`.keys`), and check every parameter's source and
   shape (:func:`.materialize.check_sources`): a mismatch is an error here, before anything is
   allocated;
3. plan (``plan_tensor_parallel``, on the meta model), compute the buffers the checkpoint does not
   hold as ``from_pretrained`` does (:func:`.materialize.compute_buffers`), and shard
   (``apply_tensor_parallel``, on meta: every sharded parameter gets its ``tp_spec``);
4. read each tensor's slices onto the rank's device (:func:`.materialize.materialize`); with
   ``zero_stage=3``, first shard the ``meta`` model over dp (``shard_parameters_over_dp``), allocate
   the fp32 shards, and read only this dp rank's rows of each TP slice
   (:func:`.materialize.materialize_dp_sharded`): no rank holds more than its 1/(tp x dp) of the
   model (replicated tensors: 1/dp) plus one box in flight.

The result equals ``from_pretrained(path)`` followed by
``apply_tensor_parallel(model, plan_tensor_parallel(model, N), context)``, tensor for tensor,
bit for bit. Per rank the weights cost their shards (replicated tensors in full) plus one
tensor segment in flight, instead of the whole model first.

The model carries a :class:`ShardedState` (``model.tp_sharded_state``): the plan, the context
and the unsharded parameter count; :func:`sharded_state` returns it, for ``TPTrainer`` to take
the plan and context instead of planning and sharding again.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch.nn as nn
from transformers.utils import logging

from ..parallel.context import ParallelContext
from ..planner import Plan, apply_tensor_parallel, plan_tensor_parallel
from .build import build_meta_model, check_directory, split_kwargs
from .files import LoadError, SafetensorsDir
from .keys import map_sources, resolve_ties
from .materialize import check_sources, compute_buffers, materialize, materialize_dp_sharded, target_dtypes

logger = logging.get_logger(__name__)

MARKER = "tp_sharded_state"


class ShardedState(NamedTuple):
    plan: Plan
    context: ParallelContext
    full_parameters: int  # parameters of the unsharded model (tied ones once)
    structure: list[tuple[str, tuple[int, ...]]]  # the unsharded model's (parameter name, shape), in order
    sequence_parallel: bool = False
    zero_stage: int = 0  # 3: loaded sharded over dp too (shard_parameters_over_dp ran while loading)


def from_pretrained(name_or_path, tp_size: int | None = None, *, context: ParallelContext | None = None,
                    user_plan: dict[str, str] | None = None, model_class=None, key_mapping: dict | None = None,
                    use_cpu: bool = False, cpu_kernels: str = "auto", sequence_parallel: bool = False,
                    zero_stage: int = 0, **kwargs) -> nn.Module:
    """The model in directory ``name_or_path``, tensor-parallel over ``tp_size`` ranks, each rank reading its shards.

    ``context``: the :class:`ParallelContext` to shard on (default: ``ParallelContext.from_environment(tp_size,
    use_cpu=..., cpu_kernels=...)``, as ``TPTrainer`` builds it); ``user_plan``: overrides of the plan, as
    ``--tp_plan``; ``sequence_parallel``: as ``--sequence_parallel`` (planned with the shards); ``zero_stage``: as
    ``--zero_stage`` (3: the model comes back sharded over dp as well, FSDP2 fp32 master shards, each rank having
    read only its rows; 0, 1, 2: TP shards only, the optimizer shards later); ``model_class``: an auto class
    (default ``AutoModelForCausalLM``) or a model class;
    ``key_mapping`` and ``**kwargs``: as for transformers' ``from_pretrained`` (``dtype``, ``attn_implementation``,
    ``trust_remote_code``, config overrides; options that place or fetch weights otherwise are refused).
    """
    if context is None and tp_size is None:
        raise LoadError("tp_trainer.from_pretrained needs tp_size= (or context=)")
    if context is not None and tp_size is not None and tp_size != context.tp_size:
        raise LoadError(f"tp_size={tp_size} but context has tp_size={context.tp_size}: pass one of them")
    if zero_stage not in (0, 1, 2, 3):
        raise LoadError(f"zero_stage={zero_stage!r}: pass 0, 1, 2 or 3 (as --zero_stage)")
    start = time.perf_counter()
    path = check_directory(name_or_path)
    split_kwargs(kwargs)  # refused options, before the process group
    files = SafetensorsDir(path)  # headers: a missing or truncated file fails here
    try:
        if context is None:
            context = ParallelContext.from_environment(tp_size, use_cpu=use_cpu, cpu_kernels=cpu_kernels)
        model, dtype = build_meta_model(path, files, kwargs, model_class=model_class)
        keymap = map_sources(model, files, key_mapping=key_mapping)
        dtypes = target_dtypes(model, model._get_dtype_plan(dtype))
        resolve_ties(model, keymap, files, dtypes)
        check_sources(model, keymap, files)
        full_parameters = sum(p.numel() for p in model.parameters())
        structure = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        plan = plan_tensor_parallel(model, context.tp_size, user_plan=user_plan)
        compute_buffers(model, keymap, device=context.device)  # before apply: TP layers copy some (embed_scale)
        apply_tensor_parallel(model, plan, context, sequence_parallel=sequence_parallel)
        if zero_stage == 3:
            held = materialize_dp_sharded(model, keymap, files, context=context, dtypes=dtypes)
        else:
            held = materialize(model, keymap, files, device=context.device, dtypes=dtypes)
    finally:
        files.close()
    if keymap.unexpected:
        logger.warning(f"{path}: checkpoint tensors this model does not use: {keymap.unexpected[:8]}"
                       + (f" (and {len(keymap.unexpected) - 8} more)" if len(keymap.unexpected) > 8 else ""))
    model._weight_conversions = keymap.conversions  # as from_pretrained: save_pretrained writes this layout back
    if hasattr(model, "adjust_generation_fn"):  # generation_config.json, as from_pretrained reads it
        model.adjust_generation_fn(generation_config=None, from_auto_class=True, from_pipeline=None,
                                   pretrained_model_name_or_path=path, cache_dir=None, force_download=False,
                                   proxies=None, local_files_only=True, token=None, revision=None, subfolder="",
                                   trust_remote_code=kwargs.get("trust_remote_code"))
    model.eval()  # as from_pretrained returns it
    setattr(model, MARKER, ShardedState(plan, context, full_parameters, structure, sequence_parallel, zero_stage))
    dp = f", dp_rank {context.dp_rank} of {context.dp_size}, zero_stage=3" if zero_stage == 3 else ""
    logger.info(f"tp_trainer: {path} loaded shard-only on rank {context.rank} (tp_rank {context.tp_rank} of "
                f"{context.tp_size}{dp}): {held / 2**20:.1f} MiB of weights in "
                f"{time.perf_counter() - start:.1f} s")
    return model


def sharded_state(model: nn.Module, *, tp_size: int | None = None, use_cpu: bool | None = None,
                  cpu_kernels: str | None = None, sequence_parallel: bool | None = None,
                  zero_stage: int | None = None) -> ShardedState | None:
    """The :class:`ShardedState` of a model built by :func:`from_pretrained`; None for any other model.

    The keywords are what the caller (``TPTrainer``: its arguments) would have built the context with; a model
    loaded on another layout or device is an error naming both values and the fix. ``zero_stage``: stages 0, 1 and 2
    load the same TP shards; 3 against any other is a mismatch (a dp-sharded model cannot be trained unsharded,
    and training at 3 a model loaded otherwise would have held its whole TP shard per rank while loading)."""
    state = getattr(model, MARKER, None)
    if state is None:
        return None
    ctx = state.context
    wrong = []
    if tp_size is not None and ctx.tp_size != tp_size:
        wrong.append(f"tp_size={ctx.tp_size} (asked: tp_size={tp_size})")
    if use_cpu and ctx.device.type != "cpu":
        wrong.append(f"device {ctx.device} (asked: use_cpu=True)")
    if cpu_kernels is not None and ctx.kernels.cpu_kernels != cpu_kernels:
        wrong.append(f"cpu_kernels={ctx.kernels.cpu_kernels!r} (asked: cpu_kernels={cpu_kernels!r})")
    if sequence_parallel is not None and state.sequence_parallel != sequence_parallel:
        wrong.append(f"sequence_parallel={state.sequence_parallel} (asked: sequence_parallel={sequence_parallel})")
    if zero_stage is not None and (state.zero_stage == 3) != (zero_stage == 3):
        wrong.append(f"zero_stage={state.zero_stage} (asked: zero_stage={zero_stage})")
    if wrong:
        raise LoadError(f"the model was loaded by tp_trainer.from_pretrained with {', '.join(wrong)}: load it with "
                        "the same tp_size, use_cpu, cpu_kernels, sequence_parallel and zero_stage as the training "
                        "arguments")
    return state
