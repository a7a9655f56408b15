"""The safetensors files of a Hugging Face model directory, read one slice at a time.

A directory holds either ``model.safetensors`` or ``model.safetensors.index.json`` (its
``weight_map``: tensor key -> file) with the files it names. Only the headers are read up
front (names, shapes, dtypes): :meth:`SafetensorsDir.read` then returns the box
``[a0:b0, a1:b1, ...]`` of one tensor, read with safetensors' ``pread`` backend, so the
process holds the bytes it asked for and never maps a file (mapped file pages would be
counted in its resident memory; the box is the only copy).

``checkpoint.load.HFCheckpointReader`` reads the same layout, but whole tensors of a Trainer
checkpoint with Trainer-checkpoint errors; this reader reads boxes and names the model
directory in its errors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype names -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class LoadError(ValueError):
    """A model directory cannot be loaded as asked; the message names the tensor, the file and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: str  # the file name inside the directory
    shape: tuple[int, ...]
    dtype: torch.dtype


class SafetensorsDir:
    """Headers of every tensor of a model directory; :meth:`read` returns one box of one tensor."""

    def __init__(self, path: str):
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                parsed = json.load(f)
            self.metadata = parsed.get("metadata") or {}
            files = sorted(set(parsed["weight_map"].values()))
            where = INDEX
        elif os.path.isfile(os.path.join(path, SINGLE)):
            files, where = [SINGLE], None
        else:
            others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            raise LoadError(f"{path} holds neither {SINGLE} nor {INDEX}" +
                            (f" (it has {others[:3]}: convert them to safetensors, e.g. load them once with "
                             "transformers' from_pretrained and save_pretrained)" if others else ""))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise LoadError(f"{os.path.join(path, where)} names {missing} but {path} has no such file: "
                            "copy the whole model directory")
        self.files = files
        for fname in files:
            with safe_open(os.path.join(path, fname), framework="pt", device="cpu") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.tensors[key] = TensorInfo(key, fname, tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
        self._handles: dict[str, object] = {}

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def where(self, key: str) -> str:
        return os.path.join(self.path, self.tensors[key].file)

    def read(self, key: str, box: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """``tensor[a0:b0, a1:b1, ...]`` for ``box = ((a0, b0), (a1, b1), ...)``; the whole tensor for ``None``."""
        fname = self.tensors[key].file
        handle = self._handles.get(fname)
        if handle is None:
            handle = self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="pt", device="cpu",
                                                      backend="pread")
        sl = handle.get_slice(key)
        if box is None or not box:  # 0-dim tensors have an empty box
            return sl[...]
        return sl[tuple(slice(a, b) for a, b in box)]

    def close(self) -> None:
        self._handles.clear()
