"""Tests for the SFT data pipeline and the locally trained tokenizer."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tp_trainer.app.data.sft import (
    IGNORE_INDEX,
    SFTDataCollator,
    format_example,
    format_prompt,
    load_alpaca,
    tokenize_sft,
)
from tp_trainer.app.data.tasks import generate_tasks
from tp_trainer.app.data.tokenizer import build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The canonical Stanford Alpaca templates (external reference text, not copied from the code).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSort it.\n\n### Input:\n3, 1, 2\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def records():
    return generate_tasks(300, seed=11)


@pytest.fixture(scope="module")
def tok(records):
    return build_tokenizer([format_example(r) for r in records], vocab_size=512)


# ------------------------------------------------------------------------- template
def test_prompt_template_matches_alpaca():
    assert format_prompt({"instruction": "Sort it.", "input": "3, 1, 2", "output": "1, 2, 3"}) == ALPACA_WITH_INPUT
    assert format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"}) == ALPACA_NO_INPUT
    assert format_prompt({"instruction": "Say hi.", "output": "hi"}) == ALPACA_NO_INPUT
    assert format_example({"instruction": "Say hi.", "output": "hi"}) == ALPACA_NO_INPUT + "hi"


# ------------------------------------------------------------------------ tokenizer
def test_tokenizer_specials_length_and_digit_split(tok):
    assert len(tok) % 8 == 0
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok.model_max_length == 512
    text = "What is 1234 + 98765? Answer: 99999 and 1000000007"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    for piece in tok.convert_ids_to_tokens(ids[1:]):
        if any(ch.isdigit() for ch in piece):
            assert len(piece) == 1, f"multi-char token with digits: {piece!r}"
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Every digit is its own token: 4 + 5 + 5 + 10 digits.
    digit_tokens = [p for p in tok.convert_ids_to_tokens(ids) if p.isdigit()]
    assert len(digit_tokens) == 24


def test_tokenizer_learns_merges_and_round_trips_text(tok, records):
    text = format_example(records[0]) + "\n  tabs\tand unicode: é ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # BPE merged the template words: far fewer tokens than bytes.
    prompt = format_prompt(records[0])
    assert len(tok(prompt)["input_ids"]) < len(prompt.encode()) / 2


def test_tokenizer_pads_vocab_with_filler_tokens(records):
    texts = [format_example(r) for r in records]
    small = build_tokenizer(texts, vocab_size=301)
    assert len(small) == 304  # 301 trained tokens + 3 fillers
    fillers = [t for t in small.get_vocab() if t.startswith("<|filler_")]
    assert len(fillers) == 3
    ids = small(texts[0])["input_ids"]
    assert not set(ids) & set(small.convert_tokens_to_ids(fillers))
    assert build_tokenizer(texts, vocab_size=301, pad_to_multiple_of=None).__len__() == 301
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(texts, vocab_size=100)
    with pytest.raises(ValueError, match="no training texts"):
        build_tokenizer([], vocab_size=512)


def test_tokenizer_save_and_reload_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    sample = "What is 12 + 345?\n\n### Response:\n357"
    script = textwrap.dedent(
        f"""
        import json, sys
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained({str(tmp_path)!r})
        print(json.dumps({{"len": len(t), "ids": t({sample!r})["input_ids"],
                          "special": [t.bos_token, t.eos_token, t.pad_token, t.unk_token],
                          "max_len": t.model_max_length, "fast": t.is_fast}}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["len"] == len(tok)
    assert got["ids"] == tok(sample)["input_ids"]
    assert got["special"] == ["<s>", "</s>", "<pad>", "<unk>"]
    assert got["max_len"] == 512 and got["fast"] is True


def test_builtin_tokenizer_template_tokens_and_word_identity(records, tmp_path):
    """The built-in default's tokenizer: each fixed piece of the Alpaca template is ONE (non-special) token, a word
    is the same token wherever it stands, digits stay single, and text still round-trips and reloads offline."""
    from transformers import AutoTokenizer

    from tp_trainer.app.data.builtin import TOKENIZER_OPTIONS, template_pieces

    pieces = template_pieces()
    assert len(pieces) == 4 and all(p in ALPACA_WITH_INPUT + ALPACA_NO_INPUT for p in pieces)
    texts = [format_example(r) for r in records]
    btok = build_tokenizer(texts, **TOKENIZER_OPTIONS)
    plain = build_tokenizer(texts, vocab_size=TOKENIZER_OPTIONS["vocab_size"])
    assert len(btok) % 8 == 0
    piece_ids = [btok.convert_tokens_to_ids(p) for p in pieces]
    assert all(btok(p, add_special_tokens=False)["input_ids"] == [i] for p, i in zip(pieces, piece_ids))
    assert len(set(piece_ids)) == 4 and not set(piece_ids) & set(btok.all_special_ids)
    prompt = format_prompt({"instruction": "Sort it.", "input": "3, 1, 2"})
    ids = btok(prompt)["input_ids"]
    assert ids[:2] == [btok.bos_token_id, btok.convert_tokens_to_ids(pieces[0])]
    assert btok.decode(ids, skip_special_tokens=True) == prompt  # template tokens are kept, not skipped
    assert len(ids) < len(plain(prompt)["input_ids"]) / 3
    for record in records[:50]:
        text = format_example(record)
        assert btok.decode(btok(text)["input_ids"], skip_special_tokens=True) == text
    odd = "What is 1234 + 98765? x\n  tabs\tand unicode: é ✓ ### Input: Below is"
    odd_ids = btok(odd)["input_ids"]
    assert btok.decode(odd_ids, skip_special_tokens=True) == odd
    assert sum(p.isdigit() for p in btok.convert_ids_to_tokens(odd_ids)) == 9
    # Word identity: "owl" at a line start, after a space, and as a whole response is one and the same token.
    owl = btok("owl", add_special_tokens=False)["input_ids"]
    assert len(owl) == 1
    assert btok("color: owl\nowl owl", add_special_tokens=False)["input_ids"].count(owl[0]) == 3
    plain_owl = plain("owl", add_special_tokens=False)["input_ids"]  # GPT-2 style: "owl" and "Ġowl" differ
    assert len(plain_owl) == 1 and plain("color: owl\nowl owl", add_special_tokens=False)["input_ids"].count(plain_owl[0]) == 1
    # SFT labels still start exactly at the response.
    ex = tokenize_sft([{"instruction": "Copy.", "input": "owl", "output": "owl"}], btok, max_length=64)[0]
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == owl + [btok.eos_token_id]
    # Saved and reloaded offline, it encodes the same.
    btok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(again) == len(btok) and again(prompt)["input_ids"] == ids
    with pytest.raises(ValueError, match="whole_tokens"):
        build_tokenizer(texts, vocab_size=512, whole_tokens=[""])


# ----------------------------------------------------------------------- tokenizing
def test_labels_mask_exactly_the_prompt(tok, records):
    ds = tokenize_sft(records, tok, max_length=256)
    assert len(ds) == len(records)
    for record, ex in zip(records, ds):
        n_prompt = len(tok(format_prompt(record))["input_ids"])
        ids, labels, mask = ex["input_ids"], ex["labels"], ex["attention_mask"]
        assert len(ids) == len(labels) == len(mask)
        assert all(m == 1 for m in mask)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == format_prompt(record)
        assert tok.decode(labels[n_prompt:]) == record["output"] + tok.eos_token
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


@pytest.fixture
def sft_log():
    """Records of the tp_trainer.app.data.sft logger at WARNING and above.

    Its own handler rather than caplog: the package logger does not propagate to the root, and
    pytest's ``caplog.at_level(logger=...)`` attaches its handler differently across pytest releases
    (9.2 adds it to the named logger too, so a handler added here would see each record twice).
    """
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("tp_trainer.app.data.sft")
    handler, level = Keep(level=logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_truncation_cuts_response_end_and_drops_long_prompts(tok, sft_log):
    long_out = {"instruction": "Reverse the sequence of letters.", "input": "a b c",
                "output": "c b a " * 10}
    n_prompt = len(tok(format_prompt(long_out))["input_ids"])
    ds = tokenize_sft([long_out], tok, max_length=n_prompt + 3)
    ex = ds[0]
    assert len(ex["input_ids"]) == n_prompt + 3
    kept = [x for x in ex["labels"] if x != IGNORE_INDEX]
    full_response = tok(long_out["output"], add_special_tokens=False)["input_ids"]
    assert kept == full_response[:3]  # the beginning of the response, EOS cut off

    short = {"instruction": "Say hi.", "input": "", "output": "hi"}
    huge_prompt = {"instruction": "word " * 200, "input": "", "output": "x"}
    ds = tokenize_sft([short, huge_prompt, short], tok, max_length=64)
    assert len(ds) == 2
    warnings = [r.getMessage() for r in sft_log if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 1 of 3" in warnings[0]

    with pytest.raises(ValueError, match="dropped all 1"):
        tokenize_sft([huge_prompt], tok, max_length=64)
    # A prompt of exactly max_length tokens leaves zero supervised tokens: dropped too.
    n_short = len(tok(format_prompt(short))["input_ids"])
    with pytest.raises(ValueError, match="max_length"):
        tokenize_sft([short], tok, max_length=n_short)
    with pytest.raises(ValueError, match="empty dataset"):
        tokenize_sft([], tok, max_length=64)


def test_packing_blocks_and_preserves_supervised_tokens(tok, records):
    max_length = 256
    plain = tokenize_sft(records, tok, max_length=max_length)
    packed = tokenize_sft(records, tok, max_length=max_length, packing=True)
    assert len(packed) < len(plain) / 2
    assert all(len(x) == max_length for col in ("input_ids", "labels", "attention_mask") for x in packed[col])

    def supervised(ds):
        return [t for labels in ds["labels"] for t in labels if t != IGNORE_INDEX]

    assert supervised(packed) == supervised(plain)
    real = [t for ids, m in zip(packed["input_ids"], packed["attention_mask"]) for t, k in zip(ids, m) if k]
    assert real == [t for ids in plain["input_ids"] for t in ids]
    for ids, labels, mask in zip(packed["input_ids"], packed["labels"], packed["attention_mask"]):
        n_real = sum(mask)
        assert mask == [1] * n_real + [0] * (max_length - n_real)
        assert ids[n_real:] == [tok.pad_token_id] * (max_length - n_real)
        assert labels[n_real:] == [IGNORE_INDEX] * (max_length - n_real)
        # whole examples only: every block starts with BOS and ends with EOS
        assert ids[0] == tok.bos_token_id and ids[n_real - 1] == tok.eos_token_id


def test_tokenize_accepts_loaded_dataset(tok, records, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    ds = tokenize_sft(load_alpaca(str(path)), tok, max_length=256)
    assert ds["input_ids"] == tokenize_sft(records[:10], tok, max_length=256)["input_ids"]


# -------------------------------------------------------------------------- loading
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


GOOD = {"instruction": "Say hi.", "output": "hi"}


def test_load_jsonl_and_json_list(tmp_path):
    lines = [json.dumps(GOOD), "", json.dumps({"instruction": "Add.", "input": "1 + 2", "output": "3", "task": "add", "extra": 5})]
    ds = load_alpaca(_write(tmp_path, "a.jsonl", "\n".join(lines) + "\n"))
    assert ds.column_names == ["instruction", "input", "output", "task"]
    assert ds["input"] == ["", "1 + 2"] and ds["task"] == ["", "add"] and ds["output"] == ["hi", "3"]
    ds2 = load_alpaca(_write(tmp_path, "a.json", json.dumps([GOOD, {**GOOD, "input": None}], indent=2)))
    assert len(ds2) == 2 and ds2["input"] == ["", ""]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"instruction": "x", "output": ', "invalid JSON"),
        ('{"instruction": "x"}', "missing required field 'output'"),
        ('{"instruction": "x", "output": 3}', "'output' must be a string"),
        ('{"instruction": "x", "output": "y", "input": ["a"]}', "'input' must be a string"),
        ('{"instruction": "   ", "output": "y"}', "'instruction' is empty"),
        ('["instruction", "output"]', "expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    text = "\n".join([json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    path = _write(tmp_path, "bad.jsonl", text)
    with pytest.raises(ValueError) as info:
        load_alpaca(path)
    assert path in str(info.value)
    assert "line 3" in str(info.value)
    assert message in str(info.value)


def test_malformed_json_list_names_index(tmp_path):
    path = _write(tmp_path, "bad.json", json.dumps([GOOD, GOOD, {"instruction": "x", "output": None}]))
    with pytest.raises(ValueError, match=r"index 2: field 'output' must be a string"):
        load_alpaca(path)
    broken = _write(tmp_path, "broken.json", '[\n{"instruction": "x",\n "output": }\n]')
    with pytest.raises(ValueError, match="invalid JSON at line 3"):
        load_alpaca(broken)


def test_skip_mode_warns_once_with_count_and_locations(tmp_path, sft_log):
    lines = [json.dumps(GOOD), "not json", json.dumps({"output": "y"}), json.dumps(GOOD), "{"]
    path = _write(tmp_path, "mixed.jsonl", "\n".join(lines))
    ds = load_alpaca(path, on_error="skip")
    assert len(ds) == 2
    messages = [r.getMessage() for r in sft_log]
    assert len(messages) == 1
    assert "skipped 3 malformed" in messages[0]
    assert messages[0].index("line 2") < messages[0].index("line 3") < messages[0].index("line 5")


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no valid Alpaca records.*empty"):
        load_alpaca(_write(tmp_path, "empty.jsonl", "\n\n"))
    with pytest.raises(ValueError, match="no valid Alpaca records"):
        load_alpaca(_write(tmp_path, "empty.json", "[]"))
    with pytest.raises(ValueError, match="2 malformed"):
        load_alpaca(_write(tmp_path, "allbad.jsonl", "{}\n[]\n"), on_error="skip")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_alpaca(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="on_error"):
        load_alpaca(_write(tmp_path, "x.jsonl", json.dumps(GOOD)), on_error="ignore")


# ------------------------------------------------------------------------- collator
def test_collator_padding_values_and_determinism(tok):
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        {"input_ids": [9, 10], "labels": [-100, 10]},  # attention_mask defaults to ones
    ]
    batch = SFTDataCollator(tok)(features)
    pad = tok.pad_token_id
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad], [9, 10, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]

    padded = SFTDataCollator(tok, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (3, 8)
    assert padded["input_ids"][0, 3:].tolist() == [pad] * 5
    again = SFTDataCollator(tok, pad_to_multiple_of=8)(features)
    assert all(torch.equal(padded[k], again[k]) for k in padded)

    assert SFTDataCollator(pad_token_id=99)(features[1:2])["input_ids"].tolist() == [[8]]
    with pytest.raises(ValueError, match="mismatched lengths"):
        SFTDataCollator(tok)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="pad_token_id"):
        SFTDataCollator()


def test_collator_on_tokenized_dataset(tok, records):
    ds = tokenize_sft(records[:4], tok, max_length=256)
    batch = SFTDataCollator(tok)([ds[i] for i in range(4)])
    lengths = [len(x) for x in ds["input_ids"]]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    n_sup = sum(sum(t != IGNORE_INDEX for t in labels) for labels in ds["labels"])
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == n_sup
