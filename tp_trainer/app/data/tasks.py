"""Deterministic generator of small instruction-following tasks with checkable answers.

The records follow the Alpaca format ``{"instruction", "input", "output"}`` plus a
``"task"`` field naming the generator, so that evaluation can report per-task
accuracy. Every answer is short and can be recomputed from the instruction and
input alone, which makes exact-match evaluation meaningful.

Available tasks (see :data:`TASKS`):

* ``add`` -- add two 1-3 digit numbers (``"23 + 481"`` -> ``"504"``).
* ``sort`` -- sort 3-6 numbers in ``0..20`` ascending (``"5, 2, 9"`` -> ``"2, 5, 9"``).
* ``reverse`` -- reverse 3-6 space separated letters (``"r e d"`` -> ``"d e r"``).
* ``copy_field`` -- return the value of a key from a small ``key: value`` list.
* ``max`` -- the largest of 3-6 numbers in ``0..99``.
* ``first_word`` / ``last_word`` -- the first / last of 3-5 words (``"owl red sun"`` -> ``"owl"``).

and single-digit variants of the arithmetic ones, same phrasings and answer format:

* ``add_digits`` -- add two numbers in ``0..9`` (``"7 + 5"`` -> ``"12"``).
* ``sort_digits`` -- sort 3-5 numbers in ``0..9`` (``"5, 2, 9"`` -> ``"2, 5, 9"``).
* ``max_digit`` -- the largest of 3-6 numbers in ``0..9``.

The tasks differ in difficulty: first/last word only need the model to find and
copy one word (attention-based copying), reverse and sort need it for every token,
arithmetic needs carries, copy_field needs a lookup (match the asked key
in the input, copy the value after it). The built-in default (``recipes/tiny-sft.yaml``)
trains a ~0.9M parameter model for about two minutes on 2 CPU cores on the digit
variants plus reverse, first_word and last_word (:data:`DEFAULT_TASKS`), which it learns
to answer mostly right in that budget. On 1-3 digit sums, two-digit sorting and maxima it
stays at a few percent, and copy_field at chance (picking one of the listed values);
those remain here for longer runs and bigger models.

All randomness comes from a :class:`random.Random` seeded by the caller, so the
same ``(n, seed, tasks)`` always yields the same records, in any process.
"""

from __future__ import annotations

import json
import os
import random
import string
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from transformers.utils import logging

logger = logging.get_logger(__name__)

Record = Dict[str, str]

__all__ = ["DEFAULT_TASKS", "TASKS", "generate_tasks", "write_task_splits", "write_jsonl"]


def _numbers(rng: random.Random, count: int, low: int, high: int) -> List[int]:
    return [rng.randint(low, high) for _ in range(count)]


def _join_numbers(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


# --------------------------------------------------------------------------- add
_ADD_WITH_INPUT = (
    "Add the two numbers.",
    "Compute the sum of the two numbers below.",
    "What is the result of this addition?",
    "Calculate the total.",
)
_ADD_NO_INPUT = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute the sum of {a} and {b}.",
)


def _add_task(max_digits: int) -> Callable[[random.Random], Record]:
    """Add two numbers of 1..``max_digits`` digits each (the digit count is drawn per number)."""

    def make(rng: random.Random) -> Record:
        a = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
        if rng.random() < 0.5:
            instruction, input_text = rng.choice(_ADD_WITH_INPUT), f"{a} + {b}"
        else:
            instruction, input_text = rng.choice(_ADD_NO_INPUT).format(a=a, b=b), ""
        return {"instruction": instruction, "input": input_text, "output": str(a + b)}

    return make


# -------------------------------------------------------------------------- sort
_SORT_PHRASES = (
    "Sort the numbers in ascending order.",
    "Arrange these numbers from smallest to largest.",
    "Put the following numbers in increasing order.",
    "Order the list from lowest to highest.",
)


def _sort_task(min_count: int, max_count: int, high: int) -> Callable[[random.Random], Record]:
    """Sort ``min_count..max_count`` numbers drawn from ``0..high``."""

    def make(rng: random.Random) -> Record:
        values = _numbers(rng, rng.randint(min_count, max_count), 0, high)
        return {
            "instruction": rng.choice(_SORT_PHRASES),
            "input": _join_numbers(values),
            "output": _join_numbers(sorted(values)),
        }

    return make


# ----------------------------------------------------------------------- reverse
_REVERSE_PHRASES = (
    "Reverse the sequence of letters.",
    "Write the letters in reverse order.",
    "Return the letters backwards.",
    "Reverse the order of the following letters.",
)


