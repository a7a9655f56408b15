"""TRL's SFT and DPO trainers under TP (tp_trainer/trl/) against the plain TRL trainers on one process.

Every run starts from the same weights (a tiny model saved to a directory and loaded by every rank
and by the reference) and sees the same data in the same order; the reference is TRL's own
trainer in this process with the same *global* batch. Compared per step: the loss, the gradient
norm, every metric TRL logs from the logits (SFT: ``entropy``, ``mean_token_accuracy``,
``num_tokens``; DPO: ``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy``,
``num_tokens``), the evaluation metrics, and the saved weights after training. TRL's ``peft_config``
path (LoRA applied by TRL before ``Trainer.__init__``, DPO's reference = the adapter disabled) and
activation checkpointing (TRL's default) are among the runs.

Tolerances: fp32 weights, 4 SGD steps at lr 0.5. TP changes only the order of summation (the
row-parallel all-reduces, the log-sum-exp combined from two vocabulary halves), so values agree to
a few fp32 ulps: observed at most 3e-6 on losses, log-probabilities and rewards (|logp| ~ 30), 1e-7
on weights. Asserted: 2e-5 absolute on those, 1e-5 relative on gradient norms, 1e-5 on weights. A
softmax normalised over one rank's half of the vocabulary moves every log-probability by ~log 2,
a lost shard gradient moves the weights by ~lr x grad ~ 1e-2: both far outside. SGD rather than
Adam, so that the weights carry the gradients' values (Adam's first step is lr x sign(g)).
Discrete metrics (top-1 accuracy, reward accuracy, token counts) are compared exactly: with these
seeds no two logits are within 1e-5 of each other where it would matter.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from distributed import run_distributed
from models import MOE_FAMILIES, tiny_model

pytestmark = pytest.mark.cpu_only(reason="the worlds train with use_cpu=True on CPU batches, like test_trainer")

VOCAB = 96
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
CHAT_TEMPLATE = (  # assistant turns marked for TRL's assistant-only loss
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% else %}<|assistant|> {% generation %}{{ m['content'] }} <|end|>{% endgeneration %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")
N_TRAIN, STEPS = 64, 4
COMMON = dict(learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[],
              save_strategy="no", seed=0, use_cpu=True, max_grad_norm=1.0, disable_tqdm=True, bf16=False,
              gradient_checkpointing=False)
STEP_KEYS = {"sft": ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"),
             "dpo": ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                     "rewards/accuracies", "logps/chosen", "logps/rejected", "entropy", "logits/chosen",
                     "logits/rejected", "mean_token_accuracy", "num_tokens")}
EXACT = {"mean_token_accuracy", "rewards/accuracies", "num_tokens", "eval_mean_token_accuracy",
         "eval_rewards/accuracies", "eval_num_tokens"}


# ------------------------------------------------------------------------------------ tokenizer, data, models
def make_tokenizer():
    """Word-level, exactly the tiny models' 96 ids: 7 special tokens and the words w0 .. w88."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS[:40]) for _ in range(rng.randint(lo, hi)))


