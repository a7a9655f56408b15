"""Read a DeepSpeed-style JSON (the seed's config) into ``TPTrainingArguments`` without DeepSpeed.

Recognised keys: ``tensor_parallel.autotp_size``, ``zero_optimization.stage``,
``zero_optimization.gather_16bit_weights_on_model_save`` (also spelled ``ZeRO_optimization``).
Keys we do not support are reported by name; a value that conflicts with an explicit flag is
an error. ``"auto"`` values (HF's DeepSpeed integration convention) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import fields

from transformers.utils import logging

logger = logging.get_logger(__name__)

_ZERO_KEYS = ("zero_optimization", "ZeRO_optimization")
# Keys that are about things tp_trainer does itself or that the Trainer flags already set.
_IGNORED_TOP = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler", "steps_per_print", "wall_clock_breakdown"}


def read_tp_config(path: str) -> tuple[dict, list[str]]:
    """``({field: value}, [unsupported key paths])`` from the JSON at ``path``."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"tp_config file {path!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"tp_config {path!r} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"tp_config {path!r} must hold a JSON object")
    values, unsupported = {}, []
    for key, val in cfg.items():
        if key == "tensor_parallel":
            for k, v in (val or {}).items():
                if k == "autotp_size":
                    values["tp_size"] = v
                else:
                    unsupported.append(f"tensor_parallel.{k}")
        elif key in _ZERO_KEYS:
            for k, v in (val or {}).items():
                if k == "stage":
                    values["zero_stage"] = v
                elif k == "gather_16bit_weights_on_model_save":
                    values["gather_16bit_weights_on_model_save"] = v
                else:
                    unsupported.append(f"{key}.{k}")
        elif key in _IGNORED_TOP:
            if val != "auto":
                unsupported.append(f"{key} (set it with the TrainingArguments flag instead)")
        else:
            unsupported.append(key)
    values = {k: v for k, v in values.items() if v != "auto"}
    return values, unsupported


def apply_tp_config(args) -> None:
    values, unsupported = read_tp_config(args.tp_config)
    defaults = {f.name: f.default for f in fields(args)}
    for name, value in values.items():
        current = getattr(args, name)
        if current != defaults[name] and current != value:
            raise ValueError(f"tp_config {args.tp_config!r} sets {name}={value!r} but the arguments say "
                             f"{name}={current!r}; remove one of them")
        setattr(args, name, value)
    if unsupported:
        logger.warning(f"tp_config {args.tp_config!r}: keys not supported by tp_trainer and ignored: "
                       f"{', '.join(unsupported)}")
