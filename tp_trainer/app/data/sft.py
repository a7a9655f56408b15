"""Supervised fine-tuning (SFT) data pipeline for Alpaca-format instruction data.

Pipeline::

    ds = load_alpaca("train.jsonl")                         # validated datasets.Dataset
    ds = tokenize_sft(ds, tokenizer, max_length=256)         # input_ids / attention_mask / labels
    batch = SFTDataCollator(tokenizer)([ds[0], ds[1]])      # padded torch tensors

The loss is computed only on the response: ``labels`` are ``-100`` on every prompt
token (including BOS) and equal ``input_ids`` on the response tokens and the final
EOS. Everything here is deterministic, so every tensor-parallel rank that runs the
same pipeline with the same inputs gets bit-identical batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import datasets
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "format_prompt",
    "format_example",
    "load_alpaca",
    "tokenize_sft",
    "SFTDataCollator",
]

#: Label value ignored by ``torch.nn.CrossEntropyLoss`` (and HF models).
IGNORE_INDEX = -100

#: Alpaca prompt for records with a non-empty ``input``.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
#: Alpaca prompt for records whose ``input`` is missing or empty.
PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_MAX_REPORTED_LOCATIONS = 5


def format_prompt(record: Mapping[str, Any]) -> str:
    """Return the Alpaca prompt for ``record`` (everything before the response).

    Uses :data:`PROMPT_TEMPLATE` when ``record["input"]`` is a non-empty string and
    :data:`PROMPT_TEMPLATE_NO_INPUT` otherwise. The prompt ends with
    ``"### Response:\\n"``; the model should continue with ``record["output"]`` + EOS.
    """
    input_text = record.get("input") or ""
    if input_text:
        return PROMPT_TEMPLATE.format(instruction=record["instruction"], input=input_text)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])


def format_example(record: Mapping[str, Any]) -> str:
    """Return prompt + output as one string (no EOS); handy as tokenizer training text."""
    return format_prompt(record) + record["output"]


# ----------------------------------------------------------------------------- loading
def _validate_record(obj: Any) -> Optional[str]:
    """Return a description of what is wrong with ``obj``, or ``None`` if it is valid."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for field in ("instruction", "output"):
        if field not in obj:
            return f"missing required field {field!r}"
        if not isinstance(obj[field], str):
            return f"field {field!r} must be a string, got {type(obj[field]).__name__}"
        if not obj[field].strip():
            return f"field {field!r} is empty"
    for field in ("input", "task"):
        value = obj.get(field)
        if value is not None and not isinstance(value, str):
            return f"optional field {field!r} must be a string, got {type(value).__name__}"
    return None


def _read_records(path: str) -> Tuple[List[Tuple[str, Any]], List[Tuple[str, str]]]:
    """Parse ``path`` into ``[(location, obj)]`` plus ``[(location, parse_error)]``.

    A file whose first non-blank character is ``[`` is a JSON list (locations are
    ``"index i"``); anything else is JSON Lines (locations are ``"line n"``, 1-based,
    blank lines ignored).
    """
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                "Expected a JSON list of records or JSON Lines (one object per line)."
            ) from None
        return [(f"index {i}", obj) for i, obj in enumerate(data)], []
    parsed, errors = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            errors.append((f"line {lineno}", f"invalid JSON ({e.msg} at column {e.colno})"))
    return parsed, errors


