"""Preference pairs for DPO from instruction data with checkable answers (no downloads).

Every Alpaca record (``instruction``, ``input``, ``output``: the built-in tasks of :mod:`.tasks`)
becomes one pair::

    prompt   = format_prompt(record)        the same Alpaca prompt the SFT pipeline trains on
    chosen   = record["output"]             the correct answer
    rejected = corrupt(record["output"])    one character changed: a digit into another digit,
                                            a letter into another letter of the same case

so the rejected answer is wrong by a single token and the model must learn which answer is right,
not a style. A file that already holds ``prompt``/``chosen``/``rejected`` records is used as it is.
The corruption draws from a ``random.Random(seed)``: every rank builds the same pairs.
"""

from __future__ import annotations

import json
import os
import random
import string
from typing import Any, Mapping

from .sft import format_prompt

PAIR_KEYS = ("prompt", "chosen", "rejected")


def corrupt(answer: str, rng: random.Random) -> str:
    """``answer`` with one digit or letter replaced by another of its kind (a different string, always)."""
    positions = [i for i, ch in enumerate(answer) if ch.isdigit() or ch.isalpha()]
    if not positions:
        return answer + " 0"
    i = rng.choice(positions)
    ch = answer[i]
    pool = string.digits if ch.isdigit() else (string.ascii_uppercase if ch.isupper() else string.ascii_lowercase)
    return answer[:i] + rng.choice([c for c in pool if c != ch]) + answer[i + 1:]


def preference_pair(record: Mapping[str, Any], rng: random.Random) -> dict[str, str]:
    return {"prompt": format_prompt(record), "chosen": record["output"], "rejected": corrupt(record["output"], rng)}


def _read_json_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_preferences(path: str, *, seed: int):
    """A ``datasets.Dataset`` of prompt/chosen/rejected: read from ``path`` (JSON or JSONL), built from Alpaca
    records by :func:`corrupt`, or an error naming the file and the keys it expected."""
    import datasets

    if not os.path.isfile(path):
        raise ValueError(f"preference data {path!r} does not exist")
    records = _read_json_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    first = records[0]
    if all(k in first for k in PAIR_KEYS):
        rows = [{k: r[k] for k in PAIR_KEYS} for r in records]
    elif all(k in first for k in ("instruction", "output")):
        rng = random.Random(seed)
        rows = [preference_pair(r, rng) for r in records]
    else:
        raise ValueError(f"{path}: records need the keys {PAIR_KEYS} (preference pairs) or instruction/input/output "
                         f"(Alpaca, turned into pairs with a corrupted answer); the first record has {sorted(first)}")
    return datasets.Dataset.from_list(rows)
