"""Tests for tp_trainer.app.evaluate (exact match, eval loss, results table)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tp_trainer.app.data.sft import SFTDataCollator, format_example, format_prompt, tokenize_sft
from tp_trainer.app.data.tasks import generate_tasks
from tp_trainer.app.data.tokenizer import build_tokenizer
from tp_trainer.app.evaluate import eval_loss, exact_match_eval, format_accuracy_table

# The records these tests were written against (tasks added later would shift every seeded draw).
FIVE_TASKS = ("add", "sort", "reverse", "copy_field", "max")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([format_example(r) for r in generate_tasks(300, seed=5, tasks=FIVE_TASKS)], vocab_size=512)


@pytest.fixture(scope="module")
def eval_records():
    return generate_tasks(20, seed=99, tasks=FIVE_TASKS)


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


class OracleModel(torch.nn.Module):
    """Stub with ``generate`` that answers from a prompt -> answer table.

    It decodes each (left-padded) prompt row, so it also checks that the evaluator
    sends exactly ``format_prompt(record)`` and pads on the left.
    """

    def __init__(self, tok, answers, wrong_tasks=()):
        super().__init__()
        self.tok, self.answers, self.wrong_tasks = tok, answers, set(wrong_tasks)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kw):
        assert kw.get("do_sample") is False
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n_pad = mask.count(0)
            assert mask == [0] * n_pad + [1] * (len(mask) - n_pad), "expected left padding"
            assert ids[:n_pad] == [pad_token_id] * n_pad
            prompt = self.tok.decode(ids[n_pad:], skip_special_tokens=True)
            task, answer = self.answers[prompt]
            if task in self.wrong_tasks:
                answer = answer + " nope"
            new = self.tok(" " + answer + " ", add_special_tokens=False)["input_ids"] + [eos_token_id]
            rows.append(ids + new[:max_new_tokens])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def _oracle(tok, records, **kw):
    return OracleModel(tok, {format_prompt(r): (r["task"], r["output"]) for r in records}, **kw)


def test_exact_match_is_one_for_an_oracle(tok, eval_records):
    model = _oracle(tok, eval_records)
    tok.padding_side = "right"
    result = exact_match_eval(model, tok, eval_records, batch_size=6, max_new_tokens=64)
    assert model.calls == math.ceil(len(eval_records) / 6)
    assert result["overall"] == 1.0
    assert result["correct"] == result["total"] == len(eval_records)
    assert set(result["per_task"]) == {"add", "sort", "reverse", "copy_field", "max"}
    assert all(acc == 1.0 for acc in result["per_task"].values())
    assert all(c == {"correct": 4, "total": 4} for c in result["counts"].values())
    assert tok.padding_side == "right"  # restored


def test_exact_match_per_task_grouping(tok, eval_records):
    model = _oracle(tok, eval_records, wrong_tasks={"add", "sort"})
    result = exact_match_eval(model, tok, eval_records, batch_size=7, return_predictions=True, max_new_tokens=64)
    assert result["per_task"] == {"add": 0.0, "copy_field": 1.0, "max": 1.0, "reverse": 1.0, "sort": 0.0}
    assert result["overall"] == pytest.approx(12 / 20)
    assert result["correct"] == 12
    wrong = [p for p, r in zip(result["predictions"], eval_records) if r["task"] == "add"]
    assert all(p.endswith(" nope") for p in wrong)
    # Records without a task are grouped under "all".
    untagged = [{k: v for k, v in r.items() if k != "task"} for r in eval_records[:3]]
    res = exact_match_eval(_oracle(tok, eval_records), tok, untagged, max_new_tokens=64)
    assert res["per_task"] == {"all": 1.0}


def test_exact_match_is_zero_for_random_tiny_model(tok, eval_records):
    model = tiny_llama(tok)
    model.train()
    records = [r for r in eval_records if r["task"] == "copy_field"]
    result = exact_match_eval(model, tok, records, max_new_tokens=6, batch_size=4, return_predictions=True)
    assert result["per_task"] == {"copy_field": 0.0}
    assert result["total"] == len(records) == 4
    assert len(result["predictions"]) == 4
    assert model.training  # training mode restored


def test_trained_tiny_model_reaches_full_accuracy_on_memorized_records(tok):
    """End to end: tokenize_sft + collator + generation agree on the prompt format."""
    records = generate_tasks(8, seed=1, tasks=["copy_field"])
    ds = tokenize_sft(records, tok, max_length=128)
    batch = SFTDataCollator(tok)([ds[i] for i in range(len(ds))])
    model = tiny_llama(tok)
    before = eval_loss(model, tok, records, max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss(model, tok, records, max_length=128)
    assert after < 0.2 < before
    assert exact_match_eval(model, tok, records, max_new_tokens=8)["overall"] == 1.0


def test_eval_loss_matches_per_record_reference(tok, eval_records):
    model = tiny_llama(tok, seed=3)
    records = eval_records[:7]
    total, count = 0.0, 0
    for record in records:
        ex = tokenize_sft([record], tok, max_length=256)[0]
        n = sum(t != -100 for t in ex["labels"][1:])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
        total += out.loss.item() * n
        count += n
    reference = total / count
    assert eval_loss(model, tok, records, max_length=256, batch_size=3) == pytest.approx(reference, rel=1e-4)
    assert eval_loss(model, tok, records, max_length=256, batch_size=1) == pytest.approx(reference, rel=1e-4)
    # Untrained: close to the uniform-distribution loss ln(V).
    assert abs(reference - math.log(len(tok))) < 1.0


def test_empty_records_raise(tok):
    with pytest.raises(ValueError, match="at least one record"):
        exact_match_eval(tiny_llama(tok), tok, [])


def _parse_table(text):
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()]
    return rows[0], rows[2:]


def test_accuracy_table_rows_and_columns():
    a = {"overall": 0.5, "total": 8, "per_task": {"reverse": 1.0, "add": 0.0},
         "counts": {"reverse": {"correct": 4, "total": 4}, "add": {"correct": 0, "total": 4}},
         "eval_loss": 1.23456}
    b = {"overall": 0.75, "total": 12, "per_task": {"reverse": 0.5, "add": 0.75, "max": 1.0},
         "counts": {"reverse": {"correct": 2, "total": 4}, "add": {"correct": 3, "total": 4},
                    "max": {"correct": 4, "total": 4}}}
    table = format_accuracy_table({"before SFT": a, "tp=2 x dp=2 ZeRO-1": b})
    header, rows = _parse_table(table)
    assert header == ["task", "n", "before SFT", "tp=2 x dp=2 ZeRO-1"]
    assert table.splitlines()[1].count("---") == 4
    assert [r[0] for r in rows] == ["add", "max", "reverse", "overall", "eval loss"]
    by_name = {r[0]: r[1:] for r in rows}
    assert by_name["add"] == ["4", "0.0%", "75.0%"]
    assert by_name["max"] == ["4", "-", "100.0%"]
    assert by_name["reverse"] == ["4", "100.0%", "50.0%"]
    assert by_name["overall"] == ["8", "50.0%", "75.0%"]
    assert by_name["eval loss"] == ["-", "1.235", "-"]
    with pytest.raises(ValueError, match="'broken'"):
        format_accuracy_table({"broken": {"overall": 1.0}})
