"""Shard metadata carried by every tensor-parallel parameter (``param.tp_spec``).

A :class:`ShardSpec` says which slices of the full (unsharded, Hugging Face layout) tensor a
TP rank holds along one dimension. The local tensor is the concatenation, along ``dim``, of
that rank's ``segments`` (``(start, length)`` ranges of the full tensor), followed by zero
padding up to ``local_size`` (used when the vocabulary does not divide by ``tp``).

Three layouts cover every case of the planner:

* contiguous: rank ``r`` holds ``[r n/tp, (r+1) n/tp)``;
* fused blocks (``[q | k | v]``, ``[gate | up]``): every block is split evenly and rank ``r``
  holds the ``r``-th piece of each block, so a fused projection stays head-aligned;
* replicated blocks: a block every rank (or a subgroup of ranks) holds in full, such as the
  single key/value head of a multi-query model. Segments of different ranks then overlap,
  and :attr:`ShardSpec.overlaps` tells the gradient code to sum those rows over TP.

Clipping, ZeRO and checkpoints only read this value; they never re-derive a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Segments = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    full_shape: tuple[int, ...]
    tp_rank: int
    tp_size: int
    segments: tuple[Segments, ...]  # one entry per TP rank
    local_size: int

    @property
    def local_segments(self) -> Segments:
        return self.segments[self.tp_rank]

    @property
    def overlaps(self) -> bool:
        """True when some rows of the full tensor live on more than one rank."""
        held = sum(length for segs in self.segments for _, length in segs)
        return held != self.full_shape[self.dim]

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = self.local_size
        return tuple(shape)

    def shard(self, full: torch.Tensor, tp_rank: int | None = None) -> torch.Tensor:
        """This rank's local tensor cut out of ``full`` (a copy, padded with zeros)."""
        rank = self.tp_rank if tp_rank is None else tp_rank
        parts = [full.narrow(self.dim, start, length) for start, length in self.segments[rank]]
        held = sum(length for _, length in self.segments[rank])
        if held < self.local_size:
            pad_shape = list(full.shape)
            pad_shape[self.dim] = self.local_size - held
            parts.append(full.new_zeros(pad_shape))
        return torch.cat(parts, dim=self.dim).contiguous()

    def unshard(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's local tensor (in tp-rank order)."""
        full = locals_[0].new_empty(self.full_shape)
        for rank, local in enumerate(locals_):
            offset = 0
            for start, length in self.segments[rank]:
                full.narrow(self.dim, start, length).copy_(local.narrow(self.dim, offset, length))
                offset += length
        return full

    def scatter_add_into(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """``full[segments] += local`` (used to sum overlapping gradient rows over TP)."""
        offset = 0
        for start, length in self.local_segments:
            full.narrow(self.dim, start, length).add_(local.narrow(self.dim, offset, length))
            offset += length

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scatter_add_into` for this rank (no padding rows)."""
        return torch.cat([full.narrow(self.dim, s, n) for s, n in self.local_segments], dim=self.dim)

    def describe(self) -> str:
        segs = self.local_segments
        return f"dim {self.dim} of {tuple(self.full_shape)}: rank {self.tp_rank} holds {list(segs)}"


def contiguous_spec(full_shape, dim: int, tp_rank: int, tp_size: int, *, pad_to_multiple: bool = False) -> ShardSpec:
    """Rank ``r`` holds ``[r n/tp, (r+1) n/tp)`` of ``dim``; with ``pad_to_multiple`` an ``n`` that
    does not divide is padded up to a multiple of ``tp`` (the last ranks hold zero rows)."""
    n = full_shape[dim]
    if n % tp_size and not pad_to_multiple:
        raise ValueError(f"dimension {dim} of size {n} is not divisible by tp_size={tp_size}")
    local = -(-n // tp_size)
    segments = tuple(
        ((r * local, max(0, min(local, n - r * local))),) if r * local < n else () for r in range(tp_size)
    )
    return ShardSpec(dim, tuple(full_shape), tp_rank, tp_size, segments, local)


def block_spec(full_shape, dim: int, tp_rank: int, tp_size: int, blocks: list[tuple[int, int]]) -> ShardSpec:
    """Fused layout: ``blocks`` is a list of ``(block_size, replicas)`` laid end to end along ``dim``.

    A block with ``replicas == 1`` is split evenly over the TP ranks. A block with
    ``replicas = k > 1`` is split into ``tp/k`` pieces, each held by ``k`` consecutive ranks
    (GQA/MQA key/value heads when ``tp`` exceeds their count).
    """
    if sum(size for size, _ in blocks) != full_shape[dim]:
        raise ValueError(f"blocks {blocks} do not add up to dimension {dim} of {tuple(full_shape)}")
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(tp_size)]
    start = 0
    for size, replicas in blocks:
        pieces = tp_size // replicas
        if tp_size % replicas or size % pieces:
            raise ValueError(f"block of size {size} cannot be split into {pieces} pieces for tp_size={tp_size}")
        piece = size // pieces
        for r in range(tp_size):
            per_rank[r].append((start + (r // replicas) * piece, piece))
        start += size
    segments = tuple(tuple(s) for s in per_rank)
    local = sum(n for _, n in segments[0])
    return ShardSpec(dim, tuple(full_shape), tp_rank, tp_size, segments, local)
