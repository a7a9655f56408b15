"""Encoders, encoder-decoders and other heads, sharded, train exactly like the unsharded model.

For each model of ``models.ENCODERS`` (BERT masked-LM / sequence / token classification, RoBERTa,
DistilBERT, T5, BART, ModernBERT's fused projections, gpt-oss's attention sinks) and a llama whose MLP
is a custom fused module: 5 AdamW steps (lr 1e-2, clipping at 1.0) on fixed batches, the loss
computed by the model's own forward (``labels=`` passed), at tp=2 (and tp=4 for BERT, T5 and ModernBERT) in one
spawned world per tp, against the same function at tp=1 in this process. Compared: per-step losses,
per-step global gradient norms, and the gradients of the first step gathered back to full tensors
(tied tensors once, under the unsharded model's name). Then a step whose loss is computed outside
the model from its logits (as the Trainer's label smoother does) for the vocab-parallel heads, and a
TPTrainer run of one encoder and one encoder-decoder: losses, evaluate and predict against the plain
Trainer, every evaluation sample once with all of the vocabulary.

Tolerances: fp32 and identical inputs; TP only reorders sums (row-parallel partial products, the
vocab-parallel log-sum-exp, the all-gather of logits). Observed: losses within 4e-7 relative,
gradients within 1.1e-7, norms within 3e-6 relative. Losses are compared at 1e-4 *relative*
(losses of 1 to 5 nats: ~1e-4 to 5e-4 absolute, as tests/test_trainer.py), a margin of two orders
over the reordering noise after 5 Adam steps (whose m/sqrt(v) update amplifies ulps) and two orders
under what a wrong split does (a shard of the wrong rows, a missing or doubled reduction, a loss on
a slice of the vocabulary: >1e-2). Gradients at 2e-5 absolute and norms at 1e-4 relative, as
tests/test_families.py.
"""

import os

import pytest
import torch

from distributed import run_distributed
from models import fused_mlp_llama, tiny_encoder
from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel
from tp_trainer.parallel.gather import iter_full_state
from tp_trainer.zero import ShardedOptimizer

LOSS_RTOL = 1e-4
GRAD_TOL = 2e-5
NORM_RTOL = 1e-4
STEPS, BATCH, SEQ = 5, 4, 16
NUM_LABELS = {"bert_seq_cls": 3, "bert_token_cls": 5}


def build(name):
    return fused_mlp_llama() if name == "fused_mlp_llama" else tiny_encoder(name)


def batches(name):
    """Fixed ids and labels of ``STEPS`` steps; masked-LM labels are half ignored (-100)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (STEPS, BATCH, SEQ), generator=g)
    if name == "bert_seq_cls":
        return ids, torch.randint(0, NUM_LABELS[name], (STEPS, BATCH), generator=g)
    if name == "bert_token_cls":
        return ids, torch.randint(0, NUM_LABELS[name], (STEPS, BATCH, SEQ), generator=g)
    labels = torch.randint(3, 96, (STEPS, BATCH, SEQ), generator=g)
    if "mlm" in name:
        labels[torch.rand(labels.shape, generator=g) < 0.5] = -100
    return ids, labels


def train_steps(name, tp, outside_loss=False):
    """``outside_loss``: no labels reach the model; the loss is computed from its logits here (the
    Trainer's label smoother / compute_loss_func path), so the logits must be all of the vocabulary."""
    ctx = ParallelContext.from_environment(tp)
    model = build(name).to(ctx.device)
    plan = plan_tensor_parallel(model, tp)
    apply_tensor_parallel(model, plan, ctx)
    opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx, stage=0)
    ids, labels = (t.to(ctx.device) for t in batches(name))
    losses, norms, grads = [], [], None
    for step in range(STEPS):
        if outside_loss:
            logits = model(input_ids=ids[step]).logits
            shift = name == "gpt_oss"
            z = logits[:, :-1] if shift else logits
            y = labels[step][:, 1:] if shift else labels[step]
            loss = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)
        else:
            loss = model(input_ids=ids[step], labels=labels[step]).loss
        loss.backward()
        opt.finish_grad_sync()
        if step == 0:
            grads = {n: g.cpu().clone() for n, g in iter_full_state(model, ctx.tp_group, grads=True)}
        norms.append(opt.clip_grad_norm(1.0).item())
        opt.step()
        model.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "grads": grads,
            "styles": {n: e.style.value for n, e in plan.entries.items()}}


TP2 = ["bert_mlm", "bert_seq_cls", "bert_token_cls", "roberta_mlm", "distilbert_mlm", "t5", "bart",
       "modernbert_mlm", "gpt_oss", "fused_mlp_llama"]
TP4 = ["bert_mlm", "t5", "modernbert_mlm"]  # one head per rank; ModernBERT's fused Wqkv and Wi in quarters
OUTSIDE = ["modernbert_mlm", "gpt_oss"]  # vocab-split heads: without labels they must hand out full logits


def suite(tp, names, outside):
    out = {name: train_steps(name, tp) for name in names}
    out.update({f"{name}+outside_loss": train_steps(name, tp, outside_loss=True) for name in outside})
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(suite, 2, 2, TP2, OUTSIDE)


@pytest.fixture(scope="module")
def tp4():
    return run_distributed(suite, 4, 4, TP4, [])


def _assert_matches_unsharded(ranks, key):
    name, _, mode = key.partition("+")
    ref = train_steps(name, 1, outside_loss=bool(mode))
    assert len(set(round(l, 4) for l in ref["losses"])) == STEPS  # the weights move: a comparison with teeth
    for got in (rank[key] for rank in ranks):
        assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL), "per-step losses"
        assert got["norms"] == pytest.approx(ref["norms"], rel=NORM_RTOL), "per-step global gradient norms"
        assert got["grads"].keys() == ref["grads"].keys()  # tied tensors once, under the unsharded names
        for param, g in ref["grads"].items():
            diff = (got["grads"][param] - g).abs().max().item()
            assert diff < GRAD_TOL, f"{key}: gradient of {param} differs by {diff}"


@pytest.mark.parametrize("key", TP2 + [f"{n}+outside_loss" for n in OUTSIDE])
def test_tp2_matches_unsharded(tp2, key):
    _assert_matches_unsharded(tp2, key)


@pytest.mark.parametrize("key", TP4)
def test_tp4_matches_unsharded(tp4, key):
    _assert_matches_unsharded(tp4, key)


def test_the_splits_that_used_to_fail_are_in_place(tp2):
    styles = tp2[0]["bert_mlm"]["styles"]
    assert styles["bert.encoder.layer.0.attention.output.dense"] == "rowwise"  # in BertSelfOutput, post-norm
    assert styles["cls.predictions.decoder"] == "colwise_gather_output"  # BERT's inline CrossEntropyLoss
    t5 = tp2[0]["t5"]["styles"]
    assert t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"] == "head_sharded"
    assert tp2[0]["modernbert_mlm"]["styles"]["decoder"] == "vocab_lm_head"  # ForMaskedLMLoss, vocab-parallel
    assert tp2[0]["gpt_oss"]["styles"]["model.layers.0.self_attn"] == "head_sharded"  # sinks


# ------------------------------------------------------------------------------------ TPTrainer
TRAIN_STEPS, N_TRAIN, N_EVAL = 4, 32, 10


def make_dataset(name, n, seed):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, SEQ), generator=g)
    labels = torch.randint(3, 96, (n, SEQ), generator=g)
    if "mlm" in name:
        labels[torch.rand(labels.shape, generator=g) < 0.5] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                                       "attention_mask": torch.ones_like(ids).tolist()})


def trainer_run(name, out_dir, trainer_cls):
    from transformers import Trainer

    from tp_trainer import TPTrainer, TPTrainingArguments

    tp = 2 if trainer_cls == "TPTrainer" else 1
    args = TPTrainingArguments(
        output_dir=out_dir, tp_size=tp, per_device_train_batch_size=4, max_steps=TRAIN_STEPS, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
        max_grad_norm=1.0, disable_tqdm=True, per_device_eval_batch_size=3)
    cls = TPTrainer if trainer_cls == "TPTrainer" else Trainer
    trainer = cls(model=tiny_encoder(name), args=args, train_dataset=make_dataset(name, N_TRAIN, 3),
                  eval_dataset=make_dataset(name, N_EVAL, 5))
    trainer.train()
    predictions = trainer.predict(make_dataset(name, N_EVAL, 5)).predictions
    predictions = predictions if isinstance(predictions, tuple) else (predictions,)
    return {"losses": [h["loss"] for h in trainer.state.log_history if "grad_norm" in h],
            "eval_loss": trainer.evaluate()["eval_loss"],
            "predictions": [torch.as_tensor(p) for p in predictions]}


TRAINER_MODELS = ["bert_mlm", "t5"]


def trainer_suite():
    return {name: trainer_run(name, f"/tmp/tp_trainer_test/enc-{name}-{os.environ['RANK']}", "TPTrainer")
            for name in TRAINER_MODELS}


@pytest.fixture(scope="module")
def trainer_world():
    return run_distributed(trainer_suite, 2)


@pytest.mark.cpu_only(reason="the worlds train with use_cpu=True on CPU batches, as tests/test_trainer.py")
@pytest.mark.parametrize("name", TRAINER_MODELS)
def test_tptrainer_evaluates_and_predicts_full_logits_like_the_trainer(trainer_world, name):
    ref = trainer_run(name, "/tmp/tp_trainer_test/enc-ref", "Trainer")
    assert len(ref["losses"]) == TRAIN_STEPS
    for rank in trainer_world:
        got = rank[name]
        assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL)
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=LOSS_RTOL)
        assert len(got["predictions"]) == len(ref["predictions"])  # T5: logits and the encoder's states
        assert got["predictions"][0].shape == (N_EVAL, SEQ, 96)  # every sample once, all of the vocabulary
        for p, r in zip(got["predictions"], ref["predictions"]):
            assert p.shape == r.shape
            assert torch.allclose(p, r, atol=1e-4, rtol=1e-4)
