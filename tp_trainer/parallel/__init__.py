"""Tensor-parallel building blocks: the process mesh and its kernel choices, the collectives, the mappings
and the layers. Importing the package registers the collectives' ``torch.compile`` operators
(``compiled_ops.py``) before any layer can call them."""

from . import compiled_ops  # noqa: F401  (registers tp_trainer::all_reduce_copy, ...)
from .collectives import TPComm
from .context import ParallelContext
from .kernels import Kernels, choose_kernels
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .sharding import ShardSpec

__all__ = ["ColumnParallelLinear", "Kernels", "ParallelContext", "ParallelLMHead", "RowParallelLinear", "ShardSpec",
           "TPComm", "VocabParallelEmbedding", "choose_kernels"]
