"""Sequence parallelism (``apply_tensor_parallel(..., sequence_parallel=True)``) trains like TP without it and like
the unsharded model.

Every family kind the planner supports, on a sequence of 15 tokens (neither tp=2 nor tp=4 divides it:
every step runs the padding path): Llama; GPT-2 (absolute positions added before the split, fused
``c_attn``); Falcon and GPT-J (parallel attention: attention and MLP read one normed input); OPT (its
block flattens the tokens before an MLP it calls itself); Mixtral and Qwen2-MoE (MoE blocks in
replicate mode: the router reads the gathered input); BERT (post-norm encoder, no final norm). At
tp=2, 3 AdamW steps each with and without sequence parallelism at the same tp, and at tp=1 in this
process; at tp=4 a subset; at tp=2 x dp=2 with ZeRO-1, ZeRO-2 and ZeRO-3; with activation checkpointing,
``torch.compile``, LoRA adapters and greedy generation (one-token steps: more padding than tokens).

Tolerances, fp32 throughout:

* against TP without sequence parallelism at the same tp: the forward runs the same operations on
  the same values (per-token ops on chunks of the rows, the reduce-scatter of tp=2 sums the same two
  partial products as the all-reduce), so the first step's loss is equal. The gradients of parameters
  that see local tokens (norm weights, row-parallel biases) are summed per chunk and then over TP
  instead of over all tokens at once: ~1e-7 relative (measured <= 6e-8 on gradients of O(0.1-1)),
  bound 1e-6; a missing TP sum halves such a gradient, a doubled one doubles it. Later steps' losses
  carry those ulps through Adam: 2e-5, as tests/test_families.py.
* against the unsharded model: tests/test_families.py's 2e-5 on losses and first-step gradients
  (reordered sums, amplified by Adam over the steps).
* activation checkpointing and ``torch.compile`` (``aot_eager``, ``fullgraph=True``) recompute or
  trace the same operations: equal losses and gradients (atol = rtol = 0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers as T

from distributed import run_distributed
from models import ENCODERS, MOE_FAMILIES, tiny_encoder, tiny_model

SEQ, BATCH, STEPS = 15, 4, 3
TOL = 2e-5         # against the unsharded model (tests/test_families.py)
SP_GRAD_TOL = 1e-6  # against TP without sequence parallelism, first step
TP2 = ["llama", "gpt2", "falcon", "gptj", "opt", "mixtral", "qwen2_moe", "bert_mlm"]
TP4 = ["llama", "gpt2", "mixtral", "bert_mlm"]


def build(name: str, seed: int = 0) -> nn.Module:
    if name in MOE_FAMILIES:
        torch.manual_seed(seed)
        return T.AutoModelForCausalLM.from_config(MOE_FAMILIES[name]())
    if name in ENCODERS:
        return tiny_encoder(name, seed=seed)
    return tiny_model(name, seed=seed)


def batches(seq: int = SEQ, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(3, 96, (STEPS, batch, seq), generator=torch.Generator().manual_seed(1))


def train(name, tp, *, sp, zero=0, checkpointing=False, compiled=False, model=None, seq=SEQ, sgd=False):
    """``STEPS`` AdamW (or SGD) steps; every dp rank trains on its slice of the same global batches."""
    from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.parallel.gather import iter_full_state
    from tp_trainer.zero import ShardedOptimizer

    ctx = ParallelContext.from_environment(tp)
    model = build(name) if model is None else model
    apply_tensor_parallel(model, plan_tensor_parallel(model, tp), ctx, sequence_parallel=sp)
    if checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = False
    forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    if zero == 3:  # the TP shards sharded once more over dp (FSDP2), as TPTrainer's --zero_stage 3
        from tp_trainer.zero import FullyShardedOptimizer, shard_parameters_over_dp

        shard_parameters_over_dp(model, ctx)
    inner = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = FullyShardedOptimizer(inner, ctx) if zero == 3 else ShardedOptimizer(inner, ctx, stage=zero)
    per = BATCH // ctx.dp_size
    losses, grads = [], None
    for ids in batches(seq):
        ids = ids[ctx.dp_rank * per:(ctx.dp_rank + 1) * per]
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.finish_grad_sync()
        if grads is None and zero != 3:
            grads = {n: g.clone() for n, g in iter_full_state(model, ctx.tp_group, grads=True)}
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    table = model.tp_sequence_plan.table() if sp and tp > 1 else ""
    final = {n: p.clone() for n, p in iter_full_state(model, ctx.tp_group)} if zero != 3 else None
    return {"losses": losses, "grads": grads, "final": final, "table": table}


def _tp2_world():
    out = {name: {"tp": train(name, 2, sp=False), "sp": train(name, 2, sp=True)} for name in TP2}
    out["llama"]["sp_checkpointed"] = train("llama", 2, sp=True, checkpointing=True)
    out["gpt2"]["sp_checkpointed"] = train("gpt2", 2, sp=True, checkpointing=True)
    out["llama"]["sp_compiled"] = train("llama", 2, sp=True, compiled=True)
    out["lora"] = {mode: _lora_step(sp=mode == "sp") for mode in ("tp", "sp")}
    out["generate"] = {mode: _generate(sp=mode == "sp") for mode in ("tp", "sp")}
    return out


def _tp4_world():
    out = {name: {"tp": train(name, 4, sp=False), "sp": train(name, 4, sp=True)} for name in TP4}
    out["zero"] = {z: train("llama", 2, sp=True, zero=z, sgd=True) for z in (1, 2, 3)}  # tp=2 x dp=2
    return out


def _lora_step(*, sp):
    """One step of a PEFT LoRA model (every Llama projection, random B so that A's gradient is not zero)."""
    from peft import LoraConfig, get_peft_model

    from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.parallel.gather import iter_full_state

    ctx = ParallelContext.from_environment(2)
    base = tiny_model("llama")
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    apply_tensor_parallel(model, plan_tensor_parallel(model, 2), ctx, sequence_parallel=sp)
    ids = batches()[0]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": loss.item(), "grads": {n: g.clone() for n, g in iter_full_state(model, ctx.tp_group, grads=True)},
            "table": model.tp_sequence_plan.table() if sp else ""}


