"""Single-process evaluation for SFT: exact-match accuracy, eval loss, results table.

These helpers run on one process with a plain (un-sharded) causal LM; they do not
touch ``torch.distributed``. Typical use after training::

    results = {}
    for name, model in {"before SFT": base, "tp=2": tuned}.items():
        res = exact_match_eval(model, tokenizer, eval_records)
        res["eval_loss"] = eval_loss(model, tokenizer, eval_records, max_length=256)
        results[name] = res
    print(format_accuracy_table(results))
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from transformers.utils import logging

from .data.sft import IGNORE_INDEX, SFTDataCollator, format_prompt, tokenize_sft

logger = logging.get_logger(__name__)

__all__ = ["exact_match_eval", "eval_loss", "format_accuracy_table"]

#: Task name used for records without a ``"task"`` field.
DEFAULT_TASK = "all"


def _as_records(records) -> List[Mapping[str, Any]]:
    records = list(records)
    if not records:
        raise ValueError("Evaluation needs at least one record; got an empty collection.")
    for i, record in enumerate(records):
        if "instruction" not in record or "output" not in record:
            raise ValueError(
                f"Eval record {i} needs 'instruction' and 'output' fields, got keys {sorted(record)}."
            )
    return records


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def exact_match_eval(
    model,
    tokenizer,
    records,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    return_predictions: bool = False,
) -> Dict[str, Any]:
    """Greedy-generate a response for each record and score exact matches.

    The prompt is ``format_prompt(record)`` encoded like in training (with the
    tokenizer's special tokens, e.g. BOS), left-padded for batched generation.
    Generation is greedy and stops at EOS or after ``max_new_tokens``. The generated
    text (special tokens skipped, whitespace stripped) must equal
    ``record["output"].strip()``.

    Args:
        model: A causal LM with ``generate`` (e.g. ``LlamaForCausalLM``).
        tokenizer: The tokenizer used for training (needs ``pad_token_id`` and
            ``eos_token_id``).
        records: Iterable of Alpaca records (list of dicts or ``datasets.Dataset``);
            ``record["task"]`` groups the accuracy (missing -> ``"all"``).
        max_new_tokens: Generation budget per record.
        batch_size: Prompts generated together.
        return_predictions: Also return the list of generated strings.

    Returns:
        ``{"overall": float, "correct": int, "total": int,
        "per_task": {task: accuracy}, "counts": {task: {"correct": int, "total": int}}}``
        (plus ``"predictions"`` if requested). Accuracies are fractions in ``[0, 1]``.
    """
    records = _as_records(records)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}."
        )
    for name in ("pad", "eos"):
        if getattr(tokenizer, f"{name}_token_id", None) is None:
            raise ValueError(f"exact_match_eval needs a tokenizer with a {name} token.")

    device = _model_device(model)
    was_training = getattr(model, "training", False)
    padding_side = tokenizer.padding_side
    predictions: List[str] = []
    try:
        if hasattr(model, "eval"):
            model.eval()
        tokenizer.padding_side = "left"
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            enc = tokenizer(
                [format_prompt(r) for r in batch], return_tensors="pt", padding=True
            ).to(device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            predictions.extend(
                t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            )
    finally:
        tokenizer.padding_side = padding_side
        if was_training and hasattr(model, "train"):
            model.train()

    counts: Dict[str, Dict[str, int]] = {}
    for record, prediction in zip(records, predictions):
        task = record.get("task") or DEFAULT_TASK
        entry = counts.setdefault(task, {"correct": 0, "total": 0})
        entry["total"] += 1
        entry["correct"] += int(prediction == record["output"].strip())
    correct = sum(c["correct"] for c in counts.values())
    result: Dict[str, Any] = {
        "overall": correct / len(records),
        "correct": correct,
        "total": len(records),
        "per_task": {t: c["correct"] / c["total"] for t, c in sorted(counts.items())},
        "counts": dict(sorted(counts.items())),
    }
    if return_predictions:
        result["predictions"] = predictions
    logger.info("Exact-match accuracy %.3f (%d/%d).", result["overall"], correct, len(records))
    return result


def eval_loss(
    model,
    tokenizer,
    records,
    *,
    max_length: int,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy per supervised token over ``records``.

    Records are tokenized exactly as for training (:func:`tokenize_sft`, no packing),
    so only response + EOS tokens count. The mean is token-weighted over the whole
    set (sum of token losses / number of supervised tokens), hence independent of
    ``batch_size``.
    """
    records = _as_records(records)
    rows = [{k: r.get(k) or "" for k in ("instruction", "input", "output")} for r in records]
    dataset = tokenize_sft(rows, tokenizer, max_length=max_length)
    collator = SFTDataCollator(tokenizer)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    total_loss, total_tokens = 0.0, 0
    try:
        model.eval()
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            # Token t predicts token t+1.
            logits = logits[:, :-1, :].float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_loss += loss.item()
            total_tokens += int((labels != IGNORE_INDEX).sum())
    finally:
        if was_training:
            model.train()
    return total_loss / total_tokens


def _format_cell(value: Optional[float], fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_accuracy_table(columns: Mapping[str, Mapping[str, Any]]) -> str:
    """Render evaluation results as a markdown table (tasks x models/layouts).

    Args:
        columns: Ordered ``{column name: result}`` where each result is an
            :func:`exact_match_eval` dict, optionally with an ``"eval_loss"`` float
            (e.g. ``{"before SFT": r0, "tp=2": r1, "tp=2 x dp=2 ZeRO-1": r2}``).

    Returns:
        A markdown table: one row per task (sorted by name, accuracy in percent),
        then ``overall`` and ``eval loss`` rows; the ``n`` column is the number of
        eval records for that task (taken from the first column reporting it). Missing
        values are shown as ``-``.
    """
    if not columns:
        raise ValueError("format_accuracy_table needs at least one column of results.")
    for name, result in columns.items():
        if not isinstance(result, Mapping) or "per_task" not in result:
            raise ValueError(
                f"Column {name!r} is not an exact_match_eval result (needs a 'per_task' key); "
                f"got {type(result).__name__} with keys "
                f"{sorted(result) if isinstance(result, Mapping) else '-'}."
            )
    names = list(columns)
    tasks = sorted({t for r in columns.values() for t in r["per_task"]})

    def n_for(task: Optional[str]) -> str:
        for r in columns.values():
            if task is None and "total" in r:
                return str(r["total"])
            if task is not None and task in r.get("counts", {}):
                return str(r["counts"][task]["total"])
        return "-"

    header = ["task", "n"] + names
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", "---:"] + ["---:"] * len(names)) + "|",
    ]
    for task in tasks:
        cells = [_format_cell(columns[c]["per_task"].get(task), "{:.1%}") for c in names]
        lines.append("| " + " | ".join([task, n_for(task)] + cells) + " |")
    overall = [_format_cell(columns[c].get("overall"), "{:.1%}") for c in names]
    lines.append("| " + " | ".join(["overall", n_for(None)] + overall) + " |")
    losses = [_format_cell(columns[c].get("eval_loss"), "{:.3f}") for c in names]
    lines.append("| " + " | ".join(["eval loss", "-"] + losses) + " |")
    return "\n".join(lines)
