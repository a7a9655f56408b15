"""A recipe: one YAML of training-argument fields plus model, data and launch fields.

``tp-trainer train RECIPE.yaml [--field value ...]`` parses the YAML and the command line with
ONE ``HfArgumentParser`` over four dataclasses: the YAML values become the parser's defaults,
the command line overrides them, and every dataclass validates itself in ``__post_init__``.
So any field may live in the file or on the command line, with the same names and types::

    tp-trainer train recipes/tiny-sft.yaml --max_steps 20 --tp_size 1 --zero_stage 1

``trainer`` (YAML or ``--trainer``) picks the job and with it the data and training dataclasses
(:data:`TRAINERS`): ``sft`` (the default) trains ``TPTrainer`` on Alpaca data with
``TPTrainingArguments``; ``dpo`` trains TRL's DPO (``tp_trainer.trl.TPDPOTrainer``, the ``trl``
extra) on preference pairs with ``TPDPOConfig``, whose ``max_length``, ``beta``, ``loss_type``, ...
are recipe fields too.

An unknown key in the YAML is an error naming it (with the closest known field, or the trainer
it belongs to), raised before any process is launched or any model is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import yaml

from ..args import TPTrainingArguments
from .lora import LoraSettings, flatten_lora_block

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny-llama", metadata={
        "help": "A local Hugging Face model directory, or the name of a built-in config (see "
                "tp_trainer.app.data.builtin.BUILTIN_MODELS, e.g. 'tiny-llama') whose initial weights are "
                "generated from training seed (nothing is downloaded)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer directory (default: the model directory; for a built-in model, a byte-level BPE "
                "tokenizer trained locally on the generated data and saved with the model)."})
    dtype: str = field(default="float32", metadata={
        "help": f"Weights dtype when loading: one of {DTYPES}. Mixed precision is --bf16 (fp32 master weights)."})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class GeneratedDataArguments:
    """Where the data comes from when no file is given: the built-in tasks (shared by every trainer)."""

    data_dir: str | None = field(default=None, metadata={
        "help": "Where the generated data, tokenizer and initial built-in model are written "
                "(default: OUTPUT_DIR/builtin). Generation is deterministic, so runs sharing it agree."})
    generated_train_size: int = field(default=4000, metadata={"help": "Generated training records."})
    generated_eval_size: int = field(default=200, metadata={"help": "Generated held-out eval records."})
    generated_tasks: str = field(default="all", metadata={
        "help": "Comma-separated generated tasks (add, sort, reverse, copy_field, max) or 'all'."})
    generated_seed: int = field(default=1234, metadata={"help": "Seed of the generated data and tokenizer."})
    eval_max_new_tokens: int = field(default=24, metadata={"help": "Generation budget of exact-match eval."})

    def __post_init__(self):
        for name in ("generated_train_size", "generated_eval_size", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.task_names()  # unknown task names fail now

    def task_names(self) -> list[str] | None:
        if self.generated_tasks in ("all", ""):
            return None
        from .data.tasks import TASKS

        names = [t.strip() for t in self.generated_tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ValueError(f"generated_tasks names unknown task(s) {unknown}; choose from {sorted(TASKS)} or 'all'")
        return names


@dataclass
class DataArguments(GeneratedDataArguments):
    """Data of ``trainer: sft``."""

    train_file: str | None = field(default=None, metadata={
        "help": "Alpaca-format JSON/JSONL training data (instruction, input, output). Default: the generated "
                "instruction tasks of tp_trainer.app.data.tasks, written to data_dir."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Held-out Alpaca-format data for eval loss and exact-match accuracy (default: the generated "
                "eval split when train_file is generated, otherwise none)."})
    max_length: int = field(default=256, metadata={"help": "Tokens per example (prompt kept, response cut)."})
    packing: bool = field(default=False, metadata={"help": "Pack whole examples into max_length blocks."})

    def __post_init__(self):
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens, got {self.max_length}")
        super().__post_init__()


@dataclass
class PreferenceDataArguments(GeneratedDataArguments):
    """Data of ``trainer: dpo`` (its ``max_length`` is ``TPDPOConfig``'s)."""

    train_file: str | None = field(default=None, metadata={
        "help": "Preference pairs (JSON/JSONL with prompt, chosen, rejected), or Alpaca records turned into pairs "
                "(chosen: the output, rejected: the output with one digit or letter changed; "
                "tp_trainer.app.data.preference). Default: pairs from the generated instruction tasks."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Held-out data in either format for the DPO eval metrics (an Alpaca file also gets exact-match "
                "accuracy before and after). Default: the generated eval split when train_file is generated."})


@dataclass
class JobArguments:
    trainer: str = field(default="sft", metadata={
        "help": "The job: 'sft' (TPTrainer on Alpaca data, the default) or 'dpo' (TRL's DPO on preference pairs, "
                "tp_trainer.trl.TPDPOTrainer; needs pip install \"tp_trainer[trl]\")."})
    nproc_per_node: int | None = field(default=None, metadata={
        "help": "Processes that `tp-trainer train` launches (through torch.distributed.run) when it is not "
                "already under torchrun/accelerate launch. Default: the visible GPUs, or tp_size on CPU."})
    final_model_dir: str | None = field(default=None, metadata={
        "help": "Where save_model writes the trained HF model (default: OUTPUT_DIR/final)."})
    eval_after_train: bool = field(default=True, metadata={
        "help": "After saving, evaluate the saved model (and the model before SFT) on the eval split in one "
                "process: exact-match accuracy per task and eval loss."})
    eval_limit: int | None = field(default=None, metadata={
        "help": "Evaluate at most this many eval records after training (default: all)."})
    max_restarts: int = field(default=3, metadata={
        "help": "How many times torch's elastic agent restarts the workers after a rank fails (a crash, a kill, "
                "a peer that timed out); each restart resumes from the newest complete checkpoint. 0: a failed "
                "rank ends the job."})
    shutdown_timeout: int = field(default=120, metadata={
        "help": "Seconds the workers have after SIGTERM/SIGUSR1 to finish the optimizer step, save a checkpoint "
                "and exit 0, before the agent kills them."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over: remove the checkpoints in output_dir instead of resuming from the newest complete one "
                "(resume_from_checkpoint: auto, the default)."})

    def __post_init__(self):
        from .launch import check_restarts

        check_trainer(self.trainer)
        check_restarts(self.max_restarts, self.shutdown_timeout)
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or unset, got {self.eval_limit}")


class Recipe(NamedTuple):
    model: ModelArguments
    data: DataArguments | PreferenceDataArguments
    job: JobArguments
    training: TPTrainingArguments  # or tp_trainer.trl.TPDPOConfig for trainer: dpo
    lora: LoraSettings  # use_lora and the lora: block (app/lora.py)

    @property
    def max_length(self) -> int:
        """Tokens per example: the data's (sft) or the DPO config's (dpo)."""
        return self.data.max_length if hasattr(self.data, "max_length") else self.training.max_length


TRAINERS = ("sft", "dpo")


def check_trainer(name: str) -> None:
    if name not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {name!r}")


def dataclasses_for(trainer: str = "sft") -> tuple[type, ...]:
    """The five dataclasses a recipe of ``trainer`` is parsed into; ``dpo`` needs the ``trl`` extra."""
    check_trainer(trainer)
    if trainer == "dpo":
        from ..extras import require

        require("trl", feature="trainer: dpo")
        from ..trl import TPDPOConfig

        return ModelArguments, PreferenceDataArguments, JobArguments, TPDPOConfig, LoraSettings
    return ModelArguments, DataArguments, JobArguments, TPTrainingArguments, LoraSettings


DATACLASSES = dataclasses_for("sft")


def make_parser(trainer: str = "sft"):
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclasses_for(trainer))


def known_fields(trainer: str = "sft") -> set[str]:
    return {f.name for cls in dataclasses_for(trainer) for f in fields(cls) if f.init}


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"recipe {path!r} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path!r} must be a YAML mapping of field: value, got {type(values).__name__}")
    return values