def _generate(*, sp):
    from tp_trainer import ParallelContext, apply_tensor_parallel, plan_tensor_parallel

    ctx = ParallelContext.from_environment(2)
    model = tiny_model("llama")
    apply_tensor_parallel(model, plan_tensor_parallel(model, 2), ctx, sequence_parallel=sp)
    model.eval()
    prompt = batches()[0][:, :5]
    return model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp2_world, 2)


@pytest.fixture(scope="module")
def tp4():
    return run_distributed(_tp4_world, 4)


def _assert_close_grads(got: dict, want: dict, tol: float, what: str):
    assert got.keys() == want.keys()
    for param, g in want.items():
        diff = (got[param] - g).abs().max().item()
        assert diff <= tol, f"{what}: gradient of {param} differs by {diff}"


def _assert_sp_matches(ranks, name, tp):
    ref = train(name, 1, sp=False)
    for rank in ranks:
        with_sp, without = rank[name]["sp"], rank[name]["tp"]
        assert with_sp["losses"][0] == without["losses"][0], "same operations on the same values"
        assert with_sp["losses"] == pytest.approx(without["losses"], abs=TOL)
        _assert_close_grads(with_sp["grads"], without["grads"], SP_GRAD_TOL, f"{name} tp={tp} SP vs TP")
        assert with_sp["losses"] == pytest.approx(ref["losses"], abs=TOL)
        _assert_close_grads(with_sp["grads"], ref["grads"], TOL, f"{name} tp={tp} SP vs unsharded")
    assert len({round(loss, 4) for loss in ref["losses"]}) == STEPS  # training moves the weights


