"""Plans are refused before a weight is touched: user-plan mistakes, inconsistent splits, unknown styles.

Everything here runs in one process without a process group: the static checks read the model,
and the meta-device validation (tp_trainer/planner/validate.py) runs one training step of rank 0's
shards on a meta twin. After every refusal the model must be exactly as it was built.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import transformers as T

from models import ALL_FAMILIES, tiny_model
from tp_trainer import PlanError, TPTrainingArguments, plan_tensor_parallel
from tp_trainer.commands import plan as plan_cli
from tp_trainer.planner import PlanEntry, Style
from tp_trainer.planner import heads as planner_module  # _is_attention, patched below, lives in heads.py
from tp_trainer.planner import validate


def _assert_untouched(model, family="llama"):
    """No module converted, no parameter sharded, no plan recorded."""
    fresh = tiny_model(family)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    assert not any(hasattr(p, "tp_spec") for p in model.parameters())
    assert not hasattr(model, "tp_plan_applied")
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))


USER_MISTAKES = {
    # a row-parallel layer fed the replicated hidden state: caught by the meta step, at up_proj itself
    "rowwise on up_proj": ({"model.layers.*.mlp.up_proj": "rowwise"},
                           r"forward of model\.layers\.0\.mlp\.up_proj \(RowParallelLinear\)(.|\n)*"
                           r"inputs \[1, 8, 64\]; weight \[96, 32\] \(rank 0's shard of \[96, 64\], dim 1\)(.|\n)*"
                           r"Fix: change the tp_plan entry that sets model\.layers\.\*\.mlp\.up_proj"),
    "colwise on a norm": ({"model.layers.*.input_layernorm": "colwise"},
                          r"model\.layers\.0\.input_layernorm is a LlamaRMSNorm, not a linear layer.*'replicated'"),
    "typo in a pattern": ({"model.layers.*.mlp.down_prj": "rowwise"},
                          r"'model\.layers\.\*\.mlp\.down_prj' matches no module.*"
                          r"closest module names: 'model\.layers\.\*\.mlp\.down_proj'"),
    "pattern on a parameterless module": ({"model.layers.*.mlp": "replicated"},
                                          r"matches only modules that own no parameters \(LlamaMLP\).*"
                                          r"'model\.layers\.\*\.mlp\.\*'"),
    "unknown style": ({"model.layers.*.mlp.down_proj": "rowwize"},
                      r"entry 'model\.layers\.\*\.mlp\.down_proj': 'rowwize' is not a tensor-parallel style.*"
                      r"Supported: colwise, .*rowwise"),
    "colwise lm_head": ({"lm_head": "colwise"}, r"lm_head is the output embedding.*'vocab_lm_head'"),
    "not a mapping": ({"model.layers.*.mlp.down_proj": 2}, r"tp_plan must map module patterns \(str\) to styles"),
}


@pytest.mark.parametrize("case", list(USER_MISTAKES))
def test_user_plan_mistakes_are_refused_before_any_module_is_converted(case):
    user_plan, message = USER_MISTAKES[case]
    model = tiny_model("llama")
    with pytest.raises(PlanError, match=message):
        plan_tensor_parallel(model, 2, user_plan=user_plan)
    _assert_untouched(model)


def test_q_proj_rowwise_beside_colwise_k_v_is_caught_by_the_meta_step():
    model = tiny_model("llama")
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn\.q_proj \(RowParallelLinear\)(.|\n)*"
                                        r"self_attn\.k_proj: colwise"):
        plan_tensor_parallel(model, 2, user_plan={"model.layers.*.self_attn.q_proj": "rowwise"})
    _assert_untouched(model)


def test_an_inconsistent_plan_passed_directly_names_the_module():
    model = tiny_model("llama")
    plan = plan_tensor_parallel(model, 2)
    plan.entries["model.layers.1.self_attn.q_proj"] = PlanEntry(Style.ROWWISE, "user", "hand-edited")
    with pytest.raises(PlanError, match=r"fails in the forward of model\.layers\.1\.self_attn\.q_proj"):
        validate.validate_plan(model, plan)
    plan.entries["model.layers.1.self_attn.q_proj"] = PlanEntry(Style.COLWISE, "user", "hand-edited", ((10, 1),))
    with pytest.raises(PlanError, match=r"cannot be applied at model\.layers\.1\.self_attn\.q_proj.*blocks"):
        validate.validate_plan(model, plan)
    _assert_untouched(model)


def test_a_failing_backward_names_the_module_whose_gradient_arrived_last():
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad[..., :1]  # wrong width

    class Inner(nn.Module):
        def forward(self, x):
            return BadGrad.apply(x)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, device="meta")
            self.inner = Inner()

        def forward(self, input_ids, labels):
            return SimpleNamespace(loss=self.inner(self.emb(input_ids)).sum())

    failure = validate._meta_step(Toy())
    assert failure.phase == "backward" and failure.module == "inner"


@pytest.mark.parametrize("tp", [2, 4])
def test_mqa_replicates_the_kv_block_only_on_k_and_v(tp):
    plan = plan_tensor_parallel(tiny_model("llama_mqa"), tp)
    blocks = {n.split(".", 3)[3]: e.blocks for n, e in plan.entries.items() if n.startswith("model.layers.0.")}
    assert blocks["self_attn.k_proj"] == blocks["self_attn.v_proj"] == ((16, tp),)
    assert blocks["mlp.gate_proj"] is blocks["mlp.up_proj"] is blocks["mlp.down_proj"] is None
    assert any(n.startswith("checked:") for n in plan.notes)


def test_an_mlp_as_wide_as_the_single_kv_head_is_split_plainly(monkeypatch):
    # 1 KV head of 128 next to an intermediate size of 128: the width alone cannot tell k/v from an MLP
    model = tiny_model("llama_mqa", head_dim=128)
    plan = plan_tensor_parallel(model, 2)
    assert plan.entries["model.layers.0.self_attn.k_proj"].blocks == ((128, 2),)
    assert plan.entries["model.layers.0.mlp.gate_proj"].blocks is None
    assert plan.entries["model.layers.0.mlp.up_proj"].blocks is None
    # the old rule (replicate anything of the KV width) is now a planning-time error, not a crash in step 1
    monkeypatch.setattr(planner_module, "_is_attention", lambda module: True)
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.down_proj \(RowParallelLinear\)(.|\n)*"
                                        r"mlp\.gate_proj: colwise blocks 128x2rep(.|\n)*"
                                        r"tp_plan=\{'model\.layers\.\*\.mlp\.\*': 'replicated'\}"):
        plan_tensor_parallel(model, 2)


def test_an_unknown_style_in_the_models_hf_plan_falls_back_to_the_rules():
    model = tiny_model("llama")
    model._tp_plan = {**model._tp_plan, "model.layers.*.mlp.down_proj": "grouped_gemm_v9",
                      "model.layers.*.input_layernorm": "colwise"}
    plan = plan_tensor_parallel(model, 2)
    down = plan.entries["model.layers.0.mlp.down_proj"]
    assert down.style == Style.ROWWISE and down.source == "rule"
    norm = plan.entries["model.layers.0.input_layernorm"]
    assert norm.style == Style.REPLICATED
    unknown = [w for w in plan.warnings if "'model.layers.*.mlp.down_proj'" in w]
    assert len(unknown) == 1  # one per pattern, not per layer
    assert "'grouped_gemm_v9' is not one tp_trainer knows" in unknown[0] and "decided instead: rowwise" in unknown[0]
    misfit = [w for w in plan.warnings if "'model.layers.*.input_layernorm'" in w]
    assert len(misfit) == 1 and "not a linear layer" in misfit[0] and "decided instead: replicated" in misfit[0]
    assert "WARNING: the model's HF tp_plan entry" in plan.table()
    # the same unknown style from the user is an error
    with pytest.raises(PlanError, match="'grouped_gemm_v9' is not a tensor-parallel style"):
        plan_tensor_parallel(tiny_model("llama"), 2, user_plan={"model.layers.*.mlp.down_proj": "grouped_gemm_v9"})


def test_every_family_validates_at_tp2_on_meta():
    for family, make in ALL_FAMILIES.items():
        with torch.device("meta"):
            model = T.AutoModelForCausalLM.from_config(make())
        plan = plan_tensor_parallel(model, 2)
        assert any(n.startswith("checked:") for n in plan.notes), (family, plan.notes)


def test_a_model_that_cannot_run_on_meta_is_planned_with_a_note(monkeypatch):
    # data-dependent code (.item()) fails on meta for the sharded and the unsharded model alike
    forward = T.models.llama.modeling_llama.LlamaMLP.forward

    def data_dependent(self, x):
        if x.sum().item() > 1e30:
            return x
        return forward(self, x)

    monkeypatch.setattr(T.models.llama.modeling_llama.LlamaMLP, "forward", data_dependent)
    # the lean MLP forward (parallel/glu.py) would take the patched one's place, after checking on CPU inputs
    # that it computes the same: keep Hugging Face's modules so that the data-dependent code runs on meta
    monkeypatch.setenv("TP_TRAINER_LEAN_ACTIVATIONS", "0")
    plan = plan_tensor_parallel(tiny_model("llama"), 2)
    assert any("NOT validated" in n and "unsharded model fails too" in n for n in plan.notes), plan.notes
    assert plan.entries["model.layers.0.mlp.down_proj"].style == Style.ROWWISE


def test_a_model_changed_after_construction_is_validated_on_a_meta_copy_of_itself(monkeypatch):
    model = tiny_model("llama")
    model.model.layers[0].mlp.act_fn = nn.GELU()  # a fresh build of the config would not have it
    plan = plan_tensor_parallel(model, 2)
    assert any(n.startswith("checked:") and "copy of the model" in n for n in plan.notes), plan.notes
    # the copy, not the model, went to meta and was sharded
    assert all(p.device.type == "cpu" and not hasattr(p, "tp_spec") for p in model.parameters())
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.up_proj \(RowParallelLinear\)"):
        plan_tensor_parallel(model, 2, user_plan={"model.layers.0.mlp.up_proj": "rowwise"})
    # neither twin possible: planned, and the plan says it was not validated and why
    monkeypatch.setattr(validate, "meta_copy", lambda model: (_ for _ in ()).throw(TypeError("cannot pickle lock")))
    plan = plan_tensor_parallel(model, 2)
    assert any("NOT validated" in n and "model.layers.0.mlp.act_fn" in n and "cannot pickle lock" in n
               for n in plan.notes), plan.notes


def test_malformed_tp_plan_names_the_flag_and_the_expected_form(tmp_path, capsys):
    assert plan_cli.main(["llama", "--tp-size", "2", "--tp-plan", "{model.layers: rowwise"]) == 2
    err = capsys.readouterr().err
    assert "--tp-plan must be 'auto' or a JSON object" in err and "'{model.layers: rowwise'" in err
    assert '"model.layers.*.mlp.down_proj": "rowwise"' in err  # the expected form
    for bad, message in [("{bad", r"tp_plan must be 'auto' or a JSON object.*'\{bad'.*not valid JSON"),
                         ('["rowwise"]', r"tp_plan must map module patterns \(str\) to styles"),
                         ('{"model.layers.*.mlp.down_proj": "rowwize"}', r"tp_plan entry .* 'rowwize' is not")]:
        with pytest.raises(ValueError, match=message):
            TPTrainingArguments(output_dir=str(tmp_path), tp_plan=bad)


def test_moe_routing_runs_on_meta():
    # token routing picks tokens with nonzero/where: on meta every expert is handed every token
    cfg = T.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=96, num_local_experts=4, num_experts_per_tok=2)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    for tp in (2, 4):
        plan = plan_tensor_parallel(model, tp)
        assert any(n.startswith("checked:") for n in plan.notes), plan.notes