def _other_trainer_with(key: str, trainer: str) -> str | None:
    for other in TRAINERS:
        if other != trainer:
            try:
                if key in known_fields(other):
                    return other
            except ImportError:  # its extra is not installed: no hint from it
                continue
    return None


def read_recipe_file(path: str, trainer: str | None = None) -> dict:
    """The YAML mapping at ``path``; unknown keys (for its ``trainer``) are an error naming the key and a close match."""
    values = flatten_lora_block(_load_yaml(path))
    trainer = trainer or values.get("trainer", "sft")
    known = known_fields(trainer)
    for key in values:
        if key not in known:
            other = _other_trainer_with(str(key), trainer)
            if other is not None:
                raise ValueError(f"recipe {path!r}: field {key!r} belongs to trainer: {other}, and this recipe "
                                 f"trains trainer: {trainer}")
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"recipe {path!r}: unknown field {key!r}{hint}. Fields are those of the training "
                             "arguments, ModelArguments, the data arguments, JobArguments and LoraSettings "
                             "(tp_trainer/app/recipe.py).")
    return values


def parse_recipe(argv: list[str]) -> Recipe:
    """``[RECIPE.yaml] [--field value ...]`` -> :class:`Recipe` (YAML values overridden by flags)."""
    argv = list(argv)
    trainer = peek(argv, "trainer", str) or "sft"
    values = {}
    if argv and not argv[0].startswith("-"):
        values = read_recipe_file(argv.pop(0), trainer)
    parser = make_parser(trainer)
    parser.set_defaults(resume_from_checkpoint="auto", **values)  # app/resume.py: the newest complete checkpoint
    model, data, job, training, lora = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return Recipe(model, data, job, training, lora)


def peek(argv: list[str], name: str, type_=int):
    """The value of one field (command line over YAML, else ``None``) without building the dataclasses."""
    argv = list(argv)
    values = _load_yaml(argv.pop(0)) if argv and not argv[0].startswith("-") else {}
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(f"--{name}", type=type_, default=values.get(name))
    known, _ = parser.parse_known_args(argv)
    return getattr(known, name)


@contextlib.contextmanager
def world_size_env(world_size: int):
    """Parse as the future ranks will: ``TPTrainingArguments`` checks ``WORLD_SIZE % tp_size`` at construction."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved
