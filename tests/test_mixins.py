"""TPTrainerMixin and TPArgumentsMixin give TP + ZeRO to any Trainer subclass and any TrainingArguments subclass.

The subject is a user's own pair: a ``TrainingArguments`` subclass with a field of its own
(``loss_weight``) and a ``Trainer`` subclass whose ``compute_loss`` reads it. Mixed in first
(``class TPWeighted(TPTrainerMixin, WeightedLossTrainer)``), they train at tp=2 with ZeRO-1 on a
2-process gloo world and are compared with the same subclass, unmixed, on one process from the same
weights and data order: per-step losses, gradient norms and the saved weights.

Tolerances: fp32, 4 SGD steps; TP changes only the order of summation (row-parallel all-reduces,
the vocab-parallel log-sum-exp): 1e-5 on losses (~4.6), 1e-5 relative on gradient norms, 1e-5 on
weights. A loss_weight ignored under TP changes the losses by 2x, a lost shard gradient moves the
weights by ~lr x grad ~ 1e-2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from distributed import run_distributed
from models import tiny_model
from tp_trainer import TPArgumentsMixin, TPTrainer, TPTrainerMixin, TPTrainingArguments

pytestmark = pytest.mark.cpu_only(reason="the world trains with use_cpu=True on CPU batches, like test_trainer")

STEPS, SEQ = 4, 16


@dataclass
class WeightedArguments(TrainingArguments):
    loss_weight: float = field(default=1.0, metadata={"help": "Factor on the model's loss."})


class WeightedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = loss * self.args.loss_weight
        return (loss, outputs) if return_outputs else loss


@dataclass
class TPWeightedArguments(TPArgumentsMixin, WeightedArguments):
    pass


class TPWeightedLossTrainer(TPTrainerMixin, WeightedLossTrainer):
    pass


def make_dataset(n=64, seed=3):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100  # an unsupervised prompt
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def train(out: str, *, tp: int | None) -> dict:
    common = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", seed=0,
                  use_cpu=True, disable_tqdm=True, loss_weight=2.0)
    if tp is None:
        trainer = WeightedLossTrainer(model=tiny_model("llama"), args=WeightedArguments(**common),
                                      train_dataset=make_dataset())
    else:
        args = TPWeightedArguments(**common, tp_size=tp, zero_stage=1)
        trainer = TPWeightedLossTrainer(model=tiny_model("llama"), args=args, train_dataset=make_dataset())
    result = {"accelerator": type(trainer.accelerator).__name__}
    if tp is not None:
        local = sum(p.numel() for p in trainer.model.parameters())
        accelerator = trainer.accelerator
        trainer.create_accelerator_and_postprocess()  # as the Trainer's hyper-parameter search does again
        result["rebuilt"] = {"accelerator": type(trainer.accelerator).__name__,
                             "new_accelerator": trainer.accelerator is not accelerator,
                             "gather_is_dp_only": trainer.gather_function.func.__self__ is trainer.accelerator,
                             "shards_kept": sum(p.numel() for p in trainer.model.parameters()) == local,
                             "local_params": local, "full_params": trainer._full_param_count}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    result.update(losses=[h["loss"] for h in logged], norms=[h["grad_norm"] for h in logged])
    trainer.save_model(os.path.join(out, "final"))
    if trainer.args.should_save:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"), dtype=torch.float32)
        result["weights"] = {k: v.clone() for k, v in saved.state_dict().items()}
    return result


def world(base: str) -> dict:
    return train(os.path.join(base, f"rank{os.environ['RANK']}"), tp=2)


def test_a_users_trainer_and_arguments_subclasses_train_under_tp_like_one_process(tmp_path):
    ranks = run_distributed(world, 2, str(tmp_path))
    ref = train(str(tmp_path / "reference"), tp=None)
    assert ref["accelerator"] == "Accelerator"
    assert "weights" in ranks[0]
    for rank in ranks:
        assert rank["accelerator"] == "TPAccelerator"
        assert rank["rebuilt"] == {"accelerator": "TPAccelerator", "new_accelerator": True, "gather_is_dp_only": True,
                                   "shards_kept": True, "local_params": rank["rebuilt"]["local_params"],
                                   "full_params": rank["rebuilt"]["full_params"]}
        assert rank["rebuilt"]["local_params"] < rank["rebuilt"]["full_params"]
        assert len(rank["losses"]) == STEPS
        assert rank["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert rank["norms"] == pytest.approx(ref["norms"], rel=1e-5)
    for name, weight in ref["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, atol=1e-5, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------- the mixins' contract
def test_tptrainer_and_tptrainingarguments_are_the_mixins_on_the_transformers_classes():
    assert issubclass(TPTrainer, TPTrainerMixin) and issubclass(TPTrainer, Trainer)
    assert issubclass(TPTrainingArguments, TPArgumentsMixin) and issubclass(TPTrainingArguments, TrainingArguments)
    assert TPTrainer.__mro__.index(TPTrainerMixin) < TPTrainer.__mro__.index(Trainer)


def test_the_arguments_mixin_goes_first():
    with pytest.raises(TypeError, match=r"put TPArgumentsMixin before TrainingArguments .* class Late\(TPArgumentsMixin"):
        @dataclass
        class Late(WeightedArguments, TPArgumentsMixin):
            pass


def test_a_custom_arguments_class_parses_and_validates_the_layout(tmp_path, monkeypatch):
    (args,) = HfArgumentParser(TPWeightedArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zero_stage", "1", "--loss_weight", "3", "--use_cpu", "true"])
    assert (args.tp_size, args.zero_stage, args.loss_weight, args.parallel_active) == (1, 1, 3.0, True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 is not divisible by tp_size=3"):
        TPWeightedArguments(output_dir=str(tmp_path), tp_size=3)
    with pytest.raises(ValueError, match="use_liger_kernel is not supported with tp_size > 1"):
        TPWeightedArguments(output_dir=str(tmp_path), tp_size=2, use_liger_kernel=True)


def test_refusals_come_before_any_work(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="got args of type WeightedArguments, which has no tp_size"):
        TPWeightedLossTrainer(model=model, args=WeightedArguments(output_dir=str(tmp_path), use_cpu=True))
    args = TPWeightedArguments(output_dir=str(tmp_path), zero_stage=1, use_cpu=True)  # a 1-process ZeRO "world"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"shards the optimizer itself: pass optimizer_cls_and_kwargs"):
        TPWeightedLossTrainer(model=model, args=args, optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="needs a model instance: model_init would build an unsharded model"):
        TPWeightedLossTrainer(args=args, model_init=lambda: tiny_model("llama"))
    assert not any(hasattr(p, "tp_spec") for p in model.parameters())  # nothing was sharded
