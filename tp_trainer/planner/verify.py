"""``tp-trainer plan MODEL --tp-size N --verify``: one real training step of the plan, on the CPU, against the unsharded model.

The meta-device check of :func:`~tp_trainer.planner.validate.validate_plan` proves that the
shapes fit; it cannot see a split that fits but computes the wrong thing (a norm fed split
activations whose gradient is not summed, a fused projection cut across heads, a gradient summed
twice). This check runs the numbers, before any GPU is rented:

1. The model's config is truncated (:func:`truncate_config`): 2 layers (one per layer type when
   the config mixes them, e.g. sliding and full attention), the vocabulary shrunk to about 1024
   with the same remainder modulo ``tp`` (so the vocab-parallel embedding and LM head are padded
   exactly when the full model's are), dropout off. Widths and head counts are kept: they decide
   the plan, and the plans of the full and the truncated model are compared per layer pattern.
   The parent plans the truncated model (with the user's plan) as ``plan_tensor_parallel`` would.
2. ``tp`` fresh interpreters run on the CPU (gloo on ``127.0.0.1``, one thread each), started
   early so that their imports overlap the parent's planning (:func:`start_ranks`). Rank 0 builds
   random fp32 weights with the real modeling code and shares them with the others through one
   mapped file (the full weights exist once, whatever ``tp``). Rank 0 runs one forward/backward of
   the unsharded model (``[2, 32]`` random tokens, labels = inputs) with every core while the
   others wait; then every rank applies the plan, exactly as training does, and runs the same step.
3. Compared on rank 0 with the unsharded run: the loss, the logits (all of the vocabulary), the
   output of every module in call order (column-parallel shards gathered; the first one that
   differs says where the forward goes wrong), and every gradient (TP partial sums reduced as the
   optimizer does, then each rank's rows gathered) with its largest difference.

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

Caveat: a MoE router whose top-k scores tie within rounding could route a token differently in
the two runs; with random weights and 64 tokens this is very unlikely, and a FAIL confined to
expert weights with a matching loss is the sign of it.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

GRAD_RTOL = 1e-4     # max |g_tp - g_ref| / max(|g_ref|, |g_tp|) per gradient tensor
LOGITS_RTOL = 1e-4   # max |z_tp - z_ref| / max |z_ref| over all logits
LOSS_RTOL = 1e-5     # |l_tp - l_ref| / |l_ref|
OUTPUT_RTOL = 1e-4   # max |y_tp - y_ref| / max(|y_ref|, |y_tp|) per module output (forward localisation)
VOCAB = 1024         # vocabulary of the truncated model (about; the remainder modulo tp is kept)
LAYERS = 2
BATCH, SEQ_LEN, SEED = 2, 32, 0
TOP = 10             # modules listed in the report
TRACEBACK_LINES = 40  # of a failed rank's traceback in the report (its innermost frames)
GRACE_S = 10.0       # after a rank failed, how long the others get to report before they are killed

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers",
                    "num_encoder_layers", "encoder_layers")


# ------------------------------------------------------------------------------- the truncated config
def _sub_configs(cfg):
    from transformers import PretrainedConfig

    return [(k, v) for k, v in vars(cfg).items() if isinstance(v, PretrainedConfig)]


def _pick_layers(types, n: int, layers: int) -> list[int]:
    """Indices of the layers to keep: the first layer of every distinct type, then the first ones."""
    picks: list[int] = []
    if isinstance(types, (list, tuple)) and len(types) == n:
        seen = set()
        for i, t in enumerate(types):
            key = repr(t)
            if key not in seen:
                seen.add(key)
                picks.append(i)
    for i in range(n):
        if len(picks) >= layers:
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks)


def truncate_config(config, tp_size: int, *, layers: int = LAYERS, vocab: int = VOCAB):
    """``(truncated copy, notes)``: ``config`` with ``layers`` layers, a ~``vocab`` vocabulary, no dropout.

    Widths and head counts are untouched. Per-layer lists (``layer_types``, ``no_rope_layers``, any
    list named ``*layer*`` as long as the layer count) keep the entries of the kept layers, index
    lists (``mlp_only_layers``) are renumbered, ``first_k_dense_replace`` becomes 1 so that both
    dense and MoE blocks are checked. Token ids beyond the new vocabulary wrap around it."""
    cfg = copy.deepcopy(config)
    notes: list[str] = []
    _truncate(cfg, tp_size, layers, vocab, notes, prefix="")
    return cfg, notes


def _truncate(cfg, tp: int, layers: int, vocab: int, notes: list[str], prefix: str) -> None:
    attrs = vars(cfg)
    counts = {k: attrs[k] for k in LAYER_COUNT_KEYS if isinstance(attrs.get(k), int) and not isinstance(attrs[k], bool)}
    n = max(counts.values(), default=0)
    if n > layers:
        picks = _pick_layers(attrs.get("layer_types"), n, layers)
        kept = len(picks)
        for key, value in counts.items():
            if value > kept:
                setattr(cfg, key, kept)
        for key, value in list(attrs.items()):
            if "layer" not in key or not isinstance(value, (list, tuple)):
                continue
            if len(value) == n:
                setattr(cfg, key, type(value)(value[i] for i in picks))
            elif value and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in value):
                setattr(cfg, key, type(value)(picks.index(i) for i in value if i in picks))
        types = attrs.get("layer_types")
        which = f" (layers {picks}: one of each type {sorted(set(map(str, types)))})" if (
            isinstance(types, (list, tuple)) and len(set(map(repr, types))) > 1) else ""
        notes.append(f"{prefix}{kept} of {n} layers{which}")
    dense = attrs.get("first_k_dense_replace")
    if isinstance(dense, int) and dense >= 1 and min(n, layers) > 1 and dense >= min(n, layers):
        cfg.first_k_dense_replace = 1
        notes.append(f"{prefix}first_k_dense_replace {dense} -> 1 (a dense and a MoE block)")
    v = attrs.get("vocab_size")
    if isinstance(v, int) and v > vocab:
        new = max(1, vocab // tp) * tp + v % tp  # same padding of the vocab-parallel layers as the full model
        cfg.vocab_size = new
        wrapped = []
        for key, value in list(attrs.items()):
            if not key.endswith(("_token_id", "_token_ids")):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value >= new:
                setattr(cfg, key, value % new)
                wrapped.append(key)
            elif isinstance(value, (list, tuple)) and any(isinstance(i, int) and i >= new for i in value):
                setattr(cfg, key, type(value)(i % new if isinstance(i, int) else i for i in value))
                wrapped.append(key)
        notes.append(f"{prefix}vocabulary {v} -> {new} (same remainder modulo tp={tp}; the embedding and LM head "
                     f"are split over it the same way)" + (f"; {', '.join(wrapped)} wrapped into it" if wrapped else ""))
    zeroed = [k for k, val in attrs.items()
              if ("dropout" in k or "pdrop" in k) and isinstance(val, float) and val > 0]
    for key in zeroed:
        setattr(cfg, key, 0.0)
    if zeroed:
        notes.append(f"{prefix}dropout off ({', '.join(zeroed)})")
    if getattr(cfg, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        notes.append(f"{prefix}attention {cfg._attn_implementation} -> sdpa (CPU)")
        cfg._attn_implementation = "sdpa"
    for key, sub in _sub_configs(cfg):
        _truncate(sub, tp, layers, vocab, notes, prefix=f"{prefix}{key}: ")


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def collapsed_entries(plan) -> dict[str, str]:
    """Pattern (layer indices as ``*``) -> style and layout, for comparing plans of different depths."""
    out = {}
    for name, e in plan.entries.items():
        out.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), f"{e.style}{e.describe_layout()}")
    for name, patch in plan.patches.items():
        out.setdefault("patch " + re.sub(r"\.\d+(?=\.|$)", ".*", name), repr((patch.attrs, patch.config, patch.hooks)))
    return out


def plan_differences(full_plan, truncated_plan, limit: int = 4) -> list[str]:
    a, b = collapsed_entries(full_plan), collapsed_entries(truncated_plan)
    diffs = [f"{k}: {a.get(k, 'absent')} in the full model, {b.get(k, 'absent')} in the truncated one"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


# ------------------------------------------------------------------------------------------ result
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


@dataclass
class VerifyResult:
    tp_size: int
    setup: list[str] = field(default_factory=list)
    loss_ref: float | None = None
    loss_tp: float | None = None
    logits: TensorDiff | None = None
    grads: list[TensorDiff] = field(default_factory=list)
    outputs: list[TensorDiff] = field(default_factory=list)  # module outputs, in the order they were produced
    missing: list[str] = field(default_factory=list)   # parameters with a reference gradient but none under TP
    extra: list[str] = field(default_factory=list)     # ... and the other way round
    failure: str | None = None       # the planned model raised: the stage, the error and the traceback
    error: str | None = None         # the check itself could not run (the unsharded model fails, no memory)
    timings: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def loss_relative(self) -> float | None:
        if self.loss_ref is None or self.loss_tp is None:
            return None
        if not (math.isfinite(self.loss_ref) and math.isfinite(self.loss_tp)):
            return math.inf
        return abs(self.loss_tp - self.loss_ref) / max(abs(self.loss_ref), 1e-12)

    def bad_grads(self) -> list[TensorDiff]:
        return [d for d in self.grads if not d.relative <= GRAD_RTOL]

    def worst_grad(self) -> TensorDiff | None:
        return max(self.grads, key=lambda d: d.relative, default=None)

    def first_bad_output(self) -> tuple[TensorDiff | None, TensorDiff | None]:
        """The first module output (in forward order) over the limit, and the last one within it before that."""
        last_good = None
        for d in self.outputs:
            if not d.relative <= OUTPUT_RTOL:
                return d, last_good
            last_good = d
        return None, last_good

    @property
    def passed(self) -> bool:
        if self.error or self.failure or self.missing or self.extra or not self.grads:
            return False
        if self.bad_grads() or self.first_bad_output()[0] is not None:
            return False
        if self.loss_relative is None or not self.loss_relative <= LOSS_RTOL:
            return False
        return self.logits is not None and self.logits.relative <= LOGITS_RTOL

    def per_module(self) -> list[TensorDiff]:
        """The worst tensor of each module, worst module first."""
        worst: dict[str, TensorDiff] = {}
        for d in self.grads:
            if d.module not in worst or d.relative > worst[d.module].relative:
                worst[d.module] = d
        return sorted(worst.values(), key=lambda d: -d.relative if not math.isnan(d.relative) else -math.inf)

    def verdict(self) -> str:
        if self.error:
            return f"verify: ERROR (the check could not run: {_first_line(self.error)})"
        if self.failure:
            return f"verify: FAIL (the planned model raised: {_first_line(self.failure)})"
        if self.passed:
            w = self.worst_grad()
            return (f"verify: PASS (largest gradient difference {w.relative:.1e} of the gradient's magnitude "
                    f"({w.max_abs_diff:.1e} absolute) at {w.name})")
        reasons = []
        first, before = self.first_bad_output()
        bad = self.bad_grads()
        rel = self.loss_relative
        loss_bad = rel is None or not rel <= LOSS_RTOL
        logits_bad = self.logits is None or not self.logits.relative <= LOGITS_RTOL
        if first is not None:  # the root cause is in the forward: everything after it follows
            after = [what for what, is_bad in (("the loss", loss_bad), ("the logits", logits_bad)) if is_bad]
            if bad:
                after.append(f"{len(bad)} of {len(self.grads)} gradients")
            reasons.append(f"the forward first differs at {first.name} ({first.relative:.2g} of its output's magnitude"
                           + (f"; {first.plan}" if first.plan else "") + ")"
                           + (f", after {before.name} matched" if before is not None else "")
                           + (f"; then {', '.join(after)} differ" if after else ""))
        else:
            if bad:
                w = max(bad, key=lambda d: d.relative)
                modules = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", d.module) for d in bad})
                reasons.append(f"gradient of {w.name} differs by {w.relative:.2g} of its magnitude "
                               f"({w.max_abs_diff:.2e} absolute; limit {GRAD_RTOL:g})"
                               + (f" [{w.plan}]" if w.plan else "")
                               + (f"; {len(bad)} gradients over the limit, in {', '.join(modules[:4])}"
                                  + (" ..." if len(modules) > 4 else "") if len(bad) > 1 else ""))
            if loss_bad:
                reasons.append(f"loss {self.loss_tp} vs {self.loss_ref} unsharded (relative {rel:.2g}, limit "
                               f"{LOSS_RTOL:g})" if rel is not None else "no loss")
            if logits_bad:
                reasons.append(f"logits differ by {self.logits.relative:.2g} of their magnitude (limit "
                               f"{LOGITS_RTOL:g})" if self.logits is not None else "no logits")
        if self.missing:
            reasons.append(f"no gradient under TP for {', '.join(self.missing[:3])}")
        if self.extra:
            reasons.append(f"gradients under TP only: {', '.join(self.extra[:3])}")
        if not self.grads:
            reasons.append("no gradient compared")
        return "verify: FAIL (" + "; ".join(reasons) + ")"

    def report(self) -> str:
        lines = [f"verification: one training step at tp={self.tp_size} ({self.tp_size} gloo processes on the CPU) "
                 f"against the unsharded model, from the same weights"]
        lines += [f"  {s}" for s in self.setup]
        if self.loss_ref is not None:
            rel = self.loss_relative
            lines.append(f"  loss: unsharded {self.loss_ref:.8f}, tp {self.loss_tp:.8f}, relative difference "
                         f"{rel:.1e} (limit {LOSS_RTOL:g})" if rel is not None else f"  loss: unsharded {self.loss_ref:.8f}")
        if self.logits is not None:
            d = self.logits
            lines.append(f"  logits {list(d.shape)}: largest difference {d.max_abs_diff:.2e} = {d.relative:.1e} of the "
                         f"largest |logit| {d.ref_max:.3g} (limit {LOGITS_RTOL:g})")
        if self.outputs:
            first, before = self.first_bad_output()
            if first is None:
                w = max(self.outputs, key=lambda d: d.relative)
                lines.append(f"  forward: the outputs of {len(self.outputs)} modules compared (column-parallel shards "
                             f"gathered), all within {OUTPUT_RTOL:g} of their magnitude (largest {w.relative:.1e} at "
                             f"{w.name})")
            else:
                lines.append(f"  forward: the outputs of {len(self.outputs)} modules compared in call order; they match "
                             + (f"up to {before.name}, " if before is not None else "nowhere: ")
                             + f"then first differ at {first.name}: {first.max_abs_diff:.2e} = {first.relative:.2g} of "
                             f"its largest |output| {first.ref_max:.3g}" + (f" [{first.plan}]" if first.plan else "")
                             + ". The fault lies there or in what runs between the two (a split, a fused layout, "
                             "patched head counts); every later difference follows from it")
        if self.grads:
            modules = self.per_module()
            lines.append(f"  gradients: {len(self.grads)} tensors of {len(modules)} modules compared; largest "
                         f"difference per module, relative to the gradient's largest |value| (limit {GRAD_RTOL:g}), "
                         f"worst {min(TOP, len(modules))}:")
            width = max(len(d.module) for d in modules[:TOP])
            lines.append(f"    {'module':<{width}}  {'tensor':<8} {'max |diff|':>10} {'max |grad|':>10} {'relative':>9}  plan")
            for d in modules[:TOP]:
                flag = "  <-- over the limit" if not d.relative <= GRAD_RTOL else ""
                lines.append(f"    {d.module:<{width}}  {d.name.rsplit('.', 1)[-1]:<8} {d.max_abs_diff:>10.2e} "
                             f"{d.ref_max:>10.2e} {d.relative:>9.1e}  {d.plan}{flag}")
        for name in self.missing:
            lines.append(f"  {name}: has a gradient in the unsharded model, none under TP")
        for name in self.extra:
            lines.append(f"  {name}: has a gradient under TP, none in the unsharded model")
        for text in (self.failure, self.error):
            if text:
                lines.append("  " + text.rstrip().replace("\n", "\n  "))
        if self.timings or self.wall_s:
            parts = [f"{k} {v:.1f} s" for k, v in self.timings.items()]
            lines.append(f"  time: {', '.join(parts)}{'; ' if parts else ''}total {self.wall_s:.1f} s")
        lines.append(self.verdict())
        return "\n".join(lines)


def _tail(text: str, lines: int) -> str:
    rows = text.splitlines()
    if len(rows) <= lines:
        return text
    return "\n".join(rows[:1] + [f"  ... ({len(rows) - lines} lines)"] + rows[-(lines - 1):])


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return text


# ------------------------------------------------------------------------------------------ parent
def verify_plan(config, tp_size: int, *, user_plan: dict | None = None, full_plan=None, layers: int = LAYERS,
                vocab: int = VOCAB, batch: int = BATCH, seq_len: int = SEQ_LEN, seed: int = SEED,
                timeout: float = 900.0, ranks: VerifyRanks | None = None, plan=None) -> VerifyResult:
    """Run the check for ``config`` (a ``PretrainedConfig``) at ``tp_size``; never raises for a failing plan.

    ``full_plan``: the plan of the full model, if already made; the truncated model's plan is
    compared with it (a difference is said in the report: the check then covers the truncated plan).
    ``ranks``: processes from :func:`start_ranks`, started earlier so that their start-up overlaps
    the caller's work (they are closed here); by default they are started here. ``plan``: check this
    :class:`~tp_trainer.planner.plan.Plan` (made, or edited, for the truncated model) instead of
    planning the truncated model with ``user_plan``."""
    from .planner import plan_tensor_parallel

    start = time.monotonic()
    result = VerifyResult(tp_size=tp_size)
    cfg, notes = truncate_config(config, tp_size, layers=layers, vocab=vocab)
    model_type = getattr(config, "model_type", type(config).__name__)

    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    world = ranks if ranks is not None else start_ranks(tp_size)
    if world.tp != tp_size:
        world.close()
        raise ValueError(f"ranks were started for tp={world.tp}, not {tp_size}")

    def done(error: str | None = None) -> VerifyResult:
        world.close()
        result.error = result.error or error
        result.wall_s = time.monotonic() - start
        return result

    try:
        meta = meta_model(cfg)
    except Exception as err:  # the truncated config cannot be built: not the plan's fault
        return done(f"the truncated {model_type} model cannot be built: {type(err).__name__}: {err}")
    n_params = sum(p.numel() for p in meta.parameters())
    result.setup.append(f"model: {model_type}, " + "; ".join(notes or ["config unchanged"]))
    result.setup.append(f"  random weights (seed {seed}), the real modeling code, {n_params / 1e6:.1f}M parameters; "
                        f"widths and head counts unchanged")
    result.setup.append(f"dtype float32, batch {batch} x {seq_len} random tokens (labels = inputs), dropout off")
    need, avail = _memory_need_bytes(n_params), _available_bytes()
    if avail is not None and need > avail:
        return done(f"needs about {need / 2**30:.1f} GiB of memory (4 copies of the truncated model's "
                    f"{n_params / 1e6:.0f}M fp32 parameters: the shared weights, the reference gradients, the "
                    f"shards and their gradients), {avail / 2**30:.1f} GiB available")
    try:  # the ranks are importing and meeting meanwhile
        truncated_plan = plan if plan is not None else plan_tensor_parallel(meta, tp_size, user_plan=user_plan)
    except Exception as err:
        return done(f"the truncated {model_type} model cannot be planned: {type(err).__name__}: {err}")
    if plan is not None:
        result.setup.append("plan: given by the caller (not re-planned)")
    if full_plan is not None:
        diffs = plan_differences(full_plan, truncated_plan)
        result.setup.append("the truncated model's plan matches the full model's plan (per layer pattern)"
                            if not diffs else "WARNING: the truncated model's plan differs from the full "
                            "model's, which this check does not cover there: " + "; ".join(diffs))
    try:
        world.send(dict(config=cfg, plan=truncated_plan, tp=tp_size, batch=batch, seq_len=seq_len, seed=seed,
                        threads=max(1, min(tp_size, _cpu_count()))))
        records, timed_out = world.wait(timeout)
    finally:
        world.close()
    _collect(result, records, timed_out, tp_size, timeout)
    return done()


def _memory_need_bytes(n_params: int) -> int:
    """Peak, in copies of the fp32 weights: the shared full weights (1), rank 0's private copy while
    it fills them, then its reference gradients (1), every rank's shards and their gradients (2 in
    all); plus 20% for activations, gathers and the processes themselves."""
    return int(1.2 * 4 * n_params * 4)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(tp_size: int) -> VerifyRanks:
    """Start the ``tp_size`` processes of a check now (they import torch and meet, then wait for
    :func:`verify_plan`); ``close()`` them if the check is not run."""
    return VerifyRanks(tp_size).start()


class VerifyRanks:
    """The ``tp`` ranks: started at once (fresh interpreters, one thread each), given the job later.

    The ranks are ``python -c`` processes (the spawn start method without multiprocessing's
    re-import of the caller's ``__main__``: the check works from any script, guarded or not).
    They import torch and transformers and join the process group while the parent plans, then
    wait for ``job.pkl``. :meth:`wait` gives a failed rank's peers :data:`GRACE_S` to report, then
    kills what is left; :meth:`close` kills and cleans up in any case. Each rank's
    output goes to a log whose tail is reported if it dies without a report."""

    def __init__(self, tp: int):
        self.tp = tp
        self.procs, self.logs = [], []
        self.failed_at = None
        self._tmp = None

    def start(self) -> VerifyRanks:
        import subprocess

        import tp_trainer

        self._tmp = tempfile.TemporaryDirectory(prefix="tp-trainer-verify-")
        self.out_dir = self._tmp.name
        self.shm_paths = (os.path.join("/dev/shm", f"tp_trainer_verify_{os.getpid()}_{os.urandom(6).hex()}"),
                          os.path.join(self.out_dir, "weights.bin"))
        root = os.path.dirname(os.path.dirname(os.path.abspath(tp_trainer.__file__)))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        port = _free_port()
        code = "import sys; from tp_trainer.planner.verify import _worker; _worker(*sys.argv[1:])"
        try:
            for r in range(self.tp):
                log = open(os.path.join(self.out_dir, f"rank{r}.log"), "wb")
                self.logs.append(log)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", code, str(r), str(self.tp), str(port), self.out_dir],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        except BaseException:
            self.close()
            raise
        return self

    def send(self, job: dict) -> None:
        _write_atomic(os.path.join(self.out_dir, "job.pkl"), dict(job, shm_paths=self.shm_paths))

    def wait(self, timeout: float) -> tuple[dict[int, dict], bool]:
        deadline, timed_out = time.monotonic() + timeout, False
        while any(p.poll() is None for p in self.procs):
            if all(os.path.exists(os.path.join(self.out_dir, f"rank{r}.ok")) for r in range(self.tp)):
                break  # every rank reported: their exits are not waited for
            now = time.monotonic()
            failed = any(p.poll() not in (None, 0) for p in self.procs) or any(
                os.path.exists(os.path.join(self.out_dir, f"rank{r}.err")) for r in range(self.tp))
            if failed:
                self.failed_at = self.failed_at or now
                if now - self.failed_at > GRACE_S:
                    break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.1)
        self._stop()
        return {r: self._record(r, p, timed_out) for r, p in enumerate(self.procs)}, timed_out

    def _record(self, r: int, p, timed_out: bool) -> dict:
        for suffix in ("err", "ok"):
            path = os.path.join(self.out_dir, f"rank{r}.{suffix}")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return pickle.load(f)
        with open(os.path.join(self.out_dir, f"rank{r}.log"), "rb") as f:
            tail = f.read().decode(errors="replace").strip().splitlines()[-20:]
        how = ("killed after another rank failed" if p.returncode == -9 and (self.failed_at or timed_out)
               else f"exited with code {p.returncode}")
        return {"ok": False, "stage": "unknown", "time": math.inf, "module": None,
                "error": f"rank {r} {how} without a report" + ("; its output ends with:\n" + "\n".join(tail)
                                                                  if tail else "")}

    def _stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in self.logs:
            if not log.closed:
                log.close()
        for path in self.shm_paths:  # rank 0 unlinks the shared weights once mapped, unless a rank died first
            if os.path.exists(path) and not os.path.islink(path):
                os.unlink(path)

    def close(self) -> None:
        """Kill what is left and remove the files; idempotent."""
        if self._tmp is not None:
            self._stop()
            self._tmp.cleanup()
            self._tmp = None


def _write_atomic(path: str, record) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
    with open(tmp, "wb") as f:
        pickle.dump(record, f)
    os.replace(tmp, path)


# Stages whose failure is the plan's (FAIL) and the ones before the plan is used (ERROR).
PLAN_STAGES = ("applying the plan", "forward of the sharded model",
               "backward of the sharded model", "reducing and gathering")


def _collect(result: VerifyResult, records: dict[int, dict], timed_out: bool, tp: int, timeout: float) -> None:
    failures = sorted(((r, rec) for r, rec in records.items() if not rec.get("ok")), key=lambda x: x[1]["time"])
    if timed_out and not failures:
        result.error = f"the {tp} processes did not finish within {timeout:.0f} s"
        return
    if failures:
        rank, rec = failures[0]  # the first to fail; the others usually failed because it left
        where = f" in {rec['module']}" if rec.get("module") else ""
        text = (f"rank {rank}, {rec['stage']}{where}: {_first_line(rec['error'].splitlines()[-1] if rec['error'] else '')}"
                f"\n{_tail(rec['error'].rstrip(), TRACEBACK_LINES)}")
        others = [f"rank {r}: {rec2['stage']}: {_first_line(rec2['error'].strip().splitlines()[-1])}"
                  for r, rec2 in failures[1:] if rec2.get("error")]
        if others:
            text += "\nthen: " + "; ".join(others)
        if rec["stage"] in PLAN_STAGES:
            result.failure = text
        else:
            result.error = text
        partial = records.get(0, {}).get("partial") or {}
        result.timings.update(partial.get("timings", {}))
        return
    rep = records[0]["result"]
    result.loss_ref, result.loss_tp = rep["loss_ref"], rep["loss_tp"]
    result.logits = TensorDiff("logits", *rep["logits"])
    result.grads = [TensorDiff(*row) for row in rep["grads"]]
    result.missing, result.extra = rep["missing"], rep["extra"]
    result.timings.update(rep["timings"])
    result.outputs = [TensorDiff(*row) for row in rep["outputs"]]


# ------------------------------------------------------------------------------------------ worker
def _first_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class _Outputs:
    """Forward hooks keeping each module's (first) floating-point output, in the order the modules finish."""

    def __init__(self, model):
        self.outputs: dict = {}
        self.handles = [mod.register_forward_hook(self._hook(name)) for name, mod in model.named_modules() if name]

    def _hook(self, name):
        def hook(module, args, output):
            t = _first_tensor(output)
            if t is not None and t.is_floating_point() and name not in self.outputs:
                self.outputs[name] = t.detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _compare_outputs(model, recorder: _Outputs, ref: dict | None, ctx, plan) -> list[tuple]:
    """Rank 0's ``TensorDiff`` rows of the module outputs, in the order the sharded model produced them.

    Full outputs (replicated, or reduced by a row-parallel layer) compare as they are; the local
    outputs of column-parallel layers are gathered first (a collective: every rank decides alike,
    from module types); other split activations (per-head norms, attention internals) are skipped."""
    from ..parallel.gather import gather_full
    from ..parallel.layers import ColumnParallelLinear
    from ..parallel.sharding import ShardSpec

    modules = dict(model.named_modules())
    rows = []
    for name, t in recorder.outputs.items():
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
        rows.append((name, tuple(t.shape), _max_abs_diff(t, r), _max_abs(r), _max_abs(t),
                     f"{entry.style}{entry.describe_layout()} ({entry.source})" if entry else ""))
    return rows


class _ModuleStack:
    """Forward hooks that remember the innermost module running (named in a runtime failure)."""

    def __init__(self, model):
        self.stack: list[str] = []
        self.last_failed: str | None = None
        self.handles = []
        for name, mod in model.named_modules():
            if name:
                self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
                self.handles.append(mod.register_forward_hook(self._leave(name)))

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            while self.stack and self.stack.pop() != name:
                pass
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _worker(rank, tp, port, out_dir: str) -> None:
    """One rank (started by :class:`VerifyRanks`): its report, or its traceback, goes to ``out_dir``."""
    rank, tp = int(rank), int(tp)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(tp), "LOCAL_WORLD_SIZE": str(tp),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    state = {"stage": "starting", "module": None, "timings": {}}
    try:
        result = _rank_main(rank, tp, out_dir, state)
        _write_atomic(os.path.join(out_dir, f"rank{rank}.ok"), {"ok": True, "result": result})
        sys.stdout.flush()
        os._exit(0)  # nothing left to do: no interpreter and process-group teardown (seconds on a busy host)
    except BaseException:
        _write_atomic(os.path.join(out_dir, f"rank{rank}.err"),
                      {"ok": False, "stage": state["stage"], "module": state["module"], "error": traceback.format_exc(),
                       "time": time.time(), "partial": {"timings": state["timings"]}})
        os._exit(1)  # close the connections now: the peers' collectives fail instead of waiting


def _wait_for_job(out_dir: str, parent: int) -> dict:
    path = os.path.join(out_dir, "job.pkl")
    while not os.path.exists(path):
        if os.getppid() != parent:
            raise SystemExit("tp-trainer plan --verify: the parent process is gone")
        time.sleep(0.02)
    with open(path, "rb") as f:
        return pickle.load(f)


def _rank_main(rank: int, tp: int, out_dir: str, state: dict) -> dict | None:
    import warnings
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from ..parallel.context import ParallelContext
    from ..parallel.grads import sync_partial_tp_grads
    from .apply import apply_tensor_parallel

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    timings = state["timings"]
    clock = [time.monotonic()]

    def stage(name):
        state["stage"] = name

    def lap(label):
        now = time.monotonic()
        timings[label] = timings.get(label, 0.0) + now - clock[0]
        clock[0] = now

    from transformers import AutoModelForCausalLM  # noqa: F401  (imported before the job arrives)

    parent = os.getppid()
    stage("starting the process group")
    ctx = ParallelContext.from_environment(tp, use_cpu=True, timeout=timedelta(seconds=1800))
    group = ctx.tp_group
    stage("waiting for the job")
    job = _wait_for_job(out_dir, parent)
    clock[0] = time.monotonic()
    stage("building the model")
    model = _build_model(job["config"], job["seed"], group, rank, tp, job["shm_paths"], job["threads"])
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (job["batch"], job["seq_len"]), generator=torch.Generator().manual_seed(job["seed"] + 1))
    lap("build")

    ref = None
    if rank == 0:
        stage("unsharded reference step")
        torch.set_num_threads(job["threads"])  # the other ranks wait in a barrier: use their cores
        recorder = _Outputs(model)
        out = model(input_ids=ids, labels=ids)
        recorder.remove()
        out.loss.backward()
        ref = {"loss": out.loss.item(), "logits": out.logits.detach().clone(), "outputs": recorder.outputs,
               "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
        for p in model.parameters():
            p.grad = None
        del out
        torch.set_num_threads(1)
        lap("unsharded step")
    if group is not None:
        dist.barrier(group=group)  # a blocking wait (the shared-memory collectives would spin)
    clock[0] = time.monotonic()

    plan = job["plan"]  # made by the parent from the same truncated config, as plan_tensor_parallel(model) would
    stage("applying the plan")
    apply_tensor_parallel(model, plan, ctx)
    lap("apply")
    stage("forward of the sharded model")
    tracker, recorder = _ModuleStack(model), _Outputs(model)
    try:
        out = model(input_ids=ids, labels=ids)
    except BaseException:
        state["module"] = tracker.stack[-1] if tracker.stack else None
        raise
    finally:
        tracker.remove()
        recorder.remove()
    stage("backward of the sharded model")
    out.loss.backward()
    stage("reducing and gathering")
    # what the optimizer does before a step, through the same transport (the context's tp_comm where it has one)
    sync_partial_tp_grads(model.parameters(), getattr(ctx, "tp_comm", group))
    lap("sharded step")
    loss_tp = out.loss.item()
    logits = _full_logits(model, out.logits.detach(), ctx)
    del out
    outputs = _compare_outputs(model, recorder, ref["outputs"] if ref else None, ctx, plan)

    entries = {name: f"{e.style}{e.describe_layout()} ({e.source})" for name, e in plan.entries.items()}
    compare = _Comparer(ref["grads"] if ref else None, entries, tp)
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
            pairs = []
            for r, part in enumerate(parts):  # each rank's held rows (padding excluded) against the same rows
                offset = 0
                for start, length in spec.segments[r]:
                    pairs.append((part.narrow(spec.dim, offset, length), (spec.dim, start, length)))
                    offset += length
            compare.add(name, pairs)
    lap("gather + compare")
    if rank != 0:
        return None
    ref_logits = ref["logits"]
    logits_row = (tuple(ref_logits.shape), _max_abs_diff(logits, ref_logits), _max_abs(ref_logits), _max_abs(logits))
    return {"loss_ref": ref["loss"], "loss_tp": loss_tp, "logits": logits_row, "grads": compare.rows,
            "outputs": outputs,
            "missing": sorted(set(compare.ref) - compare.seen), "extra": sorted(compare.seen - set(compare.ref)),
            "timings": dict(timings)}


def _build_model(config, seed: int, group, rank: int, tp: int, shm_paths: tuple[str, str], threads: int = 1):
    """The truncated model with random fp32 weights, built once and mapped by every rank.

    Rank 0 initialises it: constructed without torch's default initialisation, then initialised
    once by the model's own ``initialize_weights`` (what ``from_pretrained`` does for missing
    weights); a parameter that init leaves unset (pre-filled with NaN to tell) sends it back to a
    plain ``from_config``. Its parameters and buffers are then copied into one shared file and
    every rank (rank 0 included) points its tensors at that file: the full weights exist once in
    memory whatever ``tp`` is, every rank sees the same bits, and the other ranks only construct
    the (uninitialised, untouched) modules. The file is unlinked once all ranks mapped it; the
    sharded layers copy their shards out of it as usual."""
    import hashlib

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    def construct(initialise: bool):
        if initialise:
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        from transformers import initialization as hf_init

        with hf_init.no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if hasattr(model, "tie_weights"):  # as from_config ties them: the same tensors on every rank
            model.tie_weights()
        return model

    model = construct(False)
    if rank == 0:
        torch.set_num_threads(threads)  # the other ranks wait for the weights: their cores are free
        try:
            for p in model.parameters():
                if p.is_floating_point():
                    p.data.fill_(math.nan)  # what initialize_weights leaves unset stays NaN
            for mod in model.modules():
                for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
                    if hasattr(t, "_is_hf_initialized"):
                        del t._is_hf_initialized
                if hasattr(mod, "_is_hf_initialized"):
                    del mod._is_hf_initialized
            torch.manual_seed(seed)
            model.initialize_weights()
            if hasattr(model, "tie_weights"):
                model.tie_weights()
            # a NaN left anywhere makes the sum NaN (one pass, no temporary of the weights' size)
            complete = all(math.isfinite(float(p.detach().sum())) for p in model.parameters() if p.is_floating_point())
        except Exception:  # an older transformers, a model without initialize_weights
            complete = False
        if not complete:
            model = construct(True)
    slots = _tensor_slots(model)
    total = max((off + nbytes for _, off, nbytes, _ in slots), default=0)
    digest = hashlib.sha1(repr([(off, tuple(t.shape), str(t.dtype)) for t, off, _, _ in slots]).encode()).hexdigest()
    if group is not None:
        digests = [None] * tp
        dist.all_gather_object(digests, digest, group=group)
        if len(set(digests)) != 1:
            raise RuntimeError("the ranks constructed models with different parameters and buffers from one config")
    chosen = [None]
    if rank == 0:
        chosen[0] = _create_shared_file(shm_paths, max(total, 1))
        buf = torch.from_file(chosen[0], shared=True, size=max(total, 1), dtype=torch.uint8)
        for tensor, off, nbytes, _ in slots:
            view = _view(buf, off, tensor)
            view.copy_(tensor.detach())
        torch.set_num_threads(1)
    if group is not None:
        dist.broadcast_object_list(chosen, src=0, group=group)
    if rank != 0:
        buf = torch.from_file(chosen[0], shared=True, size=max(total, 1), dtype=torch.uint8)
    for tensor, off, nbytes, owners in slots:
        view = _view(buf, off, tensor)
        for mod, kind, name in owners:
            if kind == "param":
                getattr(mod, name).data = view
            else:
                mod._buffers[name] = view
    if group is not None:
        dist.barrier(group=group)
    if rank == 0:
        os.unlink(chosen[0])  # the mappings stay; nothing is left behind
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    model.train()
    return model


def _tensor_slots(model):
    """``(tensor, byte offset, bytes, [(module, "param"|"buffer", name), ...])`` of every distinct
    parameter and buffer, in module order, 64-byte aligned."""
    slots, index, off = [], {}, 0
    for mod in model.modules():
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) in index:
                    slots[index[id(t)]][3].append((mod, kind, name))
                    continue
                nbytes = t.numel() * t.element_size()
                index[id(t)] = len(slots)
                slots.append((t, off, nbytes, [(mod, kind, name)]))
                off += -(-nbytes // 64) * 64
    return slots


def _view(buf, off: int, like):
    import torch

    nbytes = like.numel() * like.element_size()
    return buf[off:off + nbytes].view(like.dtype).view(like.shape) if nbytes else torch.empty_like(like)


def _create_shared_file(paths: tuple[str, str], nbytes: int) -> str:
    """A new owner-only file of ``nbytes`` reserved bytes: in ``/dev/shm`` (memory) when it has the
    room, else in the run's temporary directory (page cache). Reserving now avoids a SIGBUS on a
    full tmpfs (Docker's default ``/dev/shm`` is 64 MB)."""
    for path in paths:
        if not os.path.isdir(os.path.dirname(path)):
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:
            continue
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return path
        except OSError:
            os.unlink(path)
        finally:
            os.close(fd)
    raise OSError(f"no room for the {nbytes / 2**30:.1f} GiB of shared weights in {' or '.join(paths)}")


class _Comparer:
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
            tp_max = max(tp_max, _max_abs(piece))
        module = name.rsplit(".", 1)[0]
        self.rows.append((name, tuple(ref.shape), worst, _max_abs(ref), tp_max, self.entries.get(module, "not in the plan")))
        self.ref[name] = ref.new_empty(0)  # free the reference gradient; the name stays for missing/extra

    def _max_abs_diff(self, a, b) -> float:
        if a.shape != b.shape:
            return math.inf
        if not a.numel():
            return 0.0
        import torch

        buf = self._buffer("_scratch", a.numel(), a)[: a.numel()].view(a.shape)
        torch.sub(a, b, out=buf)
        return _max_abs(buf)


def _max_abs(t) -> float:
    if not t.numel():
        return 0.0
    lo, hi = t.detach().aminmax()  # no temporary of t's size
    value = max(-float(lo), float(hi))
    return value if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def _max_abs_diff(a, b) -> float:
    if a.shape != b.shape:
        return math.inf
    return _max_abs(a.detach() - b.detach()) if a.numel() else 0.0


def _full_logits(model, logits, ctx):
    """The logits over the whole vocabulary: a vocab-parallel LM head in training mode returns its shard."""
    from ..parallel.gather import gather_full
    from ..parallel.sharding import ShardSpec

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    spec = getattr(getattr(head, "weight", None), "tp_spec", None)
    if ctx.tp_group is None or spec is None or logits.shape[-1] != spec.local_size:
        return logits  # the same decision on every rank: the gather below is a collective
    full_vocab = spec.full_shape[spec.dim]
    logits_spec = ShardSpec(logits.dim() - 1, tuple(logits.shape[:-1]) + (full_vocab,), spec.tp_rank, spec.tp_size,
                            spec.segments, spec.local_size)
    return gather_full(logits, logits_spec, ctx.tp_group)
