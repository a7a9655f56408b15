"""Checkpoints of ZeRO-3 (dp-sharded) models in the unchanged sharded format.

Under ZeRO-3 (``zero/fully_sharded.py``) a rank holds only the dp shard of each local TP tensor,
while ``model-tp{t}-of-{T}.safetensors`` holds TP rank ``t``'s whole local tensors. The file is
written as a stream: its safetensors header follows from the shapes and dtypes alone, then each
local tensor is all-gathered over dp (one all-gather per parameter, every dp rank joins) and dp
rank 0 appends its bytes. No rank holds more than its shards plus one local tensor; a plain
``safe_open`` reads the file as any other. Loading writes each rank's rows of the local tensors
(``zero.copy_into_param_``); the optimizer's pieces need nothing new (one contiguous flat range
of the local tensor per parameter and dp rank).

safetensors layout (its specification): an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(padded with spaces to a multiple of 8), then the tensors' bytes back to back in offset order.
"""

from __future__ import annotations

import json
import math
import struct
import sys

import torch

from ..zero.fully_sharded import copy_into_param_, is_dp_sharded, tp_local_tensor

__all__ = ["copy_into_param_", "is_dp_sharded", "tp_local_tensor", "write_dp_sharded_model_file"]

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name in {sorted(map(str, SAFETENSORS_DTYPES))}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, tensor: torch.Tensor) -> None:
    f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def write_dp_sharded_model_file(path: str, params: list, buffers: list, ctx) -> bool:
    """Write the local TP tensors of the dp-sharded parameters ``params`` and the ``buffers`` (``(name, tensor)``
    lists) to the safetensors file ``path``; collective over dp (every dp rank passes the same ``params``).
    Returns whether this rank wrote it (dp rank 0).

    A failed write on dp rank 0 (disk full) is raised after the last all-gather, so the other dp
    ranks are never left waiting in one.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this host is big-endian")
    params, extra = list(params), list(buffers)
    writer = ctx.dp_rank == 0
    error, f = None, None
    if writer:
        entries = [(n, t.dtype, tuple(t.shape)) for n, t in params + extra]
        try:
            f = open(path, "wb")
            f.write(_header(entries))
        except OSError as err:
            error = err
    try:
        for _, p in params:
            local = tp_local_tensor(p)  # every dp rank joins, whatever happened to the writer
            if f is not None and error is None:
                try:
                    _write_tensor(f, local)
                except OSError as err:
                    error = err
            del local
        if f is not None and error is None:
            for _, b in extra:
                _write_tensor(f, b)
    finally:
        if f is not None:
            f.close()
    if error is not None:
        raise error
    return writer
