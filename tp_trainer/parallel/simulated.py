"""A stand-in TP group for one rank of a world that does not exist (the memory estimate, plan validation).

:func:`simulated_group` returns a :class:`SimulatedGroup`: it answers what the TP layers ask of a
process group (``size()``, ``rank()``) and brings its own transport, which allocates exactly what a
real rank's collectives allocate and communicates nothing (the sums are not sums):

* all-reduce into a new tensor: the input copied into it (what the shared-memory transport and
  ``clone()`` + in-place all-reduce both allocate);
* all-gather of ``[n, ...]``: ``size`` copies of the input, concatenated (``[size n, ...]``).

``tp_trainer/memory.py`` runs the TP layers of rank 0 on ``meta`` tensors with it, so that the
simulated step allocates what a real rank's does; ``planner/validate.py`` runs a plan's training
step on ``meta`` with it. A :class:`~tp_trainer.parallel.context.ParallelContext` given a simulated
group as ``tp_group`` takes the group's transport for its ``tp_comm``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class SimulatedTransport:
    """All-reduce: the input copied to the output; all-gather: ``size`` copies of the input, concatenated."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, *, out: torch.Tensor | None = None) -> torch.Tensor:
        return tensor if out is None else out.copy_(tensor)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous().repeat(self.size, *([1] * (tensor.dim() - 1)))


class SimulatedGroup:
    """What the TP layers ask of a process group (``size()``, ``rank()``, ``group_name``), plus ``transport``."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank
        self.group_name = f"tp_trainer_simulated_{id(self):x}"
        self.transport = SimulatedTransport(size)

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def simulated_group(size: int, rank: int = 0) -> SimulatedGroup:
    """A :class:`SimulatedGroup` of ``size`` ranks seen from ``rank`` (see the module docstring)."""
    return SimulatedGroup(size, rank)
