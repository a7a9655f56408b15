"""One rank's work: the unsharded reference step (rank 0), then the planned TP step (every rank), then the comparison.

Each rank joins the gloo process group while the parent plans, waits for the job, and builds the
truncated model from the shared random weights (:mod:`.weights`). The batch is ``[batch,
seq_len]`` random token ids (labels = inputs), the same on every rank (seeded).

1. Rank 0 runs one forward/backward of the unsharded model with every core while the others
   wait in a barrier, recording each module's output (:class:`_Outputs`), the logits, the loss
   and every gradient; then it clears the gradients.
2. Every rank applies the plan, exactly as training does, and runs the same step; the
   innermost module running is tracked (:class:`_ModuleStack`) to name it if the step raises.
   The TP partial-sum gradients are then reduced as the optimizer does before a step
   (``sync_partial_tp_grads``, through the context's transport).
3. The logits, the module outputs and the gradients are gathered to rank 0 and compared
   (:mod:`.compare`); rank 0 returns the rows of its report, the others ``None``.

``state`` (shared with :func:`~.workers.worker_main`) names the current stage and module and
accumulates the timings, so that a failure is reported with where it happened.
"""

from __future__ import annotations

import os
import time

from .compare import GradComparer, compare_grads, compare_outputs, full_logits, max_abs, max_abs_diff
from .weights import build_model
from .workers import wait_for_job


class _Clock:
    """Wall time per phase, added to ``timings[label]`` at each :meth:`lap`."""

    def __init__(self, timings: dict):
        self.timings = timings
        self.start = time.monotonic()

    def reset(self) -> None:
        self.start = time.monotonic()

    def lap(self, label: str) -> None:
        now = time.monotonic()
        self.timings[label] = self.timings.get(label, 0.0) + now - self.start
        self.start = now


def run_rank(rank: int, tp: int, out_dir: str, state: dict) -> dict | None:
    """Run rank ``rank`` of ``tp``; rank 0 returns its report (loss, logits, gradient and output rows)."""
    import warnings
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from ...parallel.context import ParallelContext

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    clock = _Clock(state["timings"])

    from transformers import AutoModelForCausalLM  # noqa: F401  (imported before the job arrives)

    parent = os.getppid()
    state["stage"] = "starting the process group"
    ctx = ParallelContext.from_environment(tp, use_cpu=True, timeout=timedelta(seconds=1800))
    group = ctx.tp_group
    state["stage"] = "waiting for the job"
    job = wait_for_job(out_dir, parent)
    clock.reset()
    state["stage"] = "building the model"
    model = build_model(job["config"], job["seed"], group, rank, tp, job["shm_paths"], job["threads"])
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (job["batch"], job["seq_len"]), generator=torch.Generator().manual_seed(job["seed"] + 1))
    clock.lap("build")

    ref = _reference_step(model, ids, job["threads"], state, clock) if rank == 0 else None
    if group is not None:
        dist.barrier(group=group)  # a blocking wait (the shared-memory collectives would spin)
    clock.reset()

    plan = job["plan"]  # made by the parent from the same truncated config, as plan_tensor_parallel(model) would
    out, outputs = _sharded_step(model, ids, plan, ctx, state, clock)
    loss_tp = out.loss.item()
    logits = full_logits(model, out.logits.detach(), ctx)
    del out
    output_rows = compare_outputs(model, outputs, ref["outputs"] if ref else None, ctx, plan)
    compare = compare_grads(model, ref["grads"] if ref else None, plan, group, rank, tp)
    clock.lap("gather + compare")
    if rank != 0:
        return None
    return _rank0_report(ref, loss_tp, logits, output_rows, compare, state["timings"])


def _reference_step(model, ids, threads: int, state: dict, clock: _Clock) -> dict:
    """Rank 0: one forward/backward of the unsharded model; its loss, logits, module outputs and gradients."""
    import torch

    state["stage"] = "unsharded reference step"
    torch.set_num_threads(threads)  # the other ranks wait in a barrier: use their cores
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
    clock.lap("unsharded step")
    return ref


def _sharded_step(model, ids, plan, ctx, state: dict, clock: _Clock):
    """Every rank: apply ``plan`` and run the same step; ``(model output, module outputs)``, gradients reduced."""
    from ...parallel.grads import sync_partial_tp_grads
    from ..apply import apply_tensor_parallel

    state["stage"] = "applying the plan"
    apply_tensor_parallel(model, plan, ctx)
    clock.lap("apply")
    state["stage"] = "forward of the sharded model"
    tracker, recorder = _ModuleStack(model), _Outputs(model)
    try:
        out = model(input_ids=ids, labels=ids)
    except BaseException:
        state["module"] = tracker.stack[-1] if tracker.stack else None
        raise
    finally:
        tracker.remove()
        recorder.remove()
    state["stage"] = "backward of the sharded model"
    out.loss.backward()
    state["stage"] = "reducing and gathering"
    # what the optimizer does before a step, through the same transport (the context's tp_comm where it has one)
    sync_partial_tp_grads(model.parameters(), getattr(ctx, "tp_comm", ctx.tp_group))
    clock.lap("sharded step")
    return out, recorder.outputs


def _rank0_report(ref: dict, loss_tp: float, logits, output_rows: list[tuple], compare: GradComparer,
                  timings: dict) -> dict:
    """The picklable record rank 0 sends the parent (see :func:`~.report.collect`)."""
    ref_logits = ref["logits"]
    logits_row = (tuple(ref_logits.shape), max_abs_diff(logits, ref_logits), max_abs(ref_logits), max_abs(logits))
    return {"loss_ref": ref["loss"], "loss_tp": loss_tp, "logits": logits_row, "grads": compare.rows,
            "outputs": output_rows, "missing": compare.missing(), "extra": compare.extra(),
            "timings": dict(timings)}


# ------------------------------------------------------------------------------------------ hooks
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
