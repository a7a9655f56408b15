"""PEFT LoRA models: the adapter directory ``save_model`` writes, and the merged model ``tp-trainer export`` writes.

**Saving** (:func:`save_adapter`, collective over TP and dp). PEFT decides which tensors an adapter
directory holds and under which names (``get_peft_model_state_dict``: the ``lora_A``/``lora_B``
weights, the ``modules_to_save`` copies, embeddings when it wants them; adapter names stripped).
Every rank asks it once on the model's *local* state dict, which costs no communication, and the
tensors it picks (the same on every rank) are all-gathered over TP one at a time into full tensors
(``gather_full``: the adapters' ``tp_spec`` places each rank's rows or columns). The main process
then calls the model's own ``save_pretrained(state_dict=...)`` with those full tensors, so the
directory is exactly PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors``, loaded in
one process by ``PeftModel.from_pretrained(base, dir)``. Tensors keep their own dtype, as
``save_pretrained`` writes them (for a 16-bit adapter trained with ZeRO, the fp32 masters are not used).

**Merging** (:func:`merged_model`, one process). The base model is loaded in fp32 from a local
directory (nothing is downloaded), the adapters are read from a sharded training checkpoint (its
trainable tensors are exactly the PEFT model's trainable parameters, checked by name and shape)
or from an adapter directory, and ``merge_and_unload`` folds ``W + s B A`` into every base weight
in fp32 before the one cast to the export dtype.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn as nn
from transformers.utils import logging

from ..parallel.gather import gather_full
from ..parallel.layers import VocabParallelEmbedding
from ..parallel.lora import is_peft_model
from .layout import CheckpointError

logger = logging.get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def writes_adapter_directory(model) -> bool:
    """Whether ``save_model`` writes a PEFT adapter directory for ``model`` (a ``PeftModel``)."""
    return is_peft_model(model) and hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _adapter_tensor_names(model) -> list[str]:
    """The state-dict keys PEFT saves for any of the model's adapters, in ``state_dict`` order; identical on
    every rank (PEFT selects by name and module type, never by value)."""
    from peft import get_peft_model_state_dict

    local = model.state_dict()
    key_of = {id(v): k for k, v in local.items()}
    picked: set[str] = set()
    with _unsharded_embedding_types(model):
        for adapter in model.peft_config:
            selected = get_peft_model_state_dict(model, state_dict=local, adapter_name=adapter)
            for renamed, value in selected.items():
                if id(value) not in key_of:
                    raise RuntimeError(f"peft returned a new tensor for {renamed!r}: cannot tell which parameter "
                                       "to gather")
                picked.add(key_of[id(value)])
    return [k for k in local if k in picked]


@contextlib.contextmanager
def _unsharded_embedding_types(model):
    """While PEFT selects, the TP base layer of a LoRA-targeted input/output embedding shows as what it replaced.

    PEFT saves a targeted embedding's base weight only when that base layer is an ``nn.Embedding`` or
    ``nn.Linear`` (``has_valid_embedding_base_layer``); under TP it is a ``VocabParallelEmbedding``. A
    parameter-free meta module of the original type and full shape stands in for the selection, which reads
    names and types only (the values come from the state dict already taken)."""
    swapped = []
    embeddings = [getattr(model, "get_input_embeddings", lambda: None)(),
                  getattr(model, "get_output_embeddings", lambda: None)()]
    for layer in embeddings:
        base = getattr(layer, "base_layer", None)
        spec = getattr(getattr(base, "weight", None), "tp_spec", None)
        if base is None or spec is None or isinstance(base, (nn.Embedding, nn.Linear)):
            continue
        rows, cols = spec.full_shape
        stand_in = (nn.Embedding(rows, cols, device="meta") if isinstance(base, VocabParallelEmbedding)
                    else nn.Linear(cols, rows, bias=False, device="meta"))
        layer.base_layer = stand_in
        swapped.append((layer, base))
    try:
        yield
    finally:
        for layer, base in swapped:
            layer.base_layer = base


@torch.no_grad()
def save_adapter(model, output_dir: str, *, context, processing_class=None, training_args=None,
                 is_main: bool = True) -> None:
    """Write the PEFT adapter directory of a TP-sharded ``model`` (collective; see the module docstring)."""
    tp_group = context.tp_group if context is not None else None
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    full = {} if is_main else None
    for name in _adapter_tensor_names(model):
        if name in params:
            p = params[name]
            tensor = gather_full(p.detach(), getattr(p, "tp_spec", None), tp_group)
        else:
            tensor = buffers[name].detach()
        if is_main:
            full[name] = tensor.to("cpu").contiguous()
    if not is_main:
        return
    logger.info(f"Saving the LoRA adapters ({len(full)} tensors, gathered) to {output_dir}")
    with _unsharded_embedding_types(model):  # save_pretrained selects from ``full`` again, the same way
        model.save_pretrained(output_dir, state_dict=full, is_main_process=True)
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(output_dir)
    if training_args is not None:
        torch.save(training_args, os.path.join(output_dir, "training_args.bin"))


def write_adapter_configs(model, directory: str) -> None:
    """The adapters' ``adapter_config.json`` files (PEFT's layout: the ``default`` adapter at the top, the
    others in sub-directories named after them), for a training checkpoint of trainable tensors only."""
    base = model.get_base_model()
    for adapter, config in model.peft_config.items():
        target = directory if adapter == "default" else os.path.join(directory, adapter)
        os.makedirs(target, exist_ok=True)
        name_or_path = config.base_model_name_or_path or getattr(base, "name_or_path", None) or None
        saved = config.base_model_name_or_path
        config.base_model_name_or_path = name_or_path
        try:
            config.save_pretrained(target)
        finally:
            config.base_model_name_or_path = saved


def _base_model_dir(source: str, base_model: str | None) -> str:
    if base_model is None:
        with open(os.path.join(source, ADAPTER_CONFIG)) as f:
            base_model = json.load(f).get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"{source}/{ADAPTER_CONFIG} names no base model: pass --base-model DIR, the local "
                             "Hugging Face directory of the model the adapters were trained on")
    if not os.path.isfile(os.path.join(base_model, "config.json")):
        raise ValueError(f"base model {base_model!r} is not a local Hugging Face model directory (no config.json); "
                         "nothing is downloaded: pass --base-model DIR with the weights the adapters were trained on")
    return base_model


def merged_model(source: str, *, base_model: str | None = None, reader=None):
    """The base model with the adapters of ``source`` merged in, in fp32 (one process).

    ``source``: a sharded training checkpoint of a LoRA run (``reader`` opened on it) or an adapter
    directory (``adapter_config.json`` + ``adapter_model.safetensors``); ``base_model``: the base's
    local directory (default: ``base_model_name_or_path`` of the adapter config)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(source, ADAPTER_CONFIG)):
        raise ValueError(f"{source} has no {ADAPTER_CONFIG}: not a LoRA adapter directory or checkpoint of a LoRA run")
    base_dir = _base_model_dir(source, base_model)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if reader is None:
        peft_model = PeftModel.from_pretrained(base, source)
    else:
        peft_model = get_peft_model(base, LoraConfig.from_pretrained(source))
        _load_trainable(peft_model, reader, source)
    return peft_model.merge_and_unload(), base_dir


@torch.no_grad()
def _load_trainable(peft_model, reader, source: str) -> None:
    """Copy the checkpoint's full trainable tensors into ``peft_model``; names and shapes must match exactly."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    saved = {n for n, info in reader.tensors.items() if info["kind"] == "param"}
    missing, unexpected = sorted(set(params) - saved), sorted(saved - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not hold the trainable tensors of a LoRA model built from its "
                              f"{ADAPTER_CONFIG}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, p in params.items():
        full = reader.full_tensor(name)
        if tuple(full.shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: {name} has shape {list(full.shape)}, the LoRA model built from its "
                                  f"{ADAPTER_CONFIG} {list(p.shape)}")
        p.copy_(full)