def load_alpaca(path: str, *, on_error: str = "raise") -> datasets.Dataset:
    """Load and validate a local Alpaca-format dataset.

    Accepts a JSON file holding a list of records, or a JSON Lines file. Every record
    must be an object with non-empty string ``instruction`` and ``output``; ``input``
    and ``task`` are optional strings (missing/``null`` become ``""``). Other fields
    are dropped.

    Args:
        path: Local file path (nothing is downloaded).
        on_error: ``"raise"`` raises ``ValueError`` at the first malformed record, naming
            the file, the line (JSONL) or index (JSON list) and the problem. ``"skip"``
            drops malformed records and logs one warning with their count and first few
            locations.

    Returns:
        A ``datasets.Dataset`` with string columns ``instruction``, ``input``, ``output``,
        ``task``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: malformed record (``on_error="raise"``), invalid JSON list, or no
            valid records left.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Alpaca data file {path!r} does not exist. load_alpaca only reads local "
            "JSON/JSONL files; download or generate the data first."
        )
    parsed, problems = _read_records(path)
    if problems and on_error == "raise":
        location, reason = problems[0]
        raise ValueError(f"{path}: {location}: {reason}.")

    columns: Dict[str, List[str]] = {"instruction": [], "input": [], "output": [], "task": []}
    for location, obj in parsed:
        reason = _validate_record(obj)
        if reason is not None:
            if on_error == "raise":
                raise ValueError(
                    f"{path}: {location}: {reason}. Each record needs non-empty string "
                    "'instruction' and 'output' and an optional string 'input'."
                )
            problems.append((location, reason))
            continue
        for field in columns:
            columns[field].append(obj.get(field) or "")

    if problems:
        problems.sort(key=lambda p: int(p[0].split()[-1]))
        shown = "; ".join(f"{loc}: {why}" for loc, why in problems[:_MAX_REPORTED_LOCATIONS])
        more = len(problems) - _MAX_REPORTED_LOCATIONS
        logger.warning(
            "%s: skipped %d malformed record(s): %s%s", path, len(problems), shown,
            f"; and {more} more" if more > 0 else "",
        )
    if not columns["instruction"]:
        raise ValueError(
            f"{path}: no valid Alpaca records"
            + (f" ({len(problems)} malformed record(s) skipped)" if problems else " (file is empty)")
            + ". Expected objects with 'instruction' and 'output' fields."
        )
    return datasets.Dataset.from_dict(columns)


# -------------------------------------------------------------------------- tokenizing
def _special_id(tokenizer, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise ValueError(
            f"The tokenizer has no {name} token ({name}_token_id is None); set "
            f"tokenizer.{name}_token before SFT tokenization."
        )
    return value


def _encode_records(
    records: Iterable[Mapping[str, Any]], tokenizer, max_length: int
) -> Tuple[List[Tuple[List[int], List[int]]], int]:
    """Return ``[(input_ids, labels)]`` for the kept records and the number dropped."""
    eos_id = _special_id(tokenizer, "eos")
    records = list(records)
    prompts = [format_prompt(r) for r in records]
    outputs = [r["output"] for r in records]
    # Encode prompt and response separately so the boundary is exact. The prompt gets
    # the tokenizer's usual special tokens (e.g. BOS); the response gets output + EOS.
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    response_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"] if outputs else []
    examples, n_dropped = [], 0
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        # A prompt of >= max_length tokens leaves no room for a supervised token.
        if len(p_ids) >= max_length:
            n_dropped += 1
            continue
        r_ids = (list(r_ids) + [eos_id])[: max_length - len(p_ids)]
        examples.append((list(p_ids) + r_ids, [IGNORE_INDEX] * len(p_ids) + r_ids))
    return examples, n_dropped


def _pack(
    examples: Sequence[Tuple[List[int], List[int]]], max_length: int, pad_id: int
) -> Dict[str, List[List[int]]]:
    """Greedily pack whole examples, in order, into blocks of exactly ``max_length``."""
    out: Dict[str, List[List[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    block_ids: List[int] = []
    block_labels: List[int] = []

    def flush() -> None:
        pad = max_length - len(block_ids)
        out["input_ids"].append(block_ids + [pad_id] * pad)
        out["attention_mask"].append([1] * len(block_ids) + [0] * pad)
        out["labels"].append(block_labels + [IGNORE_INDEX] * pad)

    for ids, labels in examples:
        if block_ids and len(block_ids) + len(ids) > max_length:
            flush()
            block_ids, block_labels = [], []
        block_ids.extend(ids)
        block_labels.extend(labels)
    if block_ids:
        flush()
    return out


def tokenize_sft(
    dataset,
    tokenizer,
    *,
    max_length: int,
    packing: bool = False,
) -> datasets.Dataset:
    """Tokenize Alpaca records for SFT with prompt tokens masked out of the loss.

    Each example is ``prompt_ids + output_ids + [eos]`` where ``prompt_ids`` is
    ``tokenizer(format_prompt(record))`` (with the tokenizer's special tokens, e.g.
    BOS). ``labels`` are ``-100`` on the prompt and equal ``input_ids`` elsewhere.

    Truncation keeps the whole prompt and cuts the *end* of the response (EOS first)
    to fit ``max_length``. Records whose prompt alone has ``>= max_length`` tokens
    would keep zero supervised tokens and are dropped; drops are counted and logged
    once. If every record is dropped a ``ValueError`` is raised.

    Packing (``packing=True``) concatenates whole examples, in order, into blocks of
    exactly ``max_length`` tokens; an example that does not fit in the current block
    starts a new one, and the unused tail of each block is padded (``attention_mask``
    0, ``labels`` -100). Examples are never split, and the set of supervised tokens is
    unchanged. As in the common simple packing, no per-example attention mask or
    position reset is produced: tokens attend to earlier examples in the same block.

    Args:
        dataset: A ``datasets.Dataset`` (e.g. from :func:`load_alpaca`) or a sequence of
            record dicts with ``instruction``, ``output`` and optional ``input``.
        tokenizer: A fast tokenizer with ``eos_token_id`` (and ``pad_token_id`` when
            packing).
        max_length: Maximum tokens per example / block size when packing.
        packing: Pack examples into fixed ``max_length`` blocks.

    Returns:
        A ``datasets.Dataset`` with list-of-int columns ``input_ids``,
        ``attention_mask`` and ``labels`` (all original columns are removed).
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}.")
    pad_id = _special_id(tokenizer, "pad") if packing else None
    n_records = len(dataset)
    if n_records == 0:
        raise ValueError("tokenize_sft got an empty dataset; load at least one record.")
    examples, n_dropped = _encode_records(dataset, tokenizer, max_length)
    if n_dropped:
        logger.warning(
            "tokenize_sft dropped %d of %d record(s) whose prompt alone has >= "
            "max_length=%d tokens (no supervised token would remain). Increase max_length "
            "to keep them.",
            n_dropped, n_records, max_length,
        )
    if not examples:
        raise ValueError(
            f"tokenize_sft dropped all {n_records} record(s): no record has a response "
            f"token within max_length={max_length}. Increase max_length."
        )
    if packing:
        columns = _pack(examples, max_length, pad_id)
    else:
        columns = {
            "input_ids": [ids for ids, _ in examples],
            "attention_mask": [[1] * len(ids) for ids, _ in examples],
            "labels": [labels for _, labels in examples],
        }
    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------------- collator
