"""Shard-only loading: ``tp_trainer.from_pretrained(path, tp_size=N)`` builds the model on ``meta``, plans and
shards it there, and each rank reads only its own slices of the safetensors files.

A rank holding the ``ShardSpec`` of a parameter (dim ``d``, segments ``(start, length)``) reads
``full[..., start:start + length, ...]`` along ``d`` for each segment, straight from the file; no
communication. Modules: :mod:`.files` (headers, slice reads), :mod:`.build` (the meta model, as
``from_pretrained`` builds it), :mod:`.keys` and :mod:`.sources` (checkpoint keys -> model tensors,
transformers' conversions read lazily), :mod:`.materialize` (checks, then the reads),
:mod:`.pretrained` (the entry point and the marker ``TPTrainer`` reads).
"""

from .files import LoadError
from .pretrained import ShardedState, from_pretrained, sharded_state

__all__ = ["LoadError", "ShardedState", "from_pretrained", "sharded_state"]