@pytest.mark.parametrize("name", TP2)
def test_tp2_sequence_parallel_matches_tp_and_unsharded(tp2, name):
    _assert_sp_matches(tp2, name, 2)


@pytest.mark.parametrize("name", TP4)
def test_tp4_sequence_parallel_matches_tp_and_unsharded(tp4, name):
    _assert_sp_matches(tp4, name, 4)


@pytest.mark.parametrize("zero", [1, 2])
def test_tp2_dp2_zero_with_sequence_parallel_matches_unsharded(tp4, zero):
    """ZeRO reduces over dp what sequence parallelism leaves: the weights after the steps are the unsharded
    model's (each dp rank logs the loss of its half of the batch; equal token counts: their mean is the loss).
    SGD, whose update is linear in the gradient: Adam's first steps move every weight by about ``lr`` whatever
    the gradient's size, so a gradient of ~1e-9 whose sign the reordering flips would move it by 1e-2."""
    ref = train("llama", 1, sp=False, sgd=True)
    for step in range(STEPS):
        halves = [tp4[r]["zero"][zero]["losses"][step] for r in (0, 2)]  # tp rank 0 of dp 0 and of dp 1
        assert halves[0] != halves[1]
        assert sum(halves) / 2 == pytest.approx(ref["losses"][step], abs=TOL)
    for rank in tp4:
        _assert_close_grads(rank["zero"][zero]["final"], ref["final"], TOL, f"zero={zero}, weights after the steps")


def test_zero3_with_sequence_parallel_trains_like_zero1(tp4):
    """ZeRO-3 shards the TP shards over dp (FSDP2 per block); the sequence split is inside each block's forward.
    The first step is the same operations as ZeRO-1's at the same layout: the same loss. Then the weights
    differ by rounding (ZeRO-3 sums the clipping norm's squares over its dp shards in another order)."""
    for rank in tp4:
        zero3, zero1 = rank["zero"][3]["losses"], rank["zero"][1]["losses"]
        assert zero3[0] == zero1[0] and zero3 == pytest.approx(zero1, abs=TOL)


def test_the_regions_each_family_gets(tp2):
    tables = {name: tp2[0][name]["sp"]["table"] for name in TP2}
    assert "region model.layers.*.self_attn: reduce-scatter" in tables["llama"]
    assert "region model.layers.*.mlp: reduce-scatter" in tables["llama"]
    assert "gathered: output of model.norm" in tables["llama"]
    assert "gathered: output of transformer.ln_f" in tables["gpt2"]
    assert "region model.decoder.layers.*.fc1: reduce-scatter" in tables["opt"]  # the layer the block calls
    for moe in ("mixtral", "qwen2_moe"):  # the router reads the gathered input
        assert "region model.layers.*.mlp: replicate; split after model.layers.*.mlp" in tables[moe]
    # post-norm encoder: no final norm, the last block's output is gathered; its LayerNorms see local tokens
    assert "gathered: output of bert.encoder.layer.1" in tables["bert_mlm"]
    assert "bert.encoder.layer.*.output.LayerNorm" in tables["bert_mlm"]


def test_activation_checkpointing_recomputes_the_same_step(tp2):
    for rank in tp2:
        for name in ("llama", "gpt2"):
            plain, checkpointed = rank[name]["sp"], rank[name]["sp_checkpointed"]
            assert checkpointed["losses"] == plain["losses"]
            _assert_close_grads(checkpointed["grads"], plain["grads"], 0.0, f"{name} checkpointed")


def test_compiled_sequence_parallel_is_the_eager_step(tp2):
    for rank in tp2:
        eager, compiled = rank["llama"]["sp"], rank["llama"]["sp_compiled"]
        assert compiled["losses"] == eager["losses"]
        _assert_close_grads(compiled["grads"], eager["grads"], 0.0, "compiled")


