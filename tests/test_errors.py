"""The catalog of bad inputs (docs/errors.md): every user error tp_trainer detects, triggered as a user would.

One parametrized case per error. Each trigger goes through the entry point a user meets first: the
``tp-trainer train`` / ``tp-trainer plan`` commands (in this process: their ``main``, whose launcher
is replaced by a guard that fails the test if anything is launched), ``TPTrainingArguments`` (what a
script builds from its flags), ``TPTrainer.train(resume_from_checkpoint=...)`` on a real sharded
checkpoint, the resume decision of ``tp-trainer train``, and the data loader the command runs. Each
case checks that the message names the offending value and the fix (the words listed with it). How
early each is refused is the "when" column of docs/errors.md; the triggers check what they can: the
commands launch nothing (their launcher is a guard), ``TPTrainingArguments`` joins no process group,
a refused resume leaves every weight as it was. The data checks run in the ranks today (see the doc).

Every case's message is in docs/errors.md; ``test_the_catalog_lists_every_case`` keeps the two in step.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from models import tiny_model
from test_storage_faults import read_only_under

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG = os.path.join(ROOT, "docs", "errors.md")


@dataclass
class Case:
    id: str
    trigger: Callable  # (tmp_path, monkeypatch) -> the message the user sees
    names: tuple[str, ...]  # the offending value(s), as the message must name them
    fix: tuple[str, ...]  # words of the fix
    pending: str | None = None  # the fix phrase is missing today: what must change, and where
    marks: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------ triggers
def train_cli(*argv):
    """``tp-trainer train ARGV`` in this process; the message it prints (it must refuse with status 2)."""
    def trigger(tmp, monkeypatch):
        from tp_trainer.app import launch
        from tp_trainer.commands import train

        def launched(*args, **kwargs):
            raise AssertionError(f"tp-trainer train {list(argv)} launched its world despite the bad input")

        monkeypatch.setattr(launch, "relaunch", launched)
        monkeypatch.setattr(train, "train", launched)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.chdir(tmp)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.main([a.replace("{tmp}", str(tmp)) for a in argv])
        assert code == 2, f"exit status {code}, stderr: {err.getvalue()}"
        return err.getvalue()
    return trigger


def plan_cli(config: dict, tp: int, *extra):
    """``tp-trainer plan config.json --tp-size TP`` (a meta model: no weights)."""
    def trigger(tmp, monkeypatch):
        from tp_trainer.commands import plan

        path = tmp / "config.json"
        path.write_text(json.dumps(config))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = plan.main([str(path), "--tp-size", str(tp), *extra])
        assert code in (1, 2), f"exit status {code}, stderr: {err.getvalue()}"
        return err.getvalue()
    return trigger


def arguments(env=None, **kwargs):
    """``TPTrainingArguments(**kwargs)`` as a script's flags build them (``WORLD_SIZE`` etc. from ``env``)."""
    def trigger(tmp, monkeypatch):
        from tp_trainer import TPTrainingArguments

        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        values = {key: (v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v) for key, v in kwargs.items()}
        with pytest.raises((ValueError, TypeError)) as err:
            TPTrainingArguments(output_dir=str(tmp / "out"), report_to=[], use_cpu=True, **values)
        import torch.distributed as dist

        assert not dist.is_initialized(), "refused after joining a process group"
        return str(err.value)
    return trigger


def tp_config(content, **flags):
    """``--tp_config ds.json`` holding ``content`` (a dict, or raw text), with ``flags``."""
    def trigger(tmp, monkeypatch):
        path = tmp / "ds.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return arguments(tp_config=str(path), **flags)(tmp, monkeypatch)
    return trigger


def data(text: str, *, name="train.jsonl"):
    """The command's data loader (``load_alpaca``) on a file holding ``text``."""
    def trigger(tmp, monkeypatch):
        from tp_trainer.app.data.sft import load_alpaca

        path = tmp / name
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            load_alpaca(str(path))
        return str(err.value)
    return trigger