def _make_reverse(rng: random.Random) -> Record:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))]
    return {
        "instruction": rng.choice(_REVERSE_PHRASES),
        "input": " ".join(letters),
        "output": " ".join(reversed(letters)),
    }


# -------------------------------------------------------------------- copy_field
# Keys are whole words that never occur in the instruction templates below, so the
# requested key can be recovered unambiguously from the instruction.
_FIELD_KEYS = ("color", "city", "animal", "fruit", "planet", "metal", "tool", "day")
_FIELD_VALUES = (
    "red", "blue", "green", "paris", "tokyo", "lima", "cat", "owl", "fox", "apple",
    "pear", "plum", "mars", "venus", "iron", "gold", "tin", "saw", "axe", "monday",
    "friday", "oak", "sun", "moon", "rain", "snow", "ice", "salt", "wolf", "bear",
)
_FIELD_PHRASES = (
    "What is the value of key {key}?",
    "Return the value stored under {key}.",
    "Look up {key} in the record below.",
    "Which value is assigned to {key}?",
)


def _make_copy_field(rng: random.Random) -> Record:
    keys = rng.sample(_FIELD_KEYS, rng.randint(2, 4))
    values = [rng.choice(_FIELD_VALUES) for _ in keys]
    target = rng.randrange(len(keys))
    return {
        "instruction": rng.choice(_FIELD_PHRASES).format(key=keys[target]),
        "input": "\n".join(f"{k}: {v}" for k, v in zip(keys, values)),
        "output": values[target],
    }


# --------------------------------------------------------------------------- max
_MAX_PHRASES = (
    "What is the largest number?",
    "Find the maximum of the numbers.",
    "Return the biggest number in the list.",
    "Which number is the greatest?",
)


def _max_task(min_count: int, max_count: int, high: int) -> Callable[[random.Random], Record]:
    """The largest of ``min_count..max_count`` numbers drawn from ``0..high``."""

    def make(rng: random.Random) -> Record:
        values = _numbers(rng, rng.randint(min_count, max_count), 0, high)
        return {
            "instruction": rng.choice(_MAX_PHRASES),
            "input": _join_numbers(values),
            "output": str(max(values)),
        }

    return make


# -------------------------------------------------------------------- first_word
_FIRST_WORD_PHRASES = (
    "Return the first word.",
    "What is the first word of the list?",
    "Copy only the first word.",
)


def _make_first_word(rng: random.Random) -> Record:
    words = [rng.choice(_FIELD_VALUES) for _ in range(rng.randint(3, 5))]
    return {"instruction": rng.choice(_FIRST_WORD_PHRASES), "input": " ".join(words), "output": words[0]}


# --------------------------------------------------------------------- last_word
_LAST_WORD_PHRASES = (
    "Return the last word.",
    "What is the last word of the list?",
    "Copy only the final word.",
)


def _make_last_word(rng: random.Random) -> Record:
    words = [rng.choice(_FIELD_VALUES) for _ in range(rng.randint(3, 5))]
    return {"instruction": rng.choice(_LAST_WORD_PHRASES), "input": " ".join(words), "output": words[-1]}


#: Task name -> generator taking a seeded ``random.Random`` and returning a record.
TASKS: Dict[str, Callable[[random.Random], Record]] = {
    "add": _add_task(max_digits=3),
    "sort": _sort_task(3, 6, high=20),
    "reverse": _make_reverse,
    "copy_field": _make_copy_field,
    "max": _max_task(3, 6, high=99),
    "first_word": _make_first_word,
    "last_word": _make_last_word,
    # single-digit variants: learnable by the built-in default's tiny model in its CPU minutes
    "add_digits": _add_task(max_digits=1),
    "sort_digits": _sort_task(3, 5, high=9),
    "max_digit": _max_task(3, 6, high=9),
}

#: The built-in default's mix (``generated_tasks`` of ``recipes/tiny-sft.yaml``). Not copy_field: its lookup
#: (find the asked key in the input, copy the value after it) stays at chance, ~35%, in the default's budget.
DEFAULT_TASKS: Tuple[str, ...] = (
    "add_digits", "sort_digits", "reverse", "max_digit", "first_word", "last_word",
)


