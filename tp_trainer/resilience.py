"""What a training run adds to survive a shared cluster: preemption, and a named report of a lost peer.

:func:`resilience_callbacks` returns the two callbacks ``TPTrainer`` adds:

* :class:`~tp_trainer.preemption.PreemptionCallback`: SIGTERM/SIGUSR1 to any rank -> every rank
  saves and exits 0 (see that module);
* :class:`PeerFailureReport`: when the process dies of a collective that a peer never completed
  (the backend's timeout, ``--ddp_timeout``, or a closed connection), a last line names the
  operation and the peers that are not running.

Why the report: gloo's own error (``Timed out waiting 30000ms for send operation to complete``)
names neither the rank nor the operation, and a failure inside the Trainer's or accelerate's own
collectives (the loss gather at logging steps, a barrier) cannot be wrapped where it is issued.
The report is the process's exception hook: at ``on_train_begin`` every rank's host, pid and start
time are gathered once (one ``all_gather_object`` on the world group); when an uncaught exception
carries the backend's words for a missing peer, the hook prints the usual traceback, then the
failed ``torch.distributed`` operation with its first caller outside torch, and the state of every
rank on this host that is not running (``/proc``: stopped, exited). It issues no collective.
Failures in tp_trainer's own collectives are already named (``collectives.PeerFailure``).
"""

from __future__ import annotations

import socket
import sys

from transformers import TrainerCallback
from transformers.utils import logging

from .parallel.collectives import PeerFailure, group_timeout_s
from .parallel.peers import describe_peers, failed_collective, gather_identities, peer_state
from .preemption import PreemptionCallback

logger = logging.get_logger(__name__)


def resilience_callbacks() -> list[TrainerCallback]:
    """The callbacks a ``TPTrainer`` adds (``trainer.add_callback`` each)."""
    return [PreemptionCallback(), PeerFailureReport()]


class PeerFailureReport(TrainerCallback):
    """Name the operation and the peers when a collective fails for want of a peer (see the module docstring)."""

    def __init__(self):
        self.identities = None
        self._previous_hook = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.identities = gather_identities()
        if self._previous_hook is None:
            self._previous_hook = sys.excepthook
            sys.excepthook = self._hook

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()

    def uninstall(self) -> None:
        if self._previous_hook is not None and sys.excepthook == self._hook:
            sys.excepthook = self._previous_hook
        self._previous_hook = None

    def _hook(self, kind, err, tb):
        (self._previous_hook or sys.__excepthook__)(kind, err, tb)
        report = self.report(err)
        if report:
            print(f"tp_trainer: {report}", file=sys.stderr, flush=True)

    def report(self, err: BaseException) -> str | None:
        """The line for ``err``, or ``None`` when it is not a collective that lost a peer (or already says so)."""
        ours = err if isinstance(err, PeerFailure) else err.__cause__ if isinstance(err.__cause__, PeerFailure) else None
        # our own collectives name the operation and the ranks; what only the identities can add is which peer
        # is stopped or gone (and its pid)
        operation = str(ours).split(" over ranks ")[0] if ours is not None else failed_collective(err)
        if operation is None or not self.identities:
            return None
        import torch.distributed as dist

        me = dist.get_rank() if dist.is_initialized() else 0
        host = socket.gethostname()
        suspects = [r for r, (h, pid, start) in enumerate(self.identities)
                    if r != me and h == host and peer_state(pid, start) != "running"]
        elsewhere = sum(1 for h, _, _ in self.identities if h != host)
        if suspects:
            who = describe_peers(self.identities, suspects, me)
        elif ours is not None:
            return None  # every peer runs: the PeerFailure's own message says all there is
        else:
            who = "every other rank on this host is running"
        if elsewhere:
            who += f"; {elsewhere} rank(s) on other hosts cannot be inspected from here: look at their logs"
        timeout = group_timeout_s(dist.group.WORLD) if dist.is_initialized() else None
        limit = f" (the process group's timeout is {timeout:.0f} s, --ddp_timeout)" if timeout else ""
        return f"rank {me} gave up on {operation}{limit}: {who}."
