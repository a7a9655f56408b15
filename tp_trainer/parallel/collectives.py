"""The flat collectives used by the TP layers and ZeRO, named once for every torch version.

torch 2.13 renamed ``all_gather_into_tensor``/``reduce_scatter_tensor`` to
``all_gather_single``/``reduce_scatter_single`` (the old names warn). Both write into a
pre-allocated output that is the concatenation along dim 0 of the ranks' inputs.
"""

from __future__ import annotations

import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(output, tensor, group) -> None:
    """``output = cat([tensor of rank 0, tensor of rank 1, ...], dim=0)`` over ``group``."""
    _all_gather(output, tensor, group=group)


def reduce_scatter_flat(output, tensor, group, *, op=dist.ReduceOp.SUM) -> None:
    """``output = op over ranks of tensor.chunk(size)[rank]`` over ``group``."""
    _reduce_scatter(output, tensor, op=op, group=group)
