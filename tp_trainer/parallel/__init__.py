"""Tensor-parallel building blocks: the process mesh, the collectives and the layers."""

from .context import ParallelContext
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .sharding import ShardSpec

__all__ = ["ColumnParallelLinear", "ParallelContext", "ParallelLMHead", "RowParallelLinear", "ShardSpec",
           "VocabParallelEmbedding"]
