"""The shard planner: styles per module for every family, fused layouts, head checks and errors.

All of it runs without a process group: a plan is a pure function of the model and tp_size.
"""

import json
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.nn as nn

from models import FAMILIES, tiny_model
from tp_trainer import PlanError, plan_tensor_parallel
from tp_trainer.planner import Style

# Per family: the linears of block 0 that must be row-parallel (they write the residual stream).
ROWWISE = {
    "llama": ["self_attn.o_proj", "mlp.down_proj"], "mistral": ["self_attn.o_proj", "mlp.down_proj"],
    "qwen2": ["self_attn.o_proj", "mlp.down_proj"], "qwen3": ["self_attn.o_proj", "mlp.down_proj"],
    "gemma": ["self_attn.o_proj", "mlp.down_proj"], "phi3": ["self_attn.o_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"], "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"],
    "opt": ["self_attn.out_proj", "fc2"], "falcon": ["self_attention.dense", "mlp.dense_4h_to_h"],
    "bloom": ["self_attention.dense", "mlp.dense_4h_to_h"],
}


def _block0(plan):
    names = [n for n in plan.entries if ".0." in n]
    prefix = names[0].split(".0.")[0] + ".0."
    return {n[len(prefix):]: e for n, e in plan.entries.items() if n.startswith(prefix)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_linear_is_split_and_the_residual_writers_are_rowwise(family):
    model = tiny_model(family)
    plan = plan_tensor_parallel(model, 2)
    assert not dist.is_initialized()
    block = _block0(plan)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    rows = {n for n, e in block.items() if e.style == Style.ROWWISE}
    cols = {n for n, e in block.items() if e.style == Style.COLWISE}
    assert rows == set(ROWWISE[family])
    assert len(cols) >= 2
    for name in linears:  # nothing a block owns is left to chance
        assert name in plan.entries, name
    emb = {n: e.style for n, e in plan.entries.items() if e.style in (Style.VOCAB_EMBEDDING, Style.LM_HEAD)}
    assert sorted(emb.values()) == [Style.VOCAB_EMBEDDING, Style.LM_HEAD]  # lm_head is never skipped


def test_fused_projections_are_split_head_aligned():
    gpt2 = _block0(plan_tensor_parallel(tiny_model("gpt2"), 2))
    assert gpt2["attn.c_attn"].blocks == ((64, 1), (64, 1), (64, 1))
    phi3 = _block0(plan_tensor_parallel(tiny_model("phi3"), 2))
    assert phi3["self_attn.qkv_proj"].blocks == ((64, 1), (32, 1), (32, 1))  # 4 q heads, 2 kv heads of 16
    assert phi3["mlp.gate_up_proj"].blocks == ((96, 1), (96, 1))
    assert phi3["self_attn.o_proj"].style == Style.ROWWISE  # HF's gather/split pair upgraded
    falcon = _block0(plan_tensor_parallel(tiny_model("falcon"), 2))  # multi-query: 1 kv head on both ranks
    assert falcon["self_attention.query_key_value"].blocks == ((64, 1), (16, 2), (16, 2))
    neox = _block0(plan_tensor_parallel(tiny_model("gpt_neox"), 2))
    assert neox["attention.query_key_value"].blocks is None  # per-head interleaved: contiguous is aligned


def test_norms_inside_the_parallel_region_sum_their_gradients():
    qwen3 = _block0(plan_tensor_parallel(tiny_model("qwen3"), 2))
    assert qwen3["self_attn.q_norm"].style == Style.REPLICATED_GRAD_SUM
    assert qwen3["input_layernorm"].style == Style.REPLICATED
    qwen3.clear()
    model = tiny_model("qwen3")
    model._tp_plan = {}  # the structural rule alone must find the same thing
    ruled = _block0(plan_tensor_parallel(model, 2))
    assert ruled["self_attn.q_norm"].style == Style.REPLICATED_GRAD_SUM
    assert ruled["self_attn.q_norm"].source == "rule"
    opt = _block0(plan_tensor_parallel(tiny_model("opt"), 2))  # OPT's block owns fc1/fc2 and its norms
    assert opt["final_layer_norm"].style == Style.REPLICATED


def test_per_head_and_full_width_norms():
    cohere = _block0(plan_tensor_parallel(tiny_model("cohere"), 2))  # q_norm weight [heads, head_dim]
    assert cohere["self_attn.q_norm"].style == Style.HEAD_SHARDED
    model = tiny_model("olmo2")
    model._tp_plan = {}  # rules alone: q_norm spans all heads, so the attention gathers its projections
    olmo = _block0(plan_tensor_parallel(model, 2))
    assert olmo["self_attn.q_proj"].style == Style.COLWISE_GATHER
    assert olmo["self_attn.o_proj"].style == Style.ROWWISE_SPLIT
    assert olmo["self_attn.q_norm"].style == Style.REPLICATED
    assert olmo["mlp.down_proj"].style == Style.ROWWISE  # the MLP is unaffected


def test_unknown_fused_qkv_is_refused_not_split_blindly(monkeypatch):
    # pretend the family table does not know GPTBigCode's fused multi-query c_attn, and that the dataflow
    # trace could not follow its output either (tests/test_dataflow.py: it finds the layout on its own)
    monkeypatch.setattr("tp_trainer.planner.planner.fused_layout", lambda *args, **kwargs: None)
    monkeypatch.setattr("tp_trainer.planner.dataflow.Dataflow.layout", lambda self, name: None)
    with pytest.raises(PlanError, match="transformer.h.0.attn.c_attn .* looks like a fused q/k/v projection"):
        plan_tensor_parallel(tiny_model("gpt_bigcode"), 2)


def test_an_mlp_as_wide_as_a_fused_qkv_is_not_mistaken_for_one():
    model = tiny_model("llama", intermediate_size=128)  # (4 + 2*2) heads x 16 = 128 too
    model._tp_plan = {}
    assert _block0(plan_tensor_parallel(model, 2))["mlp.gate_proj"].style == Style.COLWISE


def test_rules_agree_with_the_hf_plan_where_both_exist():
    with_hf = plan_tensor_parallel(tiny_model("llama"), 2)
    model = tiny_model("llama")
    model._tp_plan = {}
    rules = plan_tensor_parallel(model, 2)
    assert {n: e.style for n, e in rules.entries.items()} == {n: e.style for n, e in with_hf.entries.items()}
    assert {e.source for e in rules.entries.values()} == {"rule"}


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    plan = plan_tensor_parallel(tiny_model("llama"), 4)  # 4 q heads, 2 kv heads
    block = _block0(plan)
    assert block["self_attn.k_proj"].blocks == ((32, 2),)
    assert block["self_attn.q_proj"].blocks is None
    patch = next(iter(plan.patches.values()))
    assert patch.config == {"num_attention_heads": 1, "num_key_value_heads": 1}


def test_head_counts_that_do_not_divide_fail_at_planning_time():
    with pytest.raises(PlanError, match="tp_size=3 does not divide num_attention_heads=4"):
        plan_tensor_parallel(tiny_model("llama"), 3)
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=3, head_dim=8)
    with pytest.raises(PlanError, match="num_key_value_heads=3"):
        plan_tensor_parallel(model, 2)


