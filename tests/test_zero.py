"""ShardedOptimizer's stage-0 gradient all-reduce over dp, bucketed, on 2 ranks (dp=2, tp=1; gloo or NCCL).

The bucketed path must give exactly the average a single all-reduce of all gradients gives:
the same element-wise fp32 AVG, only in pieces, so the comparison is bit-for-bit.
"""

import torch
import torch.distributed as dist
import torch.nn as nn

from distributed import run_distributed
from tp_trainer.parallel.context import ParallelContext
from tp_trainer.zero import bucket_runs
from tp_trainer.zero import ShardedOptimizer


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


def test_bucket_runs_keep_order_and_bound_size():
    assert bucket_runs([3, 4, 10, 2, 2], 6) == [[0], [1], [2], [3, 4]]  # 3 + 4 > 6; 10 goes alone
    assert bucket_runs([2, 2, 2], 6) == [[0, 1, 2]]
    assert bucket_runs([], 6) == []