@dataclass
class SFTDataCollator:
    """Right-pad SFT features into ``torch.long`` tensors, deterministically.

    ``input_ids`` are padded with the pad token id, ``attention_mask`` with 0 and
    ``labels`` with -100. There is no randomness, so identical feature lists give
    identical batches on every tensor-parallel rank.

    Args:
        tokenizer: Used only to read ``pad_token_id`` (optional if ``pad_token_id`` given).
        pad_token_id: Explicit pad id; overrides the tokenizer's.
        pad_to_multiple_of: Round the padded length up to a multiple of this.
    """

    tokenizer: Any = None
    pad_token_id: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            if self.tokenizer is None:
                raise ValueError("SFTDataCollator needs a tokenizer or an explicit pad_token_id.")
            self.pad_token_id = _special_id(self.tokenizer, "pad")
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"pad_to_multiple_of must be a positive int or None, got {self.pad_to_multiple_of!r}."
            )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SFTDataCollator got an empty list of features.")
        rows = []
        for i, feature in enumerate(features):
            if "input_ids" not in feature or "labels" not in feature:
                raise ValueError(
                    f"Feature {i} needs 'input_ids' and 'labels' (got keys {sorted(feature)}); "
                    "run tokenize_sft first."
                )
            ids = list(feature["input_ids"])
            labels = list(feature["labels"])
            mask = feature.get("attention_mask")
            mask = [1] * len(ids) if mask is None else list(mask)
            if not (len(ids) == len(labels) == len(mask)):
                raise ValueError(
                    f"Feature {i} has mismatched lengths: input_ids={len(ids)}, "
                    f"labels={len(labels)}, attention_mask={len(mask)}."
                )
            rows.append((ids, mask, labels))
        length = max(len(ids) for ids, _, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, mask, labels in rows:
            pad = length - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(labels + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
