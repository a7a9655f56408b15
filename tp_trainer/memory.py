"""Per-rank training memory of a ``dp x tp`` layout with ZeRO 0/1/2, computed without allocating anything.

The model is built on the ``meta`` device and sharded by the real planner and
:func:`~tp_trainer.planner.apply_tensor_parallel` (rank 0's shards), so ``P``, the parameter
elements one TP rank holds (its shards, padded vocabulary rows and the replicated tensors),
is exact. With ``b`` bytes per element of the training dtype, ``dp`` replicas and AdamW
(two fp32 states per element), what :class:`tp_trainer.zero.ShardedOptimizer` keeps is

========  ==================  ===============================  ====================================
stage     parameters          gradients                         optimizer (fp32 master + 2 states)
========  ==================  ===============================  ====================================
0         ``P b``             ``P b`` (+ ``4 P`` fp32 copy      ``8 P`` (+ ``4 P`` master when
                                          when ``b != 4``)         ``b != 4``; fp32 trains in place)
1         ``P b``             ``P b + 4 S``                     ``12 S``
2         ``P b``             ``4 S`` between backwards         ``12 S``
========  ==================  ===============================  ====================================

where ``S = sum over buckets of ceil(n / dp)`` ~ ``P / dp`` is this rank's slice of the flat
buckets. Activations are the tensors autograd saves for backward, measured by running the
forward of the sharded meta model under ``saved_tensors_hooks`` (each saved storage counted
once, parameters excluded); the transient peak of backward comes on top and is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32)


@dataclass
class MemoryEstimate:
    """Bytes per rank (the largest rank) of one layout; :meth:`table` prints it."""

    model_type: str
    tp: int
    dp: int
    zero: int
    dtype: str
    batch: int
    seq: int
    total_params: int       # elements of the unsharded model
    local_params: int       # P: elements one TP rank holds
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def states_total(self) -> int:
        """Parameters + gradients + optimizer: what a run holds independently of the batch."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.states_total + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "states_total": self.states_total, "total": self.total}

    def table(self) -> str:
        unit, scale = ("GiB", 2**30) if self.total >= 2**30 else ("MiB", 2**20)
        rows = [("parameters", self.params), ("gradients", self.grads), ("optimizer states", self.optimizer),
                ("activations (saved for backward)", self.activations), ("total", self.total)]
        head = (f"{self.model_type}: {self.total_params / 1e9:.2f} B parameters; tp={self.tp} dp={self.dp} "
                f"zero={self.zero} {self.dtype}, micro-batch {self.batch} x {self.seq} per rank; "
                f"{self.local_params / 1e9:.3f} B parameters on each rank")
        lines = [head] + [f"  {name:<34}{value / scale:>9.2f} {unit}" for name, value in rows]
        return "\n".join(lines)


def _sharded_meta_model(config, tp: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from .parallel.context import ParallelContext
    from .planner import apply_tensor_parallel, plan_tensor_parallel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if tp > 1:
        plan = plan_tensor_parallel(model, tp)
        # tp_group=None: the f/g collectives are identities, so the meta forward runs on local shapes
        apply_tensor_parallel(model, plan, ParallelContext(tp_size=tp, tp_rank=0))
    return model


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


def bucket_shard_numel(param_numels: list[int], dp: int, bucket_numel: int = 2**24) -> int:
    """``S``: the flat-bucket slice of one dp rank, bucketed like ``ShardedOptimizer`` (reverse order)."""
    numels = list(reversed(param_numels))
    return sum(math.ceil(sum(numels[i] for i in run) / dp) for run in bucket_runs(numels, bucket_numel))


def saved_activation_bytes(model, batch: int, seq: int) -> int:
    """Bytes autograd saves during a training forward of ``model`` (on meta) with labels."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(base) not in seen:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    model.train()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits  # local vocabulary slice [batch, seq, V/tp] in train mode
        # the (vocab-parallel) cross-entropy keeps fp32 softmax/log-softmax of the local logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())  # noqa: F841
        total = sum(seen.values())
    return total


def estimate_memory(config, *, tp: int, dp: int, zero: int, dtype: str, batch: int, seq: int,
                    bucket_numel: int = 2**24) -> MemoryEstimate:
    """Per-rank memory of training ``config`` at ``tp x dp`` with ZeRO ``zero`` (see the module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if zero not in (0, 1, 2):
        raise ValueError(f"zero must be 0, 1 or 2, got {zero}")
    if tp < 1 or dp < 1 or batch < 1 or seq < 1:
        raise ValueError(f"tp, dp, batch and seq must be >= 1, got tp={tp} dp={dp} batch={batch} seq={seq}")
    b = DTYPE_BYTES[dtype]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    full = _sharded_meta_model(config, 1, torch_dtype)
    total_params = sum(p.numel() for p in full.parameters())
    del full
    model = _sharded_meta_model(config, tp, torch_dtype)
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    local = sum(p.numel() for p in model.parameters())
    if zero == 0:
        grads = local * b + (4 * local if b != 4 else 0)
        optimizer = 4 * ADAM_STATES * local + (4 * local if b != 4 else 0)
    else:
        shard = bucket_shard_numel(numels, dp, bucket_numel)
        grads = (local * b if zero == 1 else 0) + 4 * shard
        optimizer = 4 * (1 + ADAM_STATES) * shard
    return MemoryEstimate(model_type=config.model_type, tp=tp, dp=dp, zero=zero, dtype=dtype, batch=batch, seq=seq,
                          total_params=total_params, local_params=local, params=local * b, grads=grads,
                          optimizer=optimizer, activations=saved_activation_bytes(model, batch, seq))


def _storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages behind ``tensors`` not already in ``seen`` (DTensors: the local shard)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def measure_training_memory(model, optimizer) -> dict[str, int]:
    """Live bytes on this rank of a model trained by a :class:`~tp_trainer.zero.ShardedOptimizer`.

    Call it after ``backward`` + ``optimizer.finish_grad_sync()`` (the gradient peak). Each
    storage is counted once, in the first category that holds it: parameters, gradients
    (``p.grad``, ZeRO-1/2 flat gradient shards, fp32 master gradients), optimizer (fp32
    masters that are not the parameters themselves, and the inner optimizer's states).
    """
    seen: set = set()
    params = _storage_bytes(model.parameters(), seen)
    grads = [p.grad for p in model.parameters()]
    if optimizer.stage > 0:
        grads += [b.grad for b in optimizer.buckets]
    else:
        grads += [optimizer.master_of[id(p)].grad for p in optimizer.params]
    grads = _storage_bytes(grads, seen)
    masters = [m for g in optimizer.inner.param_groups for m in g["params"]]
    states = [t for s in optimizer.inner.state.values() for t in s.values()
              if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"params": params, "grads": grads, "optimizer": _storage_bytes(masters + states, seen)}
