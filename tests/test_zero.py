"""ShardedOptimizer over dp, on real ranks (gloo or NCCL), compared bit for bit where op order is unchanged.

* Stage 0's bucketed all-reduce must give exactly the average a single all-reduce of all
  gradients gives: the same element-wise fp32 AVG, only in pieces.
* Stages 1 and 2 must train exactly like stage 0 (``atol = rtol = 0``, as nanotron tests its
  ZeRO): at dp=2 every gradient element is ``(g0 + g1) / 2`` whether it comes from an all-reduce
  (stage 0), a reduce-scatter after backward (1) or one during backward (2) (one addition of two
  numbers is commutative, and halving is exact); AdamW is element-wise, so stepping on a rank's
  flat slice of the fp32 masters computes the very same numbers, and the all-gather only copies.
  Clipping is off: the global norm is a sum over differently partitioned pieces, whose rounding
  would differ in the last bits. Checked at tp=1 x dp=2 and at tp=2 x dp=2, with fp32 weights
  (stages 0, 1, 2 identical) and bf16 weights with fp32 masters (stages 1 and 2 identical; stage 0
  stores the dp average back into the bf16 ``.grad`` before making the master gradient, one
  rounding the sharded stages, which reduce into fp32 buckets, do not make).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from distributed import run_distributed
from tp_trainer.parallel.context import ParallelContext
from tp_trainer.zero import ShardedOptimizer, bucket_runs


def _grads_after_sync(bucket_numel):
    ctx = ParallelContext.from_environment(1)
    torch.manual_seed(0)  # same weights on both ranks
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(ctx.device)
    opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), ctx, stage=0, bucket_numel=bucket_numel)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(10 + dist.get_rank())).to(ctx.device)  # per-rank
    model(x).square().sum().backward()
    local = [p.grad.clone() for p in model.parameters()]
    opt.finish_grad_sync()
    return local, [p.grad.clone() for p in model.parameters()]


def suite():
    out = {}
    for bucket_numel in (2**24, 80, 1):  # one bucket (208 elements); [128] [16, 64] [4]; one tensor each
        local, synced = _grads_after_sync(bucket_numel)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [g.cpu() for g in local])  # unpickled on the CPU, not on rank 0's GPU
        mean = [(a + b) / 2 for a, b in zip(*gathered)]
        out[bucket_numel] = {"synced": synced, "mean": mean}
    return out


def test_stage0_all_reduce_in_buckets_equals_the_mean_over_dp():
    for rank_result in run_distributed(suite, 2):
        reference = rank_result[2**24]["synced"]
        for bucket_numel, r in rank_result.items():
            for got, mean, ref in zip(r["synced"], r["mean"], reference):
                assert torch.allclose(got, mean, atol=1e-7, rtol=0), bucket_numel  # the dp average
                assert torch.equal(got, ref), bucket_numel  # and bit-identical to one all-reduce


def _train_exactly(tp, stage, dtype, steps=3):
    from models import tiny_model
    from tp_trainer import apply_tensor_parallel, plan_tensor_parallel
    from tp_trainer.parallel.gather import iter_full_state

    ctx = ParallelContext.from_environment(tp)
    model = tiny_model("llama", dtype=dtype).to(ctx.device)
    apply_tensor_parallel(model, plan_tensor_parallel(model, tp), ctx)
    # small buckets: several per stage, so bucket boundaries and padding are exercised too
    opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx, stage=stage, bucket_numel=2000)
    g = torch.Generator().manual_seed(100 + ctx.dp_rank)  # each dp rank its own batches
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 12), generator=g).to(ctx.device)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.finish_grad_sync()
        opt.step()
        opt.zero_grad()
    return {name: t.detach().cpu().clone() for name, t in iter_full_state(model, ctx.tp_group)}


def zero_stages_suite(tp):
    return {(stage, str(dtype)): _train_exactly(tp, stage, dtype)
            for dtype in (torch.float32, torch.bfloat16) for stage in (0, 1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_zero_1_and_2_train_bit_identically_to_stage_0(tp):
    for rank in run_distributed(zero_stages_suite, 2 * tp, tp):
        for dtype, ref_stage in (("torch.float32", 0), ("torch.bfloat16", 1)):
            ref = rank[(ref_stage, dtype)]
            assert any(not torch.equal(ref[n], w) for n, w in _initial(dtype).items()), "the weights moved"
            for stage in (1, 2):
                got = rank[(stage, dtype)]
                assert got.keys() == ref.keys()
                for name, w in ref.items():
                    assert torch.equal(got[name], w), f"ZeRO-{stage} {dtype}: {name} differs from ZeRO-{ref_stage}"


def _initial(dtype):
    from models import tiny_model

    return {k: v for k, v in tiny_model("llama", dtype=getattr(torch, dtype.split(".")[1])).state_dict().items()}


def test_bucket_runs_keep_order_and_bound_size():
    assert bucket_runs([3, 4, 10, 2, 2], 6) == [[0], [1], [2], [3, 4]]  # 3 + 4 > 6; 10 goes alone
    assert bucket_runs([2, 2, 2], 6) == [[0, 1, 2]]
    assert bucket_runs([], 6) == []


def _frozen_suite():
    """A model with frozen weights (as PEFT LoRA leaves the base) handed whole to the optimizer template."""
    ctx = ParallelContext.from_environment(1)
    out = {}
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(ctx.device)
        model[0].requires_grad_(False)
        frozen = [p.detach().clone() for p in model[0].parameters()]
        opt = ShardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), ctx, stage=stage, bucket_numel=50)
        g = torch.Generator().manual_seed(10 + ctx.dp_rank)
        for _ in range(2):
            model(torch.randn(6, 8, generator=g).to(ctx.device)).square().sum().backward()
            opt.clip_grad_norm(1.0)
            opt.step()
            opt.zero_grad()
        state_tensors = [t for s in opt.inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        out[stage] = {"numel": opt.local_numel(), "optimized": [id(p) for p in opt.params],
                      "frozen_ids": [id(p) for p in model[0].parameters()],
                      "trainable": sum(p.numel() for p in model[2].parameters()),
                      "frozen_unchanged": all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen)),
                      "frozen_grads": [p.grad is not None for p in model[0].parameters()],
                      "state_numel": sum(t.numel() for t in state_tensors)}
    return out


def test_frozen_parameters_get_no_master_no_state_and_stay_unchanged():
    """dp=2: the optimizer holds the trainable parameters only (the second linear: 64 + 4 elements), and two
    AdamW moments of their fp32 masters: all of them at stage 0, at stages 1/2 this rank's half of each
    bucket (buckets of <= 50 elements in reverse order: [bias 4], [weight 64] -> 2 + 32); frozen weights get
    no gradient and never move."""
    for rank in run_distributed(_frozen_suite, 2):
        for stage, r in rank.items():
            assert not set(r["optimized"]) & set(r["frozen_ids"]), stage
            assert r["numel"]["params"] == r["trainable"] == 16 * 4 + 4, stage
            share = r["trainable"] if stage == 0 else 4 // 2 + 64 // 2
            assert r["numel"]["master"] == share and r["state_numel"] == 2 * share, stage
            assert r["frozen_unchanged"] and r["frozen_grads"] == [False, False], stage
