"""Data side of tp_trainer: generated tasks, a locally trained tokenizer, SFT pipeline.

Submodules (import them directly; nothing here touches ``torch.distributed``):

* :mod:`tp_trainer.data.tasks` -- deterministic instruction tasks with checkable answers.
* :mod:`tp_trainer.data.tokenizer` -- train a small byte-level BPE fast tokenizer offline.
* :mod:`tp_trainer.data.sft` -- Alpaca template, loading/validation, tokenization, collator.
"""

from .sft import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    SFTDataCollator,
    format_example,
    format_prompt,
    load_alpaca,
    tokenize_sft,
)
from .tasks import TASKS, generate_tasks, write_task_splits
from .tokenizer import build_tokenizer

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
