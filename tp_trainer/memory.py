"""Per-rank training memory of a ``dp x tp`` layout with ZeRO 0/1/2/3, computed without allocating anything.

The model is built on the ``meta`` device and sharded by the real planner and
:func:`~tp_trainer.planner.apply_tensor_parallel` (rank 0's shards), so ``P``, the parameter
elements one TP rank holds (its shards, padded vocabulary rows and the replicated tensors),
is exact. With ``b`` bytes per element of the training dtype, ``dp`` replicas and AdamW
(two fp32 states per element), what :class:`tp_trainer.zero.ShardedOptimizer` (stages 0-2) and
FSDP2 with :class:`tp_trainer.zero.FullyShardedOptimizer` (stage 3) keep is

========  ==================  ===============================  ====================================
stage     parameters          gradients (after backward)        optimizer (fp32 master + 2 states)
========  ==================  ===============================  ====================================
0         ``P b``             ``P b`` (+ ``4 P`` fp32 copy      ``8 P`` (+ ``4 P`` master when
                                          when ``b != 4``)         ``b != 4``; fp32 trains in place)
1         ``P b``             ``P b + 4 S``                     ``12 S``
2         ``P b``             ``4 S`` between backwards         ``12 S``
3         ``4 S3`` (fp32        ``4 S3`` fp32 shards, from        ``8 S3`` (the parameters are
          shards: masters)    backward to ``zero_grad``         the masters)
========  ==================  ===============================  ====================================

where ``S = sum over buckets of ceil(n / dp)`` ~ ``P / dp`` is this rank's slice of the flat
buckets and ``S3 = sum over parameters of ceil(rows / dp) x row`` ~ ``P / dp`` its dim-0 shards of
the local TP tensors (FSDP2 pads each shard's storage to ``ceil(rows / dp)`` rows; rank 0 holds
that many of every tensor, the most). Of those, the *persistent* part lives from step to step:
parameters, optimizer states and (ZeRO-1/2) the ``4 S`` flat gradient shard; ``p.grad``, the fp32
master gradients of ZeRO-0 and ZeRO-3's gradient shards appear during the step and are freed by
``zero_grad``.

ZeRO-3 (``zero/fully_sharded.py``: FSDP2 per block, embedding and root over the dp mesh dim,
16-bit compute from fp32 masters): the step is simulated on the same meta model in its compute
dtype, whose parameters stand for the gathered ones, with FSDP2's buffers allocated where torch's
``_fully_shard`` makes them (:class:`_FullyShardedUnits`): in forward each unit's all-gather (the
shards cast to 16 bits, the flat output and the per-parameter outputs it is copied into, ``b x``
the unit's padded elements each) freed after the unit's forward (the root's after the whole
forward: it holds the final norm, and a tied embedding or an LM head read by the fused head + loss); in backward the unit gathered again *and
the one before it* (FSDP2's explicit backward prefetch: two units in flight, on CPU/gloo as on
CUDA), then, once its gradients are complete, the ``4 x`` padded fp32 reduce-scatter input beside
its ``b``-byte gradients (which are then freed), the previous unit's input kept until then (FSDP2
holds one), and the fp32 gradient shard, kept to the step's end. Units whose inputs need no
gradient (the input embedding) and the root reduce in FSDP2's final callback, after backward. The
activations are those of stages 0-2 (FSDP2 frees a gathered weight's storage under autograd's
saved reference). Not modelled: CUDA's implicit forward prefetch (the next unit's all-gather issued
while this one computes: one more unit, ``b U``, on the forward side) and the ``finish_grad_sync``
window of a parameter whose rows several TP ranks hold (one fp32 local tensor, after backward).

The peak is simulated, not modelled: one training step of the sharded meta model runs under
:class:`~tp_trainer.memory_trace.LiveTensorBytes`, which follows every tensor the step creates
until it is freed, so

    peak = persistent + max over the step of (activations + temporaries + gradients alive)

with the same modeling code, TP layers (on a simulated TP group: the collectives allocate what
a real rank's do and move no data, ``parallel/simulated.py``), loss and kernels as a real rank
(the kernels a run on ``device`` would use, ``parallel/kernels.py``; ``cpu_kernels="off"`` the
stock ones); ZeRO's own buffers (ZeRO-2's per-bucket reduce in backward, ZeRO-0/1's flat
buckets after it, the dp all-gather of the write-back) are allocated at the points where
``ShardedOptimizer`` makes them. Attention follows the kernels: on ``"cpu"`` tp_trainer's CPU kernel
where TPTrainer would use it (``parallel/attention.py``, it keeps the probabilities); otherwise
what flash / memory-efficient SDPA keeps (``q, k, v``, the output and an fp32 log-sum-exp per
row), which torch's fused CPU kernel keeps too.
With ``sequence_parallel`` the meta model runs with sequence parallelism (``parallel/sequence.py``)
as a real rank does; the per-layer closed forms (Korthikanti et al. 2022) are in
:mod:`tp_trainer.memory_theory`. :func:`fit_memory` turns the question around: the longest sequence
and the largest micro-batch whose simulated peak fits a per-GPU budget.
The optimizer step is the fused AdamW a default ``Trainer`` builds (``adamw_torch_fused``),
which updates in place; the ``foreach`` implementation (``adamw_torch``) allocates temporaries
the size of every state it updates (``4 P`` or ``4 S`` bytes more), the for-loop one about two
fp32 copies of the largest parameter. Not counted: the communication library's own buffers
(NCCL's; on CPU the ``2 x tp x 4 MiB`` shared-memory slots of ``parallel/shm.py``) and the
allocator's caching and fragmentation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch

from .memory_trace import LiveTensorBytes
from .parallel.kernels import check_cpu_kernels
from .zero.buckets import bucket_runs, bucket_shard_numel, zero_bucket_params

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32)
DEVICES = ("cuda", "cpu")


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
    device: str
    checkpointing: bool     # activation checkpointing: each decoder layer's forward recomputed in backward
    sequence_parallel: bool  # activations between the TP regions split along the sequence (parallel/sequence.py)
    total_params: int       # elements of the unsharded model
    local_params: int       # P: elements one TP rank holds
    params: int
    grads: int              # after backward (the gradient peak)
    optimizer: int
    activations: int        # saved for backward at the end of the forward
    persistent: int         # held from step to step: params + optimizer + ZeRO-1/2 flat gradient shard
    step_peak: int          # max over one step of the bytes it allocates on top of ``persistent``

    @property
    def states_total(self) -> int:
        """Parameters + gradients + optimizer: what a run holds independently of the batch."""
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        """The most a rank holds at any moment of a training step: what must fit."""
        return self.persistent + self.step_peak

    def as_dict(self) -> dict:
        return {**asdict(self), "states_total": self.states_total, "peak": self.peak}

    def table(self) -> str:
        unit, scale = ("GiB", 2**30) if self.peak >= 2**30 else ("MiB", 2**20)
        rows = [("parameters", self.params), ("gradients (after backward)", self.grads),
                ("optimizer states", self.optimizer), ("activations (saved for backward)", self.activations),
                ("peak of a training step", self.peak)]
        head = (f"{self.model_type}: {self.total_params / 1e9:.2f} B parameters; tp={self.tp} dp={self.dp} "
                f"zero={self.zero} {self.dtype} on {self.device}, micro-batch {self.batch} x {self.seq} per rank"
                f"{', activation checkpointing' if self.checkpointing else ''}"
                f"{', sequence parallel' if self.sequence_parallel else ''}; "
                f"{self.local_params / 1e9:.3f} B parameters on each rank")
        lines = [head] + [f"  {name:<34}{value / scale:>9.2f} {unit}" for name, value in rows]
        return "\n".join(lines)


def _sharded_meta_model(config, tp: int, dtype: torch.dtype, device: str = "cuda", checkpointing: bool = False,
                        cpu_kernels: str = "auto", sequence_parallel: bool = False):
    from transformers import AutoModelForCausalLM

    from .parallel.attention import use_cpu_attention
    from .parallel.context import ParallelContext
    from .parallel.kernels import choose_kernels
    from .parallel.simulated import simulated_group
    from .planner import apply_tensor_parallel, plan_tensor_parallel

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # rank 0 of a simulated TP group: the TP layers and their collectives allocate what a real
    # rank's do. Its kernels are what a run on `device` would decide; on CPU the simulated group
    # stands for one host's shared-memory transport, which splits 16-bit norms.
    kernels = choose_kernels(device, "gloo" if device == "cpu" else "nccl", cpu_kernels).granted(shm_all_reduce=tp > 1)
    context = ParallelContext(tp_size=tp, tp_rank=0, tp_group=simulated_group(tp) if tp > 1 else None,
                              device=torch.device(device), kernels=kernels)
    apply_tensor_parallel(model, plan_tensor_parallel(model, tp), context, sequence_parallel=sequence_parallel)
    if not (kernels.cpu_attention and use_cpu_attention(model)):
        _use_fused_attention_memory(model)
    if checkpointing:  # what --activation_checkpointing does, with the Trainer's default (non-reentrant)
        model.activation_checkpointing_enable()
    return model


class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in, on ``meta``, for flash / memory-efficient SDPA: keeps what they keep for backward
    (``q, k, v``, the output ``[B, H, S, dv]`` and an fp32 log-sum-exp ``[B, H, S]``); computes nothing."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention_memory(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    # transformers' sdpa_attention_forward returns the output transposed to [B, S, H, dv], contiguous
    return _FusedAttentionMemory.apply(query, key, value).transpose(1, 2).contiguous(), None


_FUSED_ATTENTION = "tp_trainer_gpu_attention_memory"


def _use_fused_attention_memory(model) -> None:
    """Route the meta model's ``sdpa`` attention through :class:`_FusedAttentionMemory` (SDPA on ``meta``
    would run its math fallback, which keeps the ``S x S`` probabilities a fused kernel never stores)."""
    from transformers import AttentionInterface, PretrainedConfig
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    from .parallel.attention import dispatches_by_registry

    if not dispatches_by_registry(model):
        return  # modeling code that picks its own path by name: keep it (an overestimate on meta)
    if _FUSED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(_FUSED_ATTENTION, _fused_attention_memory)
        AttentionMaskInterface.register(_FUSED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    configs = {id(c): c for c in [model.config] + [getattr(m, "config", None) for m in model.modules()]
               if isinstance(c, PretrainedConfig)}
    for config in configs.values():
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = _FUSED_ATTENTION


def _transient(*sizes: tuple[int, torch.dtype], device) -> None:
    """Allocate buffers of ``(numel, dtype)`` side by side, then free them: one of ``ShardedOptimizer``'s
    transients, as the tensor tracker sees it (``numel`` 0: no buffer)."""
    held = [torch.empty(n, dtype=dtype, device=device) for n, dtype in sizes if n]
    del held


def _zero2_hooks(params: list, dp: int, bucket_numel: int) -> list:
    """ZeRO-2 frees each bucket's gradients during backward, once the bucket is complete, after
    flattening them into an fp32 buffer and reduce-scattering it (``ShardedOptimizer._reduce_bucket_now``)."""
    owner = {id(p): bucket for bucket in zero_bucket_params(params, dp, bucket_numel) for p in bucket[0]}
    ready: dict[int, set] = {}

    def hook(p):
        members, padded = owner[id(p)]
        done = ready.setdefault(id(members[0]), set())
        done.add(id(p))
        if len(done) == len(members):
            # flat fp32 bucket + the reduce-scatter's output (dp > 1)
            _transient((padded, torch.float32), (padded // dp if dp > 1 else 0, torch.float32), device=p.device)
            for q in members:
                q.grad = None
            done.clear()

    return [p.register_post_accumulate_grad_hook(hook) for p in params]


def _sync_and_step(params: list, *, zero: int, dp: int, bucket_numel: int) -> None:
    """The buffers ``ShardedOptimizer.finish_grad_sync`` and ``step`` allocate after backward (see its code)."""
    meta, f32 = params[0].device, torch.float32
    if zero == 0:
        grads = [p for p in params if p.grad is not None]
        if dp > 1:  # bucketed fp32 all-reduce
            for run in bucket_runs([p.numel() for p in grads], bucket_numel):
                _transient((sum(grads[i].numel() for i in run), f32), device=meta)
        # the fp32 master gradients, beside the model's until the step's end
        _transient(*[(p.numel(), f32) for p in grads if p.dtype != f32], device=meta)
        return
    for members, padded in zero_bucket_params(params, dp, bucket_numel):
        if zero == 1:  # flatten + reduce-scatter (ZeRO-2 did it in backward)
            _transient((padded, f32), (padded // dp if dp > 1 else 0, f32), device=meta)
        if dp > 1:  # write-back: the dp all-gather of the updated parameters (+ the shard cast to their dtype)
            dtype = members[0].dtype
            _transient((padded, dtype), (padded // dp if dtype != f32 else 0, dtype), device=meta)


class _FullyShardedUnits:
    """ZeRO-3 on the meta model: FSDP2's buffers (``zero/fully_sharded.py``, torch's ``_fully_shard``) at the
    points it makes them, per unit (each block, the input and output embeddings, the root: ``block_units``).

    * forward, per unit: the all-gather (the shards cast to the compute dtype when it is 16-bit, the flat
      output of ``b x`` the unit's padded elements, then the per-parameter outputs it is copied into; FSDP2
      keeps the flat output until the next unit's copy-out) and the reshard after the unit's forward (the
      root's after the whole forward);
    * backward, per unit, when the gradient of one of its outputs arrives: the unit gathered again and the one
      that ran before it in forward prefetched (FSDP2's explicit backward prefetch: two units in flight);
    * after a unit's gradients are complete: reshard, free the previous unit's reduce-scatter input (FSDP2 keeps
      one), the fp32 reduce-scatter input (``4 x`` padded elements) beside the ``b``-byte gradients, which are then
      freed, and the fp32 gradient shard (``4 x`` padded / dp), kept until ``zero_grad``. Units whose inputs need
      no gradient (the input embedding) and the root do this in FSDP2's final callback, after backward.

    The meta model's parameters stand for the gathered ones (the step does not count them); the allocations here
    are what the gathered storages and the gradient buffers cost."""

    def __init__(self, model, dp: int):
        from .zero.fully_sharded import _embedding_units, block_units

        blocks = block_units(model)
        self.units = blocks + _embedding_units(model, blocks) + [model]
        self.root, self.dp, self.handles = model, dp, []
        claimed: set = set()
        self.own: dict[int, list] = {}
        for unit in self.units:  # the parameters a unit gathers: its own, not those of units inside it
            self.own[id(unit)] = [p for p in unit.parameters() if id(p) not in claimed]
            claimed.update(id(p) for p in self.own[id(unit)])

    def padded(self, unit) -> int:
        return sum(math.ceil(p.shape[0] / self.dp) * self.dp * math.prod(p.shape[1:]) if p.dim() else self.dp
                   for p in self.own[id(unit)])

    def shard(self, unit) -> int:
        return self.padded(unit) // self.dp

    def __enter__(self):
        self.gathered: dict[int, torch.Tensor] = {}  # the unsharded parameters of a unit
        self.flat: dict[int, torch.Tensor] = {}      # all-gather outputs not yet copied out
        self.ag_state = None                          # the last forward all-gather output FSDP2 keeps
        self.grad_shards: list = []
        self.rs_input: list = []
        self.order: list = []
        self.backward = False
        self.final: set = {id(self.root)}
        self.ready: dict[int, set] = {}
        self.owner = {id(p): unit for unit in self.units for p in self.own[id(unit)] if p.requires_grad}
        for unit in self.units:
            self.handles.append(unit.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self.handles.append(unit.register_forward_hook(self._post_forward))
        for p in {id(p): p for p in self.root.parameters() if p.requires_grad}.values():
            self.handles.append(p.register_post_accumulate_grad_hook(self._accumulated))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.gathered.clear()
        self.flat.clear()
        self.ag_state = None
        self.rs_input.clear()
        self.grad_shards.clear()

    def _unshard(self, unit) -> None:
        """The all-gather: the shards cast to the compute dtype (16-bit), then the flat output, which FSDP2 holds
        (``_all_gather_result``) until the copy-out in :meth:`_copy_out`."""
        if id(unit) in self.gathered or id(unit) in self.flat or not self.own[id(unit)]:
            return
        p = self.own[id(unit)][0]
        cast = torch.empty(self.shard(unit), dtype=p.dtype, device=p.device) if p.dtype != torch.float32 else None
        self.flat[id(unit)] = torch.empty(self.padded(unit), dtype=p.dtype, device=p.device)
        del cast

    def _copy_out(self, unit, *, forward: bool) -> None:
        """``wait_for_unshard``: the per-parameter outputs the flat one is copied into (the unsharded parameters).
        In forward FSDP2 keeps the flat output until the next unit's copy-out (``all_gather_state``: it frees
        the previous one first); in backward it frees it at once."""
        if id(unit) not in self.flat:
            return
        if forward:
            self.ag_state = None
        p = self.own[id(unit)][0]
        self.gathered[id(unit)] = torch.empty(self.padded(unit), dtype=p.dtype, device=p.device)
        flat = self.flat.pop(id(unit))
        if forward:
            self.ag_state = flat
        del flat

    def _pre_forward(self, unit, args, kwargs):
        if not self.backward:
            if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values())):
                self.final.add(id(unit))
            self._unshard(unit)
            self._copy_out(unit, forward=True)

    def _post_forward(self, unit, args, output):
        if self.backward:  # recomputed under activation checkpointing: FSDP2 keeps it gathered for backward
            return
        self.gathered.pop(id(unit), None)
        self.order.append(unit)
        if unit is self.root:  # the end of the forward: FSDP2 frees the last all-gather result
            self.ag_state = None
        index = len(self.order) - 1
        tensors = [t for t in _tensors_of(output) if t.requires_grad]
        if tensors:
            fired = [False]

            def pre_backward(grad):
                if not fired[0]:
                    fired[0] = True
                    self.backward = True
                    self._unshard(unit)  # no-op when prefetched
                    self._copy_out(unit, forward=False)
                    if index > 0:  # the prefetch: its all-gather only, copied out at its own pre-backward
                        self._unshard(self.order[index - 1])
                return grad

            for t in tensors:
                t.register_hook(pre_backward)
        return

    def _accumulated(self, p) -> None:
        unit = self.owner[id(p)]
        done = self.ready.setdefault(id(unit), set())
        done.add(id(p))
        if id(unit) not in self.final and len(done) == len(self.owner_params(unit)):
            self._post_backward(unit)

    def owner_params(self, unit) -> list:
        return [p for p in self.own[id(unit)] if p.requires_grad]

    def _post_backward(self, unit) -> None:
        self.gathered.pop(id(unit), None)  # reshard
        self.rs_input.clear()              # the previous unit's reduce-scatter input
        params = self.owner_params(unit)
        if not params:
            return
        meta = params[0].device
        self.rs_input.append(torch.empty(self.padded(unit), dtype=torch.float32, device=meta))
        for p in params:
            p.grad = None
        self.grad_shards.append(torch.empty(self.shard(unit), dtype=torch.float32, device=meta))

    def finish_backward(self) -> None:
        """FSDP2's final callback: the post-backward of the units still pending, in module order, then the last
        reduce-scatter input is released."""
        for unit in sorted((u for u in self.units if id(u) in self.final), key=self._module_index):
            self._post_backward(unit)
        self.rs_input.clear()
        self.gathered.clear()
        self.flat.clear()
        self.backward = False

    def _module_index(self, unit) -> int:
        for i, m in enumerate(self.root.modules()):
            if m is unit:
                return i
        return -1


def _tensors_of(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors_of(item)]
    return []


def fully_sharded_numel(model, dp: int) -> int:
    """``S3``: the elements of this rank's dp shards of ``model``'s parameters, FSDP2's storage padded to
    ``ceil(rows / dp)`` rows of each local TP tensor (rank 0 holds that many rows of every tensor)."""
    return sum(math.ceil(p.shape[0] / dp) * math.prod(p.shape[1:]) if p.dim() else 1 for p in model.parameters())


def simulate_step(model, *, batch: int, seq: int, zero: int, dp: int, bucket_numel: int = 2**24) -> tuple[int, int]:
    """One training step of ``model`` (on ``meta``): ``(bytes saved for backward, peak bytes allocated)``.

    Forward with labels (the model's own loss function: the vocab-parallel cross-entropy on a TP
    model), backward with ZeRO-2's bucket reduces, then ZeRO's buffers after backward; the peak
    is what the step holds on top of the persistent states (see the module docstring).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    skip = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in skip and id(base) not in saved:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    hooks = _zero2_hooks(params, dp, bucket_numel) if zero == 2 else []
    units = _FullyShardedUnits(model, dp) if zero == 3 else contextlib.nullcontext()
    model.train()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # checkpointing runs without a KV cache (transformers turns it off, with a warning, if asked for one)
    kwargs = {"use_cache": False} if model.is_activation_checkpointing else {}
    try:
        with _no_packed_sequences():
            with torch.no_grad():  # fills what the code caches across steps (the CPU attention's block masks)
                model(input_ids=ids, **kwargs)
            with LiveTensorBytes() as live, units:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(input_ids=ids, labels=ids, **kwargs).loss
                activations = sum(saved.values())
                loss.backward()
                del loss
                if zero == 3:  # the gradient shards stay until zero_grad; the step updates the shards in place
                    units.finish_backward()
                else:
                    _sync_and_step(params, zero=zero, dp=dp, bucket_numel=bucket_numel)
                for p in params:
                    p.grad = None
    finally:
        for h in hooks:
            h.remove()
    return activations, live.peak


@contextlib.contextmanager
def _no_packed_sequences():
    """Tell transformers' mask code that the simulated batch holds no packed sequences, as a real
    batch of plain ``input_ids`` does: without a KV cache (activation checkpointing turns it off)
    it looks for packing in the position ids, a data-dependent test ``meta`` tensors cannot answer."""
    from transformers import masking_utils

    find = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


def _check_layout(*, tp: int, dp: int, zero: int, dtype: str, batch: int, seq: int, device: str,
                  cpu_kernels: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {zero}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if tp < 1 or dp < 1 or batch < 1 or seq < 1:
        raise ValueError(f"tp, dp, batch and seq must be >= 1, got tp={tp} dp={dp} batch={batch} seq={seq}")
    check_cpu_kernels(cpu_kernels)


class _Layout:
    """One sharded meta model and its persistent states, from which steps of any ``(batch, seq)`` are simulated."""

    def __init__(self, config, *, tp: int, dp: int, zero: int, dtype: str, device: str, bucket_numel: int,
                 checkpointing: bool, cpu_kernels: str, sequence_parallel: bool):
        from transformers import AutoModelForCausalLM

        self.config, self.tp, self.dp, self.zero, self.dtype = config, tp, dp, zero, dtype
        self.device, self.bucket_numel, self.checkpointing = device, bucket_numel, checkpointing
        self.sequence_parallel = sequence_parallel and tp > 1
        b = DTYPE_BYTES[dtype]
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        self.total_params = sum(p.numel() for p in full.parameters())
        del full
        self.model = _sharded_meta_model(config, tp, torch_dtype, device, checkpointing, cpu_kernels,
                                         self.sequence_parallel)
        numels = [p.numel() for p in self.model.parameters() if p.requires_grad]
        local = self.local = sum(p.numel() for p in self.model.parameters())
        if zero == 3:  # fp32 dp shards (the masters), padded to ceil(rows / dp) rows; AdamW's states on the same rows
            shard = fully_sharded_numel(self.model, dp)
            self.params, self.grads, self.optimizer = 4 * shard, 4 * shard, 4 * ADAM_STATES * shard
            self.persistent = self.params + self.optimizer  # the gradient shards live from backward to zero_grad
            return
        if zero == 0:
            self.grads = local * b + (4 * local if b != 4 else 0)
            self.optimizer = 4 * ADAM_STATES * local + (4 * local if b != 4 else 0)
            flat_grad_shard = 0
        else:
            shard = bucket_shard_numel(numels, dp, bucket_numel)
            flat_grad_shard = 4 * shard
            self.grads = (local * b if zero == 1 else 0) + flat_grad_shard
            self.optimizer = 4 * (1 + ADAM_STATES) * shard
        self.params = local * b
        self.persistent = self.params + self.optimizer + flat_grad_shard

    def step(self, batch: int, seq: int) -> tuple[int, int]:
        """``(activations, step peak on top of the persistent states)`` of one simulated step."""
        return simulate_step(self.model, batch=batch, seq=seq, zero=self.zero, dp=self.dp,
                             bucket_numel=self.bucket_numel)

    def estimate(self, batch: int, seq: int) -> MemoryEstimate:
        activations, step_peak = self.step(batch, seq)
        return MemoryEstimate(model_type=self.config.model_type, tp=self.tp, dp=self.dp, zero=self.zero,
                              dtype=self.dtype, batch=batch, seq=seq, device=self.device,
                              checkpointing=self.checkpointing, sequence_parallel=self.sequence_parallel,
                              total_params=self.total_params, local_params=self.local, params=self.params,
                              grads=self.grads, optimizer=self.optimizer, activations=activations,
                              persistent=self.persistent, step_peak=step_peak)


def estimate_memory(config, *, tp: int, dp: int, zero: int, dtype: str, batch: int, seq: int,
                    device: str = "cuda", bucket_numel: int = 2**24, checkpointing: bool = False,
                    cpu_kernels: str = "auto", sequence_parallel: bool = False) -> MemoryEstimate:
    """Per-rank memory of training ``config`` at ``tp x dp`` with ZeRO ``zero`` on ``device`` (module docstring),
    with the kernels of ``--cpu_kernels cpu_kernels``, with or without sequence parallelism."""
    _check_layout(tp=tp, dp=dp, zero=zero, dtype=dtype, batch=batch, seq=seq, device=device, cpu_kernels=cpu_kernels)
    return _Layout(config, tp=tp, dp=dp, zero=zero, dtype=dtype, device=device, bucket_numel=bucket_numel,
                   checkpointing=checkpointing, cpu_kernels=cpu_kernels,
                   sequence_parallel=sequence_parallel).estimate(batch, seq)


@dataclass
class Fit:
    """What fits a per-rank ``budget`` (bytes) in one layout: the longest sequence at ``batch`` (a multiple
    of ``seq_step``; 0: not even ``seq_step`` tokens) and the largest micro-batch at ``seq`` (0: not one),
    each with its simulated estimate (``None`` when nothing fits)."""

    layout: str             # one line: model, parameters, tp x dp, ZeRO, dtype, device, checkpointing, SP
    budget: int
    batch: int
    seq: int
    seq_step: int
    persistent: int
    longest_seq: int
    at_longest_seq: MemoryEstimate | None
    largest_batch: int
    at_largest_batch: MemoryEstimate | None


def fit_memory(config, budget: int, *, tp: int, dp: int, zero: int, dtype: str, batch: int = 1, seq: int = 4096,
               device: str = "cuda", bucket_numel: int = 2**24, checkpointing: bool = False,
               cpu_kernels: str = "auto", sequence_parallel: bool = False, seq_step: int = 256,
               max_seq: int = 2**20, max_batch: int = 2**12) -> Fit:
    """The longest sequence (at micro-batch ``batch``) and the largest micro-batch (at ``seq`` tokens) whose
    simulated peak fits ``budget`` bytes per rank. The peak grows with both (linearly with fused attention,
    the saved probabilities of an eager one add ``seq^2``): each answer is bracketed on its grid and found
    by interpolation inside the bracket (bisection when that stalls), a handful of simulated steps of one
    sharded meta model."""
    _check_layout(tp=tp, dp=dp, zero=zero, dtype=dtype, batch=batch, seq=seq, device=device, cpu_kernels=cpu_kernels)
    if budget <= 0 or seq_step < 1:
        raise ValueError(f"the budget and seq_step must be positive, got budget={budget} seq_step={seq_step}")
    layout = _Layout(config, tp=tp, dp=dp, zero=zero, dtype=dtype, device=device, bucket_numel=bucket_numel,
                     checkpointing=checkpointing, cpu_kernels=cpu_kernels, sequence_parallel=sequence_parallel)
    estimates: dict[tuple[int, int], MemoryEstimate] = {}
    line = (f"{config.model_type}: {layout.total_params / 1e9:.2f} B parameters; tp={tp} dp={dp} zero={zero} {dtype} "
            f"on {device}{', activation checkpointing' if checkpointing else ''}"
            f"{', sequence parallel' if layout.sequence_parallel else ''}; "
            f"{layout.local / 1e9:.3f} B parameters on each rank")
    if layout.persistent >= budget:  # the states alone fill it: no step fits
        return Fit(layout=line, budget=budget, batch=batch, seq=seq, seq_step=seq_step, persistent=layout.persistent,
                   longest_seq=0, at_longest_seq=None, largest_batch=0, at_largest_batch=None)

    def peak(b: int, s: int) -> int:
        if (b, s) not in estimates:
            estimates[(b, s)] = layout.estimate(b, s)
        return estimates[(b, s)].peak

    longest = _largest(lambda k: peak(batch, k * seq_step), budget, max_seq // seq_step,
                       max(1, seq // seq_step)) * seq_step
    largest = _largest(lambda b: peak(b, seq), budget, max_batch, batch)
    return Fit(layout=line, budget=budget, batch=batch, seq=seq, seq_step=seq_step, persistent=layout.persistent,
               longest_seq=longest, at_longest_seq=estimates.get((batch, longest)), largest_batch=largest,
               at_largest_batch=estimates.get((largest, seq)))


def _largest(peak_of, budget: int, limit: int, start: int) -> int:
    """The largest ``k`` in ``[1, limit]`` with ``peak_of(k) <= budget`` (0 if none), for a ``peak_of`` that grows
    with ``k``. From ``start``, each next ``k`` is where the line through the last two points meets the budget
    (doubling or halving before there are two), until a bracket ``[lo fits, hi does not]`` with ``hi = lo + 1``;
    inside the bracket it interpolates, and bisects when an end stays put twice (a convex peak)."""
    seen: dict[int, int] = {}

    def fits(k: int) -> bool:
        if k not in seen:
            seen[k] = peak_of(k)
        return seen[k] <= budget

    def crossing(default: int) -> int:
        (k1, p1), (k2, p2) = sorted(seen.items())[-2:] if len(seen) > 1 else ((0, 0), (default, -1))
        if len(seen) < 2 or p2 <= p1:
            return default
        return int(k2 + (budget - p2) * (k2 - k1) / (p2 - p1))

    k = min(max(start, 1), limit)
    lo, hi = (k, None) if fits(k) else (0, k)
    while hi is None:  # grow upwards
        if lo >= limit:
            return lo
        k = min(max(crossing(2 * lo), lo + 1), limit)
        lo, hi = (k, None) if fits(k) else (lo, k)
    while lo == 0:  # shrink downwards
        if hi == 1:
            return 0
        k = min(max(crossing(hi // 2), 1), hi - 1)
        lo, hi = (k, hi) if fits(k) else (0, k)
    stalled = 0
    while hi - lo > 1:
        k = lo + int((budget - seen[lo]) * (hi - lo) / max(1, seen[hi] - seen[lo]))
        k = (lo + hi) // 2 if stalled >= 2 else min(max(k, lo + 1), hi - 1)
        if fits(k):
            stalled = stalled + 1 if hi - k < k - lo else 0
            lo = k
        else:
            stalled = stalled + 1 if k - lo < hi - k else 0
            hi = k
    return lo


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