def resume_value(value: str, *, setup=None):
    """``tp-trainer train``'s check of ``resume_from_checkpoint`` before it launches anything."""
    def trigger(tmp, monkeypatch):
        from tp_trainer.app.resume import check_resume_value

        if setup:
            setup(tmp)
        with pytest.raises(ValueError) as err:
            check_resume_value(value.replace("{tmp}", str(tmp)), str(tmp / "out"))
        return str(err.value)
    return trigger


# ---- checkpoints: a real sharded checkpoint (single process, ZeRO-1: tp_trainer's format), then damage
STEPS = 2


def _trainer(out, model=None):
    import datasets

    from tp_trainer import TPTrainer, TPTrainingArguments

    ids = (torch.arange(16) + torch.arange(8)[:, None]) % 90 + 3
    train = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TPTrainingArguments(output_dir=str(out), zero_stage=1, per_device_train_batch_size=4, max_steps=STEPS,
                               save_strategy="steps", save_steps=STEPS, report_to=[], use_cpu=True, disable_tqdm=True)
    return TPTrainer(model=model or tiny_model("llama"), args=args, train_dataset=train)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    _trainer(out).train()
    return str(out / f"checkpoint-{STEPS}")


def damaged(damage):
    """Resume ``TPTrainer`` from a copy of the saved checkpoint after ``damage(copy)``: refused, weights untouched."""
    def trigger(tmp, monkeypatch, checkpoint):
        from tp_trainer.checkpoint import CheckpointError

        copy = str(tmp / f"checkpoint-{STEPS}")
        shutil.copytree(checkpoint, copy)
        model = damage(copy)
        trainer = _trainer(tmp / "resumed", model)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        with pytest.raises(CheckpointError) as err:
            trainer.train(resume_from_checkpoint=copy)
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()), "weights were modified"
        return str(err.value)
    trigger.needs_checkpoint = True
    return trigger


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def _corrupt(copy):
    _flip_byte(os.path.join(copy, "model-tp00-of-01.safetensors"))


def _truncate(copy):
    path = os.path.join(copy, "optim-rank00000.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _drop_rank_file(copy):
    os.remove(os.path.join(copy, "optim-rank00000.safetensors"))


def _other_model(copy):
    return tiny_model("llama", hidden_size=96)  # the checkpoint is of a 64-wide model


def _tokenizer(vocab: dict):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def other_tokenizer(tmp, monkeypatch):
    """A checkpoint saved with one tokenizer, resumed with another of the same size (ids would mean other tokens)."""
    from tp_trainer.app.resume import check_same_tokenizer

    checkpoint = tmp / "out" / "checkpoint-4"
    os.makedirs(checkpoint)
    _tokenizer({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}).save_pretrained(str(checkpoint))
    ours = tmp / "tokenizer"
    _tokenizer({"<unk>": 0, "</s>": 1, "b": 2, "a": 3}).save_pretrained(str(ours))
    check_same_tokenizer(str(checkpoint), _tokenizer({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}))  # the same: fine
    with pytest.raises(ValueError) as err:
        check_same_tokenizer(str(checkpoint), str(ours))
    return str(err.value)


def save_fault(kind: str):
    """A checkpoint save (``write_checkpoint``, one process) after a good checkpoint-1, the disk failing as
    ``kind`` says (injected at the safetensors write: the tests run as root, chmod stops nothing); the error
    must leave checkpoint-1 alone and no partial directory."""
    def trigger(tmp, monkeypatch):
        from tp_trainer.checkpoint import CheckpointSaveError, save, write_checkpoint
        from tp_trainer.parallel.context import ParallelContext

        model, ctx, out = tiny_model("llama"), ParallelContext.single(), tmp / "out"
        write_checkpoint(str(out / "checkpoint-1"), model=model, optimizer=None, ctx=ctx, zero_stage=0)
        real = save.save_file

        def faulty(tensors, path, **kwargs):
            if kind == "removed":  # another job deletes the directory being written (a real ENOENT follows)
                shutil.rmtree(os.path.dirname(path))
                return real(tensors, path, **kwargs)
            code = {"full": errno.ENOSPC, "read-only": errno.EROFS}[kind]
            raise OSError(code, os.strerror(code), path)

        monkeypatch.setattr(save, "save_file", faulty)
        with pytest.raises(CheckpointSaveError) as err:
            write_checkpoint(str(out / "checkpoint-2"), model=model, optimizer=None, ctx=ctx, zero_stage=0)
        assert sorted(os.listdir(out)) == ["checkpoint-1"], "a partial save was left, or checkpoint-1 lost"
        return str(err.value)
    return trigger


def read_only_output_dir(tmp, monkeypatch):
    """``tp-trainer train --output_dir RO`` where RO cannot be written (its probe file fails as on a read-only
    mount): refused before the launch, before the model or the built-in assets are made."""
    read_only_under(monkeypatch, tmp / "ro")
    message = train_cli(RECIPE, "--output_dir", "{tmp}/ro")(tmp, monkeypatch)
    assert not os.path.exists(tmp / "ro" / "builtin"), "the built-in assets were generated before the check"
    return message


def _partial_checkpoint(tmp):
    os.makedirs(tmp / "out" / "checkpoint-8")  # a plain Trainer save killed before its trainer_state.json


LLAMA = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1,
         "num_attention_heads": 6, "num_key_value_heads": 6, "vocab_size": 96}
