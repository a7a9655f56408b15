"""``tp-trainer train RECIPE.yaml [--field value ...]``: fine-tuning from a recipe, SFT or DPO (``trainer:``).

The flow on every rank (identical inputs, so every rank of a TP group builds identical batches):

1. parse the recipe (:mod:`tp_trainer.app.recipe`), all validation before any work;
2. outside a launcher, re-run through ``torch.distributed.run`` with ``nproc_per_node`` ranks
   (:mod:`tp_trainer.app.launch`), after preparing the built-in assets once in the parent;
3. load the tokenizer and the model (a directory, or the generated initial built-in model; at tp > 1
   shard-only: each rank reads its own slices, :mod:`tp_trainer.loading`; ``use_lora``: wrapped by PEFT);
   ``trainer: sft``: load + validate + tokenize the Alpaca data (:mod:`tp_trainer.app.data.sft`);
   ``trainer: dpo``: preference pairs, read or built from Alpaca records with a corrupted answer
   (:mod:`tp_trainer.app.data.preference`);
4. find where to start (``resume_from_checkpoint: auto``: the newest complete checkpoint in
   ``output_dir``, :mod:`tp_trainer.app.resume`), then ``TPTrainer(...).train()`` (sft) or ``tp_trainer.trl.TPDPOTrainer(...).train()`` (dpo: its
   reference model is loaded from the same directory and sharded alike) with the Trainer's progress
   bar; ``save_model(final_model_dir)``;
5. on the main process: ``log_history.json`` (the loss curve; for DPO also how ``rewards/accuracies``
   and ``rewards/margins`` moved) and, with ``eval_after_train``, exact-match accuracy per task and eval
   loss of the saved model and of the model before training (Alpaca eval data).
"""

from __future__ import annotations

import json
import os
import sys

from ..app.recipe import Recipe, make_parser, parse_recipe, peek, world_size_env
from ..app.resume import check_resume_value, check_same_tokenizer, resume_candidate, resume_point

HELP = "fine-tuning from a recipe YAML, SFT or DPO (self-launches its torch.distributed world)"


# ------------------------------------------------------------------------------------ paths
def data_dir(recipe: Recipe) -> str:
    return recipe.data.data_dir or os.path.join(recipe.training.output_dir, "builtin")


def final_model_dir(recipe: Recipe) -> str:
    return recipe.job.final_model_dir or os.path.join(recipe.training.output_dir, "final")


def resolve_assets(recipe: Recipe) -> dict[str, str | None]:
    """Paths of train/eval data, tokenizer and model; generates the built-in ones (idempotent)."""
    from ..app.data.builtin import is_builtin, prepare_builtin

    model, data = recipe.model, recipe.data
    builtin_model = is_builtin(model.model_name_or_path)
    paths = {"train": data.train_file, "eval": data.eval_file, "model": model.model_name_or_path,
             "tokenizer": model.tokenizer_name_or_path}
    if data.train_file is None or builtin_model:
        generated = prepare_builtin(
            data_dir(recipe), model_name=model.model_name_or_path if builtin_model else None,
            train_size=data.generated_train_size, eval_size=data.generated_eval_size, tasks=data.task_names(),
            seed=data.generated_seed, model_seed=recipe.training.seed)
        if data.train_file is None:
            paths["train"] = generated["train"]
            paths["eval"] = data.eval_file or generated["eval"]
        if builtin_model:
            paths["model"] = generated["model"]
    elif not os.path.isdir(model.model_name_or_path):
        raise ValueError(f"model_name_or_path {model.model_name_or_path!r} is neither a local model directory nor a "
                         f"built-in config (tp_trainer.app.data.builtin.BUILTIN_MODELS); nothing is downloaded")
    paths["tokenizer"] = paths["tokenizer"] or paths["model"]
    for key in ("train", "eval"):
        if paths[key] is not None and not os.path.isfile(paths[key]):
            raise ValueError(f"{key}_file {paths[key]!r} does not exist (omit train_file to use the generated tasks)")
    return paths


