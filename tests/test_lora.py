"""PEFT LoRA under tensor parallelism, against single-process PEFT from the same weights.

* the plan: base layers planned as in the unwrapped model, adapters after their base, refusals;
* one forward/backward at tp=2 (Llama; GPT-2's fused Conv1D ``c_attn``; Phi-3's fused ``qkv_proj``
  and ``gate_up_proj``): the loss and every gathered adapter gradient equal single-process PEFT's,
  frozen weights get no gradient, and LoRA adds no collective to the step; the adapter directory
  ``save_model`` writes loads with ``PeftModel.from_pretrained`` with the TP model's logits;
* ``TPTrainer`` at tp=2 with ZeRO-1 (LoRA on every Llama projection + ``modules_to_save`` LM head)
  against the plain single-process ``Trainer``: per-step losses and gradient norms; trainable
  parameters and optimizer state per rank equal the theory; checkpoints hold the trainable tensors
  only and resume exactly (tp=2) and re-partitioned (tp=1); ``tp-trainer export --merge-lora``.

Tolerances (fp32 throughout; TP changes only the order of fp32 sums: partial products summed over
ranks, A's partial gradients summed over TP): one step's loss within 1e-6 and gradients within
2e-6 absolute (measured: <= 5e-7, and <= 2e-7 for gradients of up to 0.3; a misplaced shard or a
missing TP sum is off by the size of a gradient, >= 1e-3); logits of O(1) within 1e-5 (measured
3e-7 after training; save/load is exact, the merged export adds one rounding per merged weight);
Trainer losses (~4.6) over 6 AdamW steps within 1e-5, i.e. 20 fp32 ulps (measured: <= 1e-6, also
for the run resumed at tp=1), gradient norms within 1e-5 relative (measured: <= 2e-7). A run
resumed at the same layout repeats the same operations on the same data: its losses are equal.
"""

import json
import os

import pytest
import torch

from distributed import run_distributed
from models import tiny_model

pytestmark = pytest.mark.cpu_only(reason="the worlds run on CPU batches with use_cpu=True; not device-agnostic yet")

# case -> (family, LoRA target modules): every projection, fused ones included, and the input embedding
CASES = {"llama": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
         "gpt2": ("gpt2", ["c_attn", "c_proj", "c_fc"]),
         "phi3": ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
         "llama_embedding": ("llama", ["embed_tokens", "q_proj", "o_proj"]),
         "llama_dropout": ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
         "gpt2_saved_head": ("gpt2", ["wte", "c_attn", "c_proj", "c_fc"])}
DROPOUT = {"llama_dropout": 0.25}  # the adapters' dropout masks must be the unsharded model's (CPU dropout)
SAVED = {"gpt2_saved_head": ["lm_head"]}  # modules_to_save: GPT-2's head, tied to wte, trained as its own copy
RANK, ALPHA = 4, 8
IDS = torch.tensor([[5, 17, 42, 8, 77, 3, 60, 21, 11, 30], [9, 9, 31, 64, 2, 90, 14, 50, 7, 88]])
STEPS, SAVE_AT = 6, 3


def lora_model(case, *, random_b=False, modules_to_save=None, dtype=torch.float32):
    """Seeded base + seeded adapters; ``random_b``: B initialised randomly too (PEFT's default B = 0 would make
    the first step's A gradient zero, hiding its TP sum). A 16-bit base gets fp32 adapters (PEFT's default)."""
    from peft import LoraConfig, get_peft_model

    family, targets = CASES[case]
    base = tiny_model(family, dtype=dtype)
    torch.manual_seed(1)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT.get(case, 0.0), target_modules=targets,
                        init_lora_weights=not random_b, fan_in_fan_out=family == "gpt2",
                        modules_to_save=modules_to_save or SAVED.get(case))
    return get_peft_model(base, config)


