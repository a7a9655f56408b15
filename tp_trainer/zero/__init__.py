"""Data parallelism over the dp group: ZeRO stages 0-2 for TP-sharded models.

:mod:`.buckets` is the flat-bucket layout; :mod:`.optimizer` the optimizer wrapper that reduces
gradients over dp, keeps fp32 masters and steps on its slice.
"""

from .buckets import bucket_runs, bucket_shard_numel, zero_bucket_params, zero_buckets
from .optimizer import ELEMENTWISE_OPTIMIZERS, ShardedOptimizer

__all__ = ["ELEMENTWISE_OPTIMIZERS", "ShardedOptimizer", "bucket_runs", "bucket_shard_numel", "zero_bucket_params",
           "zero_buckets"]
