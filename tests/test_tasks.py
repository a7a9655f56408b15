"""Tests for the generated instruction tasks (tp_trainer.app.data.tasks)."""

import json
import re

import pytest

from tp_trainer.app.data.tasks import DEFAULT_TASKS, TASKS, generate_tasks, write_task_splits

ALL_TASKS = {"add", "sort", "reverse", "copy_field", "max", "first_word", "last_word",
             "add_digits", "sort_digits", "max_digit"}
# The single-digit variants: (kind, number of input values, largest value).
DIGIT_VARIANTS = {"add_digits": ("add", (2, 2), 9), "sort_digits": ("sort", (3, 5), 9), "max_digit": ("max", (3, 6), 9)}


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _solve(record):
    """Independently recompute the expected answer from instruction + input."""
    task, instruction, inp = record["task"], record["instruction"], record["input"]
    if task in DIGIT_VARIANTS:
        kind, (low, high), largest = DIGIT_VARIANTS[task]
        numbers = _ints(instruction + " " + inp)
        assert low <= len(numbers) <= high and all(0 <= x <= largest for x in numbers), record
        task = kind
    if task == "add":
        numbers = _ints(instruction + " " + inp)
        assert len(numbers) == 2, record
        return str(sum(numbers))
    if task == "sort":
        return ", ".join(str(x) for x in sorted(_ints(inp)))
    if task == "max":
        return str(max(_ints(inp)))
    if task == "reverse":
        return " ".join(inp.split()[::-1])
    if task == "copy_field":
        pairs = [line.split(": ") for line in inp.split("\n")]
        table = {k: v for k, v in pairs}
        asked = [k for k in table if re.search(rf"\b{re.escape(k)}\b", instruction)]
        assert len(asked) == 1, record
        return table[asked[0]]
    if task == "first_word":
        return inp.split()[0]
    if task == "last_word":
        return inp.split()[-1]
    raise AssertionError(f"unknown task {task}")


def _template(record):
    """The instruction with numbers and the looked-up key replaced by placeholders."""
    text = re.sub(r"\d+", "N", record["instruction"])
    if record["task"] == "copy_field":
        for key in (line.split(": ")[0] for line in record["input"].split("\n")):
            text = re.sub(rf"\b{key}\b", "K", text)
    return text


def test_generation_is_deterministic_per_seed():
    a = generate_tasks(300, seed=7)
    b = generate_tasks(300, seed=7)
    c = generate_tasks(300, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 300


def test_every_answer_is_correct_and_fields_are_strings():
    records = generate_tasks(2000, seed=0)
    for record in records:
        assert set(record) == {"instruction", "input", "output", "task"}
        assert all(isinstance(v, str) for v in record.values())
        assert record["output"] == _solve(record), record


def test_task_balance_subset_and_phrasing_variety():
    records = generate_tasks(420, seed=1)  # a multiple of the 10 tasks
    counts = {t: sum(r["task"] == t for r in records) for t in TASKS}
    assert set(counts) == ALL_TASKS
    assert all(c == 420 // len(TASKS) for c in counts.values())
    for task in TASKS:
        templates = {_template(r) for r in records if r["task"] == task}
        assert len(templates) >= 3, (task, templates)
    sub = generate_tasks(10, seed=1, tasks=["reverse"])
    assert {r["task"] for r in sub} == {"reverse"}
    # Answers are short so a tiny model has a chance.
    assert max(len(r["output"]) for r in records) <= 25


def test_no_input_variant_exists_for_add():
    for task in ("add", "add_digits"):
        records = generate_tasks(200, seed=2, tasks=[task])
        assert any(r["input"] == "" for r in records)
        assert any(r["input"] != "" for r in records)


def test_digit_variants_stay_in_range_and_the_originals_do_not():
    """The default's single-digit tasks draw from 0..9 only; the original tasks keep their wider ranges."""
    for task in DIGIT_VARIANTS:
        records = generate_tasks(300, seed=4, tasks=[task])
        assert all(r["output"] == _solve(r) for r in records)  # _solve checks counts and ranges
        assert len({r["input"] or r["instruction"] for r in records}) > 100  # varied, not a handful
    assert max(max(_ints(r["input"])) for r in generate_tasks(300, seed=4, tasks=["sort"])) > 9
    assert max(max(_ints(r["input"])) for r in generate_tasks(300, seed=4, tasks=["max"])) > 9
    assert max(int(r["output"]) for r in generate_tasks(300, seed=4, tasks=["add"])) > 18


def test_default_tasks_are_the_recipes_mix():
    """DEFAULT_TASKS names the default recipe's generated_tasks: five or more kinds, all known."""
    import os

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "recipes", "tiny-sft.yaml")) as f:
        recipe = yaml.safe_load(f)
    assert tuple(recipe["generated_tasks"].split(",")) == DEFAULT_TASKS
    assert set(DEFAULT_TASKS) <= set(TASKS) and len(set(DEFAULT_TASKS)) >= 5