# ---------------------------------------------------------------------------------------------- the plan
def test_base_layers_are_planned_as_in_the_unwrapped_model():
    from tp_trainer import plan_tensor_parallel
    from tp_trainer.planner import Style

    for case, (family, _) in CASES.items():
        plain = plan_tensor_parallel(tiny_model(family), 2)
        plan = plan_tensor_parallel(lora_model(case), 2)
        wrapped = {n.removeprefix("base_model.model.").removesuffix(".base_layer").replace(".original_module", ""): e
                   for n, e in plan.entries.items() if "lora_" not in n and ".modules_to_save." not in n}
        for name, entry in plan.entries.items():  # a modules_to_save copy: planned as its original
            if ".modules_to_save." in name:
                original = plan.entries[name.split(".modules_to_save.")[0] + ".original_module"]
                assert (entry.style, entry.blocks) == (original.style, original.blocks), name
        assert wrapped.keys() == plain.entries.keys(), case
        for name, entry in plain.entries.items():
            assert (wrapped[name].style, wrapped[name].blocks) == (entry.style, entry.blocks), (case, name)
        assert {n.removeprefix("base_model.model.") for n in plan.patches} == set(plain.patches)
        for name, entry in plan.entries.items():  # the adapters: sliced like their base, per the rules
            if ".lora_A." not in name:
                continue
            layer = name.split(".lora_A.")[0]
            base, a, b = (plan.entries[f"{layer}.base_layer"], entry, plan.entries[name.replace("lora_A", "lora_B")])
            expected = {Style.COLWISE: (Style.REPLICATED_GRAD_SUM, Style.ADAPTER_COLWISE),
                        Style.ROWWISE: (Style.ADAPTER_ROWWISE, Style.REPLICATED_GRAD_SUM)}[base.style]
            assert (a.style, b.style) == expected, name
            assert (b if base.style == Style.COLWISE else a).blocks == base.blocks, name  # fused blocks followed
        for name, entry in plan.entries.items():  # an embedding's adapters: whole on every rank
            if ".lora_embedding_" in name:
                assert entry.style == Style.REPLICATED, name
        head = "base_model.model.lm_head" + (".original_module" if case in SAVED else "")
        assert plan.entries[head].style == Style.LM_HEAD  # the vocab-parallel loss is kept
        assert "adapter_colwise" in plan.table() and "lora" in plan.summary()


def test_lora_plan_refusals_name_the_module_and_the_fix():
    from peft import LoraConfig, get_peft_model

    from tp_trainer import PlanError, plan_tensor_parallel

    cases = [
        (dict(target_modules=["q_proj"], use_dora=True), "use_dora=False"),
        (dict(target_modules=["down_proj"], lora_bias=True), "lora_bias=False"),
        (dict(target_modules=["lm_head"]), "colwise_gather_output"),
    ]
    for kwargs, fix in cases:
        model = get_peft_model(tiny_model("llama"), LoraConfig(r=RANK, **kwargs))
        with pytest.raises(PlanError, match=fix):
            plan_tensor_parallel(model, 2)
    model = lora_model("llama")
    with pytest.raises(PlanError, match="take the style of the module they wrap"):
        plan_tensor_parallel(model, 2, user_plan={"base_model.model.model.layers.*.mlp.down_proj.lora_A.default":
                                                  "replicated"})
    with pytest.raises(PlanError, match="given by the planner to LoRA adapters"):
        plan_tensor_parallel(model, 2, user_plan={"model.layers.*.mlp.down_proj": "adapter_rowwise"})


def test_user_plan_in_peft_or_plain_names_and_adapters_follow():
    from tp_trainer import plan_tensor_parallel
    from tp_trainer.planner import Style

    for pattern in ("model.layers.*.mlp.*", "base_model.model.model.layers.*.mlp.*.base_layer"):
        plan = plan_tensor_parallel(lora_model("llama"), 2, user_plan={pattern: "replicated"})
        mlp = {n: e.style for n, e in plan.entries.items() if ".mlp." in n}
        assert mlp and set(mlp.values()) == {Style.REPLICATED}, (pattern, mlp)  # the adapters too: whole per rank
        assert plan.entries["base_model.model.model.layers.0.self_attn.o_proj.base_layer"].style == Style.ROWWISE


# --------------------------------------------------------------------------- one step: gradients, saving
def _count_all_reduces():
    """Patch the mappings' all-reduce with a counter (this process only); returns the counter."""
    from tp_trainer.parallel import mappings

    counter = {"n": 0}
    inner = mappings._all_reduce

    def counted(x, group):
        counter["n"] += 1
        return inner(x, group)

    mappings._all_reduce = counted
    return counter


def _sharded(model, ctx):
    from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel

    return apply_tensor_parallel(model, plan_tensor_parallel(model, ctx.tp_size), ctx)


