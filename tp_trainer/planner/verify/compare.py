"""What is compared, on rank 0, between the unsharded step and the planned TP step, and the thresholds.

Compared with the unsharded run: the loss, the logits (all of the vocabulary), the output of every
module in call order (the first one that differs says where the forward goes wrong), and every
gradient with its largest difference. Each comparison is a :class:`TensorDiff`: the largest
``|tp - ref|`` and the largest magnitudes of both, judged relative to the larger magnitude.

Communication (gloo, the TP group; every rank takes part, rank 0 compares):

- logits: a vocab-parallel LM head in training mode returns ``[batch, seq, vocab/tp]``; its shards
  are gathered to ``[batch, seq, vocab]`` (:func:`full_logits`, an all-gather);
- module outputs: the local ``[..., out/tp]`` outputs of column-parallel layers are gathered to
  ``[..., out]`` (:func:`compare_outputs`); full outputs (replicated, or reduced by a row-parallel
  layer) compare as they are; other split activations are skipped;
- gradients: after the TP partial sums are reduced as the optimizer does, each rank's rows of a
  sharded parameter are ``dist.gather``-ed to rank 0 (:func:`compare_grads`) and each rank's held
  rows (padding excluded) are compared with the same rows of the reference gradient.

Thresholds (:data:`GRAD_RTOL`, :data:`OUTPUT_RTOL`, :data:`LOGITS_RTOL`, :data:`LOSS_RTOL`): in fp32,
tensor parallelism only reorders sums (the row-parallel partial products, the vocab-parallel
log-sum-exp), which moves a result by a few ulps of the terms summed. Measured: ~5e-7 of a
tensor's largest value at the tiny test widths, ~2e-6 at 7B widths (4096- and 11008-term dot
products). A gradient (a module output, the logits) passes when its largest difference is at
most 1e-4 of its largest magnitude: ~50x above reordering noise and ~100x below what a wrong
split does (a missing or doubled reduction, rows of the wrong shard, heads mixed: differences of
the order of the tensor itself, 0.5 for a doubled gradient, ~1 for mixed heads). Scaling by each
tensor's own magnitude (not an absolute floor) judges small gradients (a norm's, an embedding's)
as strictly as large ones. The loss, a scalar of ~ln(vocab), passes within 1e-5 relative (its
reordering error is ~1e-7 relative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GRAD_RTOL = 1e-4     # max |g_tp - g_ref| / max(|g_ref|, |g_tp|) per gradient tensor
LOGITS_RTOL = 1e-4   # max |z_tp - z_ref| / max |z_ref| over all logits
LOSS_RTOL = 1e-5     # |l_tp - l_ref| / |l_ref|
OUTPUT_RTOL = 1e-4   # max |y_tp - y_ref| / max(|y_ref|, |y_tp|) per module output (forward localisation)


@dataclass
class TensorDiff:
    name: str
    shape: tuple
    max_abs_diff: float
    ref_max: float
    tp_max: float
    plan: str = ""

    @property
    def relative(self) -> float:
        scale = max(self.ref_max, self.tp_max)
        if math.isnan(self.max_abs_diff) or math.isinf(self.max_abs_diff):
            return math.inf
        return self.max_abs_diff / scale if scale > 0 else 0.0

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name


def max_abs(t) -> float:
    """``max |t|`` (NaN if ``t`` holds one), without a temporary of ``t``'s size."""
    if not t.numel():
        return 0.0
    lo, hi = t.detach().aminmax()  # no temporary of t's size
    value = max(-float(lo), float(hi))
    return value if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def max_abs_diff(a, b) -> float:
    """``max |a - b|``; infinite when the shapes differ."""
    if a.shape != b.shape:
        return math.inf
    return max_abs(a.detach() - b.detach()) if a.numel() else 0.0


def plan_label(entry) -> str:
    """How the plan splits a module, as the report shows it: style, layout and source."""
    return f"{entry.style}{entry.describe_layout()} ({entry.source})"


