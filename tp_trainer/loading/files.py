"""The safetensors files of a Hugging Face model directory, read one box of one tensor at a time.

A directory holds ``model.safetensors``, or ``model.safetensors.index.json`` (its
``weight_map``: tensor key -> file) and the files it names. A safetensors file is an 8-byte
little-endian header length ``n``, a JSON header (per tensor: ``dtype``, ``shape``,
``data_offsets`` relative to byte ``8 + n``) and the row-major data. Only the headers are read
up front; :meth:`SafetensorsDir.read` then reads the box ``[a0:b0, a1:b1, ...]`` of a tensor
straight into a new tensor of the box's shape with ``pread``: with ``k`` the last dim the box
does not cover whole, the box is ``prod(b_i - a_i, i < k)`` contiguous byte runs of
``(b_k - a_k) * prod(shape[k+1:])`` elements each (one run for a split along dim 0, one per row
for a column split of a matrix). Runs under 256 KiB (column splits) are read as whole rows of
dim ``k - 1``, 16 MiB at a time into a bounce buffer, and the box's columns copied out: a few
large reads instead of thousands of small ones, for a 16 MiB transient.

Why not ``safetensors.safe_open``: its ``pread`` backend reads the whole tensor and then copies
the box (a transient of the full tensor plus the box), and its ``mmap`` backend returns views
of a mapping of the file, whose touched pages count in the process's resident memory while
the file stays mapped (all of a tensor's pages for a column split) and whose storage is the
whole file. Here the box is the only copy, in memory the process owns.
``checkpoint.load.HFCheckpointReader`` reads the same directory layout, whole tensors of a
Trainer checkpoint with Trainer-checkpoint errors.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# a box whose contiguous runs are shorter than this is read by whole rows through a bounce buffer of at most
# BOUNCE_BYTES: a syscall per run of a few KiB (a column split) costs more than reading the rows whole
SMALL_RUN = 256 * 1024
BOUNCE_BYTES = 16 * 2 ** 20


class LoadError(ValueError):
    """A model directory cannot be loaded as asked; the message names the tensor, the file and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: str  # the file name inside the directory
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # absolute byte offset of the data in the file


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """``{key: (dtype name, shape, start, end)}`` of a safetensors file (absolute byte offsets), checked against
    its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoadError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise LoadError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LoadError(f"{path} has a corrupted safetensors header ({err})") from None
    out = {}
    for key, rec in header.items():
        if key == "__metadata__":
            continue
        start, end = (8 + n + o for o in rec["data_offsets"])
        shape = tuple(rec["shape"])
        if rec["dtype"] not in DTYPES:
            raise LoadError(f"{path}: tensor {key} has dtype {rec['dtype']}, which tp_trainer cannot load")
        itemsize = torch.empty((), dtype=DTYPES[rec["dtype"]]).element_size()
        if end - start != math.prod(shape) * itemsize or end > size:
            raise LoadError(f"{path} is truncated or corrupted: tensor {key} {shape} {rec['dtype']} should occupy "
                            f"bytes [{start}, {start + math.prod(shape) * itemsize}) of a file of {size} bytes")
        out[key] = (rec["dtype"], shape, start, end)
    return out


class SafetensorsDir:
    """Headers of every tensor of a model directory; :meth:`read` returns one box of one tensor."""

    def __init__(self, path: str):
        if sys.byteorder != "little":
            raise LoadError("safetensors data is little-endian; this host is not")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        index = os.path.join(path, INDEX)
        self.sharded = os.path.isfile(index)
        if self.sharded:
            with open(index) as f:
                parsed = json.load(f)
            self.metadata = parsed.get("metadata") or {}
            files = sorted(set(parsed["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, SINGLE)):
            files = [SINGLE]
        else:
            others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            raise LoadError(f"{path} holds neither {SINGLE} nor {INDEX}" +
                            (f" (it has {others[:3]}: convert them to safetensors, e.g. load them once with "
                             "transformers' from_pretrained and save_pretrained)" if others else ""))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise LoadError(f"{index} names {missing} but {path} has no such file: copy the whole model directory")
        self.files = files
        for fname in files:
            for key, (dtype, shape, start, _) in read_header(os.path.join(path, fname)).items():
                self.tensors[key] = TensorInfo(key, fname, shape, DTYPES[dtype], start)
        self._fds: dict[str, int] = {}

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def where(self, key: str) -> str:
        return os.path.join(self.path, self.tensors[key].file)

    def read(self, key: str, box: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """``tensor[a0:b0, a1:b1, ...]`` for ``box = ((a0, b0), (a1, b1), ...)`` (the whole tensor for ``None``), in
        a new tensor of the checkpoint's dtype."""
        info = self.tensors[key]
        shape = info.shape
        box = tuple((0, n) for n in shape) if box is None else tuple(box)
        out = torch.empty([b - a for a, b in box], dtype=info.dtype)
        if out.numel() == 0:
            return out
        if not shape:
            _pread_into(self._fd(info.file), out.view(-1).view(torch.uint8).numpy(), info.offset, self.where(key))
            return out
        itemsize = out.element_size()
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        partial = [i for i, (a, b) in enumerate(box) if (a, b) != (0, shape[i])]
        k = partial[-1] if partial else 0  # dims after k are whole: each run is contiguous in the file
        run = (box[k][1] - box[k][0]) * strides[k] * itemsize
        if k > 0 and run < SMALL_RUN:
            self._read_rows(info, box, k, out, strides)
            return out
        buf = out.view(-1).view(torch.uint8).numpy()
        fd = self._fd(info.file)
        pos = 0
        for outer in itertools.product(*(range(a, b) for a, b in box[:k])):
            first = sum(i * s for i, s in zip(outer, strides)) + box[k][0] * strides[k]
            _pread_into(fd, buf[pos:pos + run], info.offset + first * itemsize, self.where(key))
            pos += run
        return out

    def _read_rows(self, info: TensorInfo, box, k: int, out: torch.Tensor, strides: list[int]) -> None:
        """A box whose runs are short (a column split): whole rows of dim ``k - 1`` in blocks of at most
        ``BOUNCE_BYTES`` (few large reads instead of one per row), the box's part of each block copied out."""
        shape, itemsize = info.shape, out.element_size()
        row = shape[k] * strides[k]  # elements of one index of dim k - 1
        per_block = max(1, BOUNCE_BYTES // (row * itemsize))
        lo, hi = box[k - 1]
        bounce = torch.empty(min(per_block, hi - lo) * row, dtype=info.dtype)
        raw = bounce.view(torch.uint8).numpy()
        fd = self._fd(info.file)
        grid = out.view(-1, hi - lo, box[k][1] - box[k][0], strides[k])  # (outer dims, dim k-1, dim k, the rest)
        for o, outer in enumerate(itertools.product(*(range(a, b) for a, b in box[:k - 1]))):
            base = sum(i * s for i, s in zip(outer, strides))
            for r0 in range(lo, hi, per_block):
                r1 = min(hi, r0 + per_block)
                n = (r1 - r0) * row
                _pread_into(fd, raw[:n * itemsize], info.offset + (base + r0 * strides[k - 1]) * itemsize,
                            self.where(info.key))
                block = bounce[:n].view(r1 - r0, shape[k], strides[k])
                grid[o, r0 - lo:r1 - lo].copy_(block[:, box[k][0]:box[k][1]])

    def _fd(self, fname: str) -> int:
        fd = self._fds.get(fname)
        if fd is None:
            fd = self._fds[fname] = os.open(os.path.join(self.path, fname), os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_into(fd: int, view, offset: int, where: str) -> None:
    done, want = 0, len(view)
    while done < want:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise LoadError(f"{where} ended at byte {offset + done} while reading a tensor: the file is truncated")
        done += n