def step_world(out_dir):
    """Per family: one forward/backward of the tp=2 LoRA model (gathered gradients), the collectives it issued,
    its eval logits, and the adapter directory save_model writes."""
    from tp_trainer.checkpoint.export import save_model
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.parallel.gather import gather_full
    from tp_trainer.parallel.grads import sync_partial_tp_grads

    ctx = ParallelContext.from_environment(2, use_cpu=True)
    counter = _count_all_reduces()
    results = {"bf16_all_reduces": _bf16_all_reduces(ctx, counter)}
    for case, (family, targets) in CASES.items():
        model = _sharded(lora_model(case, random_b=True), ctx).train()
        counter["n"] = 0
        torch.manual_seed(2)  # the dropout masks
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        lora_reduces = counter["n"]
        sync_partial_tp_grads(model.parameters(), ctx.tp_comm)  # what ShardedOptimizer does before stepping
        grads, frozen_with_grad = {}, []
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads[name] = gather_full(p.grad, getattr(p, "tp_spec", None), ctx.tp_group).clone()
            elif p.grad is not None:
                frozen_with_grad.append(name)
        # the same model without adapters, trainable in the modules LoRA targets only (so that the same
        # activations require gradients): the LoRA step must issue exactly its collectives
        plain = tiny_model(family).requires_grad_(False)
        for name, mod in plain.named_modules():
            if name.rsplit(".", 1)[-1] in targets + SAVED.get(case, []):  # a tied weight: trainable if one holder is
                mod.requires_grad_(True)
        plain = _sharded(plain, ctx).train()
        counter["n"] = 0
        plain(input_ids=IDS, labels=IDS).loss.backward()
        plain_reduces = counter["n"]
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        save_model(model, f"{out_dir}/{case}", context=ctx, dtype=torch.float32, is_main=ctx.rank == 0)
        results[case] = {"loss": loss.detach(), "grads": grads, "frozen_with_grad": frozen_with_grad,
                           "all_reduces": (lora_reduces, plain_reduces), "logits": logits}
    return results


def _bf16_all_reduces(ctx, counter):
    """All-reduces of a training step of a bf16 Llama with fp32 adapters (PEFT casts the adapters' input to
    fp32, a new tensor) and of the same model without adapters, its targeted linears trainable."""
    counts = []
    for model in (lora_model("llama", random_b=True, dtype=torch.bfloat16), tiny_model("llama", dtype=torch.bfloat16)):
        if not hasattr(model, "peft_config"):
            for name, p in model.named_parameters():
                p.requires_grad_(name.rsplit(".", 2)[-2] in CASES["llama"][1])
        model = _sharded(model, ctx).train()
        counter["n"] = 0
        model(input_ids=IDS, labels=IDS).loss.backward()
        counts.append(counter["n"])
    return tuple(counts)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_step"))
    return out, run_distributed(step_world, 2, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_step_equals_single_process_peft(one_step, case):
    _, ranks = one_step
    ref = lora_model(case, random_b=True).train()
    torch.manual_seed(2)
    loss = ref(input_ids=IDS, labels=IDS).loss
    loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in ref.parameters() if not p.requires_grad)
    for rank in ranks:
        got = rank[case]
        assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
        assert got["grads"].keys() == want.keys()
        for name, grad in want.items():
            assert got["grads"][name].shape == grad.shape, name
            torch.testing.assert_close(got["grads"][name], grad, atol=2e-6, rtol=0, msg=name)
        assert got["frozen_with_grad"] == [], "frozen base weights must get no gradient"
        lora_reduces, plain_reduces = got["all_reduces"]
        assert lora_reduces == plain_reduces > 0, "the adapters must ride on the base layers' collectives"
        lora_reduces, plain_reduces = rank["bf16_all_reduces"]  # fp32 adapters on a bf16 base: the same
        assert lora_reduces == plain_reduces > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_directory_loads_with_peft_and_gives_the_tp_logits(one_step, case):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    out, ranks = one_step
    family = CASES[case][0]
    directory = f"{out}/{case}"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(directory))
    saved = load_file(f"{directory}/adapter_model.safetensors")
    assert saved.keys() == get_peft_model_state_dict(lora_model(case)).keys()  # PEFT's own naming
    loaded = PeftModel.from_pretrained(tiny_model(family), directory).eval()  # same seeded base weights
    with torch.no_grad():
        logits = loaded(input_ids=IDS).logits
    for rank in ranks:
        torch.testing.assert_close(rank[case]["logits"], logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- TPTrainer end to end
def make_dataset(n=48, seq=16, seed=3):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # an unsupervised prompt: the loss normalisation is exercised
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def train(out, *, tp=2, zero=1, resume=None, trainer_cls="TPTrainer"):
    """A LoRA run (every Llama projection, the LM head in modules_to_save): losses, norms and what it holds."""
    from transformers import Trainer

    from tp_trainer import TPTrainer, TPTrainingArguments

    args = TPTrainingArguments(
        output_dir=out, tp_size=tp, zero_stage=zero, per_device_train_batch_size=4, max_steps=STEPS,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, report_to=[],
        save_strategy="steps", save_steps=SAVE_AT, seed=0, use_cpu=True, max_grad_norm=1.0, disable_tqdm=True)
    model = lora_model("llama", modules_to_save=["lm_head"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cls = TPTrainer if trainer_cls == "TPTrainer" else Trainer
    trainer = cls(model=model, args=args, train_dataset=make_dataset())
    frozen_local = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    result = {"steps": [h["step"] for h in history], "losses": [h["loss"] for h in history],
              "norms": [h["grad_norm"] for h in history]}
    params = dict(trainer.model.named_parameters())
    result["frozen_unchanged"] = all(torch.equal(params[n], t) for n, t in frozen_local.items())
    result["frozen_grads"] = [n for n, p in params.items() if not p.requires_grad and p.grad is not None]
    result["frozen_names"] = sorted(frozen)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if hasattr(opt, "local_numel"):
        result["numel"] = opt.local_numel()
        names = {id(p): n for n, p in params.items()}
        result["optimized"] = sorted(names[id(p)] for p in opt.params)
        result["local_trainable"] = {n: p.numel() for n, p in params.items() if p.requires_grad}
    model = trainer.model.eval()
    with torch.no_grad():
        result["logits"] = model(input_ids=IDS).logits
    return result, trainer


def trainer_world(base):
    full, trainer = train(f"{base}/run")
    trainer.save_model(f"{base}/adapter")
    resumed, _ = train(f"{base}/resumed", resume=f"{base}/run/checkpoint-{SAVE_AT}")
    return {"full": full, "resumed": resumed}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("lora_trainer"))
    return base, run_distributed(trainer_world, 2, base)


def test_tp2_lora_training_matches_the_single_process_trainer(trained):
    base, ranks = trained
    ref, _ = train(f"{base}/ref", tp=1, zero=0, trainer_cls="Trainer")
    assert len(ref["losses"]) == STEPS
    for rank in ranks:
        got = rank["full"]
        assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5)
        assert got["frozen_unchanged"] and got["frozen_grads"] == []
        torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0)