class GradComparer:
    """Rank 0's comparison of gathered gradient pieces with the reference, through reused buffers
    (fresh 100 MB temporaries per tensor would page-fault on every one of them)."""

    def __init__(self, ref: dict | None, entries: dict[str, str], tp: int):
        self.ref, self.tp = ref or {}, tp
        self.entries = entries
        self.rows: list[tuple] = []
        self.seen: set[str] = set()
        self._gather = None
        self._scratch = None

    def _buffer(self, attr: str, numel: int, like):
        import torch

        buf = getattr(self, attr)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
            buf = torch.empty(numel, dtype=like.dtype)
            setattr(self, attr, buf)
        return buf

    def gather_buffers(self, local):
        """``tp`` views shaped like ``local`` into one reused buffer: the receive list of a ``dist.gather``."""
        n = local.numel()
        flat = self._buffer("_gather", n * self.tp, local)
        return [flat[i * n:(i + 1) * n].view(local.shape) for i in range(self.tp)]

    def add(self, name: str, pairs) -> None:
        """``pairs``: ``(tp piece, None)`` for a whole tensor or ``(tp piece, (dim, start, length))`` of the reference."""
        self.seen.add(name)
        ref = self.ref.get(name)
        if ref is None:
            return
        worst = tp_max = 0.0
        for piece, where in pairs:
            r = ref if where is None else ref.narrow(*where)
            worst = max(worst, self._max_abs_diff(piece, r))
            tp_max = max(tp_max, max_abs(piece))
        module = name.rsplit(".", 1)[0]
        self.rows.append((name, tuple(ref.shape), worst, max_abs(ref), tp_max, self.entries.get(module, "not in the plan")))
        self.ref[name] = ref.new_empty(0)  # free the reference gradient; the name stays for missing/extra

    def _max_abs_diff(self, a, b) -> float:
        if a.shape != b.shape:
            return math.inf
        if not a.numel():
            return 0.0
        import torch

        buf = self._buffer("_scratch", a.numel(), a)[: a.numel()].view(a.shape)
        torch.sub(a, b, out=buf)
        return max_abs(buf)

    def missing(self) -> list[str]:
        """Parameters with a reference gradient but none under TP."""
        return sorted(set(self.ref) - self.seen)

    def extra(self) -> list[str]:
        """Parameters with a gradient under TP but none in the reference."""
        return sorted(self.seen - set(self.ref))


def compare_grads(model, ref_grads: dict | None, plan, group, rank: int, tp: int) -> GradComparer:
    """Compare every gradient of the sharded ``model`` with ``ref_grads`` (rank 0's); a collective.

    A replicated parameter's gradient is compared whole on rank 0; a sharded one (``tp_spec``) is
    gathered to rank 0 and each rank's segments compared with the same rows of the reference."""
    import torch.distributed as dist

    entries = {name: plan_label(e) for name, e in plan.entries.items()}
    compare = GradComparer(ref_grads, entries, tp)
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        spec = getattr(param, "tp_spec", None)
        if spec is None or group is None:
            if rank == 0:
                compare.add(name, [(grad, None)])
            continue
        parts = compare.gather_buffers(grad) if rank == 0 else None
        dist.gather(grad.contiguous(), parts, group=group, group_dst=0)
        if rank == 0:
            compare.add(name, _held_rows(parts, spec))
    return compare


def _held_rows(parts, spec) -> list[tuple]:
    """Each rank's held rows (padding excluded) paired with where they sit in the full tensor."""
    pairs = []
    for r, part in enumerate(parts):
        offset = 0
        for start, length in spec.segments[r]:
            pairs.append((part.narrow(spec.dim, offset, length), (spec.dim, start, length)))
            offset += length
    return pairs


def full_logits(model, logits, ctx):
    """The logits over the whole vocabulary: a vocab-parallel LM head in training mode returns its shard."""
    from ...parallel.gather import gather_full
    from ...parallel.sharding import ShardSpec

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    spec = getattr(getattr(head, "weight", None), "tp_spec", None)
    if ctx.tp_group is None or spec is None or logits.shape[-1] != spec.local_size:
        return logits  # the same decision on every rank: the gather below is a collective
    full_vocab = spec.full_shape[spec.dim]
    logits_spec = ShardSpec(logits.dim() - 1, tuple(logits.shape[:-1]) + (full_vocab,), spec.tp_rank, spec.tp_size,
                            spec.segments, spec.local_size)
    return gather_full(logits, logits_spec, ctx.tp_group)


def compare_outputs(model, outputs: dict, ref: dict | None, ctx, plan) -> list[tuple]:
    """Rank 0's ``TensorDiff`` rows of the module ``outputs``, in the order the sharded model produced them.

    Full outputs (replicated, or reduced by a row-parallel layer) compare as they are; the local
    outputs of column-parallel layers are gathered first (a collective: every rank decides alike,
    from module types); other split activations (per-head norms, attention internals) are skipped."""
    from ...parallel.gather import gather_full
    from ...parallel.layers import ColumnParallelLinear
    from ...parallel.sharding import ShardSpec

    modules = dict(model.named_modules())
    rows = []
    for name, t in outputs.items():
        mod = modules[name]
        spec = getattr(getattr(mod, "weight", None), "tp_spec", None)
        if (isinstance(mod, ColumnParallelLinear) and not mod.gather_output and spec is not None
                and ctx.tp_group is not None and t.dim() >= 1 and t.shape[-1] == spec.local_size):
            out_spec = ShardSpec(t.dim() - 1, tuple(t.shape[:-1]) + (spec.full_shape[spec.dim],), spec.tp_rank,
                                 spec.tp_size, spec.segments, spec.local_size)
            t = gather_full(t.contiguous(), out_spec, ctx.tp_group)
        if ref is None:
            continue
        r = ref.get(name)
        if r is None or r.shape != t.shape:
            continue
        entry = plan.entries.get(name)
        rows.append((name, tuple(t.shape), max_abs_diff(t, r), max_abs(r), max_abs(t),
                     plan_label(entry) if entry else ""))
    return rows