# ------------------------------------------------------------------------------------ training
def load_model_and_tokenizer(paths: dict, recipe: Recipe, *, wrap_lora: bool = True):
    """The model (shard-only at tp > 1: each rank reads its own slices; PEFT-wrapped for ``use_lora`` unless
    ``wrap_lora=False``) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..app.lora import wrap_with_lora

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True)
    if tokenizer.pad_token is None:  # Llama tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    dtype, args = recipe.model.dtype, recipe.training
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    # LoRA wraps the whole model first (PEFT picks its targets on the unsharded modules), then TPTrainer plans it
    if args.tp_size > 1 and not recipe.lora.use_lora:
        from ..loading import from_pretrained as load_sharded

        model = load_sharded(paths["model"], tp_size=args.tp_size, use_cpu=args.use_cpu, cpu_kernels=args.cpu_kernels,
                             user_plan=args.user_tp_plan(), sequence_parallel=args.sequence_parallel,
                             zero_stage=args.zero_stage, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch_dtype, local_files_only=True)
    return (wrap_with_lora(model, recipe.lora) if wrap_lora else model), tokenizer


def load_datasets(paths: dict, tokenizer, recipe: Recipe):
    from ..app.data.sft import load_alpaca, tokenize_sft

    data = recipe.data
    train = tokenize_sft(load_alpaca(paths["train"]), tokenizer, max_length=data.max_length, packing=data.packing)
    evaluation = None
    if paths["eval"]:
        evaluation = tokenize_sft(load_alpaca(paths["eval"]), tokenizer, max_length=data.max_length)
    return train, evaluation


def load_preference_datasets(paths: dict, recipe: Recipe):
    from ..app.data.preference import load_preferences

    seed = recipe.data.generated_seed  # the corruption of Alpaca answers: the same pairs on every rank
    train = load_preferences(paths["train"], seed=seed)
    evaluation = load_preferences(paths["eval"], seed=seed + 1) if paths["eval"] else None
    return train, evaluation


def build_dpo_trainer(recipe: Recipe, paths: dict):
    from ..trl import TPDPOTrainer

    from ..app.lora import lora_config

    # LoRA through TRL's peft_config=: TRL then takes the adapter-disabled policy as the reference
    model, tokenizer = load_model_and_tokenizer(paths, recipe, wrap_lora=False)
    train, evaluation = load_preference_datasets(paths, recipe)
    # ref_model=None: TRL loads the reference from the model's directory; TPDPOTrainer shards it like the policy
    return TPDPOTrainer(model=model, args=recipe.training, train_dataset=train, eval_dataset=evaluation,
                        processing_class=tokenizer, peft_config=lora_config(recipe.lora))


def build_trainer(recipe: Recipe, paths: dict):
    if recipe.job.trainer == "dpo":
        return build_dpo_trainer(recipe, paths)
    from ..app.data.sft import SFTDataCollator
    from ..app.fsdp_baseline import FSDPBaselineTrainer, needs_fsdp_baseline
    from ..trainer import TPTrainer

    model, tokenizer = load_model_and_tokenizer(paths, recipe)
    train, evaluation = load_datasets(paths, tokenizer, recipe)
    trainer_cls = FSDPBaselineTrainer if needs_fsdp_baseline(recipe.training) else TPTrainer
    return trainer_cls(model=model, args=recipe.training, train_dataset=train, eval_dataset=evaluation,
                     data_collator=SFTDataCollator(tokenizer), processing_class=tokenizer)


def summary(trainer) -> str:
    if getattr(trainer, "tp_active", False):
        return f"tp_trainer: {trainer.startup_summary()}"
    args = trainer.args
    params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.model.parameters())
    kind = "FSDP full-shard" if getattr(trainer, "is_fsdp_enabled", False) or args.fsdp else "data parallel, zero_stage=0"
    return (f"tp_trainer: world={args.world_size} ({kind}); global batch = "
            f"{args.per_device_train_batch_size} x {args.world_size} x {args.gradient_accumulation_steps} = "
            f"{args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps}\n"
            f"  parameters on this rank: {params:,}")


def train(recipe: Recipe) -> int:
    args = recipe.training
    # local rank 0 generates missing built-in assets while the others wait (save_pretrained writes only on rank 0)
    with args.main_process_first(local=True, desc="preparing the built-in assets"):
        paths = resolve_assets(recipe)
    trainer = build_trainer(recipe, paths)
    if not getattr(trainer, "tp_active", False):  # TPTrainer adds them itself
        from ..resilience import resilience_callbacks

        for callback in resilience_callbacks():
            trainer.add_callback(callback)
    start = resume_point(args.resume_from_checkpoint, args.output_dir, overwrite=recipe.job.overwrite_output_dir)
    if args.should_log:
        print(summary(trainer), flush=True)
        print(f"tp_trainer: {start.message}", flush=True)
    trainer.train(resume_from_checkpoint=start.path)
    out = final_model_dir(recipe)
    trainer.save_model(out)
    if args.should_save:
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        print(f"tp_trainer: saved the trained model to {out}", flush=True)
        job = recipe.job.trainer.upper()
        if recipe.job.trainer == "dpo":
            print(preference_progress(trainer.state.log_history), flush=True)
        if recipe.job.eval_after_train and paths["eval"] and is_alpaca(paths["eval"]):
            from .eval import evaluate_and_report

            before = paths["model"] if os.path.abspath(paths["model"]) != os.path.abspath(out) else None
            after = out
            if recipe.lora.use_lora:  # `out` holds the adapters: evaluate them merged into the base
                from ..checkpoint.export import export_merged_lora

                after = out.rstrip(os.sep) + "-merged"
                export_merged_lora(out, after, base_model=paths["model"])
                print(f"tp_trainer: merged the adapters into {after} for the evaluation", flush=True)
            evaluate_and_report({f"before {job}": before, f"after {job}": after}, paths["eval"], recipe.max_length,
                                max_new_tokens=recipe.data.eval_max_new_tokens, limit=recipe.job.eval_limit,
                                json_path=os.path.join(args.output_dir, "eval_results.json"))
    return 0


def is_alpaca(path: str) -> bool:
    """Whether the data file holds Alpaca records (exact-match eval needs their ``output``)."""
    with open(path, encoding="utf-8") as f:
        text = f.read(1 << 16).lstrip()
    first = json.loads(text)[0] if text.startswith("[") else json.loads(text.splitlines()[0])
    return "instruction" in first and "output" in first


def preference_progress(log_history: list[dict], keys=("rewards/accuracies", "rewards/margins")) -> str:
    """How DPO's reward metrics moved: the mean over the first and over the last fifth of the training logs."""
    lines = ["tp_trainer: DPO progress (mean of the first -> last fifth of the logged steps)"]
    for key in keys:
        values = [h[key] for h in log_history if key in h and "eval_loss" not in h]
        if values:
            k = max(1, len(values) // 5)
            first, last = sum(values[:k]) / k, sum(values[-k:]) / k
            lines.append(f"  {key}: {first:.3f} -> {last:.3f} ({len(values)} logs)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ entry point
def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: tp-trainer train [RECIPE.yaml] [--field value ...]\n\n" + __doc__)
        make_parser().print_help()  # trainer: sft; `--trainer dpo --help` lists TPDPOConfig's fields too
        return 0
    from ..app.launch import check_nproc, default_nproc, relaunch, under_launcher, use_cpu_world_if_no_gpu

    try:
        if under_launcher():
            use_cpu_world_if_no_gpu()
            return train(parse_recipe(argv))
        nproc = peek(argv, "nproc_per_node") or default_nproc(peek(argv, "tp_size") or 1)
        check_nproc(nproc, peek(argv, "tp_size") or 1)  # names nproc_per_node, before the recipe's WORLD_SIZE check
        with world_size_env(nproc):  # validate the recipe as the ranks will see it, before launching them
            recipe = parse_recipe(argv)
        job, training = recipe.job, recipe.training
        from ..checkpoint.save import check_writable

        check_writable(training.output_dir)  # a read-only output_dir fails here, not at the first save
        check_resume_value(training.resume_from_checkpoint, training.output_dir, overwrite=job.overwrite_output_dir)
        paths = resolve_assets(recipe)  # generate the built-in assets once here rather than racing in every rank
        candidate = resume_candidate(training.resume_from_checkpoint, training.output_dir,
                                     overwrite=job.overwrite_output_dir)
        if candidate is not None:
            check_same_tokenizer(candidate, paths["tokenizer"])
    except (ValueError, ImportError) as err:  # ImportError: a trainer whose extra is not installed
        print(f"tp-trainer train: {err}", file=sys.stderr)
        return 2
    if nproc > 1:
        return relaunch(["train", *argv], nproc, max_restarts=job.max_restarts, shutdown_timeout=job.shutdown_timeout,
                        output_dir=training.output_dir)
    return train(recipe)
