"""Where a model tensor comes from in the checkpoint, as a lazy expression read box by box.

A model tensor is a checkpoint tensor (:class:`Leaf`), or is built by transformers' weight
conversions (``transformers.conversion_mapping``) from several of them: MoE checkpoints store
every expert apart (``experts.N.w1``), the model holds one fused ``[E, 2I, H]`` tensor. The
conversions that only move data are represented lazily, so that a box of the result reads
only the matching boxes of the sources:

* :class:`Stack` (``MergeModulelist``): ``stack(items, dim)``; a box with ``[a, b)`` along
  ``dim`` reads items ``a .. b-1``, each with the box's other ranges;
* :class:`Cat` (``Concatenate``): ``cat(items, dim)``; a range along ``dim`` is cut at the
  items' boundaries and each item reads its own part;
* :class:`Transposed` (``Transpose``): the box with the two dims swapped.

Any other conversion (:class:`Converted`: ``Chunk``, ``Interleave``, RoPE permutations, ...)
cannot be cut before it runs: its sources are read whole, transformers' own operations run on
them, and the box is cut from the result. That costs the full sources of that one tensor.

Reading a box of a Stack or Cat fills one preallocated result piece by piece, so it holds the
result plus one piece at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .files import SafetensorsDir

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Leaf:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def keys(self) -> list[str]:
        return [self.key]


@dataclass(frozen=True)
class _Combined:
    """A source made of several of the same dtype (``items``) along ``dim``: their dtype, and every checkpoint key
    they read."""

    dim: int
    items: tuple[Source, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.items[0].dtype

    def keys(self) -> list[str]:
        return [k for item in self.items for k in item.keys()]


@dataclass(frozen=True)
class Stack(_Combined):
    @property
    def shape(self) -> tuple[int, ...]:
        inner = list(self.items[0].shape)
        return tuple(inner[:self.dim] + [len(self.items)] + inner[self.dim:])


@dataclass(frozen=True)
class Cat(_Combined):
    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.items[0].shape)
        shape[self.dim] = sum(item.shape[self.dim] for item in self.items)
        return tuple(shape)


@dataclass(frozen=True)
class Transposed:
    dim0: int
    dim1: int
    item: Source

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.item.shape)
        shape[self.dim0], shape[self.dim1] = shape[self.dim1], shape[self.dim0]
        return tuple(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.item.dtype

    def keys(self) -> list[str]:
        return self.item.keys()


@dataclass(frozen=True)
class Converted:
    """A conversion read whole: ``run(read)`` returns the full tensor (``read(key)`` reads a source whole)."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    run: object  # callable(read) -> torch.Tensor
    describe: str

    def keys(self) -> list[str]:
        return list(self.sources)


Source = Leaf | Stack | Cat | Transposed | Converted


def check_consistent(src: Source) -> str | None:
    """Why the items of a Stack or Cat cannot be combined (shapes or dtypes differ), or None."""
    if isinstance(src, (Stack, Cat)):
        for item in src.items:
            problem = check_consistent(item)
            if problem:
                return problem
        shapes = [list(item.shape) for item in src.items]
        if isinstance(src, Cat):
            for s in shapes:
                s[src.dim] = -1
        if any(s != shapes[0] for s in shapes) or len({item.dtype for item in src.items}) > 1:
            what = "stacked" if isinstance(src, Stack) else f"concatenated along dim {src.dim}"
            listing = ", ".join(f"{k}: {tuple(i.shape)} {i.dtype}" for k, i in
                                zip((item.keys()[0] for item in src.items), src.items))
            return f"the tensors {what} differ in shape or dtype ({listing})"
    if isinstance(src, Transposed):
        return check_consistent(src.item)
    return None


def read_box(files: SafetensorsDir, src: Source, box: Box) -> torch.Tensor:
    """``full[box]`` of the tensor ``src`` describes, in the checkpoint's dtype, reading only that box where it can."""
    if isinstance(src, Leaf):
        return files.read(src.key, box)
    if isinstance(src, Transposed):
        inner = list(box)
        inner[src.dim0], inner[src.dim1] = inner[src.dim1], inner[src.dim0]
        return read_box(files, src.item, tuple(inner)).transpose(src.dim0, src.dim1)
    if isinstance(src, Converted):
        full = src.run(lambda key: files.read(key))
        return full[tuple(slice(a, b) for a, b in box)].clone()
    out = torch.empty([b - a for a, b in box], dtype=src.dtype)
    if isinstance(src, Stack):
        lo, hi = box[src.dim]
        inner = box[:src.dim] + box[src.dim + 1:]
        for i in range(lo, hi):
            out.select(src.dim, i - lo).copy_(read_box(files, src.items[i], inner))
        return out
    lo, hi = box[src.dim]  # Cat: each item's part of [lo, hi)
    start = 0
    for item in src.items:
        size = item.shape[src.dim]
        a, b = max(lo, start), min(hi, start + size)
        if a < b:
            part = box[:src.dim] + ((a - start, b - start),) + box[src.dim + 1:]
            out.narrow(src.dim, a - lo, b - a).copy_(read_box(files, item, part))
        start += size
    return out


def equal_sources(files: SafetensorsDir, a: Source, b: Source, dtype: torch.dtype, *,
                  block_bytes: int = 16 * 2 ** 20) -> bool:
    """``torch.equal`` of the two tensors cast to ``dtype`` (as transformers compares tied tensors after
    loading), read in blocks of rows of at most ``block_bytes``: two blocks in memory, not two tensors."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    shape = tuple(a.shape)
    whole = tuple((0, n) for n in shape)
    if len(shape) == 0:
        return torch.equal(read_box(files, a, whole).to(dtype), read_box(files, b, whole).to(dtype))
    row = max(1, math.prod(shape[1:]) * torch.empty((), dtype=a.dtype).element_size())
    step = max(1, block_bytes // row)
    for lo in range(0, shape[0], step):
        box = ((lo, min(shape[0], lo + step)),) + whole[1:]
        if not torch.equal(read_box(files, a, box).to(dtype), read_box(files, b, box).to(dtype)):
            return False
    return True
