"""ZeRO-1/2 bucket layout: which parameters share a flat bucket, and how each bucket splits over dp.

The local parameters (registration order) are laid end to end in reverse order (roughly the
order in which backward produces their gradients), cut into runs of at most ``bucket_numel``
elements (a larger tensor alone); each run is padded to a multiple of ``dp`` and dp rank ``d``
owns the ``d``-th contiguous slice of every bucket. :class:`~.optimizer.ShardedOptimizer`
builds its buckets from these functions and the memory estimator (:mod:`tp_trainer.memory`)
simulates the same ones: one layout, owned here.
"""

from __future__ import annotations

import math


def bucket_runs(numels: list[int], bucket_numel: int) -> list[list[int]]:
    """``ShardedOptimizer``'s bucket rule: the indices of ``numels`` cut, in order, into runs of at most
    ``bucket_numel`` elements in total (a larger tensor alone)."""
    runs, size = [], 0
    for i, n in enumerate(numels):
        if not runs or size + n > bucket_numel:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += n
    return runs


def zero_buckets(param_numels: list[int], dp: int, bucket_numel: int) -> list[tuple[list[int], int]]:
    """``ShardedOptimizer``'s ZeRO-1/2 buckets over parameters of ``param_numels`` (registration order):
    ``(parameter indices, numel padded to a multiple of dp)``, laid out in reverse registration order."""
    order = list(reversed(range(len(param_numels))))
    runs = bucket_runs([param_numels[i] for i in order], bucket_numel)
    return [([order[i] for i in run], math.ceil(sum(param_numels[order[i]] for i in run) / dp) * dp)
            for run in runs]


def bucket_shard_numel(param_numels: list[int], dp: int, bucket_numel: int = 2**24) -> int:
    """``S``: the flat-bucket slice of one dp rank, bucketed like ``ShardedOptimizer`` (reverse order)."""
    return sum(padded // dp for _, padded in zero_buckets(param_numels, dp, bucket_numel))


def zero_bucket_params(params: list, dp: int, bucket_numel: int) -> list[tuple[list, int]]:
    """:func:`zero_buckets` with the parameters themselves: ``(params, padded numel)`` (``ShardedOptimizer``'s
    buckets, and the ones the estimate simulates)."""
    return [([params[i] for i in members], padded)
            for members, padded in zero_buckets([p.numel() for p in params], dp, bucket_numel)]
