"""The on-disk format of sharded checkpoints: names, the error type, and small shared helpers.

See :mod:`tp_trainer.checkpoint` for the layout of a ``checkpoint-N/`` directory.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random

import numpy as np
import torch
import torch.distributed as dist

from ..parallel.sharding import ShardSpec
from ..zero import ShardedOptimizer

MANIFEST = "tp_checkpoint.json"
FORMAT = "tp_trainer-sharded-checkpoint"
VERSION = 1
TMP_PREFIX = ".tmp-"
SCHEDULER, SCALER, TRAINER_STATE, GROUPS = "scheduler.pt", "scaler.pt", "trainer_state.json", "optimizer_groups.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what to do."""


class CheckpointSaveError(CheckpointError, OSError, RuntimeError):
    """A checkpoint that could not be written (a full disk, a read-only or removed directory, ...), raised on
    every rank; the message names the path, the cause and the fix. Nothing was published: the earlier
    checkpoints are intact. ``errno`` is the first failing rank's (``errno.ENOSPC``, ...) or ``None``.
    (Also a ``RuntimeError``: what a failed save raised before.)"""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] strerror: filename"
        return str(self.args[0]) if self.args else ""


def is_sharded_checkpoint(path) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, MANIFEST))


def _world(ctx):
    return ctx.world_group if ctx is not None and ctx.world_size > 1 and dist.is_initialized() else None


def _barrier(ctx) -> None:
    if _world(ctx) is not None:
        dist.barrier(group=_world(ctx))


def _all_gather_object(obj, ctx) -> list:
    group = _world(ctx)
    if group is None:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def unwrap_optimizer(optimizer):
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (which shares its state and groups)."""
    while optimizer is not None and not isinstance(optimizer, ShardedOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _finish_file(path: str) -> dict:
    """fsync a freshly written file and return its manifest record."""
    _fsync(path)
    return {"sha256": _sha256(path), "bytes": os.path.getsize(path)}


def _spec_record(spec: ShardSpec | None):
    if spec is None:
        return None
    return {"dim": spec.dim, "local_size": spec.local_size, "segments": [[list(s) for s in r] for r in spec.segments]}


def _spec_from_record(rec, full_shape) -> ShardSpec:
    segments = tuple(tuple((int(s), int(n)) for s, n in r) for r in rec["segments"])
    return ShardSpec(rec["dim"], tuple(full_shape), 0, len(segments), segments, rec["local_size"])


def _full_shape(p: torch.Tensor) -> list[int]:
    spec = getattr(p, "tp_spec", None)
    return list(spec.full_shape) if spec is not None else list(p.shape)


def _versions() -> dict:
    import safetensors
    import transformers

    from .. import __version__

    return {"tp_trainer": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if torch.cuda.is_available() and "cuda" in states:
        cuda = states["cuda"]  # the Trainer saves all devices' states in distributed runs
        torch.cuda.random.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, (list, tuple)) else cuda)


def is_complete(path: str) -> bool:
    """A tp_trainer checkpoint with its manifest, or a Trainer checkpoint with its trainer state."""
    return os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, TRAINER_STATE))
