"""Ordinary Hugging Face model directories from a TP model (``save_model``) or a sharded checkpoint.

``save_model`` walks ``model.named_parameters()`` (tied weights appear once) and, tensor by
tensor, all-gathers the TP shards (``gather_full``: one all-gather over the TP group per
tensor) and, when fp32 weights of a 16-bit model are asked for, first the fp32 ZeRO master
partitions over dp (one all-gather per bucket). The main process keeps each full tensor, cast
to the save dtype, and the others drop it at once, so no rank holds more than the full model
plus one tensor. The main process then writes with ``save_pretrained`` (safetensors, sharded
with an index above ``max_shard_size``, config, generation config) and adds the tokenizer.

The save dtype (:func:`resolve_save_dtype`) follows DeepSpeed's
``gather_16bit_weights_on_model_save``: 16-bit when that flag is set, or, when it is unset,
when training in bf16/fp16 or when the model's weights are 16-bit; fp32 otherwise (an fp32 save
of 16-bit weights writes the fp32 ZeRO masters). 16-bit means the model's dtype when it is
already 16-bit, fp16 when training in fp16, bf16 otherwise. Weights are cast with ``Tensor.to``, so
the file holds exactly the gathered weights rounded to that dtype.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from transformers.utils import logging

from ..parallel.gather import gather_full, persistent_buffers
from ..zero.fully_sharded import tp_local_tensor
from .layout import MANIFEST, unwrap_optimizer
from .load import CheckpointReader
from .lora import merged_model, save_adapter, writes_adapter_directory

logger = logging.get_logger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_dtype(model) -> torch.dtype:
    if getattr(model, "tp_compute_dtype", None) is not None:  # ZeRO-3: fp32 shards, 16-bit compute
        return model.tp_compute_dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_save_dtype(args, model) -> torch.dtype:
    """The dtype ``save_model`` writes for these training arguments (see the module docstring)."""
    flag = getattr(args, "gather_16bit_weights_on_model_save", None)
    current = model_dtype(model)
    if flag is None:
        flag = bool(args.bf16 or args.fp16) or current in (torch.bfloat16, torch.float16)
    if not flag:
        return torch.float32
    if current in (torch.bfloat16, torch.float16):
        return current
    return torch.float16 if args.fp16 else torch.bfloat16


@torch.no_grad()
def gather_state_dict(model, context, *, dtype: torch.dtype, optimizer=None, keep: bool = True) -> dict | None:
    """Full HF state dict (parameters + persistent buffers) cast to ``dtype``; collective over TP/dp.

    ``keep=False`` (non-main ranks) joins the collectives and returns ``None``.
    """
    tp_group = context.tp_group if context is not None else None
    optimizer = unwrap_optimizer(optimizer)
    params = list(model.named_parameters())
    use_masters = (dtype == torch.float32 and optimizer is not None and hasattr(optimizer, "iter_local_masters")
                   and any(p.dtype != torch.float32 for _, p in params))
    if use_masters:  # fp32 from a 16-bit model: the fp32 master weights are the better source
        locals_ = optimizer.iter_local_masters([p for _, p in params])
    else:
        locals_ = ((p, tp_local_tensor(p)) for _, p in params)  # ZeRO-3: gathered over dp first
    out = {} if keep else None
    for (name, p), (_, local) in zip(params, locals_):
        full = gather_full(local, getattr(p, "tp_spec", None), tp_group)
        if keep:
            out[name] = full.to(device="cpu", dtype=dtype if full.is_floating_point() else full.dtype)
    if keep:
        for name, b in persistent_buffers(model):
            out[name] = b.detach().to(device="cpu", dtype=dtype if b.is_floating_point() else b.dtype)
    return out


def write_hf_model_dir(model, state_dict: dict, output_dir: str, *, dtype: torch.dtype,
                       max_shard_size: str | int = "5GB") -> None:
    """``save_pretrained(state_dict=...)`` plus the config's ``dtype`` set to what the files hold."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, state_dict=state_dict, max_shard_size=max_shard_size)
    cfg_path = os.path.join(output_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save_model(model, output_dir: str, *, context, dtype: torch.dtype, optimizer=None, processing_class=None,
               training_args=None, is_main: bool = True, max_shard_size: str | int = "5GB") -> None:
    """Gather ``model``'s TP/ZeRO shards and write an HF model directory on the main process (collective).

    A PEFT model gets PEFT's adapter directory instead, its adapters gathered (:mod:`.lora`)."""
    if writes_adapter_directory(model):
        return save_adapter(model, output_dir, context=context, processing_class=processing_class,
                            training_args=training_args, is_main=is_main)
    state_dict = gather_state_dict(model, context, dtype=dtype, optimizer=optimizer, keep=is_main)
    if not is_main:
        return
    logger.info(f"Saving model ({str(dtype).removeprefix('torch.')}) to {output_dir}")
    write_hf_model_dir(model, state_dict, output_dir, dtype=dtype, max_shard_size=max_shard_size)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(output_dir)
    if training_args is not None:
        torch.save(training_args, os.path.join(output_dir, "training_args.bin"))


def export_checkpoint(checkpoint_dir: str, output_dir: str, *, dtype: torch.dtype | None = None,
                      max_shard_size: str | int = "5GB", merge_lora: bool = False,
                      base_model: str | None = None) -> torch.dtype:
    """Sharded training checkpoint -> HF model directory, in this single process; returns the dtype written.

    ``dtype=None`` uses the dtype the training run's ``save_model`` would have used. ``merge_lora``: the
    checkpoint of a LoRA run (or an adapter directory) merged into its base model (``base_model``: the
    base's local directory, default the one the adapter config names), see :func:`export_merged_lora`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if merge_lora:
        return export_merged_lora(checkpoint_dir, output_dir, dtype=dtype, base_model=base_model,
                                  max_shard_size=max_shard_size)
    reader = CheckpointReader.open(checkpoint_dir)
    if reader.manifest.get("trainable_only"):
        raise ValueError(f"{checkpoint_dir} is a checkpoint of a LoRA run: it holds the adapters and their optimizer "
                         "state, not the base weights. Pass --merge-lora (with --base-model DIR unless its "
                         "adapter_config.json names a local base directory) to write the merged model.")
    if dtype is None:
        dtype = parse_dtype(reader.manifest.get("model_save_dtype") or "float32")
    if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        raise ValueError(f"{checkpoint_dir}/config.json is missing: the checkpoint was not saved from a Hugging Face "
                         "model, so there is no architecture to export")
    config = AutoConfig.from_pretrained(checkpoint_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state_dict = {}
    for name, info in reader.tensors.items():
        if info["kind"] == "param" and dtype == torch.float32 and "master" in reader.state_keys(name):
            full = reader.full_state(name, "master")  # fp32 master of a 16-bit parameter
        else:
            full = reader.full_tensor(name)
        state_dict[name] = full.to(dtype) if full.is_floating_point() else full
    missing = {n for n, _ in skeleton.named_parameters()} - set(state_dict)
    if missing:
        raise ValueError(f"{checkpoint_dir} lacks weights for {sorted(missing)[:4]} of {type(skeleton).__name__}")
    write_hf_model_dir(skeleton, state_dict, output_dir, dtype=dtype, max_shard_size=max_shard_size)
    for fname in ("generation_config.json",) + TOKENIZER_FILES:
        src = os.path.join(checkpoint_dir, fname)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(output_dir, fname))
    return dtype


def export_merged_lora(source: str, output_dir: str, *, dtype: torch.dtype | None = None, base_model: str | None = None,
                       max_shard_size: str | int = "5GB") -> torch.dtype:
    """A LoRA run's checkpoint (or a ``save_model`` adapter directory) merged into its base model and written as an
    HF model directory, in this one process; returns the dtype written.

    ``dtype=None``: for a checkpoint, what the run's ``save_model`` would have written for the model's weights
    (16-bit for a 16-bit base or a bf16/fp16 run); for an adapter directory, the base's own dtype."""
    from transformers import AutoConfig

    reader = CheckpointReader.open(source) if os.path.isfile(os.path.join(source, MANIFEST)) else None
    model, base_dir = merged_model(source, base_model=base_model, reader=reader)
    if dtype is None:
        saved = reader.manifest.get("model_save_dtype") if reader is not None else None
        if saved is None:
            saved = str(getattr(AutoConfig.from_pretrained(base_dir), "dtype", None) or "float32")
        dtype = parse_dtype(str(saved).removeprefix("torch."))
    state_dict = {n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
                  for n, t in model.state_dict().items()}
    write_hf_model_dir(model, state_dict, output_dir, dtype=dtype, max_shard_size=max_shard_size)
    for folder in (source, base_dir):  # the tokenizer the run saved, else the base's
        for fname in ("generation_config.json",) + TOKENIZER_FILES:
            src = os.path.join(folder, fname)
            if os.path.isfile(src) and not os.path.isfile(os.path.join(output_dir, fname)):
                shutil.copy2(src, os.path.join(output_dir, fname))
    return dtype
