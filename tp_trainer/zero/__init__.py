"""Data parallelism over the dp group: ZeRO stages 0-3 for TP-sharded models.

:mod:`.buckets` is the flat-bucket layout; :mod:`.optimizer` the optimizer wrapper that reduces
gradients over dp, keeps fp32 masters and steps on its slice (stages 0-2); :mod:`.fully_sharded`
shards the parameters themselves over dp (stage 3) and its optimizer wrapper.
"""

from .buckets import bucket_runs, bucket_shard_numel, zero_bucket_params, zero_buckets
from .fully_sharded import is_dp_sharded, shard_parameters_over_dp
from .fully_sharded_optimizer import FullyShardedOptimizer
from .optimizer import ELEMENTWISE_OPTIMIZERS, ShardedOptimizer

ZERO_OPTIMIZERS = (ShardedOptimizer, FullyShardedOptimizer)  # what the checkpoint code reads and writes

__all__ = ["ELEMENTWISE_OPTIMIZERS", "ZERO_OPTIMIZERS", "FullyShardedOptimizer", "ShardedOptimizer", "bucket_runs",
           "bucket_shard_numel", "is_dp_sharded", "shard_parameters_over_dp", "zero_bucket_params", "zero_buckets"]