def test_lora_adapters_with_sequence_parallel(tp2):
    for rank in tp2:
        without, with_sp = rank["lora"]["tp"], rank["lora"]["sp"]
        assert with_sp["loss"] == without["loss"]
        assert any(".lora_A." in n for n in with_sp["grads"])
        _assert_close_grads(with_sp["grads"], without["grads"], SP_GRAD_TOL, "LoRA")
    # an adapter reads the region's gathered input: those regions keep f inside (replicate mode)
    assert "replicate mode: its input is also read by" in tp2[0]["lora"]["sp"]["table"]


def test_greedy_generation_is_unchanged(tp2):
    for rank in tp2:
        assert torch.equal(rank["generate"]["sp"], rank["generate"]["tp"])
        assert rank["generate"]["sp"].shape == (BATCH, 11)


# ------------------------------------------------------------------------------ the plan, without a world
def test_plan_for_an_odd_length_is_checked_on_meta_and_printable():
    from tp_trainer import plan_tensor_parallel
    from tp_trainer.planner.sequence import plan_sequence_parallel

    model = tiny_model("llama")
    seq = plan_sequence_parallel(model, plan_tensor_parallel(model, 2))
    assert (seq.entry, seq.exit) == ("model.layers.0", "model.norm")
    assert [r.reduce for r in seq.regions] == [True] * 4
    assert seq.local_modules == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                 "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                 "model.norm"]
    assert any("sequence of 5 tokens" in n for n in seq.notes)  # 5: not a multiple of 2
    assert plan_sequence_parallel(model, plan_tensor_parallel(model, 1)).summary().endswith("nothing to split")


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoders_are_refused(name):
    from tp_trainer import plan_tensor_parallel
    from tp_trainer.planner.sequence import SequenceParallelError, plan_sequence_parallel

    model = tiny_encoder(name)
    with pytest.raises(SequenceParallelError, match=r"does not split encoder-decoders .*without --sequence_parallel"):
        plan_sequence_parallel(model, plan_tensor_parallel(model, 2))


class _BlockReadingPositions(T.models.llama.modeling_llama.LlamaDecoderLayer):
    """A block that mixes a full-length tensor into the stream outside its attention: not splittable."""

    def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
        hidden_states = hidden_states + position_embeddings[0].sum(-1, keepdim=True)
        return super().forward(hidden_states, *args, position_embeddings=position_embeddings, **kwargs)


def test_a_block_the_split_breaks_is_refused_before_any_weight_is_touched():
    from tp_trainer import plan_tensor_parallel
    from tp_trainer.planner.sequence import SequenceParallelError, plan_sequence_parallel

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.__class__ = _BlockReadingPositions
    plan = plan_tensor_parallel(model, 2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(SequenceParallelError, match=r"failed in forward at model\.layers\.0 .*without --sequence_para"):
        plan_sequence_parallel(model, plan)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_sequence_parallel_in_the_deepspeed_style_config(tmp_path):
    import json

    from tp_trainer.tp_config import read_tp_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"tensor_parallel": {"autotp_size": 2, "sequence_parallel": True}}))
    values, unsupported, _ = read_tp_config(str(path))
    assert values == {"tp_size": 2, "sequence_parallel": True} and unsupported == []
    path.write_text(json.dumps({"tensor_parallel": {"sequence_parallel": "yes"}}))
    with pytest.raises(ValueError, match="tensor_parallel.sequence_parallel must be true or false, got 'yes'"):
        read_tp_config(str(path))


def test_the_training_argument(tmp_path):
    from transformers import HfArgumentParser

    from tp_trainer import TPTrainingArguments

    parser = HfArgumentParser(TPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert args.sequence_parallel is False
    with pytest.raises(ValueError, match=r"sequence_parallel=True with tp_size=1: .* set tp_size > 1"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none",
                                            "--sequence_parallel"])
