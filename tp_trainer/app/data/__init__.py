"""Data side of tp_trainer: generated tasks, a locally trained tokenizer, SFT pipeline.

Submodules (import them directly; nothing here touches ``torch.distributed``):

* :mod:`tp_trainer.app.data.tasks` -- deterministic instruction tasks with checkable answers.
* :mod:`tp_trainer.app.data.tokenizer` -- train a small byte-level BPE fast tokenizer offline.
* :mod:`tp_trainer.app.data.sft` -- Alpaca template, loading/validation, tokenization, collator.
"""

# Imported on first use: ``sft`` needs ``datasets`` (the application's dependency), ``tasks`` and
# ``tokenizer`` do not, so ``import tp_trainer.app.data.tasks`` works where ``datasets`` is absent.
_SUBMODULE = {"IGNORE_INDEX": "sft", "PROMPT_TEMPLATE": "sft", "PROMPT_TEMPLATE_NO_INPUT": "sft",
              "SFTDataCollator": "sft", "format_example": "sft", "format_prompt": "sft", "load_alpaca": "sft",
              "tokenize_sft": "sft", "TASKS": "tasks", "generate_tasks": "tasks", "write_task_splits": "tasks",
              "build_tokenizer": "tokenizer"}


def __getattr__(name):
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_SUBMODULE[name]}", __name__), name)


__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "SFTDataCollator",
    "TASKS",
    "build_tokenizer",
    "format_example",
    "format_prompt",
    "generate_tasks",
    "load_alpaca",
    "tokenize_sft",
    "write_task_splits",
]
