"""The planner's structure comes from the dataflow of one meta-device forward, not from module names or nesting.

tp_trainer/planner/dataflow.py tags every tensor of a traced forward with its provenance (the residual
stream, or the outputs of which linears) and replays shape ops on a feature-index shadow of every
stream-reading linear's output. These tests check what it reads from real models (which linears read
and write the stream, fused layouts, per-head parameters, the loss path), that the plans of every
family it replaced the module-order heuristic for are unchanged, and that the heuristic still takes
over, said in the plan, when no trace can be made. No process group: plans are pure.
"""

import pytest

from models import ALL_FAMILIES, ENCODERS, fused_mlp_llama, tiny_encoder, tiny_model
from tp_trainer import PlanError, plan_tensor_parallel
from tp_trainer.planner import Style
from tp_trainer.planner import dataflow
from tp_trainer.planner.families import fused_layout, layout_blocks
from tp_trainer.planner.model_info import model_dims
from tp_trainer.planner.planner import HEURISTIC, _layout_blocks


def _styles(plan):
    return {n: (e.style, e.blocks, e.dim) for n, e in plan.entries.items()}


def test_bert_output_projection_lives_in_another_module_and_adds_inside_a_post_norm():
    # BertSelfOutput.dense is not a sibling of q/k/v, and LayerNorm(dense(x) + input) adds the residual
    # inside the norm: the old rules made value row-parallel ("called last") and crashed in step 1
    flow = dataflow.trace_dataflow(tiny_encoder("bert_seq_cls"))
    layer = "bert.encoder.layer.0."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
        assert flow.linears[layer + name].role == "reader"
    out = flow.linears[layer + "attention.output.dense"]
    assert out.role == "inner" and out.writes_stream
    assert out.reads_linears == {layer + "attention.self." + n for n in ("query", "key", "value")}
    assert flow.linears[layer + "output.dense"].writes_stream
    # the pooler reads the stream, the classifier the pooler: nothing writes back, both stay replicated
    assert flow.linears["bert.pooler.dense"].role == "reader" and not flow.linears["classifier"].writes_stream
    plan = plan_tensor_parallel(tiny_encoder("bert_seq_cls"), 2)
    styles = {n.replace(layer, ""): e.style for n, e in plan.entries.items()}
    assert styles["attention.self.value"] == Style.COLWISE
    assert styles["attention.output.dense"] == Style.ROWWISE
    assert styles["intermediate.dense"] == Style.COLWISE and styles["output.dense"] == Style.ROWWISE
    assert styles["bert.pooler.dense"] == styles["classifier"] == Style.REPLICATED  # small task head
    assert "(dataflow)" in plan.entries[layer + "attention.output.dense"].reason
    assert plan.patches[layer + "attention.self"].attrs == {"num_attention_heads": 2, "all_head_size": 32}
    assert any(n.startswith("checked:") for n in plan.notes)  # validated, with one label per sequence
    assert plan.warnings == []


def test_fused_layouts_from_the_dataflow_match_the_family_table():
    # the family table knows these; the shadow of each output, consumed piece by piece, says the same
    cases = {"gpt2": "transformer.h.0.attn.c_attn", "phi3": "model.layers.0.self_attn.qkv_proj",
             "falcon": "transformer.h.0.self_attention.query_key_value",  # multi-query: 1 kv head replicated
             "gpt_bigcode": "transformer.h.0.attn.c_attn", "gpt_neox": "gpt_neox.layers.0.attention.query_key_value",
             "bloom": "transformer.h.0.self_attention.query_key_value"}
    for family, name in cases.items():
        model = tiny_model(family)
        flow = dataflow.trace_dataflow(model)
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        layout, how = fused_layout(type(owner).__name__, name.rsplit(".", 1)[1], owner, model.config)
        width = flow.linears[name].width
        for tp in (2, 4):
            expected = layout_blocks(layout, width, model_dims(model), tp)
            assert _layout_blocks(name, flow.layout(name), width, tp, (4, 1, 16)) == expected, (family, tp)
    phi3 = dataflow.trace_dataflow(tiny_model("phi3"))
    assert phi3.layout("model.layers.0.mlp.gate_up_proj").blocks == ((96, 0), (96, 0))  # two halves, no heads


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_without_the_family_table_the_dataflow_plans_every_family_the_same(monkeypatch, family):
    expected = _styles(plan_tensor_parallel(tiny_model(family), 2))
    monkeypatch.setattr("tp_trainer.planner.planner.fused_layout", lambda *args, **kwargs: None)
    assert _styles(plan_tensor_parallel(tiny_model(family), 2)) == expected


def test_a_fused_gate_up_the_modeling_code_chunks_is_split_half_aligned():
    # ModernBERT's MLP: Wi = Linear(h, 2i), input, gate = Wi(x).chunk(2); its name says nothing. It used to
    # be split as one plain column block (rank 0 all of `input`, rank 1 all of `gate`: silently wrong)
    plan = plan_tensor_parallel(tiny_encoder("modernbert_mlm"), 2)
    wi = plan.entries["model.layers.0.mlp.Wi"]
    assert wi.style == Style.COLWISE and wi.blocks == ((96, 1), (96, 1)) and "dataflow" in wi.reason
    assert plan.entries["model.layers.0.attn.Wqkv"].blocks == ((64, 1), (64, 1), (64, 1))
    assert plan.entries["model.layers.0.mlp.Wo"].style == Style.ROWWISE


def test_a_custom_module_with_a_fused_projection_is_recognised_from_its_dataflow():
    plan = plan_tensor_parallel(fused_mlp_llama(), 2)
    w_in = plan.entries["model.layers.0.mlp.w_in"]
    assert w_in.style == Style.COLWISE and w_in.blocks == ((96, 1), (96, 1))
    assert plan.entries["model.layers.0.mlp.w_out"].style == Style.ROWWISE


