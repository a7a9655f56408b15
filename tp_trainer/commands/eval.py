"""``tp-trainer eval MODEL_DIR [NAME=MODEL_DIR ...] --data EVAL.jsonl``: exact-match accuracy and eval loss.

Each model is an ordinary HF directory (e.g. ``save_model`` output) evaluated in this one
process: greedy generation, exact match against ``output`` per task, and the token-weighted
eval loss over the responses (:mod:`tp_trainer.app.evaluate`). With several models it prints one
table in the shape of the seed's table 1: rows are tasks, columns are the models, e.g.::

    tp-trainer eval "before SFT=out/builtin/tiny-llama-seed42-..." "ZeRO-1 dp4=runs/zero1/final" \\
        "TP2 ZeRO-1=runs/tp2-zero1/final" --data out/builtin/tasks-.../eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "exact-match accuracy per task and eval loss of one or more saved models (seed's table 1 shape)"


def evaluate_model_dir(model_dir: str, records, *, max_length: int, max_new_tokens: int, batch_size: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..app.evaluate import eval_loss, exact_match_eval

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    result = exact_match_eval(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size)
    result["eval_loss"] = eval_loss(model, tokenizer, records, max_length=max_length, batch_size=batch_size)
    return result


def load_records(path: str, limit: int | None = None) -> list[dict]:
    from ..app.data.sft import load_alpaca

    records = load_alpaca(path).to_list()
    return records[:limit] if limit else records


def evaluate_and_report(models: dict[str, str | None], data: str, max_length: int, *, max_new_tokens: int = 24,
                        limit: int | None = None, json_path: str | None = None) -> dict[str, dict]:
    """Evaluate ``{column name: model dir}`` (``None`` entries skipped), print the table, return the results."""
    from ..app.evaluate import format_accuracy_table

    records = load_records(data, limit)
    results = {name: evaluate_model_dir(path, records, max_length=max_length, max_new_tokens=max_new_tokens)
               for name, path in models.items() if path is not None}
    print(f"\nexact-match accuracy on {data} ({len(records)} records):\n{format_accuracy_table(results)}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def parse_model_args(specs: list[str]) -> dict[str, str]:
    """``["DIR", "NAME=DIR", ...]`` -> ``{name: dir}``; a missing directory is an error naming it."""
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)) or spec, spec
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} is not a saved model directory (no config.json)")
        if name in models:
            raise ValueError(f"two models are named {name!r}; name them explicitly with NAME=DIR")
        models[name] = path
    return models


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tp-trainer eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model directories, optionally NAME=DIR (the column name)")
    parser.add_argument("--data", required=True, help="Alpaca-format JSON/JSONL eval split (with 'task' fields)")
    parser.add_argument("--max-length", type=int, default=256, help="token budget of the eval-loss examples")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    try:
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data!r} does not exist")
        models = parse_model_args(args.models)
    except ValueError as err:
        print(f"tp-trainer eval: {err}", file=sys.stderr)
        return 2
    evaluate_and_report(models, args.data, args.max_length, max_new_tokens=args.max_new_tokens, limit=args.limit,
                        json_path=args.json)
    return 0