def test_trainable_parameters_and_optimizer_state_per_rank_equal_the_theory(trained):
    """Per rank, tp=2 dp=1 ZeRO-1 AdamW: beside a column-parallel base A is whole (r d_in) and B split
    (r d_out / 2); beside a row-parallel base A split (r d_in / 2) and B whole (r d_out); the LM head copy in
    modules_to_save is vocabulary-split (V H / 2). The optimizer holds fp32 masters of exactly those (dp=1:
    the whole bucket) and two AdamW moments each; no frozen weight appears in it."""
    import torch.nn as nn

    _, ranks = trained
    base = tiny_model("llama")
    columns, rows = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}, {"o_proj", "down_proj"}
    theory = 0
    for name, mod in base.named_modules():
        attr = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Linear) and attr in columns:
            theory += RANK * mod.in_features + RANK * mod.out_features // 2
        elif isinstance(mod, nn.Linear) and attr in rows:
            theory += RANK * mod.in_features // 2 + RANK * mod.out_features
    theory += base.lm_head.weight.numel() // 2
    for rank in ranks:
        got = rank["full"]
        assert got["numel"]["params"] == theory == sum(got["local_trainable"].values())
        assert got["numel"]["master"] == theory
        assert got["numel"]["optimizer_state"] == 2 * theory
        assert got["optimized"] == sorted(got["local_trainable"])
        assert not set(got["optimized"]) & set(got["frozen_names"])