def test_pieces_the_planner_cannot_align_are_refused_not_split_plainly(monkeypatch):
    # a fused output whose pieces the trace saw but could not turn into a layout (and no table knows)
    monkeypatch.setattr("tp_trainer.planner.dataflow.Dataflow.layout", lambda self, name: None)
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.Wi .*consumes separate pieces of its output"):
        plan_tensor_parallel(tiny_encoder("modernbert_mlm"), 2)


def test_encoder_decoder_pieces():
    plan = plan_tensor_parallel(tiny_encoder("t5"), 2)
    e = plan.entries
    for name in ("encoder.embed_tokens", "decoder.embed_tokens", "shared"):  # one tied table, three modules
        assert e[name].style == Style.VOCAB_EMBEDDING
    bias = e["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    assert (bias.style, bias.dim, bias.blocks) == (Style.HEAD_SHARDED, 1, None)  # [buckets, heads]: heads split
    cross = "decoder.block.0.layer.1.EncDecAttention."
    assert [e[cross + n].style for n in "qkvo"] == [Style.COLWISE] * 3 + [Style.ROWWISE]  # k/v read the encoder
    assert e["lm_head"].style == Style.COLWISE_GATHER and "inline" in e["lm_head"].reason  # T5's own CE
    assert plan.patches[cross[:-1]].attrs == {"n_heads": 2, "inner_dim": 32}
    bart = plan_tensor_parallel(tiny_encoder("bart"), 2).entries
    assert bart["lm_head"].style == Style.COLWISE_GATHER and "final_logits_bias" in bart["lm_head"].reason


@pytest.mark.parametrize("name,style,loss", [
    ("bert_mlm", Style.COLWISE_GATHER, "inline"),          # CrossEntropyLoss() in forward
    ("distilbert_mlm", Style.COLWISE_GATHER, "inline"),    # self.mlm_loss_fct
    ("modernbert_mlm", Style.LM_HEAD, "loss_function"),    # ForMaskedLMLoss: vocab-parallel, no label shift
])
def test_the_loss_path_decides_whether_logits_stay_split(name, style, loss):
    model = tiny_encoder(name)
    assert dataflow.trace_dataflow(model).loss == loss
    out = model.get_output_embeddings()
    head = next(n for n, m in model.named_modules() if m is out)
    entry = plan_tensor_parallel(model, 2).entries[head]
    assert entry.style == style
    if style == Style.LM_HEAD:
        assert "ForMaskedLMLoss" in entry.reason and "without label shift" in entry.reason
    model = tiny_model("llama")
    model._tp_plan = {}  # the rules alone (llama's HF plan names the lm_head itself)
    llama = plan_tensor_parallel(model, 2).entries["lm_head"]
    assert llama.style == Style.LM_HEAD and "ForCausalLMLoss" in llama.reason


def test_mlm_head_bias_held_by_two_modules_is_one_tied_entry():
    plan = plan_tensor_parallel(tiny_encoder("bert_mlm"), 2)
    assert plan.entries["cls.predictions"].style == Style.REPLICATED
    assert "cls.predictions.decoder.bias (tied)" in plan.entries["cls.predictions"].reason
    assert plan.param_counts["cls.predictions"] == 0  # counted once, with the sharded decoder
    assert plan.entries["cls.predictions.transform.dense"].style == Style.REPLICATED


def test_attention_sinks_are_split_by_head():
    # gpt-oss: one learned logit per head, a 1-D parameter of the attention module itself
    for tp in (2, 4):
        entry = plan_tensor_parallel(tiny_encoder("gpt_oss"), tp).entries["model.layers.0.self_attn"]
        assert entry.style == Style.HEAD_SHARDED and entry.dim == 0 and entry.blocks is None
    flow = dataflow.trace_dataflow(tiny_encoder("gpt_oss"))
    assert not flow.param_uses["model.layers.0.self_attn.sinks"].per_feature


def test_config_fields_the_model_ignores_do_not_matter():
    # BertSelfAttention never reads num_key_value_heads: 3 of them in the config used to refuse tp=2
    model = tiny_encoder("bert_mlm")
    model.config.num_key_value_heads = 3
    plan = plan_tensor_parallel(model, 2)
    assert plan.entries["bert.encoder.layer.0.attention.self.key"].blocks is None
    # the heads the forward computes are what is checked
    with pytest.raises(PlanError, match=r"tp_size=3 does not divide num_attention_heads=4.*computes 4 heads of 16"):
        plan_tensor_parallel(tiny_encoder("bert_mlm"), 3)


def test_without_a_trace_the_module_order_heuristic_plans_and_says_so(monkeypatch):
    def llama():
        model = tiny_model("llama")
        model._tp_plan = {}  # the rules alone
        return model

    expected = _styles(plan_tensor_parallel(llama(), 2))

    def no_trace(model):
        dataflow.last_failure = "a custom model (test)"
        return None

    monkeypatch.setattr(dataflow, "trace_dataflow", no_trace)
    plan = plan_tensor_parallel(llama(), 2)
    assert _styles(plan) == expected
    assert plan.entries["model.layers.0.mlp.down_proj"].reason.endswith(HEURISTIC)
    assert any("module-order heuristic" in n and "a custom model (test)" in n for n in plan.notes)


def test_every_encoder_plans_and_validates_at_tp_2_and_4():
    for name in ENCODERS:
        for tp in (2, 4):
            plan = plan_tensor_parallel(tiny_encoder(name), tp)
            assert any(n.startswith("checked:") for n in plan.notes), (name, tp, plan.notes)
            assert not any(HEURISTIC.strip(" []") in e.reason for e in plan.entries.values()), name
