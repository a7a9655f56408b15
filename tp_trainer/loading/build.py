"""The model of a Hugging Face directory, built on the ``meta`` device as ``from_pretrained`` builds it.

``from_pretrained`` reads the config (keyword arguments that are config fields override it),
settles the dtype (``dtype="auto"``, the default: the config's ``dtype``, else the checkpoint's
first floating-point tensor's), and builds the model under its init contexts: ``meta`` device,
that dtype as the default, ties deferred. :func:`build_meta_model` does the same through the
same transformers functions (``get_init_context``, ``_get_dtype``, the auto class's
``from_config``), then ties the weights (``tie_weights``), so the planner sees the tied
parameters as one. Nothing is allocated: every parameter and buffer is a ``meta`` tensor.

Options of ``from_pretrained`` that place, quantise or shard weights another way (``device_map``,
``tp_plan``, ``quantization_config``, ...) or fetch files (a Hub name, ``revision``) are refused
with the reason; a keyword that is neither a config field nor an option here is refused too.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import _get_dtype
from transformers.utils import ContextManagers

from .files import INDEX, LoadError, SafetensorsDir

# keyword -> why tp_trainer.from_pretrained refuses it
REFUSED = {
    **dict.fromkeys(("device_map", "max_memory", "offload_folder", "offload_buffers"),
                    "each rank holds its shards on its own device (the ParallelContext's); there is nothing to place"),
    **dict.fromkeys(("tp_plan", "distributed_config", "device_mesh"),
                    "the tensor-parallel layout is tp_trainer's plan: pass tp_size (and user_plan to override it)"),
    **dict.fromkeys(("quantization_config", "gguf_file"), "quantised checkpoints are not supported"),
    **dict.fromkeys(("state_dict", "from_tf", "from_flax", "use_safetensors", "weights_only"),
                    "weights are read from the directory's safetensors files only"),
    **dict.fromkeys(("cache_dir", "force_download", "proxies", "token", "revision", "subfolder", "variant",
                     "local_files_only", "code_revision"),
                    "tp_trainer.from_pretrained reads a local directory (download it first, e.g. "
                    "`hf download NAME --include '*.json' '*.safetensors' --local-dir DIR`)"),
    **dict.fromkeys(("ignore_mismatched_sizes", "output_loading_info", "adapter_kwargs", "adapter_name",
                     "generation_config", "fusion_config", "use_kernels", "kernel_config"),
                    "not supported by shard-only loading"),
}


def check_directory(name_or_path) -> str:
    path = os.fspath(name_or_path)
    if not os.path.isdir(path):
        raise LoadError(f"{path!r} is not a local model directory: tp_trainer.from_pretrained reads a directory "
                        f"holding config.json and model.safetensors (or {INDEX}); download it first, e.g. "
                        f"`hf download {path} --include '*.json' '*.safetensors' --local-dir DIR`")
    return path


def split_kwargs(kwargs: dict) -> dict:
    """The keyword arguments of ``from_pretrained`` this loader handles itself; refused ones raise."""
    refused = [k for k in kwargs if k in REFUSED]
    if refused:
        raise LoadError("tp_trainer.from_pretrained does not take " +
                        "; ".join(f"{k}= ({REFUSED[k]})" for k in refused))
    return dict(kwargs)


def build_meta_model(path: str, files: SafetensorsDir, kwargs: dict, *,
                     model_class=None) -> tuple[nn.Module, torch.dtype]:
    """``(model, dtype)``: ``model_class`` (an auto class, default ``AutoModelForCausalLM``, or a model class) of
    ``path`` on ``meta``, and the dtype ``from_pretrained`` settled on."""
    kwargs = split_kwargs(kwargs)
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "auto")
    trust_remote_code = kwargs.pop("trust_remote_code", None)
    attn = kwargs.pop("attn_implementation", None)
    experts = kwargs.pop("experts_implementation", None)
    config = kwargs.pop("config", None)
    if isinstance(config, PretrainedConfig):
        unused = kwargs
    else:
        config, unused = AutoConfig.from_pretrained(config or path, return_unused_kwargs=True,
                                                    trust_remote_code=trust_remote_code, **kwargs)
    if unused:
        raise LoadError(f"tp_trainer.from_pretrained got {sorted(unused)}: neither fields of {type(config).__name__} "
                        "nor options it supports (dtype, attn_implementation, experts_implementation, "
                        "trust_remote_code, config, key_mapping, model_class, user_plan, context)")
    if attn is not None:
        config._attn_implementation = attn
    if experts is not None:
        config._experts_implementation = experts
    paths = [os.path.join(path, f) for f in files.files]
    # _get_dtype: "auto" -> config.dtype, else the checkpoint's; sets config.dtype, as from_pretrained does
    config, dtype = _get_dtype(dtype, paths, config, files.metadata if os.path.isfile(os.path.join(path, INDEX))
                               else None, None, True, None)
    config.name_or_path = path
    model_class = model_class or AutoModelForCausalLM
    with ContextManagers(PreTrainedModel.get_init_context(dtype, False, False, None, config)):
        if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
            model = model_class._from_config(config)
        else:
            model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # the init contexts defer the ties to the end of loading; the planner needs them now
    return model, dtype
