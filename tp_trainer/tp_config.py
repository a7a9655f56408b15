"""Read a DeepSpeed-style JSON (the seed's config) into ``TPTrainingArguments`` without DeepSpeed.

``--tp_config ds_config.json`` maps:

=====================================================  =====================================
DeepSpeed key                                          TPTrainingArguments field
=====================================================  =====================================
``tensor_parallel.autotp_size``                        ``tp_size``
``tensor_parallel.sequence_parallel`` (true/false)     ``sequence_parallel``
``zero_optimization.stage`` (0-3)                     ``zero_stage``
``zero_optimization.gather_16bit_weights_on_model_save``  ``gather_16bit_weights_on_model_save``
``train_micro_batch_size_per_gpu``                     ``per_device_train_batch_size``
``gradient_accumulation_steps``                        ``gradient_accumulation_steps``
``gradient_clipping``                                  ``max_grad_norm``
``bf16.enabled``                                       ``bf16``
=====================================================  =====================================

``ZeRO_optimization`` (the seed's spelling) is read like ``zero_optimization``. ``"auto"``
values (the convention of HF's DeepSpeed integration) leave the field as it is.
``train_batch_size`` is checked against ``micro batch x grad accum x (WORLD_SIZE / tp)``.
Every other key is reported by name in one warning (never silently ignored); a value that
conflicts with a flag given explicitly (a non-default value) is an error naming both.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

from transformers.utils import logging

logger = logging.get_logger(__name__)

_ZERO_KEYS = ("zero_optimization", "ZeRO_optimization")
_TOP_LEVEL = {"train_micro_batch_size_per_gpu": "per_device_train_batch_size",
              "gradient_accumulation_steps": "gradient_accumulation_steps",
              "gradient_clipping": "max_grad_norm"}
_ZERO = {"stage": "zero_stage", "gather_16bit_weights_on_model_save": "gather_16bit_weights_on_model_save",
         "stage3_gather_16bit_weights_on_model_save": "gather_16bit_weights_on_model_save"}


def _is_auto(value) -> bool:
    return value == "auto" or (isinstance(value, dict) and value and all(v == "auto" for v in value.values()))


def read_tp_config(path: str) -> tuple[dict, list[str], object]:
    """``({field: value}, [unsupported key paths], train_batch_size or None)`` from the JSON at ``path``."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"tp_config file {path!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"tp_config {path!r} is not valid JSON: {err} (DeepSpeed's '...' placeholders must be "
                         "removed)") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"tp_config {path!r} must hold a JSON object, got {type(cfg).__name__}")
    values, unsupported, train_batch_size = {}, [], None
    for key, val in cfg.items():
        if _is_auto(val):
            continue
        if key == "tensor_parallel" and isinstance(val, dict):
            for k, v in val.items():
                if k == "autotp_size":
                    values["tp_size"] = v
                elif k == "sequence_parallel":
                    if not isinstance(v, bool):
                        raise ValueError(f"tp_config {path!r}: tensor_parallel.sequence_parallel must be true or false, "
                                         f"got {v!r}")
                    values["sequence_parallel"] = v
                elif not _is_auto(v):
                    unsupported.append(f"tensor_parallel.{k}")
        elif key in _ZERO_KEYS and isinstance(val, dict):
            for k, v in val.items():
                if k in _ZERO:
                    values[_ZERO[k]] = v
                elif not _is_auto(v):
                    unsupported.append(f"{key}.{k}")
        elif key in _TOP_LEVEL:
            values[_TOP_LEVEL[key]] = val
        elif key == "bf16" and isinstance(val, dict) and set(val) <= {"enabled"}:
            values["bf16"] = val.get("enabled", False)
        elif key == "fp16" and isinstance(val, dict) and val.get("enabled") is False:
            continue  # fp16 off: nothing to do (fp16 on is reported below: tp_trainer trains in bf16)
        elif key == "train_batch_size":
            train_batch_size = val
        else:
            unsupported.append(key)
    values = {k: v for k, v in values.items() if v != "auto"}
    return values, unsupported, train_batch_size


def apply_tp_config(args) -> None:
    """Set ``args``' fields from ``args.tp_config``; raise on conflicts with explicit flags."""
    values, unsupported, train_batch_size = read_tp_config(args.tp_config)
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
    if train_batch_size is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dp = max(1, world // max(1, int(args.tp_size)))
        got = args.per_device_train_batch_size * args.gradient_accumulation_steps * dp
        if train_batch_size != got:
            raise ValueError(f"tp_config {args.tp_config!r} sets train_batch_size={train_batch_size!r}, but "
                             f"per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_"
                             f"steps {args.gradient_accumulation_steps} x dp {dp} (WORLD_SIZE {world} / tp_size "
                             f"{args.tp_size}) = {got}; make them agree or set it to \"auto\"")