def test_checkpoints_hold_the_trainable_tensors_and_resume_exactly_and_repartitioned(trained):
    from safetensors import safe_open

    base, ranks = trained
    ckpt = f"{base}/run/checkpoint-{SAVE_AT}"
    with open(f"{ckpt}/tp_checkpoint.json") as f:
        manifest = json.load(f)
    trainable = set(ranks[0]["full"]["local_trainable"])
    assert manifest["trainable_only"] and set(manifest["tensors"]) == trainable
    for t in range(2):
        with safe_open(f"{ckpt}/model-tp{t:02d}-of-02.safetensors", "pt") as f:
            assert set(f.keys()) == trainable  # no base weight, no buffer
    assert os.path.isfile(f"{ckpt}/adapter_config.json") and os.path.isfile(f"{ckpt}/config.json")
    full = ranks[0]["full"]["losses"]
    after = list(range(SAVE_AT + 1, STEPS + 1))

    def resumed_losses(run):  # the resumed log history starts with the checkpoint's own steps
        assert run["steps"] == list(range(1, STEPS + 1))
        return run["losses"][SAVE_AT:]

    for rank in ranks:  # same layout: the same operations on the same data
        assert resumed_losses(rank["resumed"]) == full[SAVE_AT:], after
    tp1, _ = train(f"{base}/tp1", tp=1, zero=0, resume=ckpt)  # re-partitioned into one process
    assert resumed_losses(tp1) == pytest.approx(full[SAVE_AT:], abs=1e-5)


def test_a_lora_checkpoint_is_refused_for_a_model_without_the_lora_wrapper(trained):
    from tp_trainer.checkpoint import CheckpointError, CheckpointReader

    base, _ = trained
    with pytest.raises(CheckpointError, match="wrap the base model with the run's LoRA config"):
        CheckpointReader.open(f"{base}/run/checkpoint-{SAVE_AT}", model=tiny_model("llama"))


def test_export_merge_lora_writes_the_merged_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from tp_trainer.cli import main

    base, ranks = trained
    base_dir = str(tmp_path / "base")
    tiny_model("llama").save_pretrained(base_dir)
    ckpt = f"{base}/run/checkpoint-{STEPS}"
    assert main(["export", ckpt, str(tmp_path / "nope")]) == 1  # adapters only: --merge-lora is required
    assert main(["export", ckpt, str(tmp_path / "merged"), "--merge-lora", "--base-model", base_dir]) == 0
    assert main(["export", f"{base}/adapter", str(tmp_path / "from_adapter"), "--merge-lora",
                 "--base-model", base_dir]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    from_adapter = AutoModelForCausalLM.from_pretrained(tmp_path / "from_adapter").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for name, p in merged.state_dict().items():  # the checkpoint and save_model's adapters: the same merge
        assert torch.equal(p, from_adapter.state_dict()[name]), name
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
    for rank in ranks:
        torch.testing.assert_close(rank["full"]["logits"], logits, atol=1e-5, rtol=0)
    # 16-bit as save_model writes it: merged in fp32, then one cast
    assert main(["export", ckpt, str(tmp_path / "bf16"), "--merge-lora", "--base-model", base_dir, "--dtype",
                 "bf16"]) == 0
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    for name, p in bf16.state_dict().items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, merged.state_dict()[name].to(torch.bfloat16)), name


# ------------------------------------------------------------------------------------------- recipes
def test_recipe_lora_block_is_validated_and_wraps_the_model_for_the_planner():
    from tp_trainer import plan_tensor_parallel
    from tp_trainer.app.lora import LoraSettings, flatten_lora_block, wrap_with_lora
    from tp_trainer.planner import Style

    flat = flatten_lora_block({"use_lora": True, "max_steps": 3,
                               "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "down_proj"]}})
    assert flat == {"use_lora": True, "max_steps": 3, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                    "lora_target_modules": "q_proj,down_proj"}
    with pytest.raises(ValueError, match="'alpah'.*did you mean 'alpha'"):
        flatten_lora_block({"lora": {"alpah": 4}})
    for bad, what in [(dict(lora_r=0), "lora_r"), (dict(lora_alpha=0), "lora_alpha"), (dict(lora_dropout=1.0),
                      "lora_dropout"), (dict(lora_target_modules=" , "), "lora_target_modules")]:
        with pytest.raises(ValueError, match=what):
            LoraSettings(use_lora=True, **bad)
    settings = LoraSettings(**{k: v for k, v in flat.items() if k != "max_steps"})
    model = tiny_model("llama")
    assert wrap_with_lora(model, LoraSettings()) is model  # use_lora off: untouched
    wrapped = wrap_with_lora(model, settings)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and (".q_proj." in n or ".down_proj." in n) for n in trainable)
    plan = plan_tensor_parallel(wrapped, 2)
    assert plan.entries["base_model.model.model.layers.0.mlp.down_proj.lora_A.default"].style == Style.ADAPTER_ROWWISE