RECIPE = os.path.join(ROOT, "recipes", "tiny-sft.yaml")
GOOD_RECORD = '{"instruction": "Add 1 and 2.", "input": "", "output": "3"}\n'


def _write(name, text):
    def setup(tmp):
        (tmp / name).write_text(text)
    return setup


CASES = [
    # ---- layout arithmetic
    Case("tp-size-below-1", arguments(tp_size=0), ("tp_size", "0"), (">= 1",)),
    Case("world-not-divisible-by-tp", arguments(env={"WORLD_SIZE": "3"}, tp_size=2), ("WORLD_SIZE=3", "tp_size=2"),
         ("launch a multiple of 2 processes",)),
    Case("zero-stage-unknown", arguments(zero_stage=4), ("zero_stage", "4"), ("0, 1, 2 or 3",)),
    Case("zero-3-with-torch-compile", arguments(zero_stage=3, torch_compile=True), ("zero_stage=3", "--torch_compile"),
         ("compile with zero_stage 1 or 2",)),
    Case("liger-kernel-with-tp", arguments(env={"WORLD_SIZE": "2"}, tp_size=2, use_liger_kernel=True),
         ("use_liger_kernel", "tp_size > 1"), ("set use_liger_kernel=False",)),
    Case("batch-rebalance-with-tp", arguments(zero_stage=1, train_sampling_strategy="batch_rebalance"),
         ("batch_rebalance",), ("use 'random' or 'group_by_length'",)),
    Case("fp16-with-tp-or-zero", arguments(zero_stage=1, fp16=True), ("fp16",), ("use --bf16",)),
    Case("deepspeed-with-tp-or-zero", arguments(zero_stage=1, deepspeed="{tmp}/ds.json"), ("--deepspeed",),
         ("--tp_config",)),
    Case("cpu-kernels-value", arguments(cpu_kernels="fast"), ("'fast'",), ("'auto'", "'off'")),
    Case("sequence-parallel-at-tp-1", arguments(sequence_parallel=True), ("sequence_parallel=True", "tp_size=1"),
         ("set tp_size > 1",)),
    Case("nproc-not-a-multiple-of-tp", train_cli(RECIPE, "--nproc_per_node", "3"), ("3", "tp_size=2"),
         ("nproc_per_node",)),
    Case("nproc-below-1", train_cli(RECIPE, "--nproc_per_node", "0"), ("nproc_per_node", "0"), (">= 1",)),
    # `accelerate launch --num_processes 2 script.py` on a machine without GPUs runs ONE process (no --multi_gpu)
    Case("accelerate-single-process-cpu",
         arguments(env={"MASTER_ADDR": "127.0.0.1", "ACCELERATE_USE_CPU": "False",
                        "ACCELERATE_MIXED_PRECISION": "no"}, tp_size=2),
         ("WORLD_SIZE=1", "tp_size=2"), ("--multi_gpu",)),
    # ---- head counts (tp-trainer plan on a config: a meta model)
    Case("heads-not-divisible", plan_cli(LLAMA, 4), ("tp_size=4", "num_attention_heads=6"),
         ("Use a tp_size that divides 6",)),
    Case("kv-heads-neither-split-nor-replicated",
         plan_cli({**LLAMA, "num_attention_heads": 12, "num_key_value_heads": 3, "hidden_size": 96}, 2),
         ("tp_size=2", "num_key_value_heads=3"), ("Use a tp_size that divides or is a multiple of 3",)),
    # ---- plans
    Case("tp-plan-not-json", arguments(tp_plan="{model.layers: colwise"), ("tp_plan",), ("JSON object", "e.g.")),
    Case("tp-plan-not-an-object", arguments(tp_plan='["colwise"]'), ("tp_plan", "['colwise']"),
         ("must map module patterns", "e.g.")),
    Case("tp-plan-unknown-style", arguments(tp_plan='{"model.layers.*.mlp.down_proj": "diagonal"}'),
         ("'diagonal'",), ("rowwise",)),
    Case("tp-plan-matches-nothing", plan_cli(LLAMA, 2, "--tp-plan", '{"model.decoder.*.fc1": "colwise"}'),
         ("'model.decoder.*.fc1'",), ("matches no module",)),
    Case("tp-plan-colwise-on-a-norm", plan_cli(LLAMA, 2, "--tp-plan", '{"model.norm": "colwise"}'),
         ("model.norm", "colwise"), ("Use 'replicated' for it",)),
    # ---- data
    Case("train-file-missing", train_cli(RECIPE, "--model_name_or_path", "{tmp}", "--train_file", "{tmp}/nope.json"),
         ("nope.json",), ("omit train_file",)),
    Case("data-not-json", data('[{"instruction": "x", "output": "y"},', name="train.json"), ("train.json", "line 1"),
         ("JSON list of records or JSON Lines",)),
    Case("data-record-missing-output", data(GOOD_RECORD + '{"instruction": "Add 2 and 2."}\n'),
         ("line 2", "'output'"), ("non-empty string 'instruction' and 'output'",)),
    Case("data-empty", data(""), ("train.jsonl", "file is empty"), ("'instruction' and 'output'",)),
    Case("max-length-too-small", train_cli(RECIPE, "--max_length", "4"), ("max_length", "4"), (">= 8",)),
    Case("generated-task-unknown", train_cli(RECIPE, "--generated_tasks", "add_digits,fly"), ("'fly'",),
         ("choose from",)),
    # ---- recipes
    Case("recipe-missing", train_cli("{tmp}/nope.yaml"), ("nope.yaml",), ("does not exist",)),
    Case("recipe-not-yaml", train_cli("{tmp}/bad.yaml"), ("bad.yaml", "line 1"), ("not valid YAML",)),
    Case("recipe-not-a-mapping", train_cli("{tmp}/list.yaml"), ("list.yaml", "list"), ("mapping of field: value",)),
    Case("recipe-unknown-field", train_cli("{tmp}/typo.yaml"), ("'zero_stag'",), ("did you mean 'zero_stage'",)),
    Case("dtype-unknown", train_cli(RECIPE, "--dtype", "float8"), ("'float8'",), ("'bfloat16'",)),
    Case("model-path-missing", train_cli(RECIPE, "--model_name_or_path", "{tmp}/no-model", "--train_file",
                                         "{tmp}/train.jsonl"),
         ("no-model",), ("nothing is downloaded", "built-in config")),
    Case("trainer-unknown", train_cli(RECIPE, "--trainer", "ppo"), ("'ppo'",), ("'sft'", "'dpo'")),
    # ---- DeepSpeed JSON (--tp_config)
    Case("tp-config-missing", arguments(tp_config="{tmp}/none.json"), ("none.json",), ("does not exist",)),
    Case("tp-config-not-json", tp_config('{"tensor_parallel": {"autotp_size": ...}}'), ("ds.json",),
         ("placeholders must be removed",)),
    Case("tp-config-not-an-object", tp_config("[1, 2]"), ("ds.json", "list"), ("JSON object",)),
    Case("tp-config-conflicts-with-a-flag", tp_config({"zero_optimization": {"stage": 1}}, zero_stage=2),
         ("zero_stage=1", "zero_stage=2"), ("remove one of them",)),
    # ---- checkpoints (TPTrainer.train(resume_from_checkpoint=...)); the resume decision of tp-trainer train
    Case("checkpoint-corrupted", damaged(_corrupt), ("model-tp00-of-01.safetensors", "sha256"),
         ("resume from an earlier checkpoint",)),
    Case("checkpoint-truncated", damaged(_truncate), ("optim-rank00000.safetensors", "bytes"),
         ("resume from an earlier checkpoint",)),
    Case("checkpoint-missing-rank-file", damaged(_drop_rank_file), ("optim-rank00000.safetensors", "is missing"),
         ("copy the whole checkpoint directory",)),
    Case("checkpoint-of-another-model", damaged(_other_model), ("different model", "model.embed_tokens.weight"),
         ("resume from a checkpoint of this model",)),
    Case("checkpoint-of-another-tokenizer", other_tokenizer, ("another tokenizer", "token ids differ"),
         ("tokenizer_name_or_path", "resume_from_checkpoint: none")),
    Case("checkpoint-incomplete", resume_value("{tmp}/out/checkpoint-8", setup=_partial_checkpoint),
         ("checkpoint-8", "neither tp_checkpoint.json nor trainer_state.json"), ("'auto'", "'none'")),
    Case("checkpoint-save-disk-full", save_fault("full"), ("out/checkpoint-2", "no space left on device"),
         ("free space", "lower save_total_limit", "earlier checkpoints are intact")),
    Case("checkpoint-save-read-only", save_fault("read-only"), ("out/checkpoint-2", "out is read-only / not writable"),
         ("output_dir to a writable directory",)),
    Case("checkpoint-save-dir-removed", save_fault("removed"),
         ("out/checkpoint-2", "out/.tmp-checkpoint-2 was removed while saving"), ("give each run its own output_dir",)),
    Case("output-dir-read-only", read_only_output_dir, ("output_dir", "ro' is not usable", "read-only / not writable"),
         ("output_dir to a writable directory",)),
    Case("checkpoint-path-missing", resume_value("{tmp}/out/chekpoint-8"), ("chekpoint-8", "not a directory"),
         ("checkpoint-N directory",)),
]
SETUP = {"recipe-not-yaml": _write("bad.yaml", "tp_size: [2\n"), "recipe-not-a-mapping": _write("list.yaml", "- 1\n"),
         "recipe-unknown-field": _write("typo.yaml", "zero_stag: 1\n"),
         "model-path-missing": _write("train.jsonl", GOOD_RECORD)}


def _param(case):
    marks = list(case.marks)
    if case.pending:
        marks.append(pytest.mark.xfail(strict=True, reason=f"fix phrase pending: {case.pending}"))
    return pytest.param(case, id=case.id, marks=marks)


def message_of(case, tmp_path, monkeypatch, request) -> str:
    if case.id in SETUP:
        SETUP[case.id](tmp_path)
    if getattr(case.trigger, "needs_checkpoint", False):
        return case.trigger(tmp_path, monkeypatch, request.getfixturevalue("saved_checkpoint"))
    return case.trigger(tmp_path, monkeypatch)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_the_error_names_the_offending_value(case, tmp_path, monkeypatch, request):
    message = message_of(case, tmp_path, monkeypatch, request)
    for words in case.names:
        assert words in message, f"{case.id}: {words!r} not in the message:\n{message}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_the_error_names_the_fix(case, tmp_path, monkeypatch, request):
    message = message_of(case, tmp_path, monkeypatch, request)
    for words in case.fix:
        assert words in message, f"{case.id}: the fix {words!r} is not in the message:\n{message}"


def test_the_catalog_lists_every_case():
    with open(CATALOG) as f:
        text = f.read()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/errors.md has no entry for {missing}"
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
