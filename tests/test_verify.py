"""``tp-trainer plan MODEL --tp-size N --verify`` (tp_trainer/planner/verify/): one training step of the plan on
N gloo processes against the unsharded model, from the same random weights.

The config truncation and the verdict logic are checked without processes; each ``verify_plan`` call
below spawns its own 2-rank world of tiny models (a few seconds, mostly interpreter start-up).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import transformers as T

from models import FAMILIES
from tp_trainer.planner import PlanEntry, Style, plan_tensor_parallel
from tp_trainer.planner.verify import (GRAD_RTOL, TensorDiff, VerifyResult, meta_model, plan_differences,
                                       truncate_config, verify_plan)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_7B = os.path.join(ROOT, "scripts", "configs", "llama-2-7b.json")
CPU_ONLY = pytest.mark.cpu_only(reason="--verify always runs gloo ranks on the CPU, whatever the test device")


def _llama_7b():
    with open(LLAMA_7B) as f:
        data = json.load(f)
    return T.AutoConfig.for_model(data.pop("model_type"), **data)


# ----------------------------------------------------------------------------------- no processes
def test_truncation_keeps_widths_and_heads_and_the_plan():
    full = _llama_7b()
    cfg, notes = truncate_config(full, 2)
    assert (cfg.num_hidden_layers, cfg.vocab_size) == (2, 1024)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        assert getattr(cfg, key) == getattr(full, key), key
    assert full.num_hidden_layers == 32 and full.vocab_size == 32000  # a copy: the caller's config is untouched
    assert "2 of 32 layers" in notes[0] and "vocabulary 32000 -> 1024" in notes[1]
    # the truncated model is planned exactly like the full one, layer pattern by layer pattern
    assert plan_differences(plan_tensor_parallel(meta_model(full), 2), plan_tensor_parallel(meta_model(cfg), 2)) == []


def test_truncation_keeps_one_layer_of_each_type_the_padding_and_the_token_ids():
    # layer types: the first sliding layer and the first full one, the per-layer list cut to match
    g = T.Gemma3TextConfig(num_hidden_layers=12)  # 5 sliding-window layers, then a full-attention one
    cfg, notes = truncate_config(g, 2)
    assert cfg.num_hidden_layers == 2 and cfg.layer_types == ["sliding_attention", "full_attention"]
    assert "layers [0, 5]" in notes[0]
    # a vocabulary that does not divide by tp keeps its remainder (the vocab-parallel layers stay padded);
    # token ids beyond the new vocabulary wrap into it; dropout is off
    gpt2, notes = truncate_config(T.GPT2Config(), 4)
    assert gpt2.vocab_size == 1024 + 50257 % 4 and gpt2.n_layer == 2
    assert gpt2.eos_token_id == 50256 % gpt2.vocab_size and gpt2.bos_token_id == gpt2.eos_token_id
    assert gpt2.resid_pdrop == gpt2.attn_pdrop == gpt2.embd_pdrop == 0.0
    assert any("dropout off" in n for n in notes)
    # MoE models whose first blocks are dense keep one dense and one MoE block
    ds, notes = truncate_config(T.DeepseekV3Config(num_hidden_layers=8, first_k_dense_replace=3), 2)
    assert ds.num_hidden_layers == 2 and ds.first_k_dense_replace == 1
    # a config already small is left alone
    tiny, notes = truncate_config(FAMILIES["llama"](), 2)
    assert notes == [] and tiny.vocab_size == 96 and tiny.num_hidden_layers == 2


def test_verdict_thresholds_are_relative_to_each_tensor():
    def result(grad_diff, grad_max, out_diff=1e-8):
        return VerifyResult(tp_size=2, loss_ref=4.0, loss_tp=4.0 + 4e-7,
                            logits=TensorDiff("logits", (2, 32, 96), 1e-7, 1.0, 1.0),
                            grads=[TensorDiff("model.norm.weight", (64,), grad_diff, grad_max, grad_max, "replicated (rule)")],
                            outputs=[TensorDiff("model.norm", (2, 32, 64), out_diff, 1.0, 1.0)])

    # reordering noise of a small gradient passes; the same absolute difference on a tinier one does not
    assert result(1e-9, 1e-3).passed
    failing = result(2 * GRAD_RTOL * 1e-5, 1e-5)
    assert not failing.passed and "gradient of model.norm.weight" in failing.verdict()
    assert failing.verdict().startswith("verify: FAIL")
    # a differing module output is named as the place the forward goes wrong
    forward = result(1e-9, 1e-3, out_diff=0.5)
    assert not forward.passed and "the forward first differs at model.norm" in forward.verdict()
    assert result(1e-9, 1e-3).verdict().startswith("verify: PASS (largest gradient difference 1.0e-06")


# ------------------------------------------------------------------------------------- 2 ranks each
@CPU_ONLY
def test_the_automatic_plan_of_llama_passes():
    result = verify_plan(FAMILIES["llama"](), 2)
    assert result.passed, result.report()
    assert result.error is None and result.failure is None and not result.missing and not result.extra
    assert len(result.grads) == sum(1 for _ in meta_model(FAMILIES["llama"]()).parameters())
    assert max(d.relative for d in result.grads) < 1e-5  # fp32 reordering noise, far below the limit
    assert len(result.outputs) > 20  # the column-parallel shards included
    report = result.report()
    assert "forward: the outputs of" in report and "worst 10" in report
    # the shared weights file is gone (rank 0 unlinks it once every rank mapped it)
    assert os.path.isdir("/dev/shm") is False or not [
        f for f in os.listdir("/dev/shm") if f.startswith(f"tp_trainer_verify_{os.getpid()}_")]
    assert report.splitlines()[-1].startswith("verify: PASS (largest gradient difference")


@CPU_ONLY
def test_a_shape_valid_but_wrong_plan_fails_naming_the_module():
    # summing the gradient of a norm that sees replicated activations doubles it: shapes are fine,
    # the meta-device validation accepts it, the forward is exact; only the gradients tell
    user_plan = {"model.layers.*.input_layernorm": "replicated_grad_sum"}
    result = verify_plan(FAMILIES["llama"](), 2, user_plan=user_plan)
    assert not result.passed and result.failure is None and result.error is None
    assert result.first_bad_output() == (None, result.outputs[-1])
    assert {d.module for d in result.bad_grads()} == {"model.layers.0.input_layernorm", "model.layers.1.input_layernorm"}
    verdict = result.report().splitlines()[-1]
    assert verdict.startswith("verify: FAIL (gradient of model.layers.") and "input_layernorm.weight" in verdict
    assert "replicated_grad_sum (user)" in verdict

    # GPT-2's fused c_attn [q | k | v] split contiguously (no head-aligned blocks): every shape fits,
    # rank 0 gets q and half of k. The forward is localised: c_attn's own output (gathered) is right,
    # the attention's output projection is the first to differ
    cfg = FAMILIES["gpt2"]()
    plan = plan_tensor_parallel(meta_model(cfg), 2)
    for name, entry in plan.entries.items():
        if name.endswith("attn.c_attn"):
            assert entry.blocks is not None
            plan.entries[name] = dataclasses.replace(entry, blocks=None)
    result = verify_plan(cfg, 2, plan=plan)
    first, before = result.first_bad_output()
    assert not result.passed and first.name == "transformer.h.0.attn.c_proj" and before.name == "transformer.h.0.attn.c_attn"
    assert "the forward first differs at transformer.h.0.attn.c_proj" in result.verdict()


@CPU_ONLY
def test_a_plan_that_raises_at_run_time_fails_with_the_module_and_the_traceback():
    cfg = FAMILIES["llama"]()
    plan = plan_tensor_parallel(meta_model(cfg), 2)
    for name in plan.entries:
        if name.endswith("self_attn.o_proj"):  # fed 1/tp of the heads, holding the full weight
            plan.entries[name] = PlanEntry(Style.REPLICATED, "user", "test: o_proj left whole")
    result = verify_plan(cfg, 2, plan=plan)
    assert not result.passed and result.failure is not None
    verdict = result.verdict()
    assert verdict.startswith("verify: FAIL (the planned model raised: rank ")
    assert "forward of the sharded model in model.layers.0.self_attn.o_proj" in verdict
    assert "Traceback (most recent call last)" in result.report() and "mat1 and mat2" in result.report()


@CPU_ONLY
def test_cli_verify_end_to_end(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(FAMILIES["llama"]().to_dict()))
    cmd = [sys.executable, "-m", "tp_trainer.cli", "plan", str(cfg), "--tp-size", "2", "--verify"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.index("summary: llama tp=2") < text.index("verification: one training step at tp=2")
    assert "the truncated model's plan matches the full model's plan" in text
    assert text.rstrip().splitlines()[-1].startswith("verify: PASS")
    bad = subprocess.run(cmd + ["--tp-plan", '{"model.layers.*.post_attention_layernorm": "replicated_grad_sum"}'],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "verify: FAIL (gradient of model.layers." in bad.stdout
