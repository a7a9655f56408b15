"""The parent's side of the check: truncate, plan, hand the job to the ranks, collect the result.

:func:`verify_plan` runs, in order: the config truncated (:mod:`.config`); the truncated model
built on the meta device and the memory the check needs compared with what is available; the
truncated model planned (with the user's plan) as ``plan_tensor_parallel`` would, while the
ranks (:mod:`.workers`, usually started earlier by the caller) import and meet; its plan compared
with the full model's per layer pattern; the job sent; the ranks' records collected into a
:class:`~.report.VerifyResult` (:func:`~.report.collect`). A failing plan never raises: it is a
FAIL or an ERROR in the result.
"""

from __future__ import annotations

import os
import time

from .config import LAYERS, VOCAB, meta_model, plan_differences, truncate_config
from .report import VerifyResult, collect
from .workers import VerifyRanks, start_ranks

BATCH, SEQ_LEN, SEED = 2, 32, 0


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
    from ..planner import plan_tensor_parallel

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
    result.setup += _setup_lines(model_type, notes, n_params, seed, batch, seq_len)
    short = _memory_shortfall(n_params)
    if short:
        return done(short)
    try:  # the ranks are importing and meeting meanwhile
        truncated_plan = plan if plan is not None else plan_tensor_parallel(meta, tp_size, user_plan=user_plan)
    except Exception as err:
        return done(f"the truncated {model_type} model cannot be planned: {type(err).__name__}: {err}")
    if plan is not None:
        result.setup.append("plan: given by the caller (not re-planned)")
    if full_plan is not None:
        result.setup.append(_plan_match_line(full_plan, truncated_plan))
    try:
        world.send(dict(config=cfg, plan=truncated_plan, tp=tp_size, batch=batch, seq_len=seq_len, seed=seed,
                        threads=max(1, min(tp_size, _cpu_count()))))
        records, timed_out = world.wait(timeout)
    finally:
        world.close()
    collect(result, records, timed_out, tp_size, timeout)
    return done()


def _setup_lines(model_type: str, notes: list[str], n_params: int, seed: int, batch: int, seq_len: int) -> list[str]:
    """The report's description of what runs: the truncation, the weights, the batch."""
    return [f"model: {model_type}, " + "; ".join(notes or ["config unchanged"]),
            (f"  random weights (seed {seed}), the real modeling code, {n_params / 1e6:.1f}M parameters; "
             f"widths and head counts unchanged"),
            f"dtype float32, batch {batch} x {seq_len} random tokens (labels = inputs), dropout off"]


def _plan_match_line(full_plan, truncated_plan) -> str:
    diffs = plan_differences(full_plan, truncated_plan)
    return ("the truncated model's plan matches the full model's plan (per layer pattern)"
            if not diffs else "WARNING: the truncated model's plan differs from the full "
            "model's, which this check does not cover there: " + "; ".join(diffs))


def _memory_shortfall(n_params: int) -> str | None:
    """Why the check cannot run in the memory available, or ``None`` if it fits (or is unknown)."""
    need, avail = _memory_need_bytes(n_params), _available_bytes()
    if avail is not None and need > avail:
        return (f"needs about {need / 2**30:.1f} GiB of memory (4 copies of the truncated model's "
                f"{n_params / 1e6:.0f}M fp32 parameters: the shared weights, the reference gradients, the "
                f"shards and their gradients), {avail / 2**30:.1f} GiB available")
    return None


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
