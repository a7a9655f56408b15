"""Preemption: a SIGTERM or SIGUSR1 to any rank makes every rank finish its step, save a checkpoint and exit 0.

Schedulers announce the end of a job with a signal: SIGTERM (``scancel``, Kubernetes, a spot-instance
notice, torchrun's agent forwarding its own SIGTERM) or SIGUSR1 (SLURM's ``--signal=USR1@SECONDS``
before the time limit). It may reach one rank, or every rank at a different moment.

:class:`PreemptionCallback`, added to the Trainer, makes that a clean stop:

1. the signal handler only records the signal (it runs between two bytecodes of the main thread,
   maybe inside a collective's Python wrapper: nothing else is safe there);
2. at the end of every optimizer step every rank contributes its record to one all-reduce (MAX) of
   ``world_size`` int32 (slot ``r``: the signal rank ``r`` received, 0 for none), so all ranks see
   the same vector and stop at the same step even though the signal reached only some of them;
3. that step then saves (``control.should_save``, also when ``save_strategy`` is ``no``), skips
   its evaluation (the time to exit stays one step plus one save) and stops;
4. after the checkpoint is complete on every rank (``on_save``, a barrier), the process exits with
   status 0 (``SystemExit(0)``): what the script does after ``train()`` (the final ``save_model``,
   an evaluation) is for finished runs, and this one is not. The next launch resumes from the
   checkpoint (``tp_trainer.app.resume``) and continues bit for bit.

Communication: one all-reduce of ``world_size`` int32 per optimizer step on the world group (a
tensor on the training device, so NCCL runs need no gloo group), none without a process group.
The time from the signal to the exit is at most the rest of the current optimizer step, one more
step when the signal lands inside the check, and one checkpoint save; a launcher's grace period
(torchrun ``--shutdown-timeout``, SLURM's ``KillWait``) must cover it.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.utils import logging

from .parallel.collectives import naming_failures

logger = logging.get_logger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionCallback(TrainerCallback):
    """Turn ``signals`` into a checkpoint and a clean exit, agreed by every rank (see the module docstring).

    ``exit_after_save=False`` stops training after the checkpoint instead of exiting, for callers that
    want to handle it themselves (``callback.preempted_at`` then holds the step, ``None`` otherwise).
    """

    def __init__(self, signals=PREEMPTION_SIGNALS, *, exit_after_save: bool = True):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.exit_after_save = exit_after_save
        self.received = 0  # the last signal number this process received, 0 for none
        self.preempted_at: int | None = None
        self.reason = ""
        self._previous: dict = {}

    # ------------------------------------------------------------------ signal handling
    def _record(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> None:
        """Install the handlers (main thread only: Python delivers signals there); the previous ones are kept."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionCallback: training runs outside the main thread, where no signal handler can "
                           "be installed; a preemption signal will end the process without a checkpoint")
            return
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._record)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ agreement
    def agree(self, device) -> dict[int, int]:
        """``{rank: signal}`` for every rank that received one, the same on every rank (one all-reduce)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {0: self.received} if self.received else {}
        votes = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
        votes[dist.get_rank()] = self.received
        with naming_failures("the preemption check's all_reduce", dist.group.WORLD):
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return {rank: sig for rank, sig in enumerate(votes.tolist()) if sig}

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted_at is not None:
            return control
        received = self.agree(args.device)
        if received:
            self.preempted_at = state.global_step
            self.reason = ", ".join(f"{signal.Signals(sig).name} on rank {rank}" for rank, sig in received.items())
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False  # bounded time to exit: one step and one save
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.preempted_at is None:
            return control
        if dist.is_available() and dist.is_initialized():
            with naming_failures("the barrier after the preemption checkpoint", dist.group.WORLD):
                dist.barrier()  # every rank's part of the checkpoint is on disk before anyone leaves
        self.uninstall()
        message = (f"preempted ({self.reason}): saved checkpoint-{state.global_step} at step {state.global_step} of "
                   f"{state.max_steps}; the same command resumes from it")
        if args.should_log:
            logger.warning(message)
        if self.exit_after_save:
            raise SystemExit(0)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()