def test_a_linear_the_rules_cannot_place_is_named():
    model = tiny_model("llama")
    model.model.layers[0].mlp.extra = nn.Linear(64, 64)  # never called in forward
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.extra.*tp_plan"):
        plan_tensor_parallel(model, 2)


def test_user_plan_overrides_and_unsupported_styles_are_named():
    plan = plan_tensor_parallel(tiny_model("llama"), 2, user_plan={"model.layers.*.mlp.*": "replicated"})
    block = _block0(plan)
    assert block["mlp.down_proj"].style == Style.REPLICATED and block["mlp.down_proj"].source == "user"
    assert block["self_attn.o_proj"].style == Style.ROWWISE
    # a style the user names must exist; one in the model's own HF plan falls back to the rules
    # (tests/test_plan_validation.py)
    with pytest.raises(ValueError, match="'sequence_parallel' is not a tensor-parallel style"):
        plan_tensor_parallel(tiny_model("llama"), 2, user_plan={"model.layers.*.mlp.down_proj": "sequence_parallel"})


def test_plan_is_printable_and_the_cli_explains_it(tmp_path):
    plan = plan_tensor_parallel(tiny_model("gpt2"), 2)
    text = str(plan)
    assert "transformer.h.*.attn.c_attn" in text and "qkv_blocks" in text and "[x2]" in text
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(FAMILIES["qwen2"]().to_dict()))
    out = subprocess.run([sys.executable, "-m", "tp_trainer.cli", "plan", str(cfg), "--tp-size", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "model.layers.*.mlp.down_proj" in out and "rowwise" in out and "summary: qwen2 tp=2" in out
    bad = subprocess.run([sys.executable, "-m", "tp_trainer.cli", "plan", str(cfg), "--tp-size", "3"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "num_attention_heads=4" in bad.stderr
