"""The built-in default job's assets, generated locally and deterministically (nothing is downloaded).

``prepare_builtin(data_dir, ...)`` writes, once::

    data_dir/train.jsonl, eval.jsonl          generated tasks (tp_trainer.app.data.tasks), held-out eval split
    data_dir/tokenizer-<tag>/                 byte-level BPE fast tokenizer trained on the train split
                                              (<tag>: a hash of TOKENIZER_OPTIONS)
    data_dir/<model>-seed<S>/                 the initial model: a built-in config + that tokenizer,
                                              random weights from torch.manual_seed(S)

The initial model is an ordinary HF directory, so every layout of an experiment starts from the
same weights by loading it, and "the model before SFT" is something ``tp-trainer eval`` can read.
Each asset is written into a temporary directory and renamed into place, so an interrupted
preparation never leaves a half asset that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from transformers.utils import logging

from .sft import PROMPT_TEMPLATE, PROMPT_TEMPLATE_NO_INPUT, format_example
from .tasks import write_task_splits
from .tokenizer import build_tokenizer

logger = logging.get_logger(__name__)

#: Built-in model configs (Llama architecture); vocab_size comes from the tokenizer.
#: tiny-llama: 4 heads of 32 so tp 1, 2 and 4 all split heads evenly; ~0.9M parameters with the built-in
#: tokenizer's ~520 tokens, so the default's 1000 tp=2 steps of 64 sequences take under 2 minutes on 2 CPU cores.
#: (The MLP width 320 is deliberately not 384 = q+k+v width, which the planner's fused-QKV heuristic would flag.)
BUILTIN_MODELS = {
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0),
}
TOKENIZER_VOCAB = 1024


def template_pieces() -> tuple[str, ...]:
    """The fixed text of the Alpaca prompt templates between the fields: each becomes ONE token of the built-in
    tokenizer (a prompt is then ~20 tokens instead of ~60; the template itself is unchanged)."""
    pieces = []
    for template in (PROMPT_TEMPLATE, PROMPT_TEMPLATE_NO_INPUT):
        head, rest = template.split("{instruction}")
        pieces += [head, *(p for p in rest.replace("{input}", "{}").split("{}") if p)]
    return tuple(dict.fromkeys(pieces))


#: build_tokenizer options of the built-in tokenizer (its directory name carries their hash, so a change is never
#: served a stale tokenizer from an earlier run's data_dir).
TOKENIZER_OPTIONS = dict(vocab_size=TOKENIZER_VOCAB, whole_tokens=template_pieces(), isolate_words=True)


def is_builtin(name: str) -> bool:
    return name in BUILTIN_MODELS and not os.path.isdir(name)


def _atomic_dir(final: str, write) -> str:
    """Run ``write(tmp_dir)`` and rename the result to ``final`` (skipped when ``final`` exists)."""
    if os.path.isdir(final):
        return final
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        if not os.path.isdir(final):  # a concurrent writer did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_data(data_dir: str, *, train_size: int, eval_size: int, tasks, seed: int) -> dict[str, str]:
    """Generated ``train.jsonl``/``eval.jsonl`` under ``data_dir/tasks-<spec>/`` (spec in the name)."""
    spec = f"n{train_size}-e{eval_size}-s{seed}-{'+'.join(tasks) if tasks else 'all'}"
    out = _atomic_dir(os.path.join(data_dir, f"tasks-{spec}"),
                      lambda tmp: write_task_splits(tmp, n_train=train_size, n_eval=eval_size, seed=seed, tasks=tasks))
    return {"train": os.path.join(out, "train.jsonl"), "eval": os.path.join(out, "eval.jsonl")}


def prepare_tokenizer(data_dir: str, train_file: str) -> str:
    """A tokenizer trained on the prompt+response texts of ``train_file``, saved next to it."""
    def write(tmp):
        with open(train_file, encoding="utf-8") as f:
            texts = [format_example(json.loads(line)) for line in f if line.strip()]
        build_tokenizer(texts, **TOKENIZER_OPTIONS).save_pretrained(tmp)

    tag = hashlib.sha1(json.dumps(TOKENIZER_OPTIONS, sort_keys=True).encode()).hexdigest()[:8]
    return _atomic_dir(os.path.join(os.path.dirname(train_file), f"tokenizer-{tag}"), write)


def prepare_model(data_dir: str, name: str, tokenizer_dir: str, *, seed: int) -> str:
    """The initial built-in model (config + random weights from ``seed`` + tokenizer) as an HF directory."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-ins are {sorted(BUILTIN_MODELS)}, or pass a model dir")

    def write(tmp):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        spec = dict(BUILTIN_MODELS[name])
        config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    tok_dir = os.path.abspath(tokenizer_dir)
    tok_tag = f"{os.path.basename(os.path.dirname(tok_dir))}-{os.path.basename(tok_dir)}"
    config_tag = hashlib.sha1(json.dumps(BUILTIN_MODELS[name], sort_keys=True).encode()).hexdigest()[:8]
    return _atomic_dir(os.path.join(data_dir, f"{name}-{config_tag}-seed{seed}-{tok_tag}"), write)


def prepare_builtin(data_dir: str, *, model_name: str | None, train_size: int, eval_size: int, tasks, seed: int,
                    model_seed: int) -> dict[str, str]:
    """All default assets; returns ``{"train", "eval", "tokenizer", "model"}`` paths (model only if asked)."""
    paths = prepare_data(data_dir, train_size=train_size, eval_size=eval_size, tasks=tasks, seed=seed)
    paths["tokenizer"] = prepare_tokenizer(data_dir, paths["train"])
    if model_name is not None:
        paths["model"] = prepare_model(data_dir, model_name, paths["tokenizer"], seed=model_seed)
    return paths