def test_unknown_task_and_bad_n_raise():
    with pytest.raises(ValueError, match="multiply"):
        generate_tasks(3, seed=0, tasks=["add", "multiply"])
    with pytest.raises(ValueError, match="-1"):
        generate_tasks(-1, seed=0)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_write_task_splits_disjoint_balanced_and_reproducible(tmp_path):
    n_eval = 15 * len(TASKS)  # eval: 15 per task
    paths = write_task_splits(tmp_path / "a", n_train=500, n_eval=n_eval, seed=3)
    assert set(paths) == {"train", "eval"}
    train, evals = _read(paths["train"]), _read(paths["eval"])
    assert len(train) == 500 and len(evals) == n_eval
    train_keys = [(r["instruction"], r["input"]) for r in train]
    eval_keys = [(r["instruction"], r["input"]) for r in evals]
    assert not set(train_keys) & set(eval_keys)
    assert len(set(train_keys)) == len(train_keys)
    assert len(set(eval_keys)) == len(eval_keys)
    assert {r["task"]: 0 for r in evals}.keys() == set(TASKS)
    assert all(sum(r["task"] == t for r in evals) == 15 for t in TASKS)
    for record in train + evals:
        assert record["output"] == _solve(record)
    again = write_task_splits(tmp_path / "b", n_train=500, n_eval=n_eval, seed=3)
    for split in ("train", "eval"):
        with open(paths[split], "rb") as f1, open(again[split], "rb") as f2:
            assert f1.read() == f2.read()


def test_a_task_with_few_distinct_records_gives_all_it_has(tmp_path):
    """add_digits has 700 distinct (instruction, input) pairs (100 sums x 7 phrasings): asked for more than its
    share, it gives all of them and the other tasks fill the rest; eval stays balanced and disjoint from train."""
    n_eval = 10 * len(DEFAULT_TASKS)
    paths = write_task_splits(tmp_path, n_train=7000, n_eval=n_eval, seed=5, tasks=DEFAULT_TASKS)
    train, evals = _read(paths["train"]), _read(paths["eval"])
    assert len(train) == 7000 and all(sum(r["task"] == t for r in evals) == 10 for t in DEFAULT_TASKS)
    keys = [(r["instruction"], r["input"]) for r in train + evals]
    assert len(set(keys)) == len(keys)
    assert sum(r["task"] == "add_digits" for r in train + evals) == 700
    assert all(sum(r["task"] == t for r in train) > 1000 for t in DEFAULT_TASKS if t != "add_digits")
    for record in train + evals:
        assert record["output"] == _solve(record)
    # A lone task cannot be filled by others: asking for more than exists is an error naming the count.
    with pytest.raises(ValueError, match="Could only generate 700 unique records"):
        write_task_splits(tmp_path / "x", n_train=800, n_eval=10, seed=5, tasks=["add_digits"])


def test_write_task_splits_single_task_and_bad_args(tmp_path):
    paths = write_task_splits(tmp_path, n_train=5, n_eval=5, seed=0, tasks=["copy_field"])
    assert len(_read(paths["eval"])) == 5
    with pytest.raises(ValueError, match="n_train"):
        write_task_splits(tmp_path, n_train=-3, n_eval=1, seed=0)