def sft_dataset(kind: str, n: int, seed: int):
    """``prompt_completion`` (completion-only loss), ``conversational`` (chat template) or ``text`` (packing)."""
    import datasets

    rng, rows = random.Random(seed), []
    for _ in range(n):
        prompt, answer = _words(rng, 2, 7), _words(rng, 2, 6)
        rows.append({"prompt_completion": {"prompt": prompt, "completion": answer},
                     "conversational": {"messages": [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": answer}]},
                     "text": {"text": f"{prompt} {answer}"}}[kind])
    return datasets.Dataset.from_list(rows)


def preference_dataset(n: int, seed: int):
    """The chosen answer repeats the prompt's words, the rejected one shuffles them and adds a word."""
    import datasets

    rng, rows = random.Random(seed), []
    for _ in range(n):
        words = _words(rng, 2, 6).split()
        rejected = list(words)
        rng.shuffle(rejected)
        rows.append({"prompt": " ".join(words), "chosen": " ".join(words), "rejected": " ".join(rejected + ["w7"])})
    return datasets.Dataset.from_list(rows)


def save_model(family: str, path: str) -> str:
    """A local HF directory (TRL loads DPO's reference model from the policy's path)."""
    if family in MOE_FAMILIES:  # load-balancing loss on (output_router_logits, router_aux_loss_coef 0.05)
        import transformers

        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(MOE_FAMILIES[family]())
    else:
        model = tiny_model(family, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ one training run
def run(kind: str, out: str, *, model_dir: str, tp: int | None, zero: int = 0, per_device: int = 4,
        eval_batch: int = 4, n_eval: int = 10, data: str = "prompt_completion", ref_model: bool = False,
        data_dir: str | None = None, lora: bool = False, **config) -> dict:
    """``STEPS`` steps of TRL's trainer (``tp=None``) or ours; per-step logs, evaluation, saved weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    extra = {}
    if lora:  # TRL applies PEFT before Trainer.__init__: the mixin shards the adapted model
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj",
                                                                                              "down_proj"])
    layout = {} if tp is None else {"tp_size": tp, "zero_stage": zero}
    kwargs = {**COMMON, **dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=per_device,
                               per_device_eval_batch_size=eval_batch), **layout, **config}
    if kind == "sft":
        from tp_trainer.trl import TPSFTConfig, TPSFTTrainer
        from trl import SFTConfig, SFTTrainer

        config_cls, trainer_cls = (SFTConfig, SFTTrainer) if tp is None else (TPSFTConfig, TPSFTTrainer)
        trainer = trainer_cls(model=model, args=config_cls(**kwargs), train_dataset=sft_dataset(data, N_TRAIN, 3),
                              eval_dataset=sft_dataset(data, n_eval, 5), processing_class=make_tokenizer(), **extra)
    else:
        import datasets
        from tp_trainer.trl import TPDPOConfig, TPDPOTrainer
        from trl import DPOConfig, DPOTrainer

        config_cls, trainer_cls = (DPOConfig, DPOTrainer) if tp is None else (TPDPOConfig, TPDPOTrainer)
        if data_dir is None:
            train, evaluation = preference_dataset(N_TRAIN, 3), preference_dataset(n_eval, 5)
        else:  # precomputed reference log-probs are cached beside a dataset's files: every rank must see them
            train, evaluation = (datasets.load_from_disk(os.path.join(data_dir, s)) for s in ("train", "eval"))
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) if ref_model else None
        trainer = trainer_cls(model=model, ref_model=ref, args=config_cls(**kwargs), train_dataset=train,
                              eval_dataset=evaluation, processing_class=make_tokenizer(), **extra)
    ref = getattr(trainer, "ref_model", None)
    heads = [m.get_output_embeddings() for m in (trainer.model, ref) if m is not None]
    calls = []  # a call of the head module is where full logits would be built (ParallelLMHead gathers them)
    hooks = [h.register_forward_hook(lambda *_: calls.append(1)) for h in heads]
    trainer.train()
    for hook in hooks:
        hook.remove()
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    result = {key: [h[key] for h in logged] for key in STEP_KEYS[kind]}
    result["eval"] = {k: v for k, v in trainer.evaluate().items() if k.startswith("eval_") and "runtime" not in k
                      and "per_second" not in k}
    trainer.save_model(os.path.join(out, "final"))
    if trainer.args.should_save:
        saved = AutoModelForCausalLM.from_pretrained(model_dir if lora else os.path.join(out, "final"),
                                                     dtype=torch.float32)
        if lora:  # save_model wrote PEFT's adapter directory
            from peft import PeftModel

            saved = PeftModel.from_pretrained(saved, os.path.join(out, "final"))
        result["weights"] = {k: v.clone() for k, v in saved.state_dict().items()}
    if tp is not None:
        result["layout"] = {
            "heads": [type(h).__name__ for h in heads], "head_calls_in_training": len(calls),
            "fused_heads": [getattr(m, "tp_fused_lm_head", False) for m in (trainer.model, ref) if m is not None],
            "policy_params": sum(p.numel() for p in trainer.model.parameters()),
            "ref_params": None if ref is None else sum(p.numel() for p in ref.parameters()),
            "full_params": trainer._full_param_count}
    return result


# ------------------------------------------------------------------------------------ the worlds
TWO_RANK_RUNS = {  # name: (trainer, model family, options); all at tp=2
    "sft_completion_only": ("sft", "llama", dict(data="prompt_completion")),
    "sft_chat_assistant_only": ("sft", "llama", dict(data="conversational", assistant_only_loss=True)),
    "sft_packing_tied_gpt2": ("sft", "gpt2", dict(data="text", packing=True, max_length=16)),
    "sft_moe_aux_loss": ("sft", "mixtral", dict()),
    "sft_lora_checkpointing": ("sft", "llama", dict(lora=True, gradient_checkpointing=True)),
    "dpo_trl_builds_ref": ("dpo", "llama", dict()),
    "dpo_ref_passed_tied_gpt2": ("dpo", "gpt2", dict(ref_model=True)),
    "dpo_precomputed_ref": ("dpo", "llama", dict(precompute_ref_log_probs=True, data_dir="tp")),
    "dpo_lora_adapter_off_as_ref": ("dpo", "llama", dict(lora=True)),
}
# tp=2 x dp=2: per-device batches halved, the same global batch as the reference. 12 eval samples: no last
# batch to pad (TRL's metrics, gathered sums, would count the padding as plain DDP does). The tp=2 runs' 10
# eval samples end on a partial batch (4, 4, 2), which the dp-only gather must pass through.
FOUR_RANK_RUNS = {
    "sft_tp2_dp2_zero1": ("sft", "llama", dict(zero=1, per_device=2, eval_batch=2, n_eval=12)),
    "dpo_tp2_dp2_zero2": ("dpo", "llama", dict(zero=2, per_device=2, eval_batch=2, n_eval=12)),
}
FAMILIES = ("llama", "gpt2", "mixtral")


def _resolve(options: dict, base: str) -> dict:
    return {**options, "data_dir": os.path.join(base, "pref-" + options["data_dir"])} if "data_dir" in options \
        else options


def world(base: str, runs: dict, vocab_checks: bool) -> dict:
    out = {"vocab_stats": vocab_stats_checks()} if vocab_checks else {}
    for name, (kind, family, options) in runs.items():
        out[name] = run(kind, os.path.join(base, f"{name}-rank{os.environ['RANK']}"),
                        model_dir=os.path.join(base, family), tp=2, **_resolve(options, base))
    return out


def reference(base: str, name: str, runs: dict) -> dict:
    kind, family, options = runs[name]
    options = {k: v for k, v in _resolve(options, base).items() if k not in ("zero", "per_device", "eval_batch")}
    if "data_dir" in options:
        options["data_dir"] = os.path.join(base, "pref-ref")
    return run(kind, os.path.join(base, f"{name}-reference"), model_dir=os.path.join(base, family), tp=None,
               **options)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl")
    for family in FAMILIES:
        save_model(family, str(path / family))
    for tag in ("tp", "ref"):  # separate copies: each run's precomputed log-probs are cached beside its dataset
        for split, (n, seed) in {"train": (N_TRAIN, 3), "eval": (10, 5)}.items():
            preference_dataset(n, seed).save_to_disk(str(path / f"pref-{tag}" / split))
    return str(path)


@pytest.fixture(scope="module")
def two_ranks(base):
    return run_distributed(world, 2, base, TWO_RANK_RUNS, True)


@pytest.fixture(scope="module")
def four_ranks(base):
    return run_distributed(world, 4, base, FOUR_RANK_RUNS, False)


def assert_same_run(got: dict, ref: dict, *, skip_eval=()):
    for key, values in ref.items():
        if key in ("eval", "weights"):
            continue
        assert len(got[key]) == STEPS, key
        if key in EXACT:
            assert got[key] == values, key
        elif key == "grad_norm":
            assert got[key] == pytest.approx(values, rel=1e-5), key
        else:
            assert got[key] == pytest.approx(values, abs=2e-5), key
    for key, value in ref["eval"].items():
        if key in skip_eval:
            continue
        assert got["eval"][key] == (value if key in EXACT else pytest.approx(value, abs=2e-5)), key
    if "weights" not in got:  # saved by the main process only
        return
    assert got["weights"].keys() == ref["weights"].keys()
    for name, weight in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, atol=1e-5, rtol=0, msg=name)


# ------------------------------------------------------------------------------------ vocab-parallel statistics
V_STATS, N_STATS = 95, 12  # 95: the vocabulary is padded to 96, rank 1 holds 47 real columns and one of padding


def _stats_problem():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(N_STATS, V_STATS, generator=g) * 3
    target = torch.randint(0, V_STATS, (N_STATS,), generator=g)
    # ties across the ranks: the label equals an earlier maximum (not top-1, argmax takes the first), or is it
    for row, label in ((0, 60), (1, 10)):
        full[row, 10] = full[row, 60] = full[row].max() + 1
        target[row] = label
    return full, target, torch.randn(N_STATS, generator=g), torch.randn(N_STATS, generator=g)


def vocab_stats_checks() -> dict:
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.parallel.vocab_stats import OPTIONAL, vocab_parallel_token_stats

    ctx = ParallelContext.from_environment(2, use_cpu=True)
    full, target, grad_logp, grad_entropy = _stats_problem()
    width = math.ceil(V_STATS / 2)
    start = ctx.tp_rank * width
    valid = min(width, V_STATS - start)
    local = torch.full((N_STATS, width), 1e4)  # padding columns hold a huge logit: it must not count
    local[:, :valid] = full[:, start:start + valid]
    local.requires_grad_()
    stats = vocab_parallel_token_stats(local, target, vocab_start=start, vocab_valid=valid, vocab_size=V_STATS,
                                       group=ctx.tp_comm, outputs=OPTIONAL)
    (stats.log_probs * grad_logp + stats.entropy * grad_entropy).sum().backward()
    return {"stats": {k: v.detach() for k, v in stats._asdict().items()}, "grad": local.grad.clone(),
            "start": start, "valid": valid}


def test_vocab_parallel_statistics_match_the_full_softmax(two_ranks):
    # Against the float64 softmax of the full logits (|z| up to ~12). fp32 log-sum-exp of two halves: 1e-6 on
    # log-probabilities; the entropy is log Z - E[z], a difference of two numbers ~10 (as TRL's own kernel
    # computes it), 1e-6 of error in fp32: 5e-6. A softmax over one half of the vocabulary is off by > 1e-2.
    full, target, grad_logp, grad_entropy = _stats_problem()
    full = full.double().requires_grad_()
    log_p = full.log_softmax(-1)
    expected = {"log_probs": log_p.gather(-1, target[:, None]).squeeze(-1), "entropy": -(log_p.exp() * log_p).sum(-1),
                "log_sum_sq_probs": (2 * log_p).logsumexp(-1), "mean_logits": full.mean(-1),
                "is_top1": full.argmax(-1) == target}
    (expected["log_probs"] * grad_logp + expected["entropy"] * grad_entropy).sum().backward()
    assert expected["is_top1"][:2].tolist() == [False, True]  # the planted ties
    ranks = [r["vocab_stats"] for r in two_ranks]
    for rank in ranks:
        for name, value in expected.items():
            got = rank["stats"][name]
            if name == "is_top1":
                assert torch.equal(got, value)
            else:
                tol = 5e-6 if name == "entropy" else 2e-6
                torch.testing.assert_close(got.double(), value.detach(), atol=tol, rtol=0, msg=name)
        start, valid = rank["start"], rank["valid"]
        torch.testing.assert_close(rank["grad"][:, :valid].double(), full.grad[:, start:start + valid], atol=2e-6,
                                   rtol=0)
        assert torch.count_nonzero(rank["grad"][:, valid:]) == 0  # padding gets no gradient
    assert ranks[1]["valid"] == 47
    for name in expected:  # every rank combines the same gathered values in the same order
        assert torch.equal(ranks[0]["stats"][name], ranks[1]["stats"][name]), name


# ------------------------------------------------------------------------------------ SFT and DPO at tp=2
@pytest.mark.parametrize("name", [n for n in TWO_RANK_RUNS if n.startswith("sft")])
def test_sft_at_tp2_matches_trl_on_one_process(base, two_ranks, name):
    ref = reference(base, name, TWO_RANK_RUNS)
    assert "weights" in two_ranks[0][name]
    for rank in two_ranks:
        assert_same_run(rank[name], ref)


@pytest.mark.parametrize("name", [n for n in TWO_RANK_RUNS if n.startswith("dpo")])
def test_dpo_at_tp2_matches_trl_on_one_process(base, two_ranks, name):
    ref = reference(base, name, TWO_RANK_RUNS)
    # the runs learn to prefer the chosen answers (LoRA's B starts at zero: small margins), a real comparison
    assert ref["rewards/margins"][-1] > 0 and ref["rewards/accuracies"][-1] >= 0.75
    assert "weights" in two_ranks[0][name]
    for rank in two_ranks:
        assert_same_run(rank[name], ref)


def test_training_never_builds_full_logits_and_the_reference_model_is_sharded(two_ranks):
    for rank in two_ranks:
        for name, (kind, _, options) in TWO_RANK_RUNS.items():
            layout = rank[name]["layout"]
            assert layout["head_calls_in_training"] == 0, name  # the vocab-parallel fused head reads local logits
            assert all(layout["fused_heads"]) and set(layout["heads"]) == {"ParallelLMHead"}, name
            assert layout["policy_params"] < layout["full_params"], name  # shards (GPT-2 keeps its wpe whole)
            if kind == "dpo" and not options.get("precompute_ref_log_probs") and not options.get("lora"):
                assert layout["ref_params"] == layout["policy_params"], name  # the same shards, never gathered
    for name in ("dpo_precomputed_ref", "dpo_lora_adapter_off_as_ref"):  # TRL keeps no reference model
        assert two_ranks[0][name]["layout"]["ref_params"] is None


# ------------------------------------------------------------------------------------ tp=2 x dp=2
@pytest.mark.parametrize("name", list(FOUR_RANK_RUNS))
def test_tp2_dp2_zero_matches_trl_on_one_process(base, four_ranks, name):
    ref = reference(base, name, FOUR_RANK_RUNS)
    # SFT's eval_loss is, as under DDP, the mean of the dp ranks' own token means (TRL's metrics are gathered sums)
    skip = ("eval_loss",) if name.startswith("sft") else ()
    assert "weights" in four_ranks[0][name]
    for rank in four_ranks:
        assert_same_run(rank[name], ref, skip_eval=skip)
