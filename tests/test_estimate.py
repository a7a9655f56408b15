"""``tp_trainer.memory`` / ``tp-trainer estimate``: the per-rank memory theory against live tensors.

The estimate never allocates (meta model, real planner); here real gloo ranks build the same
model, shard it, take one step with a real ``ShardedOptimizer`` and count the bytes of the
live parameters, gradients and optimizer states with the function the benchmark uses. The
two must agree exactly (both count whole tensors, nothing is approximated); the only
modelled quantity, activations, is checked for its scaling.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from tests.distributed import run_distributed
from tests.models import FAMILIES, tiny_model
from tp_trainer.commands import estimate as estimate_cmd
from tp_trainer.memory import bucket_shard_numel, estimate_memory

# (family, tp, zero, dtype) run in one 2-rank world; tp=1 means dp=2 in that world
CASES = [("llama", 2, 0, "fp32"), ("llama", 2, 1, "bf16"), ("llama", 2, 2, "fp32"), ("gpt2", 2, 0, "bf16"),
         ("gemma", 2, 1, "fp32"), ("llama", 1, 1, "bf16"), ("llama", 1, 2, "bf16"), ("llama", 1, 0, "bf16")]


def _measure_cases(cases):
    from tp_trainer.memory import measure_training_memory
    from tp_trainer.parallel.context import ParallelContext
    from tp_trainer.planner import apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.zero import ShardedOptimizer

    out = []
    for family, tp, zero, dtype in cases:
        model = tiny_model(family, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        ctx = ParallelContext.from_environment(tp)
        apply_tensor_parallel(model, plan_tensor_parallel(model, tp), ctx)
        opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx, stage=zero)
        ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.finish_grad_sync()
        opt.step()  # creates the Adam states
        model(input_ids=ids, labels=ids).loss.backward()
        opt.finish_grad_sync()  # the gradient peak of the second step, states present
        out.append({"dp": ctx.dp_size, **measure_training_memory(model, opt)})
        opt.zero_grad()
    return out


@pytest.fixture(scope="module")
def measured():
    ranks = run_distributed(_measure_cases, 2, CASES)
    return [max(per_rank, key=lambda m: m["params"] + m["grads"] + m["optimizer"]) for per_rank in zip(*ranks)]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{f}-tp{t}-zero{z}-{d}" for f, t, z, d in CASES])
def test_estimate_equals_live_tensor_bytes(measured, index):
    family, tp, zero, dtype = CASES[index]
    got = measured[index]
    est = estimate_memory(FAMILIES[family](), tp=tp, dp=got["dp"], zero=zero, dtype=dtype, batch=2, seq=8)
    # exact: both sides count whole tensors of known shapes and dtypes (the issue allows 10%)
    assert (est.params, est.grads, est.optimizer) == (got["params"], got["grads"], got["optimizer"])


def test_states_shrink_as_the_theory_says():
    """ZeRO-1/2 divide the optimizer by dp; tp divides the parameters of the sharded layers."""
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    base = estimate_memory(cfg, tp=1, dp=1, zero=0, dtype="bf16", batch=1, seq=16)
    tp2 = estimate_memory(cfg, tp=2, dp=1, zero=0, dtype="bf16", batch=1, seq=16)
    z1 = estimate_memory(cfg, tp=1, dp=4, zero=1, dtype="bf16", batch=1, seq=16)
    replicated = 2 * 2 * 256 + 256  # two RMSNorm weights per layer + the final norm: not split
    assert tp2.local_params == (base.total_params - replicated) // 2 + replicated
    assert z1.optimizer == 12 * bucket_shard_numel([base.local_params], 4)
    assert base.optimizer == 12 * base.local_params  # bf16: fp32 master (4) + two Adam states (8)
    assert tp2.activations < base.activations


def test_bucket_shards_round_up_per_bucket():
    assert bucket_shard_numel([3, 3, 3], 2, bucket_numel=6) == 3 + 2  # buckets [3,3] -> 3 each, [3] -> 2
    assert bucket_shard_numel([10], 4) == 3


def test_cli_prints_components_and_rejects_bad_layouts(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 96}))
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "2", "--dp", "2", "--zero", "1", "--batch", "2",
                              "--seq", "16", "--compare"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer states", "activations", "total", "zero=0", "zero=2"):
        assert word in out
    assert estimate_cmd.main(["--model", str(cfg), "--tp", "3"]) == 1  # 4 heads cannot split over 3 ranks
    assert "tp=3" in capsys.readouterr().err
    assert estimate_cmd.main(["--model", str(cfg), "--batch", "0"]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err