def _resolve_tasks(tasks: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if tasks is None:
        return tuple(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    names = tuple(tasks)
    if not names:
        raise ValueError(f"tasks must name at least one task; choose from {sorted(TASKS)}.")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; available tasks are {sorted(TASKS)}.")
    return names


def generate_tasks(n: int, *, seed: int, tasks: Optional[Sequence[str]] = None) -> List[Record]:
    """Generate ``n`` Alpaca-format records, cycling through ``tasks`` in order.

    Args:
        n: Number of records (``>= 0``).
        seed: Seed for the private :class:`random.Random`; equal seeds give equal records.
        tasks: Task names from :data:`TASKS` (default: all, in definition order).
            Task ``i % len(tasks)`` produces record ``i``, so per-task counts are balanced.

    Returns:
        A list of dicts with string keys ``instruction``, ``input`` (possibly ``""``),
        ``output`` and ``task``. Duplicates are possible; see :func:`write_task_splits`
        for deduplicated, disjoint splits.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}.")
    names = _resolve_tasks(tasks)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        name = names[i % len(names)]
        record = TASKS[name](rng)
        record["task"] = name
        records.append(record)
    return records


def write_jsonl(records: Sequence[Record], path: str) -> str:
    """Write ``records`` to ``path`` as JSON Lines (UTF-8, one object per line)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _unique_records(
    n: int, *, seed: int, tasks: Optional[Sequence[str]], max_rounds: int = 20
) -> List[Record]:
    """Return ``n`` records unique on ``(instruction, input)``, task-balanced when possible.

    A task with fewer distinct records than its share (e.g. ``add_digits``: 100 sums in 7
    phrasings) gives all it has and the other tasks fill the rest, still round-robin.
    """
    names = _resolve_tasks(tasks)
    seen = set()
    unique: List[Record] = []
    per_task: Dict[str, List[Record]] = {name: [] for name in names}
    quota = -(-n // len(names))  # ceil: enough of every task to fill n round-robin
    for round_index in range(max_rounds):
        before = {name: len(v) for name, v in per_task.items()}
        # Derive a distinct, deterministic seed per round; oversample to absorb duplicates.
        batch = generate_tasks(2 * n + 16, seed=seed * 1_000_003 + round_index, tasks=names)
        for record in batch:
            key = (record["instruction"], record["input"])
            if key in seen or len(per_task[record["task"]]) >= n:
                continue
            seen.add(key)
            per_task[record["task"]].append(record)
        short = [name for name in names if len(per_task[name]) < quota]
        if not short:
            break
        # A round that found nothing new for the short tasks: they are exhausted.
        if all(len(per_task[name]) == before[name] for name in short) and sum(
            len(v) for v in per_task.values()
        ) >= n:
            logger.info(
                "Task(s) %s have fewer distinct records than their share of %d; the other tasks fill in.",
                {name: len(per_task[name]) for name in short}, n,
            )
            break
    # Interleave tasks round-robin so any prefix is balanced (as far as every task has records).
    for i in range(max(len(v) for v in per_task.values())):
        for name in names:
            if i < len(per_task[name]):
                unique.append(per_task[name][i])
        if len(unique) >= n:
            break
    if len(unique) < n:
        raise ValueError(
            f"Could only generate {len(unique)} unique records for tasks {list(names)} "
            f"(asked for {n}); request fewer records or include more tasks."
        )
    return unique[:n]


def write_task_splits(
    out_dir: str,
    *,
    n_train: int,
    n_eval: int,
    seed: int,
    tasks: Optional[Sequence[str]] = None,
) -> Dict[str, str]:
    """Write held-out ``train.jsonl`` and ``eval.jsonl`` generated task splits.

    Records are deduplicated on ``(instruction, input)`` across both splits, so no
    eval prompt is ever seen in training (and the train split has no duplicates).

    Args:
        out_dir: Directory to write into (created if missing).
        n_train: Number of training records.
        n_eval: Number of evaluation records.
        seed: Seed; the same arguments always produce byte-identical files.
        tasks: Optional subset of :data:`TASKS`.

    Returns:
        ``{"train": path, "eval": path}``.
    """
    for name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
    pool = _unique_records(n_train + n_eval, seed=seed, tasks=tasks)
    # Pool is round-robin interleaved, so taking eval first keeps both splits balanced
    # as long as n_eval is a multiple of the task count.
    eval_records, train_records = pool[:n_eval], pool[n_eval:]
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "train": write_jsonl(train_records, os.path.join(out_dir, "train.jsonl")),
        "eval": write_jsonl(eval_records, os.path.join(out_dir, "eval.jsonl")),
    }
    logger.info(
        "Wrote %d train and %d eval task records (seed=%d) to %s", len(train_records),
        len(eval_records), seed, out_dir,
    )
    return paths
