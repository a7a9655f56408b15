"""Parameters shared by several modules stay shared after sharding.

A model ties parameters by letting several modules hold the same ``nn.Parameter``: T5's
``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head`` all hold ``shared.weight``;
BERT's MLM head holds its vocabulary bias both as ``cls.predictions.bias`` and as the decoder's
``bias``. :func:`~tp_trainer.planner.apply.apply_tensor_parallel` builds a new (sharded) parameter
for every module it replaces; :class:`TiedShards` makes every later module built from the same
full parameter, with the same shard layout, take the first one's shard object, and finally points
every module that still holds a replaced full parameter (a parent that only owns the tied bias) at
its shard. Gradients then accumulate in one tensor, as in the unsharded model, and
``named_parameters()`` lists it once under the name the unsharded model uses.
"""

from __future__ import annotations

import torch.nn as nn


class TiedShards:
    def __init__(self):
        self._shards: dict[int, nn.Parameter] = {}  # id(full parameter) -> its first shard
        self._keep: list[nn.Parameter] = []  # the full parameters, alive while ids are compared

    def adopt(self, old: nn.Module, new: nn.Module) -> None:
        """After ``new`` was built from ``old``: its parameters that shard a full parameter already sharded
        the same way elsewhere become that shard; the others are remembered."""
        for pname, full in list(old.named_parameters(recurse=False)):
            shard = new._parameters.get(pname)
            if shard is None or shard is full:
                continue
            self._record(full, shard, lambda p, owner=new, attr=pname: setattr(owner, attr, p))

    def adopt_parameter(self, full: nn.Parameter, shard: nn.Parameter, owner: nn.Module, attr: str) -> None:
        """The same for a parameter replaced in place (``setattr(owner, attr, shard)``)."""
        self._record(full, shard, lambda p: setattr(owner, attr, p))

    def _record(self, full, shard, set_shard) -> None:
        first = self._shards.get(id(full))
        if first is None:
            self._shards[id(full)] = shard
            self._keep.append(full)
        elif first.shape == shard.shape and getattr(first, "tp_spec", None) == getattr(shard, "tp_spec", None):
            set_shard(first)

    def repoint(self, model: nn.Module) -> list[str]:
        """Point every module still holding a replaced full parameter at its shard; the names repointed."""
        moved = []
        for name, mod in model.named_modules(remove_duplicate=False):
            for pname, p in list(mod._parameters.items()):
                shard = self._shards.get(id(p)) if p is not None else None
                if shard is not None and shard is not p:
                    mod._parameters[pname] = shard
                    moved.append(f"{name}.{pname}" if name else pname)
        return moved
